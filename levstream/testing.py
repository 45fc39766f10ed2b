"""Brute-force references (the oracles for tests and benchmarks) and a sketch contract checker.

Everything here is deliberately simple and independent of the sketch code paths.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ._validation import as_matrix, check_eps, check_p
from .results import HeavyEntries

__all__ = ["heavy_entries_dense", "dense_attention", "exact_sensitivities", "check_sketch_contract"]


def dense_attention(Q: Any, K: Any, *, p: float = 2) -> np.ndarray:
    """The full attention matrix ``A = |Q K^T|^p / rowsum`` (m x n; rows with zero sum are all zero)."""
    Q, K = as_matrix(Q, "Q", allow_empty=True), as_matrix(K, "K")
    B = np.abs(Q @ K.T) ** check_p(p)
    Z = B.sum(axis=1, keepdims=True)
    return np.divide(B, Z, out=np.zeros_like(B), where=Z > 0)


def heavy_entries_dense(Q: Any, K: Any, *, eps: float, p: float = 2, block_rows: int = 64) -> HeavyEntries:
    """Every entry ``A[i, j] >= eps`` by blocked brute force over all keys (memory: ``block_rows x n``).

    Examples
    --------
    >>> import numpy as np
    >>> from levstream.testing import heavy_entries_dense
    >>> K = np.array([[1.0, 0.0], [0.0, 2.0]])
    >>> heavy_entries_dense(np.array([[1.0, 1.0]]), K, eps=0.5).key_ids.tolist()
    [1]
    """
    Q = as_matrix(Q, "Q", allow_empty=True)
    K = as_matrix(K, "K", Q.shape[1] if Q.shape[1] else None)
    eps, p = check_eps(eps), check_p(p)
    counts, keys, vals = [], [], []
    for s in range(0, Q.shape[0], block_rows):
        B = np.abs(Q[s:s + block_rows] @ K.T) ** p
        Z = B.sum(axis=1)
        for i in range(B.shape[0]):
            if Z[i] <= 0:
                counts.append(0)
                continue
            a = B[i] / Z[i]
            j = np.flatnonzero(a >= eps)
            counts.append(j.size)
            keys.append(j)
            vals.append(a[j])
    cat = (lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt))
    return HeavyEntries.from_counts(np.asarray(counts, np.int64), cat(keys, np.int64), cat(vals, np.float64), eps)


def exact_sensitivities(K: Any, *, p: float = 2, n_starts: int = 64, rng: Any = 0) -> np.ndarray:
    """``s_j = sup_q |<q,k_j>|^p / sum_l |<q,k_l>|^p`` by direct numerical maximisation (tiny inputs only).

    For p = 2 the supremum is attained at ``q = G^+ k_j`` (closed form); for other p it is maximised with
    multi-start L-BFGS over the unit sphere, so the result is a *lower* bound on ``s_j`` that is tight in
    practice.
    """
    import scipy.optimize as so

    K = as_matrix(K, "K")
    p = check_p(p)
    n, d = K.shape
    if p == 2.0:
        G = K.T @ K
        Gp = np.linalg.pinv(G, rcond=1e-12, hermitian=True)
        out = np.empty(n)
        for j in range(n):
            q = Gp @ K[j]
            den = float(np.sum((K @ q) ** 2))
            out[j] = float((K[j] @ q) ** 2 / den) if den > 0 else 0.0
        return out
    gen = np.random.default_rng(rng)
    out = np.zeros(n)
    for j in range(n):
        def neg(q: np.ndarray) -> float:
            num = abs(K[j] @ q) ** p
            den = float(np.sum(np.abs(K @ q) ** p))
            return -num / den if den > 0 else 0.0

        starts = [K[j]] + [gen.standard_normal(d) for _ in range(n_starts)]
        best = 0.0
        for q0 in starts:
            res = so.minimize(neg, q0, method="Nelder-Mead" if d <= 2 else "L-BFGS-B")
            best = max(best, -float(res.fun))
        out[j] = best
    return out


def check_sketch_contract(make: Callable[[], Any], K: np.ndarray, Q: np.ndarray, *, rng: Any = 0) -> None:
    """Assert the mergeable-sketch contract on keys ``K`` for sketches built by ``make()``.

    Checks: chunking invariance, ``update`` vs ``update_many``, merge in two orders equals one stream,
    merging an empty sketch is the identity, a bytes round trip followed by more updates equals a sketch
    that was never serialized, and copies are independent.  Raises ``AssertionError`` on the first failure.
    """
    gen = np.random.default_rng(rng)
    n = K.shape[0]

    def answer(sk: Any) -> tuple:
        return (sk.universal_set().ids.tolist(), sorted(sk.heavy_entries(Q).as_set()), sk.n)

    one = make().update_many(K)
    ref = answer(one)

    cuts = np.sort(gen.choice(np.arange(1, n), size=min(5, n - 1), replace=False))
    chunked = make()
    for part in np.split(K, cuts):
        chunked.update_many(part)
    assert answer(chunked) == ref, "chunking changed the answer"

    rows = make()
    head = min(n, 300)
    for x in K[:head]:
        rows.update(x)
    rows.update_many(K[head:]) if head < n else None
    assert answer(rows) == ref, "update vs update_many changed the answer"

    mid = n // 2
    a = make().update_many(K[:mid])
    b = make().update_many(K[mid:], offset=mid)
    assert answer(a.copy().merge(b)) == ref, "merge a+b differs from one stream"
    assert answer(b.copy().merge(a)) == ref, "merge b+a differs from one stream"
    assert answer(one.copy().merge(make())) == ref, "merging an empty sketch changed the answer"

    part = make().update_many(K[:mid])
    restored = type(part).from_bytes(part.to_bytes())
    restored.update_many(K[mid:])
    assert answer(restored) == ref, "bytes round trip then more updates differs"

    original = make().update_many(K[:mid])
    clone = original.copy()
    clone.update_many(K[mid:], offset=mid)
    assert original.n == mid, "updating a copy changed the original"
