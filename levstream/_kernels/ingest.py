"""Compiled passes of the ingest path (p = 2): one pass per slab of keys for everything but the Gram update.

A *slab* is a run of consecutive key rows (about 1024) of one processing block.  For each slab the caller
computes the Gram update ``X^T X`` with NumPy (BLAS ``syrk``; its trace, the sum of all squares, is the
finiteness check: non-finite iff the slab holds a nan/inf or squares that overflow) and calls
:func:`slab_pass` once, while the slab is in cache, for the rest: the scaled squared norms and the norm
pre-filter, and the candidate test of the rows that pass it against a triangular factor of an earlier Gram
matrix (docs/theory.md, "The norm pre-filter" and "Stale factors").

The triangular product ``Y = X W`` is BLAS ``dtrmm`` (half the flops of a general product), called from
compiled code through SciPy's Cython BLAS so that it runs without the GIL: slabs are processed by several
threads at once; the BLAS function is passed in as an argument (:mod:`levstream._kernels.blas`).  Every
kernel here is serial: the threads are the caller's (:func:`levstream._threads.run_items`), and serial numba
code leaves no runtime threads spinning against BLAS.

All arithmetic is float64, whatever the precision of the rows (float32 rows are widened exactly).
"""

from __future__ import annotations

import numba
import numpy as np

from .._config import FASTMATH
from .blas import times_upper


@numba.njit(nogil=True, cache=True)
def _row_sq_sums(Y):  # pragma: no cover - compiled
    b, d = Y.shape
    out = np.empty(b)
    for i in range(b):
        acc = 0.0
        for j in range(d):
            acc += Y[i, j] * Y[i, j]
        out[i] = acc
    return out


@numba.njit(nogil=True, cache=True, fastmath=FASTMATH)
def _norm_pass(X, scale, limit, wide):  # pragma: no cover - compiled
    """The rows whose scaled squared norm ``sum_j (x_j scale_j)^2`` reaches ``limit`` (every row when ``scale``
    is empty), and a float64 copy of ``X`` into ``wide`` when ``wide`` has rows (float32 input)."""
    n, d = X.shape
    idx = np.empty(n, dtype=np.int64)
    k = 0
    bounded = scale.shape[0] == d
    if wide.shape[0] == n:
        for i in range(n):
            for j in range(d):
                wide[i, j] = np.float64(X[i, j])
    if not bounded:
        for i in range(n):
            idx[i] = i
        return idx
    for i in range(n):
        scaled = 0.0
        for j in range(d):
            w = np.float64(X[i, j]) * scale[j]
            scaled += w * w
        if not (scaled < limit):  # a nan (products overflowing both ways) keeps the row
            idx[k] = i
            k += 1
    return idx[:k]


@numba.njit(nogil=True, cache=True)
def slab_pass(X, scale, limit, W, threshold, wide, dtrmm):  # pragma: no cover - compiled
    """The candidate test of one slab ``X`` (float32 or float64 rows) in one pass while it is in cache.

    Returns ``(rows, tested)``: ``rows`` the indices of the rows that may reach ``threshold``, those passing
    the norm pre-filter ``sum_j (x_j scale_j)^2 >= limit`` (all rows when ``scale`` is empty) and, when ``W``
    (upper triangular, ``||x W||^2`` an upper bound on the score) is given, ``||x W||^2 >= threshold``;
    ``tested`` whether that second test ran (``W`` non-empty).  When ``wide`` has as many rows as ``X`` it
    receives a float64 copy of ``X`` (for the Gram update).  Finiteness is the caller's: a nan/inf, or squares
    that overflow, make the trace of the slab's Gram block non-finite.
    """
    idx = _norm_pass(X, scale, limit, wide)
    d = X.shape[1]
    tested = W.shape[0] == d
    if not tested or idx.shape[0] == 0:
        return idx, tested
    k = idx.shape[0]
    Y = np.empty((k, d))
    for r in range(k):
        i = idx[r]
        for j in range(d):
            Y[r, j] = np.float64(X[i, j])
    times_upper(Y, W, dtrmm)
    u = _row_sq_sums(Y)
    keep = np.empty(k, dtype=np.int64)
    m = 0
    for r in range(k):
        if not (u[r] < threshold):  # a nan bound keeps the row
            keep[m] = idx[r]
            m += 1
    return keep[:m], True


@numba.njit(nogil=True, cache=True)
def upper_scores(X, W, dtrmm, out):  # pragma: no cover - compiled
    """``out[i] = ||x_i W||^2`` for the rows of ``X`` (float32 or float64) and upper-triangular ``W``, in
    pieces of 512 rows (one small float64 buffer)."""
    n, d = X.shape
    step = 512
    Y = np.empty((min(n, step), d))
    for a in range(0, n, step):
        b = min(n, a + step)
        Yb = Y[: b - a]
        for i in range(a, b):
            for j in range(d):
                Yb[i - a, j] = np.float64(X[i, j])
        times_upper(Yb, W, dtrmm)
        out[a:b] = _row_sq_sums(Yb)


@numba.njit(nogil=True, cache=True, fastmath=FASTMATH)
def sq_total(X):  # pragma: no cover - compiled
    """Sum of all squared entries of a 2-D array: nan/inf iff an entry is nan/inf or the squares overflow."""
    n, d = X.shape
    total = 0.0
    for i in range(n):
        for j in range(d):
            v = np.float64(X[i, j])
            total += v * v
    return total


@numba.njit(nogil=True, cache=True, fastmath=FASTMATH)
def copy_sq_total(src, dst):  # pragma: no cover - compiled
    """``dst[...] = src`` (rows of the same shape, float32 or float64) and the sum of all squared entries of
    ``src`` in float64, in one pass: nan/inf iff an entry is nan/inf or the squares overflow."""
    n, d = src.shape
    total = 0.0
    for i in range(n):
        for j in range(d):
            v = src[i, j]
            dst[i, j] = v
            w = np.float64(v)
            total += w * w
    return total


@numba.njit(nogil=True, cache=True)
def two_sum_add(hi, lo, add):  # pragma: no cover - compiled
    """In place ``hi + lo += add`` with the rounding error of each addition carried in ``lo`` (Knuth's
    two-sum), one pass.  No fastmath: reassociation would cancel the error term."""
    n, m = hi.shape
    for i in range(n):
        for j in range(m):
            a = add[i, j]
            h = hi[i, j]
            s = h + a
            bp = s - h
            lo[i, j] += (h - (s - bp)) + (a - bp)
            hi[i, j] = s
