"""Brute-force references (the oracles for tests and benchmarks) and a sketch contract checker.

Everything here is deliberately simple and independent of the sketch code paths.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ._config import TIE_RTOL
from ._validation import as_matrix, check_eps, check_int, check_p
from .results import HeavyEntries

__all__ = [
    "DenseHeavyScan",
    "check_sketch_contract",
    "dense_attention",
    "exact_sensitivities",
    "heavy_entries_dense",
]


def dense_attention(Q: Any, K: Any, *, p: float = 2) -> np.ndarray:
    """The full attention matrix ``A = |Q K^T|^p / rowsum`` (m x n; rows with zero sum are all zero)."""
    Q = as_matrix(Q, "Q", allow_empty=True)
    K = as_matrix(K, "K", Q.shape[1] if Q.shape[1] else None)  # the queries' width
    B = np.abs(Q @ K.T) ** check_p(p)
    Z = B.sum(axis=1, keepdims=True)
    return np.divide(B, Z, out=np.zeros_like(B), where=Z > 0)


def heavy_entries_dense(
    Q: Any, K: Any, *, eps: float, p: float = 2, block_rows: int = 64
) -> HeavyEntries:
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
    block_rows = check_int(block_rows, "block_rows", minimum=1)
    counts, keys, vals = [], [], []
    for s in range(0, Q.shape[0], block_rows):
        B = np.abs(Q[s : s + block_rows] @ K.T) ** p
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
    cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)
    return HeavyEntries.from_counts(
        np.asarray(counts, np.int64), cat(keys, np.int64), cat(vals, np.float64), eps
    )


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

        def neg(q: np.ndarray, j: int = j) -> float:
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


#: Tie band of the contract (docs/theory.md, "The guarantee"): entries whose value is within this
#: relative distance of eps may go either way; exact values equal the dense values to this rtol.
_VALUE_RTOL = 1e-9


def _require(condition: Any, message: str) -> None:
    """``assert`` that survives ``python -O``: the checker is a library function, not a test."""
    if not condition:
        raise AssertionError(message)


def check_sketch_contract(
    make: Callable[[], Any], K: Any, Q: Any, *, rng: Any = 0, delta: float | None = None
) -> None:
    """Assert the mergeable-sketch contract on keys ``K`` for sketches built by ``make()``.

    Every answer is compared with brute force over the keys (:func:`dense_attention`), not only
    with the answers of other sketches.  Works for :class:`~levstream.KeySketch` (``K`` of shape
    ``(n, d)``, ``Q`` of shape ``(m, d)``) and :class:`~levstream.MultiHeadKeySketch` (``K`` of
    shape ``(n_heads, n, d)``, ``Q`` of shape ``(n_heads, m, d)``; every head is checked), for
    every ``p`` and every normaliser summary.

    Parameters
    ----------
    make : callable
        Returns a new, empty sketch (the same configuration, and seed, on every call).
    K, Q : array_like
        Keys and queries (small: the reference is dense, ``m x n`` per head).
    rng : int or numpy.random.Generator, default 0
        Seeds the random chunk boundaries.
    delta : float, optional
        The distortion of an approximate (coreset) normaliser; when given, every returned entry
        must also have a true value of at least ``eps (1 - delta)^2``.

    Raises
    ------
    AssertionError
        On the first violation, naming the check, the head and how the sketch was fed.

    Notes
    -----
    The sketch of all keys is built in several ways: one chunk, random chunks, rows then a chunk,
    two shards (``offset=``) merged in both orders, merged with an empty sketch, restored from
    bytes mid-stream and fed on.  Each must satisfy, against brute force:

    * no false negatives: every dense entry ``A >= eps`` is returned and its key is in the
      universal set;
    * exact sketches (results without ``lower``/``upper``): no entry below ``eps`` outside the
      tie band (``1e-9`` relative), values to ``rtol = 1e-9``, exact ``top_k`` values, and every
      way of feeding gives the same universal set and entries;
    * approximate sketches: every returned entry's true value lies in ``[lower, upper]``.

    Also: a query (``heavy_entries``, ``normalizer``, ``universal_set``, ``top_k``) leaves
    ``to_bytes()`` unchanged, an empty chunk is a no-op, a chunk holding a NaN raises
    ``ValueError`` and leaves ``to_bytes()`` unchanged, and a copy is independent of its original.

    Examples
    --------
    >>> import numpy as np, levstream as ls
    >>> from levstream.testing import check_sketch_contract
    >>> rng = np.random.default_rng(0)
    >>> K = rng.standard_normal((600, 4)) * (1.0 + rng.pareto(2.0, size=(600, 1)))
    >>> Q = np.vstack([rng.standard_normal((4, 4)), K[:3]])
    >>> check_sketch_contract(lambda: ls.KeySketch(4, eps=0.05, block_rows=64), K, Q)
    >>> check_sketch_contract(lambda: ls.MultiHeadKeySketch(2, 4, eps=0.05), np.stack([K, -K]),
    ...                       np.stack([Q, Q]))
    """
    gen = np.random.default_rng(rng)
    probe = make()
    multi = hasattr(probe, "n_heads")
    K = np.asarray(K, dtype=np.float64)
    Q = np.asarray(Q, dtype=np.float64)
    if not multi:  # one head: give the data the head axis of the multi-head case
        K, Q = K[None], Q[None]
    H, n, _ = K.shape
    eps, p = probe.eps, probe.p
    dense = [dense_attention(Q[h], K[h], p=p) for h in range(H)]

    def take(X: np.ndarray) -> np.ndarray:  # data as the sketch takes it
        return X if multi else X[0]

    def per_head(result: Any) -> list:
        return list(result) if multi else [result]

    def fed(sk: Any, X: np.ndarray, **ids: Any) -> Any:
        sk.update_many(take(X), **ids)
        return sk

    def check(sk: Any, what: str) -> tuple:
        """Compare ``sk`` with brute force; return its answers for the exact-mode comparisons."""
        _require(sk.n == n, f"{what}: n = {sk.n}, but {n} keys were fed")
        hits, sets = per_head(sk.heavy_entries(take(Q))), per_head(sk.universal_set())
        _require(len(hits) == len(sets) == H, f"{what}: expected one answer per head ({H})")
        answer, exact = [], True
        for h in range(H):
            where = f"{what}, head {h}"
            A, got = dense[h], hits[h]
            rows, keys = got.rows(), got.key_ids
            known = keys.size == 0 or (keys.min() >= 0 and keys.max() < n)
            _require(known, f"{where}: key ids never fed were returned")
            true = A[rows, keys]
            must = set(zip(*(ix.tolist() for ix in np.nonzero(A >= eps * (1 + TIE_RTOL)))))
            missed = sorted(must - set(zip(rows.tolist(), keys.tolist())))
            _require(
                not missed,
                f"{where}: missed {len(missed)} of {len(must)} heavy entries "
                f"(query row, key id), e.g. {missed[:5]}",
            )
            needed = {k for _, k in must} - set(sets[h].ids.tolist())
            _require(
                not needed,
                f"{where}: keys of heavy entries missing from the universal set: "
                f"{sorted(needed)[:5]}",
            )
            if got.lower is None:
                low = true < eps * (1 - TIE_RTOL)
                _require(not low.any(), f"{where}: {int(low.sum())} entries returned below eps")
                _require(
                    np.allclose(got.values, true, rtol=_VALUE_RTOL, atol=0.0),
                    f"{where}: values differ from the dense values",
                )
            else:
                exact = False
                slack = 1 + _VALUE_RTOL
                _require(
                    np.all(got.lower <= true * slack) and np.all(true <= got.upper * slack),
                    f"{where}: a true value lies outside its [lower, upper] bounds",
                )
                if delta is not None:
                    floor = eps * (1 - delta) ** 2 * (1 - TIE_RTOL)
                    _require(
                        np.all(true >= floor),
                        f"{where}: an entry's true value is below eps (1 - delta)^2",
                    )
            answer.append((sets[h].ids.tolist(), sorted(got.as_set())))
        return tuple(answer) if exact else ()

    one = fed(make(), K)
    ref = check(one, "one chunk")

    cuts: list[int] = []
    if n > 1:
        cuts = sorted(gen.choice(np.arange(1, n), size=min(5, n - 1), replace=False).tolist())
    chunked = make()
    for part in np.split(K, cuts, axis=1):
        fed(chunked, part)
    _require(check(chunked, "random chunks") == ref, "chunking changed the answer")

    rows = make()
    head = min(n, 300)
    for i in range(head):
        rows.update(take(K[:, i]))
    fed(rows, K[:, head:])
    _require(check(rows, "rows then a chunk") == ref, "update vs update_many changed the answer")

    mid = n // 2
    a, b = fed(make(), K[:, :mid]), fed(make(), K[:, mid:], offset=mid)
    _require(check(a.copy().merge(b), "merge a + b") == ref, "merge a + b differs from one stream")
    _require(check(b.copy().merge(a), "merge b + a") == ref, "merge b + a differs from one stream")
    _require(
        check(one.copy().merge(make()), "merged with an empty sketch") == ref,
        "merging an empty sketch changed the answer",
    )

    restored = type(a).from_bytes(a.to_bytes())
    fed(restored, K[:, mid:])
    _require(
        check(restored, "restored from bytes, then fed") == ref,
        "bytes round trip then more updates differs",
    )

    clone = a.copy()
    fed(clone, K[:, mid:], offset=mid)
    _require(a.n == mid, "updating a copy changed the original")

    fresh = make()  # never queried: fed in random chunks, rows wait in the input buffer
    for part in np.split(K, cuts, axis=1):
        fed(fresh, part)
    state = fresh.to_bytes()
    queries = {
        "heavy_entries": lambda sk: sk.heavy_entries(take(Q)),
        "normalizer": lambda sk: sk.normalizer(take(Q)),
        "universal_set": lambda sk: sk.universal_set(),
        "top_k": lambda sk: sk.top_k(take(Q), 2),
    }
    for name, query in queries.items():
        sk = type(chunked).from_bytes(state)
        query(sk)
        _require(sk.to_bytes() == state, f"{name} changed the sketch (to_bytes() differs after it)")

    sk = type(chunked).from_bytes(state)
    fed(sk, K[:, :0])
    _require(sk.to_bytes() == state, "an empty chunk changed the sketch")
    bad = K[:, :3].copy()
    bad[:, 1, 0] = np.nan
    try:
        fed(sk, bad)
    except ValueError:
        pass
    else:
        raise AssertionError("a chunk holding a NaN was accepted")
    _require(sk.to_bytes() == state, "a rejected chunk changed the sketch")

    if ref != ():  # exact sketches: the top-k values are the dense values of the returned keys
        for h, top in enumerate(per_head(one.top_k(take(Q), 2))):
            ids = np.asarray(top.key_ids)
            live = ids >= 0
            true = np.take_along_axis(dense[h], np.where(live, ids, 0), axis=1)
            vals = np.asarray(top.values)[live]
            close = np.allclose(vals, true[live], rtol=_VALUE_RTOL, atol=0.0)
            _require(close, f"top_k, head {h}: values differ from the dense values")


class DenseHeavyScan:
    """Every entry ``A[i, j] >= eps`` of queries ``Q`` over keys fed chunk by chunk, by brute force.

    The streaming form of :func:`heavy_entries_dense`, for keys that are never held together (a
    generator, a file read in chunks) and for dense baselines in benchmarks: feed the keys in order
    with :meth:`add` (key ``j`` of the stream gets id ``offset + j``), then call :meth:`result`.
    Memory: one ``m x block_rows`` score matrix plus the candidate entries.

    Each block ``X`` of keys gives ``B = |Q X^T|^p``, whose row sums are added to the normalisers
    ``Z``.  ``Z`` only grows, so an entry with ``B >= eps Z`` at the end had ``B >= eps Z_so_far``
    when its block was seen: keeping those (at most ``1/eps`` per query and block) and filtering
    with the final ``Z`` gives every heavy entry, with value ``B / Z``.

    Parameters
    ----------
    Q : array_like, shape (m, d)
        The queries.
    eps : float
        Threshold, ``1e-300 <= eps <= 1``.
    p : float, default 2
        Exponent of ``f(x) = |x|^p``.
    offset : int, default 0
        Id of the first key fed.
    block_rows : int, default 8192
        Keys per block of scores.

    Attributes
    ----------
    normalizer : ndarray of float64, shape (m,)
        ``Z_i = sum_j |<q_i, k_j>|^p`` over the keys fed so far.
    n : int
        Number of keys fed so far.

    Examples
    --------
    >>> import numpy as np
    >>> from levstream.testing import DenseHeavyScan, heavy_entries_dense
    >>> rng = np.random.default_rng(0)
    >>> K, Q = rng.standard_normal((1000, 4)), rng.standard_normal((5, 4))
    >>> scan = DenseHeavyScan(Q, eps=0.01)
    >>> for chunk in np.array_split(K, 7):
    ...     _ = scan.add(chunk)
    >>> scan.result().as_set() == heavy_entries_dense(Q, K, eps=0.01).as_set()
    True
    """

    def __init__(
        self, Q: Any, *, eps: float, p: float = 2, offset: int = 0, block_rows: int = 8192
    ) -> None:
        self._Q = as_matrix(Q, "Q", allow_empty=True)
        self.eps, self.p = check_eps(eps), check_p(p)
        self._offset = check_int(offset, "offset", minimum=0)  # key ids are non-negative
        self._block_rows = check_int(block_rows, "block_rows", minimum=1)
        self.normalizer = np.zeros(self._Q.shape[0])
        self.n = 0
        self._found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def add(self, X: Any) -> DenseHeavyScan:
        """Feed the next keys (shape (k, d), k >= 0); returns ``self``."""
        X = as_matrix(X, "X", self._Q.shape[1] or None, allow_empty=True)
        for start in range(0, X.shape[0], self._block_rows):
            B = self._Q @ X[start : start + self._block_rows].T
            if self.p == 2.0:
                np.square(B, out=B)
            else:
                np.abs(B, out=B)
                np.power(B, self.p, out=B)
            self.normalizer += B.sum(axis=1)
            i, j = np.nonzero(B >= self.eps * self.normalizer[:, None])
            self._found.append((i, j + (self._offset + self.n + start), B[i, j]))
        self.n += X.shape[0]
        return self

    def result(self) -> HeavyEntries:
        """Every entry ``A[i, j] >= eps`` over the keys fed so far, by query then key id."""
        m = self._Q.shape[0]
        if not self._found:
            none = np.zeros(0, np.int64)
            return HeavyEntries.from_counts(np.zeros(m, np.int64), none, np.zeros(0), self.eps)
        i, j, b = (np.concatenate(parts) for parts in zip(*self._found))
        Z = self.normalizer[i]
        a = b / np.where(Z > 0, Z, np.inf)
        heavy = a >= self.eps
        i, j, a = i[heavy], j[heavy], a[heavy]
        order = np.lexsort((j, i))
        counts = np.bincount(i, minlength=m).astype(np.int64)
        return HeavyEntries.from_counts(counts, j[order].astype(np.int64), a[order], self.eps)
