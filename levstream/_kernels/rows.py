"""Row-wise reductions used while streaming keys."""

from __future__ import annotations

import numba
import numpy as np

from .._config import FASTMATH


@numba.njit(parallel=True, nogil=True, cache=True, fastmath=FASTMATH)
def row_sq_norms(X):  # pragma: no cover - compiled
    """Squared Euclidean norm of every row of the C-contiguous float64 matrix ``X``."""
    n, d = X.shape
    out = np.empty(n, dtype=np.float64)
    for i in numba.prange(n):
        acc = 0.0
        for j in range(d):
            acc += X[i, j] * X[i, j]
        out[i] = acc
    return out


@numba.njit(parallel=True, nogil=True, cache=True, fastmath=FASTMATH)
def scaled_row_sq_norms(X, scale):  # pragma: no cover - compiled
    """``sum_j (X[i, j] * scale[j])**2`` for every row ``i``."""
    n, d = X.shape
    out = np.empty(n, dtype=np.float64)
    for i in numba.prange(n):
        acc = 0.0
        for j in range(d):
            v = X[i, j] * scale[j]
            acc += v * v
        out[i] = acc
    return out
