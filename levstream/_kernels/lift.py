"""Symmetric degree-2 lifting of rows: ``<phi(x), phi(y)> = <x, y>^2``.

Used for exact p = 4 and the moment state of values (docs/theory.md, "General p", proof 16, and
"Values and exact outputs").
"""

from __future__ import annotations

import numba
import numpy as np

from .._config import FASTMATH


def _lift_degree2(X):  # pragma: no cover - compiled
    """``phi(x) = (x_a x_b)_{a <= b}`` with off-diagonal monomials scaled by ``sqrt(2)``, row by row.

    Output shape ``(n, d (d + 1) / 2)``, columns ordered ``(0,0), (0,1), ..., (0,d-1), (1,1), ...``.
    """
    n, d = X.shape
    D = d * (d + 1) // 2
    out = np.empty((n, D), dtype=np.float64)
    root2 = np.sqrt(2.0)
    for i in numba.prange(n):
        col = 0
        for a in range(d):
            xa = X[i, a]
            out[i, col] = xa * xa
            col += 1
            s = root2 * xa
            for b in range(a + 1, d):
                out[i, col] = s * X[i, b]
                col += 1
    return out


# A separate copy on purpose: compiling _lift_degree2 a second time (serial) with cache=True shares its
# cache entry with the parallel build, and every serial call then cost ~3 ms instead of ~3 us (measured).
def _lift_rows(X):  # pragma: no cover - compiled
    """The same lifting as :func:`_lift_degree2`, serial (a few rows)."""
    n, d = X.shape
    D = d * (d + 1) // 2
    out = np.empty((n, D), dtype=np.float64)
    root2 = np.sqrt(2.0)
    for i in range(n):
        col = 0
        for a in range(d):
            xa = X[i, a]
            out[i, col] = xa * xa
            col += 1
            s = root2 * xa
            for b in range(a + 1, d):
                out[i, col] = s * X[i, b]
                col += 1
    return out


#: Parallel over rows (large blocks); ``lift_rows`` is the same loop, serial, for a few rows (a parallel region
#: costs more to start than a few rows take).
lift_degree2 = numba.njit(parallel=True, nogil=True, cache=True, fastmath=FASTMATH)(_lift_degree2)
lift_rows = numba.njit(nogil=True, cache=True, fastmath=FASTMATH)(_lift_rows)
