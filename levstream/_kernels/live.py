"""Small kernels of the live path (a few rows per call): the normaliser ``q^T G q`` of a few queries and the
summary of newly buffered rows for queries (docs/theory.md, "Live streams").

For one to a few rows a compiled loop costs about a microsecond where the equivalent NumPy expression costs
several (temporaries and dispatch); large inputs go to BLAS in the callers.
"""

from __future__ import annotations

import numba
import numpy as np

from .._config import UNIT_ROUNDOFF


@numba.njit(nogil=True, cache=True)
def gram_quadratic(Q, G):  # pragma: no cover - compiled
    """``q^T G q`` for every row of ``Q``; values at or below the rounding level
    ``(d u)^2 sum_a q_a^2 G_aa`` are set to 0 (the query is orthogonal to every key)."""
    m, d = Q.shape
    out = np.empty(m, dtype=np.float64)
    tol = (d * UNIT_ROUNDOFF) ** 2
    for i in range(m):
        acc = 0.0
        floor = 0.0
        for a in range(d):
            qa = Q[i, a]
            row = 0.0
            for b in range(d):
                row += G[a, b] * Q[i, b]
            acc += qa * row
            floor += qa * qa * G[a, a]
        out[i] = acc if acc > tol * floor else 0.0
    return out


@numba.njit(nogil=True, cache=True)
def add_rows_and_bound(X, G, W, threshold, keep):  # pragma: no cover - compiled
    """``G += X^T X`` in place, and ``keep[i] = u_i / (1 + u_i) >= threshold`` with ``u_i = ||x_i W||^2``
    (an upper bound on the row's leverage score after its own inclusion, ``W`` a factor of an earlier Gram
    matrix).  ``W`` with zero columns means no factor is available: every row is kept."""
    m, d = X.shape
    r = W.shape[1]
    for i in range(m):
        for a in range(d):
            xa = X[i, a]
            for b in range(d):
                G[a, b] += xa * X[i, b]
        if r == 0:
            keep[i] = True
            continue
        u = 0.0
        for c in range(r):
            y = 0.0
            for a in range(d):
                y += X[i, a] * W[a, c]
            u += y * y
        keep[i] = u >= threshold * (1.0 + u)


@numba.njit(nogil=True, cache=True, fastmath={"nsz", "contract", "reassoc"}, inline="always")
def _dot(x, y, d):  # pragma: no cover - compiled
    acc = 0.0
    for a in range(d):
        acc += x[a] * y[a]
    return acc


@numba.njit(nogil=True, cache=True, fastmath={"nsz", "contract", "reassoc"})
def heavy_p2(Q, G, K, Ke, thresh, z_add):  # pragma: no cover - compiled
    """Every ``A = <q, k>^2 / q^T G q >= thresh`` of a few queries over the rows ``[K; Ke]`` (p = 2, exact ``G``).

    Returns ``(counts, positions, values, z)`` as the thresholding kernel of the batch path — per query row its
    number of entries, and for every entry its row position in ``[K; Ke]`` (ascending) and its value — and the
    normalisers ``z``; ``z_add`` is added to them (the terms of keys that are not in ``G``, e.g. a decode
    step's own key).
    """
    m, d = Q.shape
    c, e = K.shape[0], Ke.shape[0]
    z = gram_quadratic(Q, G) + z_add
    W = np.empty((m, c + e), dtype=np.float64)
    counts = np.zeros(m, dtype=np.int64)
    for i in range(m):
        zi = z[i]
        if zi <= 0.0:
            continue
        cut = thresh * zi
        q = Q[i]
        cnt = 0
        for j in range(c):
            v = _dot(q, K[j], d)
            v *= v
            W[i, j] = v
            cnt += v >= cut
        for j in range(e):
            v = _dot(q, Ke[j], d)
            v *= v
            W[i, c + j] = v
            cnt += v >= cut
        counts[i] = cnt
    total = counts.sum()
    positions = np.empty(total, dtype=np.int64)
    values = np.empty(total, dtype=np.float64)
    pos = 0
    for i in range(m):
        if counts[i] == 0:
            continue
        zi = z[i]
        cut = thresh * zi
        for j in range(c + e):
            if W[i, j] >= cut:
                positions[pos] = j
                values[pos] = W[i, j] / zi
                pos += 1
    return counts, positions, values, z


@numba.njit(nogil=True, cache=True, fastmath={"nsz", "contract", "reassoc"})
def heavy_p2_heads(Q, Gs, Ks, ids, Kes, extra_ids, thresh):  # pragma: no cover - compiled
    """:func:`heavy_p2` for every head in one call: ``Q`` (H, m, d) and, per head ``h``, ``Gs[h]``, the rows
    ``Ks[h]`` with ids ``ids[h]`` and ``Kes[h]`` with ids ``extra_ids[h]`` (tuples of arrays).

    Returns ``(indptr, key_ids, values)``: head ``h``'s query row ``i`` has the entries
    ``indptr[h, i] .. indptr[h, i + 1] - 1`` (one running offset over all heads), key ids ascending when each
    head's ids are.
    """
    H, m, _ = Q.shape
    counts_all = np.zeros((H, m), dtype=np.int64)
    parts_pos = []
    parts_val = []
    for h in range(H):
        counts, positions, values, _ = heavy_p2(Q[h], Gs[h], Ks[h], Kes[h], thresh, np.zeros(m))
        counts_all[h] = counts
        parts_pos.append(positions)
        parts_val.append(values)
    total = counts_all.sum()
    key_ids = np.empty(total, dtype=np.int64)
    values = np.empty(total, dtype=np.float64)
    indptr = np.zeros((H, m + 1), dtype=np.int64)
    at = 0
    for h in range(H):
        c = ids[h].shape[0]
        indptr[h, 0] = at
        for i in range(m):
            indptr[h, i + 1] = indptr[h, i] + counts_all[h, i]
        pos = parts_pos[h]
        for t in range(pos.shape[0]):
            j = pos[t]
            key_ids[at + t] = ids[h][j] if j < c else extra_ids[h][j - c]
            values[at + t] = parts_val[h][t]
        at += pos.shape[0]
    return indptr, key_ids, values


@numba.njit(nogil=True, cache=True)
def add_rows_and_bound_heads(Xs, Gs, Ws, thresholds, keeps):  # pragma: no cover - compiled
    """:func:`add_rows_and_bound` for every head in one call (tuples of per-head arrays)."""
    for h in range(len(Xs)):
        add_rows_and_bound(Xs[h], Gs[h], Ws[h], thresholds[h], keeps[h])


@numba.njit(nogil=True, cache=True, fastmath={"nsz", "contract", "reassoc"})
def moment_numerator(Q, S):  # pragma: no cover - compiled
    """``phi(q)^T S`` for a few queries without forming ``phi(q)`` (``S`` rows ordered as ``lift_degree2``'s
    columns: ``(0,0), (0,1), ..., (1,1), ...``, off-diagonal features scaled by ``sqrt(2)``)."""
    m, d = Q.shape
    dv = S.shape[1]
    out = np.zeros((m, dv), dtype=np.float64)
    root2 = np.sqrt(2.0)
    for i in range(m):
        row = 0
        for a in range(d):
            qa = Q[i, a]
            w = qa * qa
            for c in range(dv):
                out[i, c] += w * S[row, c]
            row += 1
            s = root2 * qa
            for b in range(a + 1, d):
                w = s * Q[i, b]
                for c in range(dv):
                    out[i, c] += w * S[row, c]
                row += 1
    return out


@numba.njit(nogil=True, cache=True)
def heavy_outputs(counts, positions, weights, V1, V2, V3):  # pragma: no cover - compiled
    """``(sum_j A_j v_j, sum_j A_j)`` over each query row's entries; entry ``t`` has weight ``weights[t]`` and
    the value row ``positions[t]`` of ``[V1; V2; V3]`` (the candidates', the scanned buffered rows', a chunk's)."""
    m = counts.shape[0]
    dv = V1.shape[1]
    n1, n2 = V1.shape[0], V2.shape[0]
    out = np.zeros((m, dv), dtype=np.float64)
    mass = np.zeros(m, dtype=np.float64)
    t = 0
    for i in range(m):
        for _ in range(counts[i]):
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
            t += 1
    return out, mass
