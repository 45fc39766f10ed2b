"""Attention restricted to a selected subset of keys (the inner loop of ``lev_attention``).

Inputs are stacked over a flattened batch axis ``b`` (batch and heads).  One parallel loop runs over all
``(b, query)`` pairs, so every head of every batch element is processed in a single kernel call.
"""

from __future__ import annotations

import numba
import numpy as np

from .._config import FASTMATH

#: ``kind`` codes understood by :func:`selected_attention`.
SOFTMAX = 0
POWER = 1


@numba.njit(parallel=True, nogil=True, cache=True, fastmath=FASTMATH)
def selected_attention(
    Q, K, V, idx, counts, kind, scale, p, causal, z_exact, out
):  # pragma: no cover - compiled
    """Write into ``out[b, i]`` the attention of query ``Q[b, i]`` over the keys ``idx[b, :counts[b]]``.

    Parameters (all C-contiguous)
    ----------
    Q : float64 (B, m, d);  K : float64 (B, n, d);  V : float64 (B, n, dv)
    idx : int64 (B, s), the selected key positions of each batch item, ascending in the first ``counts[b]``
    counts : int64 (B,)
    kind : SOFTMAX (weights ``exp(scale * <q, k>)``) or POWER (weights ``|<q, k>|**p``)
    causal : query ``i`` sits at key position ``i + n - m`` and sees only selected keys at or before it
    z_exact : float64 (B, m) true normalisers for POWER (weights divided by them, not renormalised), or
        shape (B, 0) to renormalise over the selected keys
    out : float64 (B, m, dv), written in full; a query with no visible selected key (or a zero
        normaliser) gets a zero row.
    """
    B, m, d = Q.shape
    n = K.shape[1]
    dv = V.shape[2]
    s = idx.shape[1]
    shift = n - m
    use_exact = z_exact.shape[1] > 0
    is_two = p == 2.0
    for t in numba.prange(B * m):
        b = t // m
        i = t - b * m
        for c in range(dv):
            out[b, i, c] = 0.0
        cnt = counts[b]
        if causal:
            limit = i + shift
            visible = 0
            while visible < cnt and idx[b, visible] <= limit:
                visible += 1
            cnt = visible
        if cnt == 0:
            continue
        w = np.empty(max(s, 1))
        for jj in range(cnt):
            j = idx[b, jj]
            acc = 0.0
            for c in range(d):
                acc += Q[b, i, c] * K[b, j, c]
            w[jj] = acc
        total = 0.0
        if kind == SOFTMAX:
            top = w[0] * scale
            for jj in range(1, cnt):
                top = max(top, w[jj] * scale)
            for jj in range(cnt):
                w[jj] = np.exp(w[jj] * scale - top)
                total += w[jj]
        else:
            for jj in range(cnt):
                x = abs(w[jj])
                w[jj] = x * x if is_two else x**p
                total += w[jj]
            if use_exact:
                total = z_exact[b, i]
        if not total > 0.0:
            continue
        inv = 1.0 / total
        for jj in range(cnt):
            j = idx[b, jj]
            wj = w[jj] * inv
            for c in range(dv):
                out[b, i, c] += wj * V[b, j, c]
