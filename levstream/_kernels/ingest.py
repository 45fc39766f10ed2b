"""Compiled passes of the ingest path (p = 2): one pass per slab of keys, and its Gram update, in one call.

A *slab* is a run of consecutive key rows (about 1024) of one processing block.  :func:`slab_run` takes a run
of a block's slabs in one call (with a call per slab and NumPy's product the Python around them cost about 8%
of a build of 2e6 keys, d = 64, on one thread: benchmarks/RESULTS.md, "Ingest").  Per slab it makes
:func:`slab_pass` (the scaled squared norms and the norm pre-filter, and the candidate test of the rows that
pass it against a triangular factor of an earlier Gram matrix: docs/theory.md, "The norm pre-filter" and
"Stale factors"), then, while the slab is in cache, the Gram update ``X^T X`` (BLAS ``syrk``; its trace, the
sum of all squares, is the finiteness check: non-finite iff the slab holds a nan/inf or squares that
overflow).

The triangular product ``Y = X W`` is BLAS ``dtrmm`` (half the flops of a general product) and the Gram update
``dsyrk``, called from compiled code so that they run without the GIL: slabs are
processed by several threads at once; the BLAS functions are passed in as arguments
(:mod:`levstream._kernels.blas`).  Every kernel here is serial: the threads are the caller's
(:func:`levstream._threads.run_items`), and serial numba code leaves no runtime threads spinning against BLAS.

All arithmetic is float64, whatever the precision of the rows (float32 rows are widened exactly).
"""

from __future__ import annotations

import numba
import numpy as np

from .._config import FASTMATH
from .blas import add_gram, times_upper


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


#: Fewer rows than this passing the norm pre-filter of a slab skip the float32 screen (:func:`_screen`).
SCREEN_MIN_ROWS = 32

_DROP, _KEEP, _UNDECIDED = 0, 1, 2


@numba.njit(nogil=True, cache=True)
def _screen(X, idx, W32, w_inv, threshold, strmm):  # pragma: no cover - compiled
    """Decide ``||x W||^2 >= threshold`` for the rows ``idx`` of ``X`` from a float32 product where it is safe
    to (docs/theory.md, "The float32 screen"): ``_DROP`` or ``_KEEP`` where the float64 test of
    :func:`slab_pass` is certain to decide the same, ``_UNDECIDED`` where it must run.

    Each row is scaled to unit norm (``c = 1 / ||x||``) and rounded to float32, ``W32`` is ``W`` times
    ``w_inv = 1 / ||W||_F`` rounded to float32, and ``y32 = strmm(x32, W32)``.  Then
    ``|| y32 - c w_inv x W || <= delta = (d + 2) 2^-24 1.02 + 4 d 2^-53 + 1e-30`` (the roundings of the scaled
    entries, of the products and sums of ``strmm`` in any order, subnormals, and the float64 test's own
    rounding), so ``||x W||`` lies within ``(||y32|| -+ delta) / (c w_inv)``; a further relative ``1e-12``
    covers the float64 arithmetic of the test.  Undecided: rows whose norm is 0, not finite or outside
    ``2^+-500``, or whose ``c w_inv`` is outside ``2^+-400``, or whose scaled threshold ``threshold (c w_inv)^2``
    is below ``2^-1000`` (it would lose its precision), and every row whose bound straddles the threshold."""
    k = idx.shape[0]
    d = X.shape[1]
    Y = np.empty((k, d), dtype=np.float32)
    scaled = np.empty(k)  # c w_inv, 0 for a row the screen does not decide
    for r in range(k):
        i = idx[r]
        s = 0.0
        for j in range(d):
            v = np.float64(X[i, j])
            s += v * v
        c = 0.0
        if s >= 2.0**-1000 and s <= 2.0**1000:
            c = 1.0 / np.sqrt(s)
        cw = c * w_inv
        if not (cw >= 2.0**-400 and cw <= 2.0**400):
            c = 0.0
            cw = 0.0
        scaled[r] = cw
        for j in range(d):
            Y[r, j] = np.float32(np.float64(X[i, j]) * c)
    times_upper(Y, W32, strmm)
    delta = (d + 2) * 2.0**-24 * 1.02 + 4 * d * 2.0**-53 + 1e-30
    out = np.empty(k, dtype=np.int8)
    for r in range(k):
        cw = scaled[r]
        if cw == 0.0:
            out[r] = _UNDECIDED
            continue
        n2 = 0.0
        for j in range(d):
            v = np.float64(Y[r, j])
            n2 += v * v
        n32 = np.sqrt(n2)
        ts = threshold * (cw * cw)
        if not ts >= 2.0**-1000:  # subnormal or zero (or nan): not precise enough to compare with
            out[r] = _UNDECIDED
            continue
        hi = n32 * (1.0 + 1e-12) + delta
        lo = max(n32 * (1.0 - 1e-12) - delta, 0.0)
        if hi * hi * (1.0 + 1e-12) < ts * (1.0 - 1e-12):
            out[r] = _DROP
        elif lo * lo * (1.0 - 1e-12) >= ts * (1.0 + 1e-12):
            out[r] = _KEEP
        else:
            out[r] = _UNDECIDED
    return out


@numba.njit(nogil=True, cache=True)
def slab_pass(
    X, scale, limit, W, threshold, wide, dtrmm, W32, w_inv, strmm
):  # pragma: no cover - compiled
    """The candidate test of one slab ``X`` (float32 or float64 rows) in one pass while it is in cache.

    Returns ``(rows, tested)``: ``rows`` the indices of the rows that may reach ``threshold``, those passing
    the norm pre-filter ``sum_j (x_j scale_j)^2 >= limit`` (all rows when ``scale`` is empty) and, when ``W``
    (upper triangular, ``||x W||^2`` an upper bound on the score) is given, ``||x W||^2 >= threshold``;
    ``tested`` whether that second test ran (``W`` non-empty).  When ``wide`` has as many rows as ``X`` it
    receives a float64 copy of ``X`` (for the Gram update).  Finiteness is the caller's: a nan/inf, or squares
    that overflow, make the trace of the slab's Gram block non-finite.

    With ``W32`` (``W / ||W||_F`` in float32, ``w_inv = 1 / ||W||_F``; empty: none), the rows a float32 product
    decides for certain skip the float64 one (:func:`_screen`, half its cost); the rows returned are the same.
    """
    idx = _norm_pass(X, scale, limit, wide)
    d = X.shape[1]
    tested = W.shape[0] == d
    if not tested or idx.shape[0] == 0:
        return idx, tested
    k = idx.shape[0]
    if W32.shape[0] == d and k >= SCREEN_MIN_ROWS:
        verdict = _screen(X, idx, W32, w_inv, threshold, strmm)
        open_rows = 0
        for r in range(k):
            open_rows += verdict[r] == _UNDECIDED
    else:  # every row takes the float64 product
        verdict = np.full(k, _UNDECIDED, dtype=np.int8)
        open_rows = k
    Y = np.empty((open_rows, d))
    t = 0
    for r in range(k):
        if verdict[r] == _UNDECIDED:
            i = idx[r]
            for j in range(d):
                Y[t, j] = np.float64(X[i, j])
            t += 1
    times_upper(Y, W, dtrmm)
    u = _row_sq_sums(Y)
    keep = np.empty(k, dtype=np.int64)
    m = 0
    t = 0
    for r in range(k):
        if verdict[r] == _UNDECIDED:
            if not (u[t] < threshold):  # a nan bound keeps the row
                keep[m] = idx[r]
                m += 1
            t += 1
        elif verdict[r] == _KEEP:
            keep[m] = idx[r]
            m += 1
    return keep[:m], True


@numba.njit(nogil=True, cache=True)
def slab_run(
    X, cuts, scale, limit, W, threshold, wide, dtrmm, W32, w_inv, strmm, Gs, totals, syrk, combine
):  # pragma: no cover - compiled
    """:func:`slab_pass` of consecutive slabs of ``X`` in one call (slab ``s``: rows ``cuts[s]`` to
    ``cuts[s + 1] - 1``), and, when ``Gs`` holds a matrix per slab, each slab's Gram block computed while the
    slab is in cache: ``Gs[s] += Y^T Y`` (BLAS ``syrk``, :func:`~levstream._kernels.blas.add_gram`) for its
    float64 rows ``Y`` (``X``'s own, or their copy in ``wide``, which then has a slab's rows and which the norm
    pass fills), and its trace in ``totals[s]``: the sum of all squares, nan/inf iff the slab holds a nan/inf
    or squares that overflow.  With ``combine`` the slabs' Gram blocks are then summed into ``Gs[0]`` in slab
    order, ``((Gs[0] + Gs[1]) + Gs[2]) + ...``, as the caller sums the parts of several calls.

    Returns ``(rows, tested)`` as :func:`slab_pass` does, ``rows`` indexing ``X`` in increasing order.  Each
    slab is computed on its own, as in a call per slab: the results do not depend on how a block's slabs are
    shared among calls (or threads)."""
    d = X.shape[1]
    if Gs.shape[0] and X.itemsize != 8 and wide.shape[0] == 0:
        raise ValueError(
            "slab_run: float32 rows need a float64 buffer `wide` for their Gram blocks"
        )
    keep = np.empty(X.shape[0], dtype=np.int64)
    m = 0
    tested = W.shape[0] == d
    for s in range(cuts.shape[0] - 1):
        a, b = cuts[s], cuts[s + 1]
        w = wide[: b - a] if wide.shape[0] else wide
        rows, tested = slab_pass(X[a:b], scale, limit, W, threshold, w, dtrmm, W32, w_inv, strmm)
        if Gs.shape[0]:
            if w.shape[0]:
                add_gram(Gs[s], w, syrk)
            else:
                add_gram(Gs[s], X[a:b], syrk)
            total = 0.0
            for c in range(d):
                total += Gs[s, c, c]
            totals[s] = total
        for r in range(rows.shape[0]):
            keep[m] = rows[r] + a
            m += 1
    if combine:
        for s in range(1, Gs.shape[0]):
            Gs[0] += Gs[s]
    return keep[:m], tested


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
