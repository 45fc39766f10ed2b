"""Symmetric degree-2 lifting of rows: ``<phi(x), phi(y)> = <x, y>^2``.

Used for exact p = 4 and the moment state of values (docs/theory.md, "General p", proof 16, and
"Values and exact outputs").
"""

from __future__ import annotations

import ctypes
from typing import Any

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


# ---------------------------------------------------------------------- the moment fold: S += phi(X)^T V
_dgemm: Any = None


def dgemm_function() -> Any:
    """SciPy's Cython-BLAS ``dgemm`` as a ctypes function (looked up once, on first use), passed to
    :func:`fold_features` as an argument so that the kernel stays in numba's on-disk cache."""
    global _dgemm
    if _dgemm is None:
        from numba.extending import get_cython_function_address

        address = get_cython_function_address("scipy.linalg.cython_blas", "dgemm")
        pointer = ctypes.c_void_p
        _dgemm = ctypes.CFUNCTYPE(None, *([pointer] * 13))(address)
    return _dgemm


@numba.njit(nogil=True, cache=True)
def feature_pairs(d):  # pragma: no cover - compiled
    """``(a, b)`` of every lifted feature, in the order of :func:`lift_degree2`'s columns."""
    D = d * (d + 1) // 2
    ia = np.empty(D, dtype=np.int64)
    ib = np.empty(D, dtype=np.int64)
    col = 0
    for a in range(d):
        for b in range(a, d):
            ia[col] = a
            ib[col] = b
            col += 1
    return ia, ib


@numba.njit(nogil=True, cache=True, inline="always")
def _piece_product(XT, V, ia, ib, f0, nf, s, k, buf, C, accumulate, dgemm):  # pragma: no cover
    """``C (+)= phi(X_piece)[:, f0:f0+nf]^T V_piece`` for the rows ``s .. s+k-1``: their features are lifted into
    ``buf`` (feature-major, ``nf * k`` floats), then one BLAS ``dgemm`` (``C`` is ``(nf, dv)``, C-contiguous).
    Features are lifted as in :func:`lift_degree2` (``(sqrt(2) x_a) x_b`` off the diagonal)."""
    dv = V.shape[1]
    root2 = np.sqrt(2.0)
    for c in range(nf):
        a = ia[f0 + c]
        b = ib[f0 + c]
        o = c * k
        if a == b:
            for j in range(k):
                x = XT[a, s + j]
                buf[o + j] = x * x
        else:
            for j in range(k):
                buf[o + j] = (root2 * XT[a, s + j]) * XT[b, s + j]
    # column-major view: C^T (dv, nf) = V_p^T (dv, k) @ buf (k, nf)
    flags = np.array([ord("N"), ord("N")], dtype=np.uint8)
    sizes = np.array([dv, nf, k, dv, k, dv], dtype=np.int32)
    alpha = np.ones(1)
    beta = np.ones(1) if accumulate else np.zeros(1)
    dgemm(
        flags[0:].ctypes,
        flags[1:].ctypes,
        sizes[0:].ctypes,
        sizes[1:].ctypes,
        sizes[2:].ctypes,
        alpha.ctypes,
        V[s:].ctypes,
        sizes[3:].ctypes,
        buf.ctypes,
        sizes[4:].ctypes,
        beta.ctypes,
        C.ctypes,
        sizes[5:].ctypes,
    )


@numba.njit(nogil=True, cache=True, inline="always")
def _add_rows_compensated(hi, lo, f0, C):  # pragma: no cover - compiled
    """``hi + lo += C`` on the rows ``f0 .. f0 + len(C) - 1`` of the state, renormalised: two-sum of ``hi`` and
    ``C``, its error into ``lo``, then a two-sum of ``hi`` and ``lo``, so ``hi`` is left the rounded value of
    ``hi + lo`` (readers may take ``hi`` for the state) and ``lo`` the remainder.  No fastmath."""
    nf, dv = C.shape
    for i in range(nf):
        for j in range(dv):
            x = C[i, j]
            h = hi[f0 + i, j]
            t = h + x
            bp = t - h
            e = lo[f0 + i, j] + ((h - (t - bp)) + (x - bp))
            s = t + e
            bq = s - t
            lo[f0 + i, j] = (t - (s - bq)) + (e - bq)
            hi[f0 + i, j] = s


@numba.njit(nogil=True, cache=True)
def fold_features(XT, V, ia, ib, f0, f1, piece, group, buf, C, hi, lo, dgemm):  # pragma: no cover
    """``hi + lo += phi(X)^T V`` for the lifted features ``f0 .. f1-1`` only (rows ``f0 .. f1-1`` of the state).

    ``XT`` is ``X^T`` (d, m), ``V`` the values (m, dv, C-contiguous), ``hi`` and ``lo`` the compensated state
    (D, dv, C-contiguous).  The rows are taken ``piece`` at a time: the piece's features are lifted into
    ``buf`` (feature-major, ``(f1 - f0) * piece`` floats: a block that stays in cache, written once, never
    allocated here) and multiplied by the piece's values with one BLAS ``dgemm`` into ``C``
    (``(f1 - f0, dv)``), which accumulates ``group`` pieces before it is added to ``(hi, lo)`` with Knuth's
    two-sum.  ``C`` is then :func:`lift_degree2`'s ``lift(X).T @ V`` of those rows.  Serial; callers run
    disjoint feature ranges on several threads (each with its own ``buf`` and ``C``), and the result does not
    depend on how.  :func:`features_product` then :func:`add_product` add the same to the state up to the
    rounding of the products (they cut the BLAS calls differently).
    """
    m = XT.shape[1]
    nf = f1 - f0
    n_pieces = (m + piece - 1) // piece
    for p in range(n_pieces):
        s = p * piece
        _piece_product(XT, V, ia, ib, f0, nf, s, min(piece, m - s), buf, C, p % group != 0, dgemm)
        if (p + 1) % group == 0 or p == n_pieces - 1:
            _add_rows_compensated(hi, lo, f0, C)


@numba.njit(nogil=True, cache=True)
def features_product(XT, V, ia, ib, block, buf, C, dgemm):  # pragma: no cover - compiled
    """``C = phi(X)^T V`` (``C`` of shape ``(D, dv)``) for a few rows (``XT`` is ``X^T``): the product a fold of
    these rows (at most ``fold_features``'s ``piece``) adds to the state, computed without touching the state,
    ``block`` lifted features per BLAS ``dgemm`` in one compiled call (``buf``: ``block * m`` floats)."""
    D = C.shape[0]
    m = XT.shape[1]
    for f0 in range(0, D, block):
        f1 = min(D, f0 + block)
        _piece_product(XT, V, ia, ib, f0, f1 - f0, 0, m, buf, C[f0:f1], False, dgemm)


@numba.njit(nogil=True, cache=True)
def add_product(hi, lo, C):  # pragma: no cover - compiled
    """``hi + lo += C`` (shape (D, dv)), by the two-sum and renormalisation of :func:`fold_features`."""
    _add_rows_compensated(hi, lo, 0, C)
