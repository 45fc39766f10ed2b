"""Small kernels of the live path (a few rows per call): the normaliser ``q^T G q`` of a few queries and the
summary of newly buffered rows for queries (docs/theory.md, "Live streams").

For one to a few rows a compiled loop costs about a microsecond where the equivalent NumPy expression costs
several (temporaries and dispatch); large inputs go to BLAS in the callers.
"""

from __future__ import annotations

import numba
import numpy as np

from .._config import CUT_MIN, UNIT_ROUNDOFF
from .blas import add_gram, times_upper
from .rows import decode_rows_fit

#: The pre-filters of the scans (norms, int8 products) are off below this ``cut`` or ``||q||^2`` (subnormal
#: territory).
_FILTER_FLOOR = 1e-280


#: The live paths trust ``q^T G q`` evaluated from ``G`` only while its rounding bound
#: ``(d + 2) u |q|^T |G| |q|`` is at most this fraction of it (docs/theory.md, "Numerics"); otherwise they
#: report ``UNRELIABLE`` and the caller answers from the summary and the pending rows instead.
GRAM_FORM_REL = 1e-12

#: The normaliser the live kernels report for a query whose ``q^T G q`` they cannot trust.
UNRELIABLE = -1.0


@numba.njit(nogil=True, cache=True, inline="always")
def _checked_quadratic(q, G, d, tol):  # pragma: no cover - compiled
    """``q^T G q`` (0 at rounding level, as :func:`gram_quadratic`), or ``UNRELIABLE`` when its rounding bound
    ``(d + 2) u |q|^T |G| |q|`` exceeds ``GRAM_FORM_REL`` of it (cancellation: ``G`` ill-conditioned along
    ``q``)."""
    acc = 0.0
    floor = (
        0.0  # sum_a (sqrt(tol) q_a)^2 G_aa: scaled before squaring (q_a^2 G_aa alone may overflow)
    )
    du = np.sqrt(tol)
    # sum_a |q_a| sqrt(G_aa): its square bounds |q|^T |G| |q| (|G_ab| <= sqrt(G_aa G_bb))
    diag_bound = 0.0
    for a in range(d):
        qa = q[a]
        row = 0.0
        for b in range(d):
            row += G[a, b] * q[b]
        acc += qa * row
        s = du * qa
        floor += s * s * G[a, a]
        diag_bound += abs(qa) * np.sqrt(max(G[a, a], 0.0))
    gamma = (d + 2) * UNIT_ROUNDOFF
    trusted = GRAM_FORM_REL * max(acc, 0.0)
    if gamma * diag_bound * diag_bound > trusted:  # the O(d) bound cannot settle it: the exact one
        bound = 0.0
        for a in range(d):
            arow = 0.0
            for b in range(d):
                arow += abs(G[a, b] * q[b])
            bound += abs(q[a]) * arow
        if gamma * bound > trusted:
            return UNRELIABLE
    if (
        not acc < np.inf
    ):  # weights beyond float64 (or a nan from an overflow): the caller answers another way
        return UNRELIABLE
    return acc if acc > floor else 0.0


@numba.njit(nogil=True, cache=True)
def any_unreliable(z):  # pragma: no cover - compiled
    """Whether a (heads, queries) array of normalisers holds ``UNRELIABLE`` (cheaper than NumPy for a few)."""
    for h in range(z.shape[0]):
        for i in range(z.shape[1]):
            if z[h, i] == UNRELIABLE:
                return True
    return False


@numba.njit(nogil=True, cache=True)
def gram_quadratic(Q, G):  # pragma: no cover - compiled
    """``q^T G q`` for every row of ``Q``; values at or below the rounding level
    ``(d u)^2 sum_a q_a^2 G_aa`` are set to 0 (the query is orthogonal to every key)."""
    m, d = Q.shape
    out = np.empty(m, dtype=np.float64)
    du = d * UNIT_ROUNDOFF
    for i in range(m):
        acc = 0.0
        floor = 0.0  # (d u)^2 sum_a q_a^2 G_aa, with d u applied before squaring (q_a^2 G_aa alone may overflow)
        for a in range(d):
            qa = Q[i, a]
            row = 0.0
            for b in range(d):
                row += G[a, b] * Q[i, b]
            acc += qa * row
            s = du * qa
            floor += s * s * G[a, a]
        out[i] = acc if acc > floor else 0.0
    return out


@numba.njit(nogil=True, cache=True)
def checked_quadratic_rows(Q, G):  # pragma: no cover - compiled
    """:func:`_checked_quadratic` of every row of ``Q``: ``q^T G q`` (0 at rounding level), or ``UNRELIABLE`` for a
    row whose value cannot be trusted (cancellation, or beyond float64)."""
    m, d = Q.shape
    tol = (d * UNIT_ROUNDOFF) ** 2
    out = np.empty(m, dtype=np.float64)
    for i in range(m):
        out[i] = _checked_quadratic(Q[i], G, d, tol)
    return out


@numba.njit(nogil=True, cache=True, inline="always")
def _worse(a, ia, b, ib):  # pragma: no cover - compiled
    """Whether entry ``(a, ia)`` ranks below ``(b, ib)``: a smaller value, or the same value and a larger id."""
    return a < b or (a == b and ia > ib)


@numba.njit(nogil=True, cache=True)
def _sift_down(bv, bi, i, size):  # pragma: no cover - compiled
    """Restore the heap of ``bv[:size]``/``bi[:size]`` below slot ``i`` (the worst-ranked entry at the root)."""
    while True:
        c = 2 * i + 1
        if c >= size:
            return
        if c + 1 < size and _worse(bv[c + 1], bi[c + 1], bv[c], bi[c]):
            c += 1
        if not _worse(bv[c], bi[c], bv[i], bi[i]):
            return
        bv[i], bv[c] = bv[c], bv[i]
        bi[i], bi[c] = bi[c], bi[i]
        i = c


@numba.njit(nogil=True, cache=True, fastmath={"nsz", "contract", "reassoc"})
def top_k_p2(Q, G, K, ids, k):  # pragma: no cover - compiled
    """The ``k`` largest ``A = <q, x>^2 / Z`` of each query over every row ``x`` of ``K`` (float32 or float64; ids
    ``ids``), with ``Z = q^T G q`` (``G`` the Gram matrix of every key fed): ``(key_ids, values, z)``, shapes
    (m, k), (m, k), (m,), by descending value with ties by ascending id, padded with -1 / nan.  A query whose ``z``
    is ``UNRELIABLE`` (see :func:`_checked_quadratic`) or not positive gets the padding only (the caller answers an
    unreliable one another way).  One pass over the rows with a heap of the ``k`` best entries (worst at the root:
    ``O(n log k)``), sorted at the end."""
    m, d = Q.shape
    n = K.shape[0]
    kk = min(k, n)
    tol = (d * UNIT_ROUNDOFF) ** 2
    out_ids = np.full((m, k), -1, dtype=np.int64)
    out_vals = np.full((m, k), np.nan)
    z = np.empty(m)
    bv = np.empty(max(kk, 1))
    bi = np.empty(max(kk, 1), dtype=np.int64)
    for i in range(m):
        zi = _checked_quadratic(Q[i], G, d, tol)
        z[i] = zi
        if not zi > 0.0 or kk == 0:
            continue
        q = Q[i]
        for j in range(n):
            v = 0.0
            for a in range(d):
                v += q[a] * K[j, a]
            a_j = (v * v) / zi
            key_id = ids[j]
            if j < kk:  # filling: the new entry sifts up
                c = j
                bv[c], bi[c] = a_j, key_id
                while c > 0:
                    parent = (c - 1) // 2
                    if not _worse(bv[c], bi[c], bv[parent], bi[parent]):
                        break
                    bv[c], bv[parent] = bv[parent], bv[c]
                    bi[c], bi[parent] = bi[parent], bi[c]
                    c = parent
            elif _worse(
                bv[0], bi[0], a_j, key_id
            ):  # better than the worst kept: it takes the root's place
                bv[0], bi[0] = a_j, key_id
                _sift_down(bv, bi, 0, kk)
        # heapsort: the worst entry goes to the end, the best ends first
        for size in range(kk - 1, 0, -1):
            bv[0], bv[size] = bv[size], bv[0]
            bi[0], bi[size] = bi[size], bi[0]
            _sift_down(bv, bi, 0, size)
        for c in range(kk):
            out_ids[i, c] = bi[c]
            out_vals[i, c] = bv[c]
    return out_ids, out_vals, z


@numba.njit(nogil=True, cache=True)
def add_rows_and_bound(X, G, W, threshold, keep, norms):  # pragma: no cover - compiled
    """``G += X^T X`` in place, and ``keep[i] = u_i / (1 + u_i) >= threshold`` with ``u_i = ||x_i W||^2``
    (an upper bound on the row's leverage score after its own inclusion, ``W`` a factor of an earlier Gram
    matrix).  ``W`` with zero columns means no factor is available: every row is kept.  ``norms[i]``: the row's
    norm for the scans' norm bound (as :func:`scan_norms`)."""
    y = np.empty(W.shape[1])
    for i in range(X.shape[0]):
        keep[i], norms[i] = _add_row_and_bound(X[i], G, W, threshold, y)


@numba.njit(nogil=True, cache=True)
def add_row_and_bound(x, G, W, threshold):  # pragma: no cover - compiled
    """:func:`add_rows_and_bound` of one row (a live step: nothing to allocate or box): returns the row's norm
    when it is kept, else ``-1``."""
    keep, norm = _add_row_and_bound(x, G, W, threshold, np.empty(W.shape[1]))
    return norm if keep else -1.0


@numba.njit(nogil=True, cache=True)
def append_row_and_bound(
    keys, ids, values, n, x, key_id, v, G, W, threshold, y
):  # pragma: no cover
    """Write key ``x`` (id ``key_id``; value row ``v`` when ``values`` has rows) as row ``n`` of a row store's
    arrays, then :func:`add_row_and_bound` of the row as stored (``y``: scratch of ``W``'s width): a live step's
    arrival in one call, nothing allocated.  Returns the row's norm when it is kept, else ``-1``."""
    for a in range(x.shape[0]):
        keys[n, a] = x[a]
    ids[n] = key_id
    if values.shape[0]:
        for c in range(v.shape[0]):
            values[n, c] = v[c]
    keep, norm = _add_row_and_bound(keys[n], G, W, threshold, y)
    return norm if keep else -1.0


@numba.njit(nogil=True, cache=True)
def append_row_and_keep(
    keys,
    ids,
    values,
    n,
    x,
    key_id,
    v,
    G,
    W,
    threshold,
    y,
    rkeys,
    rids,
    rvalues,
    rn,
    rnorms,
    r8,
    rscale,
):  # pragma: no cover - compiled
    """:func:`append_row_and_bound`, and when the row is kept, in the same call, the row as stored joins the
    scanned rows of a live cache: row ``rn`` of ``rkeys``/``rids``/``rvalues`` (the values when ``rvalues`` has
    rows), its norm in ``rnorms`` and its int8 form in ``r8``/``rscale`` (:func:`int8_rows_into`).  A gated
    stream's live step keeps most rows it is fed; this spares it the Python calls of that.  Every array has
    room (nothing is allocated).  Returns the row's norm when it is kept, else ``-1``."""
    norm = append_row_and_bound(keys, ids, values, n, x, key_id, v, G, W, threshold, y)
    if norm >= 0.0:
        for a in range(x.shape[0]):
            rkeys[rn, a] = keys[n, a]
        rids[rn] = key_id
        if rvalues.shape[0]:
            for c in range(v.shape[0]):
                rvalues[rn, c] = values[n, c]
        rnorms[rn] = norm
        rscale[rn], _ = _int8_row(keys[n], r8[rn])
    return norm


@numba.njit(nogil=True, cache=True, inline="always")
def _add_row_and_bound(x, G, W, threshold, y):  # pragma: no cover - compiled
    """``G += x x^T``; returns ``(keep, norm)`` (see :func:`add_rows_and_bound`; ``y``: scratch of ``W``'s
    width)."""
    d = x.shape[0]
    r = W.shape[1]
    sq = 0.0
    for a in range(d):
        xa = np.float64(x[a])  # float32 rows widened: exact products
        sq += xa * xa
        for b in range(d):
            G[a, b] += xa * x[b]
    norm = np.sqrt(sq) if sq >= _FILTER_FLOOR else np.inf
    if r == 0:
        return True, norm
    # y = x W, row by row of W (contiguous: the loop over c vectorizes)
    for c in range(r):
        y[c] = 0.0
    for a in range(d):
        xa = np.float64(x[a])
        for c in range(r):
            y[c] += xa * W[a, c]
    u = 0.0
    for c in range(r):
        u += y[c] * y[c]
    return not (u < threshold * (1.0 + u)), norm  # a nan bound keeps the row


@numba.njit(nogil=True, cache=True, fastmath={"nsz", "contract", "reassoc"}, inline="always")
def _dot(x, y, d):  # pragma: no cover - compiled
    acc = 0.0
    for a in range(d):
        acc += x[a] * y[a]
    return acc


@numba.njit(nogil=True, cache=True, fastmath={"nsz", "contract", "reassoc"})
def heavy_p2(
    Q, G, K, nk, K8, wk, ids, Ke, nke, Ke8, we, extra_ids, Kc, idc, thresh
):  # pragma: no cover - compiled
    """Every ``A = <q, k>^2 / Z >= thresh`` of a few queries over the rows ``[K; Ke; Kc]`` (p = 2), with
    ``Z = q^T G q + sum_r <q, Kc_r>^2``: ``G`` the exact Gram matrix of every key fed, ``Kc`` (ids ``idc``) rows
    every query sees that ``G`` does not hold yet (a decode step's own key; usually none).

    Returns two arrays, so that the caller unpacks them without boxing one array per field:

    * ``ints = [indptr (m + 1) | key_ids (t) | positions (t)]``: the CSR row pointer of the ``t`` entries, and for
      every entry its id (from ``ids``, ``extra_ids``, ``idc``; ascending within a query row, whatever the order
      of the rows) and its row position in ``[K; Ke; Kc]``;
    * ``floats = [z (m) | values (t)]``: the normalisers and the entries' values.

    A query whose ``q^T G q`` cannot be trusted, or that is not finite (a nan/inf, or squares that overflow), gets
    ``z = UNRELIABLE`` and no entries: the caller must validate it and answer it another way.

    ``nk``, when not empty, holds the norms of the rows of ``K`` in non-increasing order (the rows come by
    descending norm): a query then scans only the rows with ``||q|| ||k|| >= sqrt(cut) (1 - 1e-9)``, a prefix
    found by bisection, since by Cauchy-Schwarz ``<q, k>^2 <= ||q||^2 ||k||^2`` (the margin covers the rounding
    of the norms, ``~d 2^-53``, and keeps every row the float64 scan would report).  ``nke``, when not empty,
    holds the norms of the rows of ``Ke`` (in any order): those too short are skipped without a product.
    ``K8``/``wk`` (with ``nk``) and ``Ke8``/``we`` (with ``nke``), when not empty, hold the rows of ``K`` and
    ``Ke`` as int8 with their scales (:func:`int8_rows`): a row that passes the norm bound then passes the int8
    bound of :func:`heavy_p2_stacked` before its float64 product (an eighth of the bytes; a decaying stream
    keeps thousands of candidates and recent rows, most of them long enough to pass the norm bound).
    """
    m, d = Q.shape
    c, e, o = K.shape[0], Ke.shape[0], Kc.shape[0]
    tol = (d * UNIT_ROUNDOFF) ** 2
    z = np.empty(m)
    W = np.empty((m, c + e + o), dtype=np.float64)
    q32 = np.empty(d, dtype=np.float32)
    for i in range(m):
        q = Q[i]
        # a nan/inf, or squares that overflow: UNRELIABLE (the caller validates the query)
        zi = _checked_quadratic(q, G, d, tol) if _dot(q, q, d) < np.inf else UNRELIABLE
        if zi != UNRELIABLE:
            for j in range(o):
                v = _dot(Q[i], Kc[j], d)
                v *= v
                W[i, c + e + j] = v
                zi += v
            if not zi < np.inf:  # the rows not in G took it beyond float64
                zi = UNRELIABLE
        z[i] = zi
    stops = np.zeros(m, dtype=np.int64)
    counts = np.zeros(m, dtype=np.int64)
    for i in range(m):
        zi = z[i]
        if zi <= 0.0:
            continue
        cut = max(thresh * zi, CUT_MIN)  # never 0 for a positive Z (see CUT_MIN)
        q = Q[i]
        stop = c
        nq2 = _dot(q, q, d)
        filt = cut >= _FILTER_FLOOR and nq2 >= _FILTER_FLOOR
        lim = np.sqrt(cut / nq2) * (1.0 - 1e-9) if filt else 0.0
        if nk.shape[0] and filt:
            lo, hi = 0, c  # the first row with nk < lim: the rows from it on cannot reach the cut
            while lo < hi:
                mid = (lo + hi) // 2
                if nk[mid] < lim:
                    hi = mid
                else:
                    lo = mid + 1
            stop = lo
        stops[i] = stop
        cnt = 0
        short = filt and nke.shape[0] > 0
        by_int8 = short and Ke8.shape[0] > 0
        cand_int8 = filt and nk.shape[0] > 0 and K8.shape[0] > 0
        slack = _unit_query(q, nq2, q32) if by_int8 or cand_int8 else 0.0
        for j in range(stop):
            if cand_int8 and not _int8_reaches(q32, K8[j], wk[j], slack, lim, d):
                W[i, j] = 0.0
                continue
            v = _dot(q, K[j], d)
            v *= v
            W[i, j] = v
            cnt += v >= cut
        for j in range(e):
            if short and nke[j] < lim:  # |<q, k>| <= ||q|| ||k|| < sqrt(cut): not heavy
                W[i, c + j] = 0.0
                continue
            if by_int8 and not _int8_reaches(q32, Ke8[j], we[j], slack, lim, d):
                W[i, c + j] = 0.0
                continue
            v = _dot(q, Ke[j], d)
            v *= v
            W[i, c + j] = v
            cnt += v >= cut
        for j in range(c + e, c + e + o):
            cnt += W[i, j] >= cut
        counts[i] = cnt
    total = counts.sum()
    ints = np.empty(m + 1 + 2 * total, dtype=np.int64)
    floats = np.empty(m + total, dtype=np.float64)
    floats[:m] = z
    ints[0] = 0
    for i in range(m):
        ints[i + 1] = ints[i] + counts[i]
    key_ids = ints[m + 1 : m + 1 + total]
    positions = ints[m + 1 + total :]
    values = floats[m:]
    pos = 0
    for i in range(m):
        if counts[i] == 0:
            continue
        zi = z[i]
        cut = max(thresh * zi, CUT_MIN)
        first = pos
        for j in range(stops[i]):  # the rows of K past the norm cut were not scanned
            if W[i, j] >= cut:
                pos = _emit(positions, key_ids, values, pos, j, ids[j], W[i, j] / zi)
        for j in range(c, c + e):
            if W[i, j] >= cut:
                pos = _emit(positions, key_ids, values, pos, j, extra_ids[j - c], W[i, j] / zi)
        for j in range(c + e, c + e + o):
            if W[i, j] >= cut:
                pos = _emit(positions, key_ids, values, pos, j, idc[j - c - e], W[i, j] / zi)
        _sort_entries(key_ids, values, positions, first, pos)
    return ints, floats


@numba.njit(nogil=True, cache=True, inline="always")
def _emit(positions, key_ids, values, pos, j, key_id, value):  # pragma: no cover - compiled
    """Write entry ``pos`` (row position ``j``); returns the next entry's index."""
    positions[pos] = j
    key_ids[pos] = key_id
    values[pos] = value
    return pos + 1


@numba.njit(nogil=True, cache=True, inline="always")
def _ascending(a, start, stop):  # pragma: no cover - compiled
    """Whether ``a[start:stop]`` is strictly increasing."""
    for k in range(start + 1, stop):
        if a[k] <= a[k - 1]:
            return False
    return True


#: A query's entries are put in id order by insertion up to this many (a few entries: no allocation), by
#: ``argsort`` beyond.
_INSERTION_SORT_MAX = 16


@numba.njit(nogil=True, cache=True, inline="always")
def _sort_entries(key_ids, values, positions, start, stop):  # pragma: no cover - compiled
    """``key_ids[start:stop]`` (distinct ids) sorted ascending in place, ``values`` and ``positions`` with them.

    The scans emit a query's entries by descending key norm; a step has a few of them, which an insertion sort
    orders without the three temporaries of a fancy-indexed ``argsort`` (about a tenth of a 12-head step)."""
    if _ascending(key_ids, start, stop):
        return
    if stop - start > _INSERTION_SORT_MAX:
        order = np.argsort(key_ids[start:stop])
        key_ids[start:stop] = key_ids[start:stop][order]
        values[start:stop] = values[start:stop][order]
        positions[start:stop] = positions[start:stop][order]
        return
    for k in range(start + 1, stop):
        kid, val, pos = key_ids[k], values[k], positions[k]
        j = k - 1
        while j >= start and key_ids[j] > kid:
            key_ids[j + 1] = key_ids[j]
            values[j + 1] = values[j]
            positions[j + 1] = positions[j]
            j -= 1
        key_ids[j + 1] = kid
        values[j + 1] = val
        positions[j + 1] = pos


# ---------------------------------------------------------------------- many heads (MultiHeadKeySketch)
#
# The live state of a multi-head sketch is stacked over heads (levstream.multihead): one (H, d, d) array of
# Gram matrices, (H, rows, d) arrays of candidates and of scanned pending rows with per-head counts, so one call
# does the work of every head and the compiled code is the same for any number of heads.


@numba.njit(nogil=True, cache=True)
def absorb_rows_heads(
    rows,
    vrows,
    b0,
    b1,
    id0,
    LG,
    W,
    has_w,
    kthr,
    scale,
    lam,
    Ke,
    Ke8,
    we,
    nke,
    Ie,
    Ve,
    ne,
    syrk,
    dtrmm,
):  # pragma: no cover - compiled
    """Rows ``b0..b1-1`` of every head's ``rows[h]`` (ids ``id0 + i``) join the live state: ``LG[h] += X^T X``, and
    a row joins the scanned rows ``Ke[h]``/``Ie[h]`` (with its value row ``vrows[h, i]`` into ``Ve[h]`` when
    ``Ve`` has columns; its int8 row, scale and norm into ``Ke8``/``we``/``nke`` as :func:`int8_rows`; ``ne[h]``
    counts them) unless a bound ``u`` on ``x^T G_0^-1 x`` (``G_0`` a Gram matrix the live state held earlier)
    shows ``u / (1 + u) < kthr[h]``: its leverage score after its own inclusion, now and later, is below the
    pruning threshold (docs/theory.md, "Stale factors").  Two bounds, the cheap one first: the norm bound
    ``u = sum_a (x_a scale[h, a])^2 / lam[h]`` (when ``lam[h] > 0``: ``scale[h]`` the inverse square roots of the
    diagonal of ``G_0`` and ``lam[h]`` a lower bound on the smallest eigenvalue of the equilibrated ``G_0``,
    docs/theory.md, "The norm pre-filter"), then for the rows it keeps ``u = ||x W[h]||^2`` (``W[h]`` an
    upper-triangular factor of ``G_0^-1``; every row is kept when ``not has_w[h]``).  Both products of the batch
    are BLAS level 3 (``syrk`` for the Gram matrices, ``trmm`` for the rows the norm bound keeps; ``syrk`` and
    ``dtrmm`` from :mod:`levstream._kernels.blas`).  The callers make room for ``b1 - b0`` more rows in ``Ke``."""
    H = rows.shape[0]
    d = rows.shape[2]
    dv = Ve.shape[2]
    k = b1 - b0
    if k <= 0:
        return
    Y = np.empty((k, d))
    picked = np.empty(k, dtype=np.int64)
    for h in range(H):
        X = rows[h, b0:b1]
        add_gram(LG[h], X, syrk)
        m = 0
        for r in range(k):
            if has_w[h] and lam[h] > 0.0:
                u = 0.0
                for a in range(d):
                    w = X[r, a] * scale[h, a]
                    u += w * w
                u /= lam[h]
                if u < kthr[h] * (1.0 + u):  # a nan bound keeps the row
                    continue
            picked[m] = r
            m += 1
        if has_w[h] and m:
            for i in range(m):
                Y[i] = X[picked[i]]
            times_upper(Y[:m], W[h], dtrmm)
        for i in range(m):
            r = picked[i]
            if has_w[h]:
                u = 0.0
                for c in range(d):
                    u += Y[i, c] * Y[i, c]
                if u < kthr[h] * (1.0 + u):  # a nan bound keeps the row
                    continue
            x = X[r]
            j = ne[h]
            for a in range(d):
                Ke[h, j, a] = x[a]
            we[h, j], nke[h, j] = _int8_row(x, Ke8[h, j])
            Ie[h, j] = id0 + b0 + r
            for c in range(dv):
                Ve[h, j, c] = vrows[h, b0 + r, c]
            ne[h] = j + 1


def scan_norms(K):
    """Norms of the rows of ``K`` (n, d) for the scans' norm bound: ``inf`` (never skipped) where the squared norm
    is below ``_FILTER_FLOOR`` (or overflows), since a sum of squares that underflows would understate it."""
    # float32 rows widened (a float32 sum would understate the norm)
    K = np.asarray(K, dtype=np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", K, K))
    norms[~(norms * norms >= _FILTER_FLOOR)] = np.inf
    return norms


@numba.njit(nogil=True, cache=True, inline="always")
def _int8_row(x, out):  # pragma: no cover - compiled
    """Row ``x`` for the stacked scan's pre-filter: ``out[a] = round(127 x_a / max_b |x_b|)`` (int8); returns
    ``(w, norm)``, ``w = max_b |x_b| / 127`` and the row's float64 norm.  A row whose squared norm is below
    ``_FILTER_FLOOR`` (or is not finite) gets a zero row, ``w = inf`` and ``norm = inf``: never skipped."""
    d = x.shape[0]
    nrm2 = 0.0
    mx = 0.0
    for a in range(d):
        xa = np.float64(x[a])
        nrm2 += xa * xa
        mx = max(mx, abs(xa))
    if not (nrm2 >= _FILTER_FLOOR and nrm2 < np.inf):
        for a in range(d):
            out[a] = 0
        return np.inf, np.inf
    for a in range(d):
        out[a] = np.int8(np.round(127.0 * (np.float64(x[a]) / mx)))
    return mx / 127.0, np.sqrt(nrm2)


@numba.njit(nogil=True, cache=True)
def int8_rows(K):  # pragma: no cover - compiled
    """``(K8, w, norms)`` for :func:`heavy_p2_stacked`'s pre-filter, row by row as :func:`_int8_row`: the rows of
    ``K`` (n, d) scaled by 127 over their largest entry and rounded to int8, those scales' inverses ``w`` and
    the float64 norms."""
    n, d = K.shape
    K8 = np.empty((n, d), dtype=np.int8)
    w = np.empty(n)
    norms = np.empty(n)
    for i in range(n):
        w[i], norms[i] = _int8_row(K[i], K8[i])
    return K8, w, norms


@numba.njit(nogil=True, cache=True)
def int8_rows_into(K, K8, w, start):  # pragma: no cover - compiled
    """:func:`int8_rows` of the rows of ``K`` written to ``K8[start:]`` and ``w[start:]`` (the norms are not kept:
    the caller has them)."""
    for i in range(K.shape[0]):
        w[start + i], _ = _int8_row(K[i], K8[start + i])


@numba.njit(nogil=True, cache=True, inline="always")
def _unit_query(q, nq2, q32):  # pragma: no cover - compiled
    """``q32 = q / ||q||`` rounded to float32 (``nq2 = ||q||^2``, at least ``_FILTER_FLOOR``); returns the slack of
    the int8 bound, ``||q32||_1 (1/2 + 127 (d + 3) 2^-24) 1.001 + 1e-38`` (see :func:`heavy_p2_stacked`)."""
    d = q.shape[0]
    nq = np.sqrt(nq2)
    l1 = 0.0
    for a in range(d):
        q32[a] = np.float32(q[a] / nq)
        l1 += abs(np.float64(q32[a]))
    return l1 * (0.5 + 127.0 * (d + 3) * 2.0**-24) * 1.001 + 1e-38


@numba.njit(nogil=True, cache=True, fastmath={"nsz", "contract", "reassoc"}, inline="always")
def _int8_reaches(q32, k8, w, slack, lim, d):  # pragma: no cover - compiled
    """Whether the int8 bound ``w (|s| + slack)`` of a row (``s`` the float32 product of the unit query with its
    int8 row ``k8``, scale ``w``) allows ``|<q, k>| / ||q||`` to reach ``lim`` (a nan bound does)."""
    s = np.float32(0.0)
    for a in range(d):
        s += q32[a] * np.float32(k8[a])
    return not w * (abs(np.float64(s)) + slack) < lim


@numba.njit(nogil=True, cache=True, fastmath={"nsz", "contract", "reassoc"}, inline="always")
def _scan_rows(
    q,
    q32,
    K,
    K8,
    w,
    norms,
    ids,
    n,
    base,
    filt,
    by_norm,
    lim,
    slack,
    cut,
    z,
    positions,
    values,
    key_ids,
    t,
):  # pragma: no cover - compiled
    """Entries of rows ``0..n-1`` of ``K`` (positions from ``base``) for one query; returns the new count ``t``.
    With ``filt``, a row is computed exactly only when the int8 bound ``w (|s| + slack)`` allows
    ``|<q, k>| >= sqrt(cut)`` (``s`` the float32 product of the unit query ``q32`` with the int8 row), and not
    even that when its norm rules it out (``||q|| ||k|| < sqrt(cut)``); ``by_norm``: the rows come by
    descending norm, so the first such row ends the scan."""
    d = q.shape[0]
    for j in range(n):
        if filt:
            if norms[j] < lim:  # |<q, k>| <= ||q|| ||k|| (Cauchy-Schwarz): no product needed
                if by_norm:
                    break
                continue
            if not _int8_reaches(q32, K8[j], w[j], slack, lim, d):
                continue
        v = _dot(q, K[j], d)
        v *= v
        if v >= cut:
            positions[t] = base + j
            values[t] = v / z
            key_ids[t] = ids[j]
            t += 1
    return t


@numba.njit(nogil=True, cache=True)
def _grown(arr, size):  # pragma: no cover - compiled
    out = np.empty(max(size, 2 * arr.shape[0]), dtype=arr.dtype)
    out[: arr.shape[0]] = arr
    return out


@numba.njit(nogil=True, cache=True, fastmath={"nsz", "contract", "reassoc"})
def heavy_p2_stacked(
    Q, LG, Kc, Kc8, wc, nk, Ic, nc, Ke, Ke8, we, nke, Ie, ne, R, r0, r1, rid0, thresh
):  # pragma: no cover - compiled
    """:func:`heavy_p2` of every head in one call, on the stacked live state: head ``h``'s queries ``Q[h]``
    (shape (H, m, d)), its Gram matrix ``LG[h]``, the rows ``Kc[h, :nc[h]]`` (ids ``Ic``) then ``Ke[h, :ne[h]]``
    (ids ``Ie``), then the recent rows ``R[h, r0:r1]`` (ids ``rid0 + r``): tokens fed that ``LG[h]`` does not
    hold yet, so ``Z = q^T LG[h] q + sum_r <q, R[h, r]>^2`` (as :func:`heavy_p2`'s ``Kc``), each of them scanned
    exactly.

    Rows pass an int8 pre-filter first (a scalar quantizer, as in faiss, but with a certified bound):
    ``Kc8``/``wc``/``nk`` (``Ke8``/``we``/``nke``) hold each row ``k`` scaled by ``127 / max_a |k_a|`` and rounded
    to int8, ``w = max_a |k_a| / 127`` and ``||k||`` (:func:`int8_rows`).  With ``u = q / ||q||`` rounded to
    float32 and ``s`` the float32 product of ``u`` with the int8 row, ``|<q, k>| <= ||q|| w (|s| + slack)``,
    ``slack = ||u||_1 (1/2 + 127 (d + 3) 2^-24) 1.001 + 1e-38``: the rounding of each scaled entry to an integer
    (at most 1/2), and the roundings of ``u`` to float32, of the products and of any order of the sum, and
    underflow.  A row is computed exactly (float64, as :func:`heavy_p2`) unless that bound shows
    ``<q, k>^2 < cut (1 - 1e-9)^2``, so the entries are those of the exact scan: the skipped ones have exact
    values below the threshold.  The int8 rows take a quarter of the bytes of float32 unit rows (the live state
    of many heads is that much smaller) and are nearly as selective: for attention-like keys about one row in a
    hundred of those read needs the float64 product.  Before that, a row whose norm alone shows
    ``||q|| ||k|| < sqrt(cut) (1 - 1e-9)`` is skipped without a product, and the candidates ``Kc[h]`` come by
    descending norm (``nk[h]`` non-increasing), so the first of them that fails ends their scan: a query reads
    only the candidates long enough to be heavy for it (about half of them, for
    attention-like keys at eps = 0.01).

    Returns ``(starts, indptr, key_ids, values, positions, z)``: head ``h``'s entries are
    ``starts[h]..starts[h + 1] - 1`` of ``key_ids``/``values``/``positions`` (row positions in
    ``[Kc[h, :nc[h]]; Ke[h, :ne[h]]; R[h, r0:r1]]``),
    its query row ``i`` has ``indptr[h, i]..indptr[h, i + 1] - 1`` of them (from 0 per head), ids ascending
    within a row (sorted here when the scan order gave them otherwise), and ``z`` (H, m) holds the normalisers
    (0 for a query orthogonal to every key, as :func:`gram_quadratic`; ``UNRELIABLE``, with no entries, for a
    query whose ``q^T G q`` cannot be trusted, or that is not finite (a nan/inf, or squares that overflow): the
    caller must validate it and answer it another way).
    """
    H, m, d = Q.shape
    tol = (d * UNIT_ROUNDOFF) ** 2
    cap = 16 * H * m + 64
    positions = np.empty(cap, dtype=np.int64)
    values = np.empty(cap, dtype=np.float64)
    key_ids = np.empty(cap, dtype=np.int64)
    z = np.zeros((H, m))
    starts = np.zeros(H + 1, dtype=np.int64)
    indptr = np.zeros((H, m + 1), dtype=np.int64)
    q32 = np.empty(d, dtype=np.float32)
    o = max(r1 - r0, 0)
    recent = np.empty(o)
    t = 0
    for h in range(H):
        starts[h] = t
        G = LG[h]
        c, e = nc[h], ne[h]
        for i in range(m):
            indptr[h, i] = t - starts[h]
            q = Q[h, i]
            nq2 = _dot(q, q, d)
            if (
                not nq2 < np.inf
            ):  # a nan/inf, or squares that overflow: the caller validates the query
                z[h, i] = UNRELIABLE
                continue
            acc = _checked_quadratic(q, G, d, tol)
            if acc == UNRELIABLE:
                z[h, i] = UNRELIABLE
                continue
            for r in range(o):
                v = _dot(q, R[h, r0 + r], d)
                v *= v
                recent[r] = v
                acc += v
            if not acc < np.inf:  # the recent rows took it beyond float64
                z[h, i] = UNRELIABLE
                continue
            z[h, i] = acc
            if acc == 0.0:
                continue
            cut = max(thresh * acc, CUT_MIN)  # never 0 for a positive Z (see CUT_MIN)
            first = t
            if t + c + e + o > positions.shape[0]:
                positions = _grown(positions, t + c + e + o)
                values = _grown(values, t + c + e + o)
                key_ids = _grown(key_ids, t + c + e + o)
            filt = cut >= _FILTER_FLOOR and nq2 >= _FILTER_FLOOR
            lim = 0.0
            slack = 0.0
            if filt:
                lim = np.sqrt(cut / nq2) * (1.0 - 1e-9)
                slack = _unit_query(q, nq2, q32)
            t = _scan_rows(
                q,
                q32,
                Kc[h],
                Kc8[h],
                wc[h],
                nk[h],
                Ic[h],
                c,
                0,
                filt,
                True,
                lim,
                slack,
                cut,
                acc,
                positions,
                values,
                key_ids,
                t,
            )
            t = _scan_rows(
                q,
                q32,
                Ke[h],
                Ke8[h],
                we[h],
                nke[h],
                Ie[h],
                e,
                c,
                filt,
                False,
                lim,
                slack,
                cut,
                acc,
                positions,
                values,
                key_ids,
                t,
            )
            for r in range(o):
                if recent[r] >= cut:
                    positions[t] = c + e + r
                    values[t] = recent[r] / acc
                    key_ids[t] = rid0 + r0 + r
                    t += 1
            _sort_entries(key_ids, values, positions, first, t)
        indptr[h, m] = t - starts[h]
    starts[H] = t
    return starts, indptr, key_ids[:t].copy(), values[:t].copy(), positions[:t].copy(), z


@numba.njit(nogil=True, cache=True, fastmath={"nsz", "contract", "reassoc"})
def outputs_stacked(
    Q, starts, indptr, positions, values, Vc, nc, Ve, ne, RV, r0, rows, vrows, nb
):  # pragma: no cover - compiled
    """For :func:`heavy_p2_stacked`'s entries of every head: ``heavy_output`` (H, m, dv), the sums of ``A_j v_j``
    (value row ``positions`` of ``[Vc[h, :nc[h]]; Ve[h, :ne[h]]; RV[h, r0:]]``), ``captured_mass`` (H, m), the
    sums of ``A_j``, and the numerator terms ``sum_j <q, k_j>^2 v_j`` of the first ``nb`` rows of
    ``rows``/``vrows`` (rows fed that the moment state does not hold yet), shape (H, m, dv)."""
    H, m, d = Q.shape
    dv = Vc.shape[2]
    out = np.zeros((H, m, dv))
    mass = np.zeros((H, m))
    num = np.zeros((H, m, dv))
    for h in range(H):
        c = nc[h]
        base = starts[h]
        for i in range(m):
            for t in range(base + indptr[h, i], base + indptr[h, i + 1]):
                j = positions[t]
                a = values[t]
                mass[h, i] += a
                if j < c:
                    for k in range(dv):
                        out[h, i, k] += a * Vc[h, j, k]
                elif j < c + ne[h]:
                    for k in range(dv):
                        out[h, i, k] += a * Ve[h, j - c, k]
                else:
                    for k in range(dv):
                        out[h, i, k] += a * RV[h, r0 + j - c - ne[h], k]
            q = Q[h, i]
            for r in range(nb):
                w = _dot(q, rows[h, r], d)
                w *= w
                for k in range(dv):
                    num[h, i, k] += w * vrows[h, r, k]
    return out, mass, num


@numba.njit(nogil=True, cache=True, fastmath={"nsz", "contract", "reassoc"})
def moment_numerator(Q, S, BK, BV, XK, XV):  # pragma: no cover - compiled
    """``phi(q)^T S + sum_j <q, BK_j>^2 BV_j + sum_j <q, XK_j>^2 XV_j`` for a few queries, lifting one query at a
    time into a reused array of ``D`` floats (``S`` rows ordered as ``lift_degree2``'s columns: ``(0,0), (0,1),
    ..., (1,1), ...``, off-diagonal features scaled by ``sqrt(2)``; ``BK``/``BV`` the keys and values waiting to
    be folded into ``S`` (every key of a short stream, with ``S`` of no rows), ``XK``/``XV`` keys not fed yet that
    the queries see: a decode step's own key)."""
    m, d = Q.shape
    dv = S.shape[1]
    out = np.zeros((m, dv), dtype=np.float64)
    for i in range(m):
        for j in range(BK.shape[0]):
            t = _dot(Q[i], BK[j], d)
            t *= t
            for c in range(dv):
                out[i, c] += t * BV[j, c]
        for j in range(XK.shape[0]):
            t = _dot(Q[i], XK[j], d)
            t *= t
            for c in range(dv):
                out[i, c] += t * XV[j, c]
    root2 = np.sqrt(2.0)
    D = S.shape[0]
    # no state to read: a short stream's rows are all in BK (see MomentState.query_arrays)
    if D == 0:
        return out
    phi = np.empty(D)
    for i in range(m):
        row = 0
        for a in range(d):
            qa = Q[i, a]
            phi[row] = qa * qa
            s = root2 * qa
            for b in range(a + 1, d):
                phi[row + b - a] = s * Q[i, b]
            row += d - a
        # two rows of S per pass over the output row: half the loads and stores of it per element of S (the
        # loop reads S, 1 MiB at d = dv = 64, from beyond the core's L2 cache at every query)
        o = out[i]
        f = 0
        while f + 1 < D:
            w0 = phi[f]
            w1 = phi[f + 1]
            for c in range(dv):
                o[c] += w0 * S[f, c] + w1 * S[f + 1, c]
            f += 2
        if f < D:
            w0 = phi[f]
            for c in range(dv):
                o[c] += w0 * S[f, c]
    return out


#: :func:`decode_and_take`'s norm when it took nothing (the rows need the validating path, or the query cannot be
#: answered from ``G``).
NOT_TAKEN = -2.0


@numba.njit(nogil=True, cache=True)
def decode_and_take(
    q,
    G,
    K,
    nk,
    K8,
    wk,
    ids,
    Ke,
    nke,
    Ke8,
    we,
    extra_ids,
    kc,
    idc,
    thresh,
    V1,
    V2,
    vc,
    S,
    BK,
    BV,
    buf_keys,
    buf_values,
    buf_n,
    keys,
    store_ids,
    values,
    n,
    G_live,
    W,
    threshold,
    y,
    rkeys,
    rids,
    rvalues,
    rn,
    rnorms,
    r8,
    rscale,
    take,
):  # pragma: no cover - compiled
    """A decode step that takes its row in the same call (the common step of a stream with values: one compiled
    call instead of three).  When the step's rows ``kc``, ``q``, ``vc`` pass :func:`decode_rows_fit` and the
    query can be answered from ``G``: :func:`decode_p2` (the same answer), then the row is written to row
    ``buf_n`` of the moment state's buffer (when ``buf_keys`` has rows: the state takes it as a buffered row) and
    appended to the store and the live cache by :func:`append_row_and_keep` (``G_live`` the live cache's Gram
    matrix, id ``idc[0]``; every array has room).  Returns ``(ints, floats, norm)``: ``norm`` as
    :func:`append_row_and_keep`'s, or :data:`NOT_TAKEN` with nothing written anywhere.  With ``take`` false the row
    is checked and the query answered, but nothing is written (``norm`` is then ``-1`` when answered): the caller
    takes the row itself (a step that settles or hands over the moment state's product)."""
    if not decode_rows_fit(kc[0], q[0], vc[0], S.shape[1] > 0):
        return np.zeros(0, dtype=np.int64), np.zeros(1), NOT_TAKEN
    ints, floats = decode_p2(
        q,
        G,
        K,
        nk,
        K8,
        wk,
        ids,
        Ke,
        nke,
        Ke8,
        we,
        extra_ids,
        kc,
        idc,
        thresh,
        V1,
        V2,
        vc,
        S,
        BK,
        BV,
    )
    if floats[0] == UNRELIABLE:
        return ints, floats, NOT_TAKEN
    if not take:
        return ints, floats, -1.0
    if buf_keys.shape[0]:
        buf_keys[buf_n] = kc[0]
        buf_values[buf_n] = vc[0]
    norm = append_row_and_keep(
        keys,
        store_ids,
        values,
        n,
        kc[0],
        idc[0],
        vc[0],
        G_live,
        W,
        threshold,
        y,
        rkeys,
        rids,
        rvalues,
        rn,
        rnorms,
        r8,
        rscale,
    )
    return ints, floats, norm


@numba.njit(nogil=True, cache=True)
def heavy_outputs(indptr, positions, weights, V1, V2, V3):  # pragma: no cover - compiled
    """``(sum_j A_j v_j, sum_j A_j)`` over each query row's entries (CSR ``indptr``); entry ``t`` has weight
    ``weights[t]`` and the value row ``positions[t]`` of ``[V1; V2; V3]`` (the candidates', the scanned buffered
    rows', a chunk's)."""
    m = indptr.shape[0] - 1
    dv = V1.shape[1]
    n1, n2 = V1.shape[0], V2.shape[0]
    out = np.zeros((m, dv), dtype=np.float64)
    mass = np.zeros(m, dtype=np.float64)
    for i in range(m):
        for t in range(indptr[i], indptr[i + 1]):
            j = positions[t]
            a = weights[t]
            mass[i] += a
            if j < n1:
                for c in range(dv):
                    out[i, c] += a * V1[j, c]
            elif j < n1 + n2:
                for c in range(dv):
                    out[i, c] += a * V2[j - n1, c]
            else:
                for c in range(dv):
                    out[i, c] += a * V3[j - n1 - n2, c]
    return out, mass


@numba.njit(nogil=True, cache=True)
def decode_p2(
    q, G, K, nk, K8, wk, ids, Ke, nke, Ke8, we, extra_ids, kc, idc, thresh, V1, V2, vc, S, BK, BV
):  # pragma: no cover - compiled
    """A decode step of one query ``q`` (shape (1, d)) in one call: :func:`heavy_p2` over ``[K; Ke; kc]`` (``kc``
    the step's own key, ids ``idc``), :func:`heavy_outputs` of its entries (value rows ``[V1; V2; vc]``) and, when
    ``S`` has columns, the exact output ``moment_numerator(q, S, BK, BV, kc, vc) / z`` (0 when ``z <= 0``).

    Returns ``(ints, floats)``: ``ints`` as :func:`heavy_p2`'s for one query (``[0, t | key_ids | positions]``),
    ``floats = [z | values (t) | heavy output (dv) | captured mass | output (dv, when S has columns)]``: ``S`` of
    shape (0, 0) means no exact output; (0, dv) one from ``BK``/``BV`` and ``kc`` alone (a short stream's).  A
    query whose ``z`` is ``UNRELIABLE`` gets no entries, and the rest is not computed (the caller answers it
    another way)."""
    ints, found = heavy_p2(q, G, K, nk, K8, wk, ids, Ke, nke, Ke8, we, extra_ids, kc, idc, thresh)
    t = ints[1]
    dv = V1.shape[1]
    exact = S.shape[1] > 0
    floats = np.zeros(1 + t + dv + 1 + (dv if exact else 0))
    floats[: 1 + t] = found
    z = found[0]
    if z == UNRELIABLE:
        return ints, floats
    heavy, mass = heavy_outputs(ints[:2], ints[2 + t :], found[1:], V1, V2, vc)
    floats[1 + t : 1 + t + dv] = heavy[0]
    floats[1 + t + dv] = mass[0]
    if exact and z > 0.0:
        num = moment_numerator(q, S, BK, BV, kc, vc)
        base = 2 + t + dv
        for c in range(dv):
            floats[base + c] = num[0, c] / z
    return ints, floats
