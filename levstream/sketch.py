"""``KeySketch``: stream keys once, keep a summary of size independent of n, answer heavy-entry queries exactly.

Data flow (DESIGN.md §2): rows and chunks are validated, numbered and buffered into blocks of ``block_rows``;
each block is folded into the normaliser summary (``G = K^T K`` for p = 2) and its rows are scored against
it; rows whose leverage score can still reach ``eps`` become candidates.  Scores only decrease as keys
arrive, so a candidate that falls below ``eps`` is dropped for good.  Candidates are rescored whenever their
number exceeds twice the a-priori bound ``d / eps`` and before every query.
"""

from __future__ import annotations

import os
from typing import Any, Iterable

import numpy as np

from . import _serialize
from ._config import PRUNE_RTOL, QUERY_BLOCK_ROWS, default_block_rows
from ._config import REPORT_RTOL as TIE_RTOL
from ._ids import IdRanges
from ._kernels.query import threshold_power_csr
from ._kernels.rows import scaled_sq_norms, sq_norm
from ._validation import as_ids, as_matrix, as_real_array, as_row, check_eps, check_finite, check_int, check_p
from .results import HeavyEntries, TopK, UniversalSet
from .summaries import GramSummary, make_summary, summary_from_state

_SKETCH_KIND = "KeySketch"


class KeySketch:
    """Streaming, mergeable summary of keys that finds every heavy attention entry of new queries.

    For ``f(x) = |x|^p`` the attention of query ``q`` on key ``k_j`` is
    ``A_j = f(<q, k_j>) / sum_l f(<q, k_l>)``.  The sketch keeps the normaliser summary of all keys plus the
    *universal set* of keys whose sensitivity is at least ``eps``; every entry ``A_j >= eps`` of every
    possible query lies in that set.  For p = 2 both are exact.

    Parameters
    ----------
    dim : int
        Width of every key row.
    eps : float
        Heaviness threshold, ``0 < eps <= 1``.  Queries may use any threshold ``>= eps``.
    p : float, default 2
        Exponent of ``f(x) = |x|^p``, any ``p > 0``.  p = 2 is exact; p = 4 is exact with ``exact=True``
        (lifted Gram matrix); every other ``p`` (and p = 4 by default) uses an l_p coreset.
    block_rows : int, optional
        Rows per processing block (default: about 4 MiB of float64 rows, 8192 rows for dim = 64).
    exact : bool, optional
        ``True`` for the exact lifted summary of p = 4 (``D = d(d+1)/2``, ``D^2`` memory, refused beyond
        ``memory_budget``).  Default: exact for p = 2, coreset otherwise.
    delta, failure_prob, oversampling, rng
        Coreset settings (p other than 2, see :class:`levstream.summaries.CoresetSummary`): the normaliser
        is within ``(1 ± delta)`` of the truth except with per-query probability ``failure_prob`` (default
        ``delta = 0.1`` and a practical oversampling; the proven bound is ``normalizer_summary.failure_bound``).
        ``rng`` seeds the sampling; its state is serialized, so a restored sketch continues identically.
    memory_budget : int, optional
        Bytes allowed for the lifted summary of ``exact=True`` (default 256 MiB).

    Notes
    -----
    Guarantee (p = 2): ``universal_set().ids`` equals ``{j : tau_j >= eps}`` with ``tau_j = k_j^T (K^T K)^+ k_j``
    computed on all keys, whatever the chunking, the mix of ``update``/``update_many``/``extend`` and the
    shard split and merge order; keys within ``1e-9 eps`` of the threshold may go either way.
    ``heavy_entries`` returns exactly the entries ``A >= eps'`` of the dense attention.  State is
    ``O(d^2 + |candidates| d)`` with at most ``2 d / eps`` candidates.

    Guarantee (p = 4, ``exact=True``): the same with ``tau_j`` the leverage score of the lifted keys (an upper
    bound on the p = 4 sensitivity), at most ``2 D / eps`` candidates; queries exact.

    Guarantee (other p, coreset): candidates are kept while ``(1 + delta) c_p (k^T M^-1 k)^(p/2) >= eps``
    (``M`` the coreset's Lewis form, ``c_p = d^max(0, p/2-1)``).  ``heavy_entries`` reports ``A~ >= eps (1 -
    delta)`` with ``A~`` computed with the coreset normaliser ``Z~``, plus ``lower``/``upper`` bounds
    ``A~ (1 -+ delta)^-1``: whenever ``Z~`` is within ``(1 ± delta)`` of ``Z`` (per query, probability
    ``>= 1 - failure_prob``), every entry ``A >= eps`` is returned and every returned entry has
    ``A >= eps (1 - delta)^2``.

    Examples
    --------
    >>> import numpy as np, levstream as ls
    >>> rng = np.random.default_rng(0)
    >>> K = rng.standard_normal((20_000, 8)) * rng.pareto(3.0, size=(20_000, 1))
    >>> sk = ls.KeySketch(8, eps=0.05)
    >>> for chunk in np.array_split(K, 7):
    ...     _ = sk.update_many(chunk)
    >>> U = sk.universal_set()
    >>> bool(np.array_equal(U.ids, ls.universal_set(K, eps=0.05).ids))
    True
    >>> Q = rng.standard_normal((5, 8))
    >>> hits = sk.heavy_entries(Q)
    >>> hits.as_set() == ls.testing.heavy_entries_dense(Q, K, eps=0.05, p=2).as_set()
    True
    """

    def __init__(self, dim: int, *, eps: float, p: float = 2, block_rows: int | None = None,
                 exact: bool | None = None, delta: float = 0.1, failure_prob: float | None = None,
                 oversampling: float | None = None, rng: Any = None, memory_budget: int | None = None) -> None:
        dim = check_int(dim, "dim", minimum=1)
        eps = check_eps(eps)
        p = check_p(p)
        block_rows = default_block_rows(dim) if block_rows is None else check_int(block_rows, "block_rows", minimum=1)
        self._dim, self._eps, self._p = dim, eps, p
        self._block_rows = block_rows
        self._summary = make_summary(dim, p, exact=exact, delta=delta, failure_prob=failure_prob,
                                     oversampling=oversampling, rng=rng, memory_budget=memory_budget)
        self._n = 0
        self._next_id = 0
        self._seen = IdRanges()
        self._buf_rows = np.empty((0, dim))
        self._buf_ids = np.empty(0, dtype=np.int64)
        self._buf_n = 0
        self._cand_rows = np.empty((0, dim))
        self._cand_ids = np.empty(0, dtype=np.int64)
        self._cand_n = 0

    # ------------------------------------------------------------------ properties
    @property
    def dim(self) -> int:
        return self._dim

    @property
    def eps(self) -> float:
        return self._eps

    @property
    def p(self) -> float:
        return self._p

    @property
    def n(self) -> int:
        """Number of keys fed so far (including buffered ones)."""
        return self._n

    @property
    def num_retained(self) -> int:
        """Key rows held in memory: candidates plus rows waiting in the input buffer."""
        return self._cand_n + self._buf_n

    def is_empty(self) -> bool:
        return self._n == 0

    @property
    def nbytes(self) -> int:
        """Bytes held by the sketch's arrays (summary, candidates, input buffer)."""
        return int(self._summary.nbytes + self._cand_rows.nbytes + self._cand_ids.nbytes
                   + self._buf_rows.nbytes + self._buf_ids.nbytes + self._seen.ranges.nbytes)

    @property
    def capacity(self) -> int:
        """Candidates are rescored when their number exceeds this (twice the bound ``d / eps``, ``D / eps``
        for exact p = 4, ``(1 + delta) d^max(1, p/2) / eps`` for the coreset)."""
        return int(2 * np.ceil(getattr(self._summary, "size_bound", self._dim) / self._eps)) + 1

    @property
    def next_id(self) -> int:
        """The id the next row fed without ``ids=``/``offset=`` will get."""
        return self._next_id

    @property
    def ids_tracked_exactly(self) -> bool:
        """Whether every id ever fed is remembered for clash detection (see ``levstream._ids``)."""
        return self._seen.exact

    @property
    def normalizer_summary(self) -> GramSummary:
        """The normaliser summary (read-only use: the Gram matrix via ``.gram``)."""
        self._flush()
        return self._summary

    def __repr__(self) -> str:
        return (f"KeySketch(dim={self._dim}, eps={self._eps:g}, p={self._p:g}, n={self._n}, "
                f"retained={self.num_retained}, mode={self._summary.mode!r})")

    # ------------------------------------------------------------------ ingest
    def _new_ids(self, m: int, ids: Any, offset: Any) -> tuple[np.ndarray | None, int, np.ndarray]:
        """Validate ids for ``m`` new rows; returns (ids or None for a range, start, ranges-to-add)."""
        if ids is not None and offset is not None:
            raise ValueError("pass ids= or offset=, not both.")
        if ids is not None:
            arr = as_ids(ids, m)
            srt = np.sort(arr)
            hit = self._seen.clash(srt)
            if hit is None:
                hit = self._retained_clash(srt)
            if hit is not None:
                raise ValueError(f"ids clash: id {hit} was already fed to this sketch.")
            return arr, -1, srt
        start = self._next_id if offset is None else check_int(offset, "offset", minimum=0)
        if start > np.iinfo(np.int64).max - m:
            raise ValueError(f"ids would overflow int64 from offset {start}.")
        rng = np.array([start, start + m - 1], dtype=np.int64)
        hit = None
        if self._seen.ranges.shape[0] and start < self._seen.ranges[-1, 1]:
            hit = self._seen.clash(np.arange(start, start + m, dtype=np.int64))
        if hit is None and offset is not None:
            hit = self._retained_clash(np.arange(start, start + m, dtype=np.int64))
        if hit is not None:
            raise ValueError(f"ids clash: id {hit} was already fed to this sketch "
                             f"(rows would be numbered {start}..{start + m - 1}; pass offset= or ids=).")
        return None, start, rng

    def _retained_clash(self, sorted_ids: np.ndarray) -> int | None:
        """Smallest of ``sorted_ids`` held as a candidate or buffered row, once range tracking is inexact."""
        if self._seen.exact:
            return None
        held = np.concatenate([self._cand_ids[: self._cand_n], self._buf_ids[: self._buf_n]])
        both = np.intersect1d(held, sorted_ids)
        return int(both[0]) if both.size else None

    def _record_ids(self, m: int, ids: np.ndarray | None, start: int, srt: np.ndarray) -> np.ndarray:
        if ids is None:
            ranges = self._seen.ranges
            if ranges.shape[0] and ranges[-1, 1] == start:  # the running counter: extend the last interval
                ranges[-1, 1] = start + m
            else:
                self._seen = self._seen.union(IdRanges(np.array([[start, start + m]], dtype=np.int64)))
            self._next_id = max(self._next_id, start + m)
            return np.arange(start, start + m, dtype=np.int64)
        self._seen = self._seen.added(srt)
        self._next_id = max(self._next_id, int(srt[-1]) + 1)
        return ids

    def update(self, x: Any) -> "KeySketch":
        """Feed one key row (1-D, length ``dim``); it gets the next id.  Buffered; returns ``self``."""
        if type(x) is np.ndarray and x.dtype == np.float64 and x.shape == (self._dim,):
            if not sq_norm(x) < np.inf:  # a nan/inf, or squares that overflow: find which, raise
                x = as_row(x, "x", self._dim)
                _check_magnitude(x[None, :], "x")
        else:
            x = as_row(x, "x", self._dim)
            _check_magnitude(x[None, :], "x")
        i = self._next_id
        if self._seen.ranges.shape[0] and i < self._seen.ranges[-1, 1]:
            hit = self._seen.clash(np.array([i], dtype=np.int64))
            if hit is not None:
                raise ValueError(f"ids clash: id {hit} was already fed to this sketch.")
        if self._buf_n == self._buf_rows.shape[0]:
            self._grow_buffer(self._buf_n + 1)
        self._buf_rows[self._buf_n] = x
        self._buf_ids[self._buf_n] = i
        self._buf_n += 1
        self._n += 1
        ranges = self._seen.ranges
        if ranges.shape[0] and ranges[-1, 1] == i:
            ranges[-1, 1] = i + 1
        else:
            self._seen = self._seen.union(IdRanges(np.array([[i, i + 1]], dtype=np.int64)))
        self._next_id = i + 1
        if self._buf_n >= self._block_rows:
            self._flush()
        return self

    def update_many(self, X: Any, ids: Any = None, offset: Any = None) -> "KeySketch":
        """Feed a chunk of key rows (shape (m, dim)); returns ``self``.

        Parameters
        ----------
        X : array_like, shape (m, dim)
            Real, finite rows (float32 input is accumulated in float64).
        ids : array_like of int, shape (m,), optional
            Global ids of the rows (unique, non-negative, never fed before).
        offset : int, optional
            Number the rows ``offset, offset + 1, ...`` (for shards of one global stream).

        Raises
        ------
        ValueError, TypeError
            For bad shapes, dtypes, non-finite values or clashing ids; the sketch is left unchanged.
        """
        X = as_matrix(X, "X", self._dim, hint="Use update(x) for one row.", finite=False)
        m = X.shape[0]
        new_ids, start, srt = self._new_ids(m, ids, offset)
        # Plan: top up the pending block, then whole blocks straight from X, then the tail into the buffer.
        head = min(m, self._block_rows - self._buf_n) if self._buf_n else 0
        n_full = (m - head) // self._block_rows
        tail = head + n_full * self._block_rows
        grams = self._validated_block_grams(X, head, n_full)
        for part in (X[:head], X[tail:]):  # rows that wait in the buffer are checked now, not at flush time
            if part.shape[0]:
                check_finite(part, "X")
                _check_magnitude(part, "X")
        # --- nothing has been changed up to here; from here on nothing can fail ---
        all_ids = self._record_ids(m, new_ids, start, srt)
        self._n += m
        if head:
            self._append_buffer(X[:head], all_ids[:head])
            if self._buf_n >= self._block_rows:
                self._flush()
        for b in range(n_full):
            s = head + b * self._block_rows
            e = s + self._block_rows
            self._process(X[s:e], all_ids[s:e], None if grams is None else grams[b])
        if tail < m:
            self._append_buffer(X[tail:], all_ids[tail:])
        return self

    _MAX_PRECOMPUTED_BLOCKS = 64

    def _validated_block_grams(self, X: np.ndarray, head: int, n_full: int) -> list[np.ndarray] | None:
        """Check the whole blocks of ``X`` for nan/inf; return their Gram blocks when computed on the way.

        A nan/inf in a block makes the diagonal of its Gram block non-finite, so for up to
        ``_MAX_PRECOMPUTED_BLOCKS`` blocks the check costs nothing beyond the Gram update itself (no extra
        pass over the data).  Larger chunks are checked with one ``isfinite`` pass instead.
        """
        if n_full == 0:
            return None
        body = X[head:head + n_full * self._block_rows]
        if n_full > self._MAX_PRECOMPUTED_BLOCKS:
            check_finite(body, "X")
            return None
        grams = []
        for b in range(n_full):
            block = body[b * self._block_rows:(b + 1) * self._block_rows]
            g = self._summary.block_gram(block)
            if not np.isfinite(np.diagonal(g)).all():
                check_finite(X, "X")  # names the first bad entry
                _check_magnitude(block, "X")
            grams.append(g)
        return grams

    def extend(self, iterable: Iterable[Any], progress: bool = False) -> "KeySketch":
        """Feed rows and/or chunks from an iterable (e.g. a generator); returns ``self``.

        Each item is a 1-D row or a 2-D chunk.  All or nothing: if an item is rejected the sketch is restored
        to its state before the call and the error names the item.  ``progress=True`` shows a tqdm bar.
        """
        snapshot = self.copy()
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(unit=" rows", unit_scale=True, desc="levstream")
        try:
            for index, item in enumerate(iterable):
                try:
                    arr = as_real_array(item, f"item {index}")
                    if arr.ndim == 1:
                        self.update(arr)
                        rows = 1
                    elif arr.ndim == 2:
                        self.update_many(arr)
                        rows = arr.shape[0]
                    else:
                        raise ValueError(f"must be a 1-D row or a 2-D chunk; got shape {arr.shape}.")
                except (ValueError, TypeError) as exc:
                    raise type(exc)(f"extend: item {index} rejected ({exc}); the sketch was left as before the call.") from exc
                if bar is not None:
                    bar.update(rows)
        except BaseException:
            self.__dict__.update(snapshot.__dict__)
            raise
        finally:
            if bar is not None:
                bar.close()
        return self

    # ------------------------------------------------------------------ buffer and blocks
    def _grow_buffer(self, needed: int) -> None:
        size = min(max(needed, 2 * self._buf_rows.shape[0], 64), max(self._block_rows, needed))
        rows = np.empty((size, self._dim))
        ids = np.empty(size, dtype=np.int64)
        rows[: self._buf_n] = self._buf_rows[: self._buf_n]
        ids[: self._buf_n] = self._buf_ids[: self._buf_n]
        self._buf_rows, self._buf_ids = rows, ids

    def _append_buffer(self, X: np.ndarray, ids: np.ndarray) -> None:
        m = X.shape[0]
        if self._buf_n + m > self._buf_rows.shape[0]:
            self._grow_buffer(self._buf_n + m)
        self._buf_rows[self._buf_n:self._buf_n + m] = X
        self._buf_ids[self._buf_n:self._buf_n + m] = ids
        self._buf_n += m

    def flush(self) -> "KeySketch":
        """Settle the sketch now: process the rows waiting in the input buffer and rescore the candidates,
        dropping those that can no longer be heavy (queries, merges and ``universal_set`` do it anyway).

        The answers do not change; the state shrinks to its smallest size, so call it before shipping a
        sketch (``to_bytes``, pickling) to another process.  Returns ``self``.
        """
        self._flush()
        if self._cand_n:
            self._prune()
        return self

    def _flush(self) -> None:
        if self._buf_n:
            n = self._buf_n
            self._buf_n = 0
            try:
                self._process(self._buf_rows[:n], self._buf_ids[:n])
            except BaseException:
                self._buf_n = n  # the summary refused the block before changing anything: keep the rows
                raise

    def _margin(self) -> float:
        return max(PRUNE_RTOL, 4.0 * self._summary.rel_error)

    def _process(self, X: np.ndarray, ids: np.ndarray, block: np.ndarray | None = None) -> None:
        """Fold one block into the summary and keep its rows that may be heavy.

        The pre-filter bound is taken *before* the block is folded in; it stays valid after (ALGORITHMS.md
        §3: G only grows).  The norms are computed after the Gram update, while the block is still in cache.
        """
        prefilter = getattr(self._summary, "prefilter", None)  # lifted / coreset summaries filter themselves
        if prefilter is not None:
            self._summary.add(X, block)
            threshold = self._eps * (1.0 - self._margin())
            idx = prefilter(X, threshold)
        else:
            scale, lam = self._summary.bound_weights()
            self._summary.add(X, block)
            threshold = self._eps * (1.0 - self._margin())
            if scale is None:
                idx = np.arange(X.shape[0])
            else:
                idx = np.flatnonzero(scaled_sq_norms(X, scale) >= threshold * lam)
        if idx.size:
            rows = X[idx]
            # upper bounds suffice here: candidates are rescored exactly at every prune and before queries
            upper = getattr(self._summary, "score_upper_bounds", self._summary.scores)
            keep = upper(rows) >= threshold
            if keep.any():
                self._append_candidates(rows[keep], ids[idx[keep]])
        if self._cand_n > self.capacity:
            self._prune()

    def _append_candidates(self, rows: np.ndarray, ids: np.ndarray) -> None:
        m = rows.shape[0]
        need = self._cand_n + m
        if need > self._cand_rows.shape[0]:
            size = max(need, min(2 * self._cand_rows.shape[0], self.capacity + self._block_rows), 16)
            new_rows = np.empty((size, self._dim))
            new_ids = np.empty(size, dtype=np.int64)
            new_rows[: self._cand_n] = self._cand_rows[: self._cand_n]
            new_ids[: self._cand_n] = self._cand_ids[: self._cand_n]
            self._cand_rows, self._cand_ids = new_rows, new_ids
        self._cand_rows[self._cand_n:need] = rows
        self._cand_ids[self._cand_n:need] = ids
        self._cand_n = need

    def _prune(self) -> np.ndarray:
        """Rescore all candidates against the current summary, drop those below eps; return kept scores."""
        n = self._cand_n
        scores = self._summary.scores(self._cand_rows[:n])
        keep = np.flatnonzero(scores >= self._eps * (1.0 - self._margin()))
        k = keep.size
        if k < n:
            self._cand_rows[:k] = self._cand_rows[keep]
            self._cand_ids[:k] = self._cand_ids[keep]
            self._cand_n = k
        return scores[keep]

    def _settled(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Flush, prune, and return (ids, rows, scores) of the candidates sorted by id (views)."""
        self._flush()
        scores = self._prune()
        n = self._cand_n
        order = np.argsort(self._cand_ids[:n], kind="stable")
        if not np.array_equal(order, np.arange(n)):
            self._cand_ids[:n] = self._cand_ids[:n][order]
            self._cand_rows[:n] = self._cand_rows[:n][order]
            scores = scores[order]
        return self._cand_ids[:n], self._cand_rows[:n], scores

    # ------------------------------------------------------------------ merge
    def _check_compatible(self, other: Any) -> None:
        if not isinstance(other, KeySketch):
            raise TypeError(f"can only merge a KeySketch; got {type(other).__name__} instead.")
        mine = (self._dim, self._eps, self._p)
        theirs = (other._dim, other._eps, other._p)
        if mine != theirs:
            raise ValueError(f"cannot merge sketches with different (dim, eps, p): {mine} vs {theirs}.")
        mine, theirs = (getattr(s._summary, "config", ("gram",)) for s in (self, other))
        if mine != theirs:
            raise ValueError(f"cannot merge sketches with different normaliser summaries: {mine} vs {theirs}.")

    def merge(self, other: "KeySketch") -> "KeySketch":
        """Fold ``other`` (same dim, eps, p; disjoint ids) into this sketch in place; returns ``self``.

        The result is the sketch of the union of both key streams: merging is associative and commutative,
        so any reduction tree over shards gives the same universal set.  ``other`` is not modified.
        """
        self._check_compatible(other)
        if other is self:
            raise ValueError("cannot merge a sketch with itself (every id would clash).")
        hit = self._seen.clash_with(other._seen)
        if hit is None:
            mine = set(self._cand_ids[: self._cand_n].tolist()) | set(self._buf_ids[: self._buf_n].tolist())
            theirs = np.concatenate([other._cand_ids[: other._cand_n], other._buf_ids[: other._buf_n]])
            both = [i for i in theirs.tolist() if i in mine]
            hit = min(both) if both else None
        if hit is not None:
            raise ValueError(f"cannot merge: both sketches contain key id {hit}. Shards of one stream need "
                             "disjoint ids: pass offset= or ids= to update_many.")
        src = other.copy()
        src._flush()
        self._flush()
        self._summary.merge(src._summary)
        self._append_candidates(src._cand_rows[: src._cand_n], src._cand_ids[: src._cand_n])
        self._seen = self._seen.union(src._seen)
        self._n += src._n
        self._next_id = max(self._next_id, src._next_id)
        self._prune()
        return self

    def __iadd__(self, other: "KeySketch") -> "KeySketch":
        return self.merge(other)

    def __add__(self, other: "KeySketch") -> "KeySketch":
        return self.copy().merge(other)

    @classmethod
    def merge_all(cls, sketches: Iterable["KeySketch"]) -> "KeySketch":
        """Merge an iterable of sketches pairwise in a balanced tree and return a new sketch."""
        level = [s.copy() for s in sketches]
        if not level:
            raise ValueError("merge_all needs at least one sketch; got none.")
        while len(level) > 1:
            level = [level[i].merge(level[i + 1]) if i + 1 < len(level) else level[i]
                     for i in range(0, len(level), 2)]
        return level[0]

    # ------------------------------------------------------------------ queries
    def universal_set(self) -> UniversalSet:
        """Every key whose leverage score over all keys seen is ``>= eps`` (exact for p = 2)."""
        ids, rows, scores = self._settled()
        margin = max(TIE_RTOL, 4.0 * self._summary.rel_error)
        sel = scores >= self._eps * (1.0 - margin)
        return UniversalSet(ids[sel].copy(), rows[sel].copy(), scores[sel].copy(), self._eps, self._p,
                            self._n, margin)

    def _queries(self, Q: Any) -> np.ndarray:
        return as_matrix(Q, "Q", self._dim, hint="Pass queries as a 2-D array, one row per query.",
                         allow_empty=True)

    def normalizer(self, Q: Any) -> np.ndarray:
        """``Z(q) = sum_l f(<q, k_l>)`` over *all* keys fed, for every query row (exact for p = 2)."""
        Q = self._queries(Q)
        self._flush()
        return self._summary.normalizer(Q)

    def heavy_entries(self, Q: Any, eps: float | None = None) -> HeavyEntries:
        """Every entry ``A[i, j] >= eps`` of the attention of queries ``Q`` over all keys fed.

        Parameters
        ----------
        Q : array_like, shape (m, dim)
        eps : float, optional
            Threshold, at least the sketch's ``eps`` (default: the sketch's ``eps``).

        Returns
        -------
        HeavyEntries
            CSR by query row, key ids ascending; for p = 2 exactly the dense answer, values exact to
            rounding.  Queries orthogonal to every key (``Z = 0``) have no entries.
        """
        Q = self._queries(Q)
        eps = self._eps if eps is None else check_eps(eps)
        if eps < self._eps:
            raise ValueError(f"eps must be >= the sketch's eps ({self._eps:g}); got {eps:g}. "
                             "Build the sketch with a smaller eps to query lower thresholds.")
        ids, rows, scores = self._settled()
        sel = scores >= eps * (1.0 - self._margin())
        if not sel.all():
            ids, rows = ids[sel], rows[sel]
        thresh = eps * (1.0 - TIE_RTOL)
        dist = getattr(self._summary, "distortion", 0.0)  # coreset: report A~ >= eps (1 - delta)
        query_scale = getattr(self._summary, "query_scale", None)  # coreset: A is scale-free, avoid |x|^p overflow
        counts, keys, vals = [], [], []
        for start in range(0, Q.shape[0], QUERY_BLOCK_ROWS):
            Qb = Q[start:start + QUERY_BLOCK_ROWS]
            if query_scale is not None and query_scale(Qb, rows) is not None:
                Qb = Qb * query_scale(Qb, rows)[:, None]
            z = self._summary.normalizer(Qb)
            P = Qb @ rows.T
            c, k, v = threshold_power_csr(P, z, self._p, thresh * (1.0 - dist), ids)
            counts.append(c)
            keys.append(k)
            vals.append(v)
        if not counts:
            return HeavyEntries.from_counts(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), eps)
        values = np.concatenate(vals)
        lower = upper = None
        if dist:
            lower, upper = values / (1.0 + dist), values / (1.0 - dist)
        return HeavyEntries.from_counts(np.concatenate(counts), np.concatenate(keys), values, eps, lower, upper)

    def top_k(self, Q: Any, k: int) -> TopK:
        """The ``k`` largest attention entries of each query among the universal set.

        ``certified[i]`` is true when row ``i``'s ``k``-th value is ``>= eps``: every key outside the
        universal set has ``A < eps``, so the result is then the true top-``k`` over all keys.  With a coreset
        normaliser (values ``A~``, true values ``>= A~ (1 - delta)``) the test is ``A~ (1 - delta) >= eps``.
        """
        Q = self._queries(Q)
        k = check_int(k, "k", minimum=1)
        ids, rows, _ = self._settled()
        m, c = Q.shape[0], ids.shape[0]
        out_ids = np.full((m, k), -1, dtype=np.int64)
        out_vals = np.full((m, k), np.nan)
        certified = np.zeros(m, dtype=bool)
        kk = min(k, c)
        query_scale = getattr(self._summary, "query_scale", None)
        dist = getattr(self._summary, "distortion", 0.0)
        for start in range(0, m, QUERY_BLOCK_ROWS):
            Qb = Q[start:start + QUERY_BLOCK_ROWS]
            if query_scale is not None and query_scale(Qb, rows) is not None:
                Qb = Qb * query_scale(Qb, rows)[:, None]
            z = self._summary.normalizer(Qb)
            live = z > 0
            if kk == 0 or not live.any():
                continue
            P = Qb @ rows.T
            B = P * P if self._p == 2.0 else np.abs(P) ** self._p
            A = np.where(live[:, None], B / np.where(live, z, 1.0)[:, None], 0.0)
            part = np.argpartition(-A, kk - 1, axis=1)[:, :kk] if kk < c else np.broadcast_to(np.arange(c), (A.shape[0], c))
            top = np.take_along_axis(A, part, axis=1)
            order = np.argsort(-top, axis=1, kind="stable")
            part = np.take_along_axis(part, order, axis=1)
            top = np.take_along_axis(top, order, axis=1)
            sl = slice(start, start + Qb.shape[0])
            out_ids[sl, :kk] = np.where(live[:, None], ids[part], -1)
            out_vals[sl, :kk] = np.where(live[:, None], top, np.nan)
            if kk == k:
                certified[sl] = live & (top[:, -1] * (1.0 - dist) >= self._eps)
        return TopK(out_ids, out_vals, certified, self._eps)

    # ------------------------------------------------------------------ copies and persistence
    def copy(self) -> "KeySketch":
        """An independent deep copy."""
        out = KeySketch.__new__(KeySketch)
        out.__dict__.update(self.__dict__)
        out._summary = self._summary.copy()
        out._seen = self._seen.copy()
        out._buf_rows, out._buf_ids = self._buf_rows[: self._buf_n].copy(), self._buf_ids[: self._buf_n].copy()
        out._cand_rows = self._cand_rows[: self._cand_n].copy()
        out._cand_ids = self._cand_ids[: self._cand_n].copy()
        return out

    __copy__ = copy

    def __deepcopy__(self, memo: dict) -> "KeySketch":
        return self.copy()

    def to_bytes(self) -> bytes:
        """Serialize (versioned, checksummed; buffered rows included, nothing is lost)."""
        smeta, sarrays = self._summary.to_state()
        meta = {
            "kind": _SKETCH_KIND, "dim": self._dim, "eps": self._eps, "p": self._p,
            "block_rows": self._block_rows, "n": self._n, "next_id": self._next_id,
            "ids_exact": self._seen.exact, "summary": smeta,
        }
        arrays = {f"summary.{k}": v for k, v in sarrays.items()}
        arrays.update({
            "cand_rows": self._cand_rows[: self._cand_n], "cand_ids": self._cand_ids[: self._cand_n],
            "buf_rows": self._buf_rows[: self._buf_n], "buf_ids": self._buf_ids[: self._buf_n],
            "id_ranges": self._seen.ranges,
        })
        return _serialize.pack(meta, arrays)

    @classmethod
    def from_bytes(cls, data: bytes) -> "KeySketch":
        """Inverse of :meth:`to_bytes`; raises ``ValueError`` for corrupted, truncated or foreign bytes."""
        meta, arrays, _ = _serialize.unpack(data)
        try:
            if meta.get("kind") != _SKETCH_KIND:
                raise ValueError(f"bytes hold a {meta.get('kind')!r}, not a KeySketch")
            out = cls(int(meta["dim"]), eps=float(meta["eps"]), p=float(meta["p"]),
                      block_rows=int(meta["block_rows"]))
            d = out._dim
            for name, arr in arrays.items():  # a valid checksum does not make the content consistent
                want = np.int64 if name in ("cand_ids", "buf_ids", "id_ranges") else np.float64
                if not name.startswith("summary.") or arr.dtype.kind == "f":
                    if arr.dtype != want:
                        raise ValueError(f"stored array {name!r} must be {np.dtype(want)}; got {arr.dtype}")
                    if want is np.float64 and not np.isfinite(arr).all():
                        raise ValueError(f"stored array {name!r} must be finite")
            summary_arrays = {k.split(".", 1)[1]: v for k, v in arrays.items() if k.startswith("summary.")}
            out._summary = summary_from_state(meta["summary"], summary_arrays)
            cand_rows, cand_ids = arrays["cand_rows"], arrays["cand_ids"]
            buf_rows, buf_ids = arrays["buf_rows"], arrays["buf_ids"]
            for rows, ids in ((cand_rows, cand_ids), (buf_rows, buf_ids)):
                if rows.ndim != 2 or rows.shape[1] != d or ids.shape != (rows.shape[0],):
                    raise ValueError("row and id arrays have inconsistent shapes")
            out._cand_rows, out._cand_ids, out._cand_n = cand_rows, cand_ids, cand_rows.shape[0]
            out._buf_rows, out._buf_ids, out._buf_n = buf_rows, buf_ids, buf_rows.shape[0]
            ranges = arrays["id_ranges"]
            if ranges.ndim != 2 or ranges.shape[1] != 2:
                raise ValueError("id ranges must have shape (r, 2)")
            out._seen = IdRanges(ranges, bool(meta["ids_exact"]))
            out._n, out._next_id = int(meta["n"]), int(meta["next_id"])
            if out._next_id < 0:
                raise ValueError(f"next_id must be >= 0; got {out._next_id}")
            if out._summary.dim != d or out._n < out._summary.n_rows + out._buf_n:
                raise ValueError("summary does not match the sketch header")
        except (KeyError, TypeError, NotImplementedError) as exc:
            raise ValueError(f"serialized sketch is malformed: {exc}.") from exc
        return out

    def __reduce__(self):
        return (KeySketch.from_bytes, (self.to_bytes(),))

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`to_bytes` to ``path`` atomically (a temporary file renamed into place)."""
        _serialize.write_atomic(path, self.to_bytes())

    def __eq__(self, other: object) -> bool:  # identity semantics; sketches are compared by their answers
        return self is other

    __hash__ = object.__hash__


def _check_magnitude(X: np.ndarray, name: str) -> None:
    """Refuse finite rows whose squares overflow float64 (the Gram matrix could not hold them)."""
    if X.size and not np.isfinite(np.einsum("ij,ij->", X, X)):
        raise ValueError(f"{name} has values so large that their squares overflow float64 (largest |x| = "
                         f"{float(np.abs(X).max()):.3g}); rescale the keys (leverage scores are scale-invariant).")


def load(path: str | os.PathLike) -> KeySketch:
    """Read a sketch written by :meth:`KeySketch.save`."""
    with open(os.fspath(path), "rb") as fh:
        return KeySketch.from_bytes(fh.read())
