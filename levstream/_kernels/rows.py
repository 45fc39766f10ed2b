"""Row-wise reductions used while streaming keys.

Serial on purpose: they run between BLAS-3 Gram updates, and a parallel numba region (OpenMP threading
layer) leaves spinning threads that slow the next multithreaded BLAS call on a 2-core machine.  One pass
over a block that is still in the last-level cache (right after its Gram update) costs ~0.07 ms for
8192 x 64.
"""

from __future__ import annotations

import numba
import numpy as np

from .._config import FASTMATH


@numba.njit(nogil=True, cache=True, fastmath=FASTMATH)
def scaled_sq_norms(X, scale):  # pragma: no cover - compiled
    """``sum_j (X[i, j] * scale[j])**2`` for every row ``i`` of the C-contiguous float64 matrix ``X``."""
    n, d = X.shape
    out = np.empty(n, dtype=np.float64)
    for i in range(n):
        acc = 0.0
        for j in range(d):
            v = X[i, j] * scale[j]
            acc += v * v
        out[i] = acc
    return out


@numba.njit(nogil=True, cache=True)
def sq_norm(x):  # pragma: no cover - compiled
    """``sum x_j**2`` of a 1-D float64 row: nan/inf when the row has a nan/inf or its squares overflow.

    (No fastmath here: the result must stay non-finite for non-finite input.  Compiled code also raises no
    floating-point warnings, unlike ``x @ x``.)
    """
    acc = 0.0
    for j in range(x.shape[0]):
        acc += x[j] * x[j]
    return acc


@numba.njit(nogil=True, cache=True)
def largest_sq_norm(x, y, z):  # pragma: no cover - compiled
    """:func:`sq_norm` of three rows in one call (a decode step's key, query and value): the largest of the three,
    or nan/inf when any row has a nan/inf or squares that overflow."""
    a, b, c = sq_norm(x), sq_norm(y), sq_norm(z)
    if not (a < np.inf and b < np.inf and c < np.inf):
        return np.inf
    return max(a, b, c)


@numba.njit(nogil=True, cache=True)
def copy_rows_sq(dst, start, X):  # pragma: no cover - compiled
    """``dst[:, start:start + m] = X`` for stacked rows ``X`` (heads, m, width) and the sum of all their squares
    in the same pass: nan/inf when a row has a nan/inf or its squares overflow (no fastmath, as :func:`sq_norm`)."""
    H, m, w = X.shape
    acc = 0.0
    for h in range(H):
        for i in range(m):
            for j in range(w):
                v = X[h, i, j]
                dst[h, start + i, j] = v
                acc += v * v
    return acc


@numba.njit(nogil=True, cache=True, inline="always")
def _moment_term(x, v, power):  # pragma: no cover - compiled
    """``||x||^(2 power) max_c |v_c|`` (inf when it overflows; nan/inf for a non-finite row)."""
    kk = 0.0
    for a in range(x.shape[0]):
        xa = np.float64(x[a])  # float32 rows widened: their squares never overflow
        kk += xa * xa
    if power == 2:
        kk *= kk
    vm = 0.0
    for c in range(v.shape[0]):
        vm = max(vm, abs(v[c]))
    return kk * vm


@numba.njit(nogil=True, cache=True)
def first_moment_overflow(X, V, power):  # pragma: no cover - compiled
    """The first row ``i`` whose moment-state terms may overflow float64: ``||X_i||^(2 power) max_c |V_ic|`` is not
    finite (it bounds every term ``k_a k_b v_c`` of the state, and with ``power = 2`` every term of the state over
    lifted keys); -1 when no row's does."""
    for i in range(X.shape[0]):
        if not _moment_term(X[i], V[i], power) < np.inf:
            return i
    return -1


@numba.njit(nogil=True, cache=True)
def moment_row_fits(x, v, power):  # pragma: no cover - compiled
    """:func:`first_moment_overflow` of one row (a decode step's): whether its terms fit."""
    return _moment_term(x, v, power) < np.inf


@numba.njit(nogil=True, cache=True)
def decode_rows_fit(k, q, v, moments):  # pragma: no cover - compiled
    """Whether a decode step's key, query and value rows need no further check: finite, with squares that do not
    overflow (:func:`largest_sq_norm`), and, with a moment state (``moments``), terms that fit it
    (:func:`moment_row_fits` of degree 2).  False sends the step to the path that validates and explains."""
    if not largest_sq_norm(k, q, v) < np.inf:
        return False
    return not moments or _moment_term(k, v, 1) < np.inf
