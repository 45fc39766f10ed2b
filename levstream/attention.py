"""LevAttention: attention computed over a small selected set of keys per head (arXiv 2410.05462).

Keys are selected per head (per item of the leading batch axes) once, independently of the query: the top-k
keys by a selection score (leverage score by default, the paper's rule), or for leverage selection the
``eps`` universal set ``{j : tau_j >= eps}``.  Every query then attends to the selected keys only:

``out_i = sum_{j in S} w_ij v_j / sum_{j in S} w_ij`` with ``w_ij = exp(scale <q_i, k_j>)`` (softmax) or
``|<q_i, k_j>|^p`` (power).  With ``score="power", normalizer="exact"`` the weights are divided by the true
normaliser over *all* keys instead, so the weight of every selected key equals its full attention value and
only the light mass outside ``S`` is missing.

Guarantee and its limits: for ``score="power", p=2`` and ``eps`` selection every attention entry ``>= eps``
of the full attention has its key in ``S`` (``S`` is the universal set).  For softmax there is no such
guarantee (docs/theory.md, "Softmax"): leverage selection is a heuristic whose quality is measured
in ``docs/levattention-results.md``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._config import REPORT_RTOL
from ._kernels.attention import POWER, SOFTMAX, selected_attention
from ._validation import as_real_array, check_eps, check_finite, check_int, check_p, check_real

__all__ = ["SELECTIONS", "lev_attention", "selection_scores"]

#: Selection rules accepted by :func:`lev_attention` (see its docstring).
SELECTIONS = (
    "leverage",
    "leverage_affine",
    "leverage_query",
    "query_mean",
    "norm",
    "random",
    "first_last",
    "h2o",
    "oracle",
)

#: Number of sink keys kept by ``selection="first_last"`` (StreamingLLM keeps 4 initial tokens).
FIRST_LAST_SINKS = 4

#: Query blocks used by the dense reference passes (``h2o``, ``oracle``, exact normalisers).
_DENSE_BLOCK = 256


def _as_stack(obj: Any, name: str) -> np.ndarray:
    arr = as_real_array(obj, name)
    if arr.ndim < 2:
        raise ValueError(
            f"{name} must have shape (..., rows, dim) with at least 2 dimensions; "
            f"got shape {arr.shape}."
        )
    check_finite(arr, name)
    out = np.ascontiguousarray(arr, dtype=np.float64)
    check_finite(out, name)  # huge integers may overflow float64
    return out


def _validate_qkv(Q: Any, K: Any, V: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    Q, K, V = _as_stack(Q, "Q"), _as_stack(K, "K"), _as_stack(V, "V")
    if not (Q.shape[:-2] == K.shape[:-2] == V.shape[:-2]):
        raise ValueError(
            "Q, K and V must share their leading (batch, head) axes; got shapes "
            f"{Q.shape}, {K.shape}, {V.shape}."
        )
    if Q.shape[-1] != K.shape[-1]:
        raise ValueError(
            f"Q and K must have the same last dimension; got {Q.shape[-1]} and {K.shape[-1]}."
        )
    if K.shape[-2] != V.shape[-2]:
        raise ValueError(
            f"K and V must have the same number of rows (keys); got {K.shape[-2]} and {V.shape[-2]}."
        )
    if K.shape[-2] == 0 or K.shape[-1] == 0:
        raise ValueError(f"K must have at least one key and one column; got shape {K.shape}.")
    return Q, K, V


def _batched_leverage(K: np.ndarray) -> np.ndarray:
    """Leverage scores of every stacked matrix ``K[b]`` (B, n, d): :func:`levstream.leverage_scores` of each
    (columns equilibrated before the rank is decided, a key along a direction the rank tolerance cuts scored
    1), so that the ``eps`` guarantee holds for keys a plain SVD rank rule would call rounding: a key alone in
    a direction of ``1e-13`` (its score 1) or a column scaled by ``1e-14`` (docs/theory.md, "Numerics")."""
    from ._linalg import factor_rank_tolerance
    from .scores import leverage_scores

    B, n, d = K.shape
    col_max = np.abs(K).max(axis=1, keepdims=True)
    U, s, _ = np.linalg.svd(K / np.where(col_max > 0, col_max, 1.0), full_matrices=False)
    out = np.einsum("bnr,bnr->bn", U, U)
    # one batched SVD; a head whose rank falls short takes leverage_scores' rules
    for b in range(B):
        if not (s[b, -1] > factor_rank_tolerance(s[b, 0], n, d, 1)):
            out[b] = leverage_scores(K[b])
    return out


def _weights(
    logits: np.ndarray, visible: np.ndarray | None, score: str, scale: float, p: float
) -> np.ndarray:
    """Unnormalised attention weights from inner products, zero where not ``visible``."""
    if score == "softmax":
        x = logits * scale
        if visible is not None:
            x = np.where(visible, x, -np.inf)
        top = x.max(axis=-1, keepdims=True)
        return np.exp(x - np.where(np.isfinite(top), top, 0.0))
    w = np.abs(logits) ** p
    return w if visible is None else np.where(visible, w, 0.0)


def _visible(rows: np.ndarray, m: int, n: int) -> np.ndarray:
    """Causal visibility of keys for query rows ``rows`` (query i sits at key position ``i + n - m``)."""
    return np.arange(n)[None, :] <= (rows + n - m)[:, None]


def _attention_mass(
    Q: np.ndarray, K: np.ndarray, rows: np.ndarray, score: str, scale: float, p: float, causal: bool
) -> np.ndarray:
    """Column sums, over query rows ``rows``, of the full (dense) attention matrix of each batch item."""
    B, m, _ = Q.shape
    n = K.shape[1]
    mass = np.zeros((B, n))
    for start in range(0, rows.shape[0], _DENSE_BLOCK):
        r = rows[start : start + _DENSE_BLOCK]
        W = _weights(
            Q[:, r] @ K.transpose(0, 2, 1),
            _visible(r, m, n)[None] if causal else None,
            score,
            scale,
            p,
        )
        Z = W.sum(axis=-1, keepdims=True)
        mass += np.divide(W, Z, out=np.zeros_like(W), where=Z > 0).sum(axis=1)
    return mass


def _exact_power_normalizer(Q: np.ndarray, K: np.ndarray, p: float, causal: bool) -> np.ndarray:
    """``Z_i = sum_l |<q_i, k_l>|^p`` over every key visible to query ``i``, shape (B, m)."""
    B, m, _ = Q.shape
    n = K.shape[1]
    if p == 2.0 and not causal:  # Z(q) = q^T G q (docs/theory.md, "Queries")
        G = K.transpose(0, 2, 1) @ K
        return np.maximum(np.einsum("bmd,bde,bme->bm", Q, G, Q), 0.0)
    Z = np.zeros((B, m))
    for start in range(0, m, _DENSE_BLOCK):
        r = np.arange(start, min(m, start + _DENSE_BLOCK))
        W = _weights(
            Q[:, r] @ K.transpose(0, 2, 1),
            _visible(r, m, n)[None] if causal else None,
            "power",
            1.0,
            p,
        )
        Z[:, r] = W.sum(axis=-1)
    return Z


def selection_scores(
    Q: Any,
    K: Any,
    *,
    selection: str = "leverage",
    score: str = "softmax",
    p: float = 2,
    scale: float | None = None,
    causal: bool = False,
    rng: Any = None,
    h2o_queries: int = 32,
    query_rank: int = 2,
    query_mean: Any = None,
) -> np.ndarray:
    """Per-key selection scores used by :func:`lev_attention` (larger = kept first), shape ``(..., n)``.

    ``"first_last"`` has no score (it selects by position) and is rejected here.

    Examples
    --------
    >>> import numpy as np
    >>> from levstream.attention import selection_scores
    >>> K = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    >>> selection_scores(K, K).round(3).tolist()
    [1.0, 0.5, 0.5]
    """
    Q = _as_stack(Q, "Q")
    K = _as_stack(K, "K")
    if Q.shape[:-2] != K.shape[:-2] or Q.shape[-1] != K.shape[-1]:
        raise ValueError(
            f"Q and K must have shapes (..., m, d) and (..., n, d) with the same leading axes; "
            f"got {Q.shape} and {K.shape}."
        )
    if selection == "first_last":
        raise ValueError(
            "selection='first_last' selects by position and has no score; "
            "use lev_attention(..., selection='first_last')."
        )
    score, p, scale = _check_score(score, p, scale, K.shape[-1])
    batch = K.shape[:-2]
    B = int(np.prod(batch, dtype=np.int64))  # explicit: -1 cannot be inferred when Q has no rows
    Qf = Q.reshape((B,) + Q.shape[-2:])
    Kf = K.reshape((B,) + K.shape[-2:])
    mean = _query_mean(query_mean, Q, selection)
    scores = _scores(
        Qf, Kf, selection, score, p, scale, bool(causal), rng, h2o_queries, query_rank, mean
    )
    return scores.reshape(batch + K.shape[-2:-1])


def _query_mean(query_mean: Any, Q: np.ndarray, selection: str) -> np.ndarray | None:
    """The mean query per head, shape (B, d), for ``selection="query_mean"``: ``query_mean`` when given
    (shape ``(..., d)`` with Q's leading axes, or ``(d,)`` for all heads), else the mean of the rows of Q
    (zero when Q has no rows: every key then scores 0, as for the other query-based rules)."""
    lead, d = Q.shape[:-2], Q.shape[-1]
    if query_mean is None:
        if selection != "query_mean":
            return None
        if Q.shape[-2] == 0:
            return np.zeros((int(np.prod(lead, dtype=np.int64)), d))
        return Q.mean(axis=-2).reshape(-1, d)
    if selection != "query_mean":
        raise ValueError(
            f"query_mean= is used by selection='query_mean' only; got selection={selection!r}."
        )
    mean = as_real_array(query_mean, "query_mean")
    if mean.ndim == 0 or mean.shape[-1] != d or mean.shape[:-1] not in (lead, ()):
        raise ValueError(
            f"query_mean must have shape {lead + (d,)} (one mean query per head) or ({d},); "
            f"got shape {mean.shape}."
        )
    check_finite(mean, "query_mean")
    return np.broadcast_to(mean.astype(np.float64), lead + (d,)).reshape(-1, d)


def _sink_mask(always_keep: Any, n: int) -> np.ndarray:
    """Boolean mask of the key positions in ``always_keep`` (negative positions count from the end)."""
    pos = np.asarray(always_keep)
    if pos.size and not np.issubdtype(pos.dtype, np.integer):
        raise TypeError(
            f"always_keep must be a sequence of integer key positions; got dtype {pos.dtype} instead."
        )
    pos = pos.astype(np.int64).ravel()
    if pos.size and (pos.min() < -n or pos.max() >= n):
        raise ValueError(
            f"always_keep positions must lie in [-{n}, {n}) for {n} keys; got {pos.tolist()}."
        )
    mask = np.zeros(n, dtype=bool)
    mask[pos % n if pos.size else pos] = True
    return mask


def _check_score(score: Any, p: Any, scale: Any, d: int) -> tuple[str, float, float]:
    if score not in ("softmax", "power"):
        raise ValueError(f"score must be 'softmax' or 'power'; got {score!r} instead.")
    p = check_p(p)
    if score == "power":
        if scale is not None:
            raise ValueError(
                "scale applies to score='softmax' only; |x|^p attention does not depend on the "
                "scale of q and k (it cancels in the normalisation). Drop scale=."
            )
        return score, p, 1.0
    scale = 1.0 / np.sqrt(d) if scale is None else check_real(scale, "scale")
    return score, p, scale


def _scores(
    Q: np.ndarray,
    K: np.ndarray,
    selection: str,
    score: str,
    p: float,
    scale: float,
    causal: bool,
    rng: Any,
    h2o_queries: int,
    query_rank: int,
    query_mean: np.ndarray | None = None,
) -> np.ndarray:
    B, n, _ = K.shape
    m = Q.shape[1]
    if selection == "leverage":
        return _batched_leverage(K)
    if selection == "leverage_affine":
        return _batched_leverage(np.concatenate([K, np.ones((B, n, 1))], axis=2))
    if selection == "leverage_query":
        # Leverage of [K P, 1] with P the top query directions: the sensitivity of each key (affine, p = 2)
        # when queries are restricted to the span of the dominant right singular vectors of Q.
        r = check_int(query_rank, "query_rank", minimum=1)
        cols = [np.ones((B, n, 1))]
        if m:
            vt = np.linalg.svd(Q, full_matrices=False)[2][:, :r]
            cols.insert(0, K @ vt.transpose(0, 2, 1))
        return _batched_leverage(np.concatenate(cols, axis=2))
    if selection == "query_mean":
        # The keys the mean query attends to most: softmax weight exp(scale <qbar, k>) is monotone in the
        # logit; |x|^p weight in |<qbar, k>|.  By Jensen, mean_i exp(s <q_i, k>) >= exp(s <qbar, k>).
        assert query_mean is not None
        logit = np.einsum("bnd,bd->bn", K, query_mean)
        return logit if score == "softmax" else np.abs(logit)
    if selection == "norm":
        return np.sqrt(np.einsum("bnd,bnd->bn", K, K))
    if selection == "random":
        return np.random.default_rng(rng).random((B, n))
    if selection == "h2o":
        h2o_queries = check_int(h2o_queries, "h2o_queries", minimum=1)
        rows = np.sort(
            np.random.default_rng(rng).choice(m, size=min(h2o_queries, m), replace=False)
        )
        return _attention_mass(Q, K, rows, score, scale, p, causal)
    if selection == "oracle":
        return _attention_mass(Q, K, np.arange(m), score, scale, p, causal)
    raise ValueError(f"selection must be one of {SELECTIONS}; got {selection!r} instead.")


def lev_attention(
    Q: Any,
    K: Any,
    V: Any,
    *,
    top_k: int | None = None,
    eps: float | None = None,
    score: str = "softmax",
    p: float = 2,
    scale: float | None = None,
    selection: str = "leverage",
    normalizer: str = "selected",
    causal: bool = False,
    always_keep: Any = (),
    rng: Any = None,
    h2o_queries: int = 32,
    query_rank: int = 2,
    query_mean: Any = None,
    return_indices: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Attention output over a selected set of keys per head (LevAttention, arXiv 2410.05462).

    Parameters
    ----------
    Q : array_like, shape (..., m, d)
        Queries; the leading axes (batch, heads) are shared by ``K`` and ``V``.
    K : array_like, shape (..., n, d)
    V : array_like, shape (..., n, dv)
    top_k : int, optional
        Keep the ``top_k`` keys with the largest selection score per head (all keys when ``n <= top_k``).
        Equal computed scores go to the lower key index.  Scores equal in exact arithmetic (``n <= d``, where
        every score is 1; duplicated keys) can differ in their last bits, and which of them is kept then
        depends on that rounding.
    eps : float, optional
        Instead of ``top_k`` (exactly one of the two must be given): keep every key whose selection score
        is ``>= eps``.  Only for ``selection="leverage"`` (the universal set ``{j : tau_j >= eps}``) and
        ``"leverage_affine"``.
    score : {"softmax", "power"}
        Attention weights ``exp(scale <q, k>)`` or ``|<q, k>|^p``.
    p : float, default 2
        Exponent for ``score="power"`` (and for the attention mass of ``h2o``/``oracle`` selection).
    scale : float, optional
        Softmax logit scale, default ``1 / sqrt(d)``.  Not allowed with ``score="power"``.
    selection : str, default "leverage"
        How keys are chosen, per head and independently of the query:

        * ``"leverage"``: leverage scores ``tau_j = k_j^T (K^T K)^+ k_j`` (the paper's rule);
        * ``"leverage_affine"``: leverage scores of ``[K, 1]``, invariant like softmax to adding one vector
          to every key;
        * ``"leverage_query"``: leverage scores of ``[K P, 1]`` where ``P`` holds the top ``query_rank``
          right singular vectors of ``Q``: the affine sensitivity of each key when queries are restricted
          to their dominant directions (uses the queries, unlike the two rules above);
        * ``"query_mean"``: the keys the mean query ``qbar`` attends to most (largest ``<qbar, k_j>`` for
          softmax, ``|<qbar, k_j>|`` for ``score="power"``); ``qbar`` is the mean of ``Q``'s rows, or
          ``query_mean=`` (e.g. stored from calibration text, so the selection needs no queries).  Not a
          leverage score: it sees which side of the keys the queries point to, which leverage (built from
          squares) cannot; on a real transformer it is on par with H2O without H2O's dense passes
          (``docs/levattention-results.md``);
        * baselines: ``"norm"`` (largest ``||k_j||``), ``"random"`` (uniform, from ``rng``),
          ``"first_last"`` (StreamingLLM: the first ``min(4, top_k)`` keys as sinks plus the last ones as
          the window), ``"h2o"`` (H2O-style: attention mass accumulated from ``h2o_queries`` queries drawn
          from ``rng``), ``"oracle"`` (true attention mass summed over all queries: the best fixed set,
          at the cost of the dense attention).
    normalizer : {"selected", "exact"}
        ``"selected"`` renormalises the weights over the selected keys; ``"exact"`` (``score="power"``
        only) divides by the true normaliser over all visible keys, so every selected key gets exactly its
        full attention weight.  For p = 2 without causal masking it comes from the d x d Gram matrix.
    causal : bool, default False
        The selected set is computed once per head over all keys; query ``i`` then attends only to the
        selected keys ``j <= i + n - m`` (``j <= i`` when ``m == n``).  A query that sees no selected key
        gets a zero output row.  The ``eps`` guarantee below refers to the full (non-causal) attention;
        a prefix ``K[:i+1]`` can have heavy keys outside the universal set of all of ``K``.
    always_keep : sequence of int, default ()
        Key positions kept in every head whatever their score (attention sinks such as ``[CLS]`` at 0 or
        ``[SEP]`` at -1; negative positions count from the end).  With ``top_k`` they count towards the
        ``top_k`` keys; with ``eps`` they are added to the selected set.
    rng : numpy Generator, int or None
        Randomness for ``"random"`` and ``"h2o"``.
    h2o_queries : int, default 32
        Number of sampled queries for ``"h2o"``.
    query_rank : int, default 2
        Number of query directions for ``"leverage_query"``.
    query_mean : array_like, shape (..., d) or (d,), optional
        The mean query per head for ``"query_mean"`` (default: the mean of ``Q``'s rows).
    return_indices : bool, default False
        Also return the selected key positions per head.

    Returns
    -------
    out : ndarray of float64, shape (..., m, dv)
    indices : ndarray of int64, shape (..., s), only with ``return_indices=True``
        Selected key positions per head, ascending; with ``eps`` the heads keep different numbers of keys
        and the rows are padded at the end with ``-1`` to the largest count ``s``.

    Raises
    ------
    ValueError, TypeError
        For mismatched shapes, non-finite or non-real inputs, or inconsistent options.

    Notes
    -----
    Cost ``O(n d^2)`` for leverage scores plus ``O(m s (d + dv))`` for the attention over ``s`` selected
    keys, instead of ``O(m n (d + dv))``; the attention runs as one parallel numba kernel over all heads.
    Guarantee: with ``score="power", p=2, selection="leverage"`` and ``eps``, every entry of the full
    attention ``A_ij >= eps`` has ``j`` selected (docs/theory.md, "Proofs", 1), and with
    ``normalizer="exact"`` its weight is exact.  Softmax selection is a heuristic with no such
    guarantee (docs/theory.md, "Softmax").  The power weights ``|<q, k>|^p`` are computed as they are, in
    float64: inputs far from unit scale (``|<q, k>|^p`` below about ``1e-308`` or above ``1e308``, e.g. ``Q``
    and ``K`` both of norm ``1e-120`` at ``p = 2``) underflow to zero outputs or overflow to nan; rescale them
    first (the attention of ``|x|^p`` does not depend on the scale of ``q`` and ``k``).

    Examples
    --------
    >>> import numpy as np, levstream as ls
    >>> rng = np.random.default_rng(0)
    >>> Q, K, V = rng.standard_normal((3, 2, 50, 8))   # 2 heads, 50 tokens, head dim 8
    >>> out, idx = ls.lev_attention(Q, K, V, top_k=16, return_indices=True)
    >>> out.shape, idx.shape
    ((2, 50, 8), (2, 16))
    >>> full = ls.lev_attention(Q, K, V, top_k=50)            # every key selected: exact softmax attention
    >>> W = np.exp(Q @ K.transpose(0, 2, 1) / np.sqrt(8)); W /= W.sum(-1, keepdims=True)
    >>> bool(np.allclose(full, W @ V))
    True
    """
    Q, K, V = _validate_qkv(Q, K, V)
    if (top_k is None) == (eps is None):
        raise ValueError(
            "pass exactly one of top_k= (keep k keys per head) or eps= (keep the universal set); "
            f"got top_k={top_k!r}, eps={eps!r}."
        )
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}; got {selection!r} instead.")
    score, p, scale = _check_score(score, p, scale, K.shape[-1])
    mean = _query_mean(query_mean, Q, selection)
    if normalizer not in ("selected", "exact"):
        raise ValueError(f"normalizer must be 'selected' or 'exact'; got {normalizer!r} instead.")
    if normalizer == "exact" and score != "power":
        raise ValueError(
            "normalizer='exact' needs score='power' (the softmax normaliser over all keys is the "
            "dense attention itself); use normalizer='selected'."
        )
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal must be a bool; got {causal!r} ({type(causal).__name__}) instead.")
    n_keys = K.shape[-2]
    sink = _sink_mask(always_keep, n_keys)
    if top_k is not None:
        top_k = check_int(top_k, "top_k", minimum=1)
        if int(sink.sum()) > top_k:
            raise ValueError(
                f"always_keep must name at most top_k keys (they count towards the top_k keys); "
                f"got {int(sink.sum())} positions for top_k={top_k}."
            )
    else:
        eps = check_eps(eps)
        if selection not in ("leverage", "leverage_affine"):
            raise ValueError(
                f"eps= selects the universal set and needs selection='leverage' or "
                f"'leverage_affine'; got selection={selection!r}. Use top_k= instead."
            )

    batch = Q.shape[:-2]
    m, d = Q.shape[-2:]
    n, dv = V.shape[-2:]
    B = int(np.prod(batch, dtype=np.int64))  # explicit: -1 cannot be inferred when Q has no rows
    Qf = Q.reshape(B, m, d)
    Kf = K.reshape(B, n, d)
    Vf = V.reshape(B, n, dv)

    if selection == "first_last":
        k = min(top_k, n)
        first = min(FIRST_LAST_SINKS, k)
        ranked = np.where(np.arange(n) < first, 2.0, np.arange(n) / n) + np.where(sink, 4.0, 0.0)
        pos = np.sort(np.argsort(-ranked, kind="stable")[:k])
        idx = np.broadcast_to(pos, (B, k)).copy()
        counts = np.full(B, k, dtype=np.int64)
    else:
        scores = _scores(
            Qf, Kf, selection, score, p, scale, bool(causal), rng, h2o_queries, query_rank, mean
        )
        if top_k is not None:
            k = min(top_k, n)
            ranked = np.where(sink[None, :], np.inf, scores)
            idx = np.sort(np.argsort(-ranked, axis=1, kind="stable")[:, :k], axis=1)
            counts = np.full(B, k, dtype=np.int64)
        else:
            assert eps is not None  # top_k or eps is given (checked above)
            keep = (scores >= eps * (1.0 - REPORT_RTOL)) | sink[None, :]
            counts = keep.sum(axis=1).astype(np.int64)
            idx = np.full((B, max(int(counts.max()) if B else 0, 1)), -1, dtype=np.int64)
            for b in range(B):
                idx[b, : counts[b]] = np.flatnonzero(keep[b])
    idx = np.ascontiguousarray(idx, dtype=np.int64)

    if normalizer == "exact":
        z_exact = np.ascontiguousarray(_exact_power_normalizer(Qf, Kf, p, bool(causal)))
    else:
        z_exact = np.zeros((B, 0))
    out = np.empty((B, m, dv))
    if B * m:
        selected_attention(
            Qf,
            Kf,
            Vf,
            np.where(idx >= 0, idx, 0),
            counts,
            SOFTMAX if score == "softmax" else POWER,
            float(scale),
            float(p),
            bool(causal),
            z_exact,
            out,
        )
    out = out.reshape(batch + (m, dv))
    if return_indices:
        # eps selection: the kernel's index array has a column at least; the rows returned are as wide as the
        # largest count (top_k: as wide as the keys each head keeps, whatever the batch)
        s = idx.shape[1] if eps is None else (int(counts.max()) if B else 0)
        return out, np.ascontiguousarray(idx[:, :s]).reshape(batch + (s,))
    return out
