"""``KeySketch``: stream keys once, keep a summary of size independent of n, answer heavy-entry queries exactly.

Orchestration only: rows and chunks are validated and numbered here, then kept in one :class:`RowStore` —
the candidates (folded into the normaliser summary, score still able to reach ``eps``) followed by the
pending rows (the input buffer).  Pending rows are folded into the summary in blocks and filtered; rows whose
score can still reach ``eps`` stay as candidates.  Scores only decrease as keys arrive, so a candidate that
falls below ``eps`` is dropped for good; candidates are rescored when their number has doubled since the
last rescoring (and at most :attr:`KeySketch.capacity`), an amortised ``O(d^2)`` per candidate.  Queries go through the one query path (:mod:`levstream._query`) and
change nothing (docs/theory.md, "Live streams").
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _query, _serialize
from ._config import default_block_rows, margin
from ._decay import FORGET_SHIFT, Frame, check_gate, neg_log_gate, neg_log_gates
from ._ids import IdRanges
from ._kernels.blas import dsyrk_function, dtrmm_function, strmm_function
from ._kernels.decay import weigh_row, weigh_rows
from ._kernels.ingest import slab_run, sq_total, upper_scores
from ._kernels.live import (
    NOT_TAKEN,
    add_row_and_bound,
    add_rows_and_bound,
    append_row_and_keep,
    int8_rows_into,
    scan_norms,
)
from ._kernels.rows import largest_sq_norm, sq_norm
from ._linalg import inverse_upper_factor
from ._store import _NO_VALUE_ROW, _NO_VALUE_ROWS, RowStore, StoreState
from ._threads import get_num_threads, ingest_threads, lowered_blas, run_items
from ._validation import (
    as_ids,
    as_matrix,
    as_ndarray,
    as_real_array,
    as_row,
    check_eps,
    check_finite,
    check_int,
    check_p,
    fast_float64,
)
from .moments import MomentState
from .results import AttentionResult, HeavyEntries, TopK, UniversalSet, concat_attention
from .summaries import (
    GramSummary,
    LiftedSummary,
    NormalizerSummary,
    make_summary,
    summary_from_state,
)
from .summaries.coreset import CoresetSummary
from .summaries.gram import float32_factor, gram_rel_error_max

if TYPE_CHECKING:  # (multihead imports this module)
    from .multihead import MultiHeadKeySketch

_SKETCH_KIND = "KeySketch"

#: What ``KeySketch._move_frame`` returns for ``_frame_back``: the frame before, and the sketch copied before a
#: rebase (None when there was none).
_FrameBefore = tuple[Frame, "KeySketch | None"]

#: What ``KeySketch._counters`` saves: the ids seen, the end of their last range, the next id, the row count.
_Counters = tuple[IdRanges, int, int, int]

#: What ``KeySketch._save_feed`` saves: the summary's copy (or None), the store's snapshot, the pending-row marker,
#: the last prune's row count, the counters.
_SavedFeed = tuple["NormalizerSummary | None", StoreState, int, int, _Counters]

#: Bytes written without values use format version 1 (readable by levstream 0.1.0); with values, version 2;
#: a sketch that forgets (decay or gates), version 3; a sketch whose key rows are float32 (a float32 stream),
#: version 4, whose header alone says whether values and a decay frame are present.
_FORMAT_WITH_VALUES = 2
_FORMAT_WITH_DECAY = 3
_FORMAT_FLOAT32_ROWS = 4


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
        Heaviness threshold, ``1e-300 <= eps <= 1``.  Queries may use any threshold ``>= eps``.
    p : float, default 2
        Exponent of ``f(x) = |x|^p``, ``0.01 <= p <= 32``.  p = 2 is exact; p = 4 is exact with ``exact=True``
        (lifted Gram matrix); every other ``p`` (and p = 4 by default) uses an l_p coreset.
    block_rows : int, optional
        Rows per processing block (default: about 4 MiB of float64 key and value rows; 8192 rows for
        dim = 64 without values).
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
    value_dim : int, optional
        Width of the value row that travels with every key (``update(k, v)``).  Retained keys keep their
        value rows, pruned keys drop them; :meth:`attend` and :meth:`prefill` then return attention outputs.
        Default None: keys only, nothing costs more than without values.
    exact_output : bool, default False
        Keep the moment state ``S = sum_j phi(k_j) v_j^T`` (``d (d + 1) / 2 x value_dim`` numbers, p = 2 only) so
        that :meth:`attend` and :meth:`prefill` also return the exact output over every key fed.
    decay : float, optional
        A constant gate in ``(0, 1]`` on every row (p = 2): the stream forgets, key ``j`` weighing
        ``c_j(t) = g_{j+1} ... g_t`` at time ``t``.  Data-dependent gates go with the rows instead
        (``update(k, v, gate=)``, ``update_many(..., gates=)``, ``prefill(..., gates=)``; multiplied by
        ``decay`` when both are given).  The gate of a row multiplies everything before it (gated attention:
        ``G_t = g_t G_{t-1} + k_t k_t^T``).  Every guarantee holds for the weighted keys
        ``sqrt(c_j(t)) k_j`` (docs/theory.md, "Decay and gates"; docs/streams-that-forget.md).

    Notes
    -----
    Guarantee (p = 2): ``universal_set().ids`` equals ``{j : tau_j >= eps}`` with ``tau_j = k_j^T (K^T K)^+ k_j``
    computed on all keys, whatever the chunking, the mix of ``update``/``update_many``/``extend`` and the
    shard split and merge order; keys within ``1e-9 eps`` of the threshold may go either way.
    ``heavy_entries`` returns exactly the entries ``A >= eps'`` of the dense attention.  State is
    ``O(d^2 + |candidates| d)`` with at most ``2 d / eps`` candidates.

    Live streams: updates and queries may alternate at any granularity.  A query never settles or changes the
    sketch (``to_bytes()`` is identical before and after it): it reads the candidates and the rows still
    waiting in the input buffer, with the normaliser over every key fed (docs/theory.md, "Live streams").
    One sketch takes one writer at a time; concurrent readers are safe while no thread writes (give each
    writer its own sketch and merge them).

    Guarantee (p = 4, ``exact=True``): the same with ``tau_j`` the leverage score of the lifted keys (an upper
    bound on the p = 4 sensitivity), at most ``2 D / eps`` candidates; queries exact.

    Guarantee (other p, coreset): candidates are kept while ``(1 + delta) c_p (k^T M^-1 k)^(p/2) >= eps``
    (``M`` the coreset's Lewis form, ``c_p = d^max(0, p/2-1)``).  ``heavy_entries`` reports ``A~ >= eps (1 -
    delta)`` with ``A~`` computed with the coreset normaliser ``Z~``, plus ``lower``/``upper`` bounds
    ``A~ (1 -+ delta)``: whenever ``Z~`` is within ``(1 ± delta)`` of ``Z`` (per query, probability
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

    def __init__(
        self,
        dim: int,
        *,
        eps: float,
        p: float = 2,
        block_rows: int | None = None,
        exact: bool | None = None,
        delta: float = 0.1,
        failure_prob: float | None = None,
        oversampling: float | None = None,
        rng: Any = None,
        memory_budget: int | None = None,
        value_dim: int | None = None,
        exact_output: bool = False,
        decay: float | None = None,
    ) -> None:
        dim = check_int(dim, "dim", minimum=1)
        eps = check_eps(eps)
        p = check_p(p)
        if decay is not None:
            decay = check_gate(decay, "decay")
            if p != 2.0 or exact not in (None, True):
                raise ValueError(
                    f"decay and gates need p = 2 (the exact Gram summary); got p = {p:g}"
                    + ("" if exact in (None, True) else " with exact=False")
                    + "."
                )
        if value_dim is not None:
            value_dim = check_int(value_dim, "value_dim", minimum=1)
        # the input buffer holds a block of keys and, with values, their value rows: size it by both
        block_rows = (
            default_block_rows(dim + (value_dim or 0))
            if block_rows is None
            else check_int(block_rows, "block_rows", minimum=1)
        )
        if not isinstance(exact_output, (bool, np.bool_)):
            raise TypeError(f"exact_output must be True or False; got {exact_output!r} instead.")
        if exact_output and value_dim is None:
            raise ValueError(
                "exact_output=True needs value rows: pass value_dim= (the width of each value)."
            )
        self._summary: NormalizerSummary = make_summary(
            dim,
            p,
            exact=exact,
            delta=delta,
            failure_prob=failure_prob,
            oversampling=oversampling,
            rng=rng,
            memory_budget=memory_budget,
        )
        degree = 2 if p == 2.0 else 4
        if exact_output and (p not in (2.0, 4.0) or self._summary.distortion):
            raise ValueError(
                f"exact_output=True is available for p = 2 and for p = 4 with exact=True (moment states "
                f"of exact normalisers); got p = {p:g} with a {self._summary.kind} summary. Use attend() "
                "without exact_output for heavy-only outputs."
            )
        if exact_output and degree == 4:
            need = MomentState.nbytes_for(dim, int(value_dim or 0), 4)
            assert isinstance(self._summary, LiftedSummary)  # p = 4 without distortion
            budget = self._summary.memory_budget
            if need > budget:
                raise ValueError(
                    f"exact p = 4 outputs need a moment state of {need / 2**20:.1f} MiB; memory_budget "
                    f"is {budget / 2**20:.1f} MiB. Raise memory_budget or use a smaller dim."
                )
        self._dim, self._eps, self._p = dim, eps, p
        self._block_rows = block_rows
        self._value_dim = value_dim
        self._moments = (
            MomentState(dim, value_dim, degree) if exact_output and value_dim is not None else None
        )
        self._store = RowStore(dim, value_dim)
        #: rows ``_pending_from..`` of the store are pending (not yet folded into the summary)
        self._pending_from = 0
        self._n = 0
        self._next_id = 0
        self._seen = IdRanges()
        self._lock = threading.RLock()
        self._live: _LiveRows | None = None
        self._decay = decay
        #: the decaying stream's reference frame (docs/theory.md, "Decay and gates"); stays at zero without gates
        self._frame = Frame()

    # ------------------------------------------------------------------ properties
    @property
    def dim(self) -> int:
        """Width of every key row."""
        return self._dim

    @property
    def eps(self) -> float:
        """The heaviness threshold the sketch guarantees (queries may use any threshold ``>= eps``)."""
        return self._eps

    @property
    def p(self) -> float:
        """Exponent of ``f(x) = |x|^p``."""
        return self._p

    @property
    def value_dim(self) -> int | None:
        """Width of the value rows travelling with keys, or None for a keys-only sketch."""
        return self._value_dim

    @property
    def exact_output(self) -> bool:
        """Whether the moment state for exact outputs is kept."""
        return self._moments is not None

    @property
    def n(self) -> int:
        """Number of keys fed so far (including buffered ones)."""
        return self._n

    @property
    def decay(self) -> float | None:
        """The constant gate on every row, or None."""
        return self._decay

    @property
    def forgets(self) -> bool:
        """Whether the stream decays: a constant ``decay``, or a gate below 1 was fed."""
        return self._decay is not None or self._frame.log_total != 0.0

    @property
    def log_total_gate(self) -> float:
        """``sum_t log g_t`` over every row fed (0 for a stream that does not forget): the factor by which the
        stream has decayed whatever preceded it (``exp`` of it may underflow; the sketch never forms it)."""
        return self._frame.log_total

    @property
    def num_retained(self) -> int:
        """Key rows held in memory: candidates plus rows waiting in the input buffer."""
        return self._store.n

    def is_empty(self) -> bool:
        """True when no key has been fed."""
        return self._n == 0

    @property
    def nbytes(self) -> int:
        """Bytes held by the sketch's arrays: summary (with its cached factors), row store (as allocated: key
        rows in their input precision), moment state, id ranges and the live queries' cache."""
        moments = 0 if self._moments is None else self._moments.nbytes
        live = self._live
        cache = 0
        if live is not None:
            cache = int(live.gram.nbytes + live.rows.nbytes + live.row_norms.nbytes)
            cache += int(live.row_int8.nbytes + live.row_scale.nbytes + live.scratch.nbytes)
            if live.cand is not None:
                cache += live.cand.nbytes + live.cand_norms.nbytes
                cache += live.cand_int8.nbytes + live.cand_scale.nbytes
        return int(
            self._summary.nbytes + self._store.nbytes + moments + self._seen.ranges.nbytes + cache
        )

    @property
    def capacity(self) -> int:
        """Candidates never exceed this before they are rescored (twice the bound ``size_bound / eps``:
        ``d / eps`` for p = 2, ``D / eps`` for exact p = 4, ``(1 + delta) d^max(1, p/2) / eps`` for the
        coreset); they are rescored sooner, whenever their number has doubled since the last rescoring."""
        # beyond 2^62 the budget never binds (a coreset of large p and d has d^(p/2) / eps of them)
        return int(2 * np.ceil(min(self._summary.size_bound / self._eps, 2.0**62))) + 1

    @property
    def next_id(self) -> int:
        """The id the next row fed without ``ids=``/``offset=`` will get."""
        return self._next_id

    @property
    def ids_tracked_exactly(self) -> bool:
        """Whether every id ever fed is remembered for clash detection (see ``levstream._ids``)."""
        return self._seen.exact

    @property
    def normalizer_summary(self) -> NormalizerSummary:
        """The normaliser summary of every key fed (a settled copy: read-only use, e.g. ``.gram`` for p = 2)."""
        settled = self.copy()
        settled._flush()
        if settled.forgets:  # from the frame's weights to the keys' weights c_j(t)
            assert isinstance(settled._summary, GramSummary)
            settled._summary.scale(math.exp(-settled._frame.exponent))
        return settled._summary

    def __repr__(self) -> str:
        return (
            f"KeySketch(dim={self._dim}, eps={self._eps:g}, p={self._p:g}, n={self._n}, "
            f"retained={self.num_retained}, mode={self._summary.mode!r})"
        )

    # ------------------------------------------------------------------ ids
    def _new_ids(self, m: int, ids: Any, offset: Any) -> tuple[np.ndarray | None, int, np.ndarray]:
        """Validate ids for ``m`` new rows; returns (ids or None for a range, start, sorted ids or the range)."""
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
        if start > _ID_MAX - m:
            raise ValueError(f"ids would overflow int64 from offset {start}.")
        hit = None
        if self._seen.ranges.shape[0] and start < self._seen.ranges[-1, 1]:
            hit = self._seen.clash(np.arange(start, start + m, dtype=np.int64))
        if hit is None and offset is not None:
            hit = self._retained_clash(np.arange(start, start + m, dtype=np.int64))
        if hit is not None:
            raise ValueError(
                f"ids clash: id {hit} was already fed to this sketch "
                f"(rows would be numbered {start}..{start + m - 1}; pass offset= or ids=)."
            )
        return None, start, np.zeros(0, dtype=np.int64)

    def _retained_clash(self, sorted_ids: np.ndarray) -> int | None:
        """Smallest of ``sorted_ids`` held in the store, once range tracking is inexact."""
        if self._seen.exact:
            return None
        both = np.intersect1d(self._store.ids_view(), sorted_ids)
        return int(both[0]) if both.size else None

    def _counters(self) -> _Counters:
        """What counting rows changes besides the store and summary: the ids seen (the running counter extends
        their last range in place), the next id, the number of rows."""
        ranges = self._seen.ranges
        return self._seen, int(ranges[-1, 1]) if ranges.shape[0] else 0, self._next_id, self._n

    def _restore_counters(self, saved: _Counters) -> None:
        seen, last, self._next_id, self._n = saved
        self._seen = seen
        if seen.ranges.shape[0]:
            seen.ranges[-1, 1] = last

    def _save_feed(self, summary: bool = True) -> _SavedFeed:
        """What feeding rows changes, for :meth:`_back_to` should the feed fail (no memory, an interruption): a copy
        of the summary (unless ``summary`` is false: a feed that folds nothing), a snapshot of the store (it saves a
        row only just before its first overwrite in place; release it with ``_store.release()`` once the feed is
        done), the pending-row marker, the last prune's row count, the counters."""
        return (
            self._summary.copy() if summary else None,
            self._store.snapshot(),
            self._pending_from,
            self._pruned_rows,
            self._counters(),
        )

    def _back_to(self, saved: _SavedFeed) -> None:
        """The state :meth:`_save_feed` saved (the live cache, derived data, goes)."""
        summary, state, self._pending_from, self._pruned_rows, counters = saved
        if summary is not None:
            self._summary = summary
        self._store.restore(state)
        self._restore_counters(counters)
        self._live = None

    def _record_ids(
        self, m: int, ids: np.ndarray | None, start: int, srt: np.ndarray
    ) -> np.ndarray:
        if ids is None:
            out = np.arange(start, start + m, dtype=np.int64)  # (allocated before anything changes)
            ranges = self._seen.ranges
            if (
                ranges.shape[0] and ranges[-1, 1] == start
            ):  # the running counter: extend the last interval
                ranges[-1, 1] = start + m
            else:
                self._seen = self._seen.union(
                    IdRanges(np.array([[start, start + m]], dtype=np.int64))
                )
            self._next_id = max(self._next_id, start + m)
            return out
        self._seen = self._seen.added(srt)
        self._next_id = max(self._next_id, int(srt[-1]) + 1)
        return ids

    # ------------------------------------------------------------------ validation of values
    def _value_row(self, v: Any) -> np.ndarray | None:
        if self._value_dim is None:
            if v is not None:
                raise ValueError(
                    "this sketch keeps no values (value_dim=None); got a value row. Build it with "
                    "value_dim= to keep values with keys."
                )
            return None
        if v is None:
            raise ValueError(
                f"a value row of length {self._value_dim} is required with every key (the sketch "
                f"was built with value_dim={self._value_dim}); got none."
            )
        row = fast_float64(v)
        if row is not None and row.shape == (self._value_dim,) and sq_norm(row) < np.inf:
            return row
        v = as_row(v, "v", self._value_dim, "value_dim")
        _check_magnitude(v[None, :], "v")
        return v

    def _value_chunk(self, V: Any, m: int) -> np.ndarray | None:
        if self._value_dim is None:
            if V is not None:
                raise ValueError(
                    "this sketch keeps no values (value_dim=None); got V. Build it with value_dim= "
                    "to keep values with keys."
                )
            return None
        if V is None:
            raise ValueError(
                f"V (one value row per key, shape ({m}, {self._value_dim})) is required: the sketch "
                f"was built with value_dim={self._value_dim}; got none."
            )
        V = as_matrix(V, "V", self._value_dim, allow_empty=True)
        if V.shape[0] != m:
            raise ValueError(
                f"V must have one value row per key: shape ({m}, {self._value_dim}); got shape "
                f"{V.shape}."
            )
        _check_magnitude(V, "V")
        return V

    # ------------------------------------------------------------------ ingest
    def update(self, x: Any, v: Any = None, gate: float | None = None) -> KeySketch:
        """Feed one key row (1-D, length ``dim``), with its value row ``v`` when the sketch keeps values.

        The key gets the next id.  It waits in the input buffer (a query still sees it) until a block of
        rows has arrived.  ``gate`` in ``(0, 1]`` (p = 2) multiplies the weight of every key fed before this one
        (times the sketch's ``decay``).  Returns ``self``; on bad input raises and changes nothing.
        """
        x = as_ndarray(x)
        row = fast_float64(x)
        # a float64 or float32 row, finite with squares that do not overflow (sq_norm is nan/inf otherwise): no
        # further validation
        if row is None or row.shape != (self._dim,) or not sq_norm(row) < np.inf:
            row = as_row(x, "x", self._dim)
            _check_magnitude(row[None, :], "x")
        if row is not x:
            x = _kept_row(x, row, isinstance(self._summary, GramSummary))
        value = None if (v is None and self._value_dim is None) else self._value_row(v)
        return self._feed_row(x, value, gate)

    def _append_next_rows(self, X: np.ndarray, m: int, frame: Frame | None = None) -> bool:
        """Feed ``m >= 1`` validated float64 key rows ``X`` (shape (m, dim), or (dim,) for one) under the next ids,
        without values, in the common case only (call with the lock held): the next id extends the last range of
        ids seen (so the rows clash with no id and keep the ids ascending), the stream does not forget (or the rows
        come weighed in ``frame``, the frame after them, which needs no rebase: :meth:`_plan_row`) and the rows do
        not reach past the input buffer.  False, with nothing changed, otherwise (the general path then takes
        them).  The rows wait in the store for the live cache (see :meth:`_append_token`)."""
        ranges = self._seen.ranges
        i = self._next_id
        # (ids past int64's range: the general path refuses them)
        if (
            (frame is None and self.forgets)
            or not ranges.shape[0]
            or ranges[-1, 1] != i
            or i > _ID_MAX - m
        ):
            return False
        store = self._store
        n = store.n
        if n + m - self._pending_from >= self._block_rows:
            return False  # the rows complete a block: folded the general way (all or nothing)
        if store.keys.dtype != np.float64 or n + m > store.capacity:
            store.reserve(n + m, np.float64, self._buffer_end())  # may raise: nothing has changed
        store.keys[n : n + m] = X
        if m == 1:
            store.ids[n] = i
        else:
            store.ids[n : n + m] = np.arange(i, i + m)
        ranges[-1, 1] = i + m
        store.n = n + m
        self._n += m
        self._next_id = i + m
        if frame is not None:
            self._frame = frame
        return True

    def _feed_row(self, x: np.ndarray, value: np.ndarray | None, gate: Any) -> KeySketch:
        """:meth:`update` of a validated row (float64, or float32 kept as float32 on the Gram path) and value."""
        # whether the stream forgets is read under the lock too: another writer may gate it
        with self._lock:
            # the live step of a key-only stream
            # (a stream with a constant decay weighs every row: straight to the gated step below)
            plain = value is None and gate is None and x.dtype == np.float64 and self._decay is None
            if plain and self._append_next_rows(x, 1):
                return self
            if (
                value is None
                and x.dtype == np.float64
                and (gate is not None or self.forgets)
                and self._summary.kind == "gram"
            ):
                # the live step of a gated key-only row: weighed in the frame after it (no rebase due) when the
                # stream forgets, stored as the plain step stores a row (a gate of 1 on a stream that has forgotten
                # nothing weighs 1); the id is checked first, as the general path checks it
                self._check_next_id()
                neg = neg_log_gate(gate, self._decay)
                if not (neg or self.forgets):
                    if self._append_next_rows(x, 1):
                        return self
                else:
                    xw, shift, after = self._plan_row(x, neg, "x")
                    if not shift and self._append_next_rows(xw, 1, after):
                        return self
            self._check_next_id()
            before, n, frame = None, self._n, self._frame
            try:
                if gate is not None or self.forgets:
                    neg = self._neg_log_gate(gate)
                    # a gate of 1 on a stream that has forgotten nothing weighs 1
                    if neg or self.forgets:
                        if self._moments is not None:  # before the frame moves (see _append_token)
                            self._moments.prepare(1)
                        x, before = self._weigh_row(x, neg, "x", value)
                self._append_token(x, value)
            except BaseException:
                self._uncounted(n, frame, before)
                raise
        return self

    def _uncounted(self, n: int, frame: Frame, before: _FrameBefore | None) -> None:
        """After a failure while rows weighed in a moved frame were taken: when they were not counted (the row
        count is still ``n``), the frame goes back (``before`` as :meth:`_move_frame` returned it; None when it
        did not return: then the frame ``frame`` it moved from)."""
        if self._n != n:
            return
        if before is not None:
            self._frame_back(before)
        else:
            self._frame = frame

    # ------------------------------------------------------------------ decay (docs/theory.md, "Decay and gates")
    def _check_gates_allowed(self) -> None:
        if self._summary.kind != "gram":
            raise ValueError(
                f"gates need p = 2 with the exact Gram summary; this sketch has p = {self._p:g} and a "
                f"{self._summary.kind} summary."
            )

    def _neg_log_gate(self, gate: Any) -> float:
        if self._summary.kind != "gram":
            self._check_gates_allowed()
        return neg_log_gate(gate, self._decay)

    def _neg_log_gates(self, gates: Any, m: int) -> np.ndarray | None:
        """``-log`` of each row's effective gate, or None when nothing is weighed (no gate, and a stream that has
        not forgotten anything: its frame is the identity)."""
        if gates is None and not self.forgets:
            return None
        self._check_gates_allowed()
        neg = neg_log_gates(gates, m, self._decay)
        if not self.forgets and not neg.any():  # gates of 1 on a stream that has forgotten nothing
            return None
        return neg

    def _weigh_row(
        self, x: np.ndarray, neg: float, name: str, value: np.ndarray | None = None
    ) -> tuple[np.ndarray, _FrameBefore]:
        """Advance the frame by one row and return the row weighted in it, and the frame before (see
        :meth:`_move_frame`; call with the lock held; the row is checked before anything changes, with its
        ``value`` against the moment state)."""
        xw, shift, frame = self._plan_row(x, neg, name)
        if self._moments is not None and value is not None:
            self._moments.check(xw[None, :], value[None, :])
        return xw, self._move_frame(shift, frame)

    def _plan_row(self, x: np.ndarray, neg: float, name: str) -> tuple[np.ndarray, int, Frame]:
        """The row weighted in the frame after it, the rebase that frame needs and the frame (nothing changes;
        raises when the weighted squares overflow)."""
        xw = np.empty(x.shape[0])
        sq, shift, e_hi, e_lo, t_hi, t_lo = weigh_row(x, neg, *self._frame, xw)
        if not sq < np.inf:
            raise _too_large_weighted(x, name)
        return xw, shift, Frame(e_hi, e_lo, t_hi, t_lo)

    def _move_frame(self, shift: int, frame: Frame) -> _FrameBefore:
        """Rebase the state by ``4^-shift`` and take ``frame`` (a planned step that passed its checks).  Returns what
        :meth:`_frame_back` needs to put the sketch back as it was, should the rows weighed in the new frame fail to
        be counted: the old frame, and after a rebase (it rescales every row held; rare but for strong decay) the
        state copied before it, at the cost of one more pass over the rows the rebase rescales."""
        before = (self._frame, self.copy() if shift else None)
        if shift:
            try:
                self._rebase(shift)
            except BaseException:  # part of the state rescaled: back to the copy
                self._frame_back(before)
                raise
        self._frame = frame
        return before

    def _frame_back(self, before: _FrameBefore) -> None:
        """Undo :meth:`_move_frame` (call with the lock held)."""
        frame, saved = before
        if saved is None:
            self._frame = frame
        else:
            self._take_state(saved)

    def _take_state(self, saved: KeySketch) -> None:
        """Become ``saved``, a :meth:`copy` of this sketch, keeping this sketch's lock (readers keep waiting on
        it; call with the lock held)."""
        # one assignment (attributes the failed call set, e.g. a first prune's count, go too)
        self.__dict__ = {**saved.__dict__, "_lock": self._lock}

    def _weigh_rows(
        self, X: np.ndarray, neg: np.ndarray, name: str, V: np.ndarray | None = None
    ) -> tuple[np.ndarray, int, Frame]:
        """Rows ``X`` weighted in the frame after the last of them, the rebase that frame needs and the frame
        (nothing changes here; raises for a nan/inf, a row whose weighted squares overflow, or with values ``V``
        weighted rows the moment state could not hold)."""
        scales, shifts, frame = self._frame.rows(neg)
        total = int(shifts[-1]) if shifts.size else 0
        if total:
            # earlier rows of the chunk, in the frame after its last row; below 2^-1800 flushed
            scales = np.ldexp(scales, shifts - total)
            scales[scales < _FLUSH_SCALE] = 0.0
        Xw = np.empty(X.shape)
        if not np.isfinite(_weigh_in_pieces(X, scales, Xw)):
            check_finite(X, name)
            # a sum over rows that overflows is fine (the R factor takes them); a row's own squares are not
            if _rows_overflow(Xw):
                raise _too_large_weighted(X, name)
        if self._moments is not None and V is not None:
            self._moments.check(Xw, V)
        return Xw, total, frame

    def _rebase(self, shift: int) -> None:
        """Multiply the whole state by ``4^-shift`` (exact; below ``2^-1800`` flushed to zero).  In pieces of at
        most ``4^-_REBASE_PIECE``: ``4^-shift`` itself leaves float64's range from shift 512 on, and a flush
        there lost weights the frame holds exactly (to ``2^-1800``, as R factors and rows down to ``2^-900``)."""
        if shift > FORGET_SHIFT:
            self._scale_state(0.0)
            return
        while shift > 0:
            piece = min(shift, _REBASE_PIECE)
            self._scale_state(math.ldexp(1.0, -2 * piece))
            shift -= piece

    def _scale_state(self, factor: float) -> None:
        """Every weight times ``factor``: the summary and moments by ``factor``, every row held by its root."""
        if self._moments is not None:  # the step that can fail, before anything is scaled
            self._moments.settle()
        summary = self._summary
        assert isinstance(summary, GramSummary)
        root = math.sqrt(factor)
        summary.scale(factor)
        self._store.scale_keys(root)
        if self._moments is not None:
            self._moments.scale(factor)
        if self._live is not None:
            # G left float64's range (kept as its R factor): queries read the summary and every row, not the cache
            if summary.gram_sum() is None:
                self._live = None
            else:
                self._live.scale(factor, root)

    def _check_next_id(self) -> None:
        """Refuse the running counter's next id when it was already fed (e.g. by ``ids=``), or when the counter would
        leave int64 (as :meth:`_new_ids` does for a chunk)."""
        i = self._next_id
        if i > _ID_MAX - 1:
            raise ValueError(f"ids would overflow int64 from offset {i}.")
        if self._seen.ranges.shape[0] and i < self._seen.ranges[-1, 1]:
            hit = self._seen.clash(np.array([i], dtype=np.int64))
            if hit is not None:
                raise ValueError(f"ids clash: id {hit} was already fed to this sketch.")

    def _append_token(self, x: np.ndarray, value: np.ndarray | None, checked: bool = False) -> None:
        """Feed one validated row under the next id (checked by :meth:`_check_next_id`; ``checked``: the row and
        its value passed the moment state's :meth:`~levstream.moments.MomentState.check_row` already)."""
        i = self._next_id
        if self._store.n + 1 - self._pending_from >= self._block_rows:
            # the row completes a block: the chunk path folds it all or nothing (should the fold fail, no memory or
            # an interruption, the row is not counted either)
            self._ingest(
                x[None, :], None if value is None else value[None, :], None, i, _NO_ID_ROWS
            )
            return
        if self._live is not None and self._live.refresh_due:
            # a refresh the last row made due, before this row changes anything (should it fail, the cache goes)
            self._refresh_live()
        # the steps that can fail first, each changing nothing when it does: the value refused (before the room
        # made below may widen a float32 store), room for the row (in the store, the ids seen and a current live
        # cache), then the moment state (which adds a pending product before it takes the row)
        if self._moments is not None and not checked:
            assert value is not None
            self._moments.check_row(x, value)
        store = self._store
        store.room_for_row(x, self._buffer_end())
        ranges = self._seen.ranges
        grows_last = bool(ranges.shape[0]) and ranges[-1, 1] == i
        seen = None if grows_last else self._seen.union(IdRanges(np.array([[i, i + 1]], np.int64)))
        live = self._live
        if live is not None and (live.upto != store.n or store.values is None):
            # rows wait for the next query: it scans up to _WAITING_ROWS_SCANNED of them as they are, and folds them
            # into the cache beyond (_LiveRows.add).  A key-only live step is then a copy into the store.  With
            # values, a query reads the cache of every row (outputs): the cache takes it now.
            live = None
        if live is not None:  # the row's slot holds the row as the store will: its type
            live.room_for_row(store.keys[store.n])
            x = _kernel_layout(x)
            value = None if value is None else _kernel_layout(value)
        if self._moments is not None:
            assert value is not None
            self._moments.add_row(x, value, checked=True)
        # --- from here on nothing can fail before the row is recorded
        refresh = False
        if live is not None:
            # the live cache is current: it takes the row now, in the same compiled call as the store, instead
            # of at the next query
            summary = self._summary
            assert isinstance(summary, GramSummary)  # a live cache exists only for it
            refresh = live.append(store, x, i, value, live.bound_factor(summary))
        else:
            store.append_row(x, i, value)
        self._n += 1
        if seen is None:
            ranges[-1, 1] = i + 1
        else:
            self._seen = seen
        self._next_id = i + 1
        if refresh:
            # made before the next row (a failure now would come through with the row counted)
            assert live is not None
            live.refresh_due = True

    def _buffer_end(self) -> int:
        """The rows the store holds once the input buffer is full (a block is folded then)."""
        return self._pending_from + self._block_rows

    def _refresh_live(self) -> None:
        """Refactor the live cache (derived data): should that fail, the cache goes and the next query makes
        a new one."""
        live = self._live
        assert live is not None
        try:
            live.refresh(self._store)
        except BaseException:
            self._live = None
            raise

    def update_many(
        self, X: Any, V: Any = None, ids: Any = None, offset: Any = None, gates: Any = None
    ) -> KeySketch:
        """Feed a chunk of key rows (shape (m, dim)), with their value rows ``V`` when the sketch keeps values.

        Parameters
        ----------
        X : array_like, shape (m, dim)
            Real, finite rows (float32 input is accumulated in float64, its rows held as float32).  ``m = 0``
            is a no-op.
        V : array_like, shape (m, value_dim), optional
            One value row per key; required exactly when the sketch was built with ``value_dim``.
        ids : array_like of int, shape (m,), optional
            Global ids of the rows (unique, non-negative, never fed before).
        offset : int, optional
            Number the rows ``offset, offset + 1, ...`` (for shards of one global stream).
        gates : array_like, shape (m,), optional
            One gate in ``(0, 1]`` per row (p = 2): row ``i``'s gate multiplies the weight of every key before it.

        Returns
        -------
        KeySketch
            ``self``.

        Raises
        ------
        ValueError, TypeError
            For bad shapes, dtypes, non-finite values or clashing ids; the sketch is left unchanged.
        """
        if ids is None and offset is None and gates is None:
            few = self._few_rows(X, V)
            # a few float64 rows of a key-only stream, finite: the live step's path
            if few is not None:
                m = few.shape[0]
                if m == 0:
                    return self  # an empty chunk of the right width (a filter that kept nothing)
                with self._lock:
                    if self._append_next_rows(few, m):
                        return self
            one = self._one_row(X, V)
            if one is not None:  # a (1, dim) chunk: the live step's path (as update)
                return self._feed_row(*one, None)
        X = _as_keys(X, self._dim, isinstance(self._summary, GramSummary))
        m = X.shape[0]
        V = self._value_chunk(V, m)
        neg = self._neg_log_gates(gates, m)
        with self._lock:
            new_ids, start, srt = self._new_ids(m, ids, offset)
            if m and neg is not None:
                X, shift, frame = self._weigh_rows(X, neg, "X", V)
                # a pending moment product is added before the frame moves (as in _feed_row)
                if self._moments is not None:
                    self._moments.prepare(m)
                self._ingest_weighed(X, V, new_ids, start, srt, shift, frame)
            elif m:
                self._ingest(X, V, new_ids, start, srt)
        return self

    def _ingest_weighed(
        self,
        X: np.ndarray,
        V: np.ndarray | None,
        new_ids: np.ndarray | None,
        start: int,
        srt: np.ndarray,
        shift: int,
        frame: Frame,
    ) -> None:
        """:meth:`_ingest` of rows weighed in ``frame`` (:meth:`_weigh_rows`): the frame moves first; should the rows
        not be counted (no memory, an interruption), it goes back (call with the lock held)."""
        before, n, old = None, self._n, self._frame
        try:
            before = self._move_frame(shift, frame)
            self._ingest(X, V, new_ids, start, srt)
        except BaseException:
            self._uncounted(n, old, before)
            raise

    def _few_rows(self, X: Any, V: Any) -> np.ndarray | None:
        """``X`` when it is a chunk of at most ``_FEW_ROWS`` rows that :meth:`_append_next_rows` may take as they are: a
        C-contiguous writable float64 array of the sketch's width, finite with squares that do not overflow, and no
        values (none given, none kept); None for anything else."""
        rows = None if V is not None or self._value_dim is not None else fast_float64(X)
        if rows is None or rows is not X or rows.ndim != 2 or rows.shape[1] != self._dim:
            return None
        return rows if rows.shape[0] <= _FEW_ROWS and np.isfinite(sq_total(rows)) else None

    def _one_row(self, X: Any, V: Any) -> tuple[np.ndarray, np.ndarray | None] | None:
        """``(x, v)`` for a chunk ``X`` of one row (float64 or float32) with its value row, both finite with squares
        that do not overflow and of the right shapes; None for anything else (validated in full by the caller)."""
        rows = fast_float64(X)
        if rows is None or rows.shape != (1, self._dim) or not sq_norm(rows[0]) < np.inf:
            return None
        dv = self._value_dim
        value = None
        if dv is not None or V is not None:
            vals = None if dv is None else fast_float64(V)
            if vals is None or vals.shape != (1, dv) or not sq_norm(vals[0]) < np.inf:
                return None
            value = vals[0]
        if rows is not X:
            rows = _kept_row(X, rows, isinstance(self._summary, GramSummary))
        return rows[0], value

    def _ingest(
        self,
        X: np.ndarray,
        V: np.ndarray | None,
        new_ids: np.ndarray | None,
        start: int,
        srt: np.ndarray,
    ) -> None:
        """Feed validated rows with checked ids.  Blocks are aligned to the stream (rows ``k * block_rows ..``
        of the sketch's own rows), whatever the chunking: rows that complete the pending block, then whole
        blocks straight from ``X`` (no copy), then the rest waits in the input buffer.  Bad input is refused before
        anything changes; for p = 2 the blocks are folded by :func:`_fold_chunk` on the library's threads, which
        undoes the chunk should anything fail on the way (a later wave refused, no memory, an interruption)."""
        m = X.shape[0]
        if self._moments is not None:
            assert V is not None
            self._moments.check(X, V)
            # a pending moment product is added first: if that fails, nothing changed
            self._moments.prepare(m)
        pending = self._store.n - self._pending_from
        head = min(m, self._block_rows - pending) if pending else 0
        n_full = (m - head) // self._block_rows
        tail = head + n_full * self._block_rows
        if isinstance(self._summary, GramSummary):
            if self._store.n and self._store.keys.dtype == np.float32 and X.dtype != np.float32:
                # the rows held are widened to float64 before any of these rows is stored: the whole chunk is
                # checked first, so that a refused chunk leaves them as they were
                _check_rows(X, X)
            # rows that wait in the buffer are checked now, not at flush time (one pass: while copied in, or
            # through the trace of the Gram block they complete)
            _check_rows(X[tail:], X)

            def count() -> None:
                """Record the chunk's ids and rows, and its rows left for the input buffer (whose room is made);
                the moment state takes the chunk last."""
                self._record_ids(m, new_ids, start, srt)
                self._n += m
                if tail < m:
                    self._store.room_for(X[tail:], self._buffer_end())
                    self._store.append(
                        X[tail:],
                        _chunk_ids(new_ids, start, tail, m),
                        _rows(V, tail, m),
                        increasing=new_ids is None,
                    )
                if self._moments is not None:
                    assert V is not None
                    self._moments.add(X.astype(np.float64, copy=False), V)

            if n_full or (head and pending + head == self._block_rows):
                _fold_chunk(self, X, V, new_ids, start, head, n_full, count)
                return
            # rows for the input buffer alone, all or nothing too: they are written past the rows held, and the
            # store's snapshot keeps its arrays should a growth (or a float32 store widened) replace them
            store, saved = self._store, self._save_feed(summary=False)
            try:
                if head:
                    store.room_for(X[:head], self._buffer_end())
                    if not np.isfinite(store.stage_checked(X[:head])):
                        _refuse_rows(X[:head], X)
                    store.commit(
                        _chunk_ids(new_ids, start, 0, head),
                        _rows(V, 0, head),
                        increasing=new_ids is None,
                    )
                count()
            except BaseException:
                self._back_to(saved)
                raise
            finally:
                store.release()
            return
        grams = self._validated_block_grams(X, head, n_full)
        for part in (X[:head], X[tail:]):
            if part.shape[0]:
                check_finite(part, "X")
                _check_magnitude(part, "X")
        # --- nothing has been changed up to here; from here on nothing can fail ---
        all_ids = self._record_ids(m, new_ids, start, srt)
        self._n += m
        if self._moments is not None:
            assert V is not None
            self._moments.add(X, V)
        if head:
            self._store.room_for(X[:head], self._buffer_end())
            self._store.append(
                X[:head], all_ids[:head], _rows(V, 0, head), increasing=new_ids is None
            )
            if self._store.n - self._pending_from >= self._block_rows:
                self._flush()
        for b in range(n_full):
            s, e = head + b * self._block_rows, head + (b + 1) * self._block_rows
            self._process(X[s:e], all_ids[s:e], _rows(V, s, e), None if grams is None else grams[b])
        if tail < m:
            self._store.room_for(X[tail:], self._buffer_end())
            self._store.append(
                X[tail:], all_ids[tail:], _rows(V, tail, m), increasing=new_ids is None
            )

    #: candidates held after the last prune (an instance attribute once a prune has run)
    _pruned_rows = 0

    _MAX_PRECOMPUTED_BLOCKS = 64

    def _validated_block_grams(
        self, X: np.ndarray, head: int, n_full: int
    ) -> list[np.ndarray] | None:
        """Check the whole blocks of ``X`` for nan/inf; return their Gram blocks when computed on the way
        (summaries other than the Gram matrix; p = 2 checks blocks in its one pass per slab instead).

        A nan/inf in a block makes the diagonal of its Gram block non-finite, so for up to
        ``_MAX_PRECOMPUTED_BLOCKS`` blocks the check costs nothing beyond the Gram update itself (no extra
        pass over the data).  Larger chunks are checked with one ``isfinite`` pass instead.
        """
        if n_full == 0:
            return None
        body = X[head : head + n_full * self._block_rows]
        if n_full > self._MAX_PRECOMPUTED_BLOCKS:
            check_finite(body, "X")
            return None
        grams = []
        for b in range(n_full):
            block = body[b * self._block_rows : (b + 1) * self._block_rows]
            g = self._summary.block_gram(block)
            if not np.isfinite(np.diagonal(g)).all():
                check_finite(X, "X")  # names the first bad entry
                _check_magnitude(block, "X")
            grams.append(g)
        return grams

    def extend(self, iterable: Iterable[Any], progress: bool = False) -> KeySketch:
        """Feed rows and/or chunks from an iterable (e.g. a generator); returns ``self``.

        Each item is a 1-D row or a 2-D chunk — or, when the sketch keeps values, a pair ``(k, v)`` of rows or
        ``(K, V)`` of chunks.  Empty chunks are skipped.  All or nothing: if an item is rejected the sketch is
        restored to its state before the call and the error names the item.  ``progress=True`` shows a tqdm
        bar.
        """
        snapshot = None if _at_most_one_item(iterable) else self.copy()
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(unit=" rows", unit_scale=True, desc="levstream")
        try:
            # not enumerate(): its reused result tuple would keep the last item alive
            index = -1
            for item in iterable:
                index += 1
                try:
                    rows = self._feed_item(item, index)
                except (ValueError, TypeError) as exc:
                    raise type(exc)(
                        f"extend: item {index} rejected ({exc}); the sketch was left as before the "
                        "call."
                    ) from exc
                if bar is not None:
                    bar.update(rows)
                # let the item go before the iterable makes the next one: a stream of chunks then never
                # holds two of them at once on our account
                del item
        except BaseException:
            if snapshot is not None:
                with self._lock:
                    self._take_state(snapshot)
            raise
        finally:
            if bar is not None:
                bar.close()
        return self

    def _feed_item(self, item: Any, index: int) -> int:
        """Feed one item of :meth:`extend`; returns the number of keys it held."""
        value = None
        if isinstance(item, tuple):
            if len(item) != 2:
                raise ValueError(
                    f"a tuple item must be a (keys, values) pair; got a tuple of {len(item)}."
                )
            item, value = item
        arr = as_real_array(item, f"item {index}")
        if arr.ndim == 1:
            self.update(arr, value)
            return 1
        if arr.ndim == 2:
            self.update_many(arr, value)
            return int(arr.shape[0])
        raise ValueError(f"must be a 1-D row or a 2-D chunk; got shape {arr.shape}.")

    # ------------------------------------------------------------------ folding rows into the summary
    def flush(self) -> KeySketch:
        """Settle the sketch now: fold the rows waiting in the input buffer into the summary and rescore the
        candidates, dropping those that can no longer be heavy.

        The answers do not change; the state shrinks to its smallest size, so call it before shipping a
        sketch (``to_bytes``, pickling) to another process.  Returns ``self``.
        """
        with self._lock:
            self._flush()
            if self._store.n:
                self._prune()
        return self

    def _keep_threshold(self) -> float:
        return self._eps * (1.0 - margin(self._summary.rel_error, prune=True))

    def _fold(self, X: np.ndarray, block: np.ndarray | None) -> np.ndarray:
        """Fold a block into the summary (summaries other than the Gram matrix); return a mask of its rows
        that may still be heavy.  The pre-filter bound is the one from before the block (docs/theory.md, "The
        norm pre-filter"); survivors get upper bounds from a stale factor (docs/theory.md, "Stale factors"),
        never lower ones."""
        self._summary.add(X, block)
        threshold = self._keep_threshold()
        keep = np.zeros(X.shape[0], dtype=bool)
        idx = self._summary.prefilter(X, threshold)
        if idx.size:
            keep[idx[~(self._summary.score_upper_bounds(X[idx]) < threshold)]] = True  # nan: kept
        return keep

    def _flush(self) -> None:
        """Fold the pending rows into the summary; the ones that may still be heavy stay as candidates."""
        start = self._pending_from
        if start == self._store.n:
            return
        self._live = None
        if isinstance(self._summary, GramSummary):
            with ingest_threads() as n_threads:
                _fold_pending(self, n_threads)
            return
        keep = self._fold(self._store.keys_view(start), None)
        self._store.keep_from(start, keep)
        self._pending_from = self._store.n
        _maybe_prune(self, self._block_rows)

    def _process(
        self, X: np.ndarray, ids: np.ndarray, V: np.ndarray | None, block: np.ndarray | None
    ) -> None:
        """Fold a block taken straight from the caller's chunk (summaries other than the Gram matrix; no
        pending rows exist at this point)."""
        self._live = None
        keep = self._fold(X, block)
        if keep.any():
            self._store.append(X[keep], ids[keep], None if V is None else V[keep])
        self._pending_from = self._store.n
        _maybe_prune(self, 0)

    def _prune(self, room: int | None = None) -> None:
        """Rescore every candidate exactly against the summary and drop those below eps (``GramSummary.exact_keep``
        decides as the exact scores would).  Only called with no pending rows.  Storage is then trimmed to the
        candidates and the summary drops its factors (``room=None``: the sketch settles), or, while streaming,
        released only beyond 1.5 times twice the candidates plus ``room`` rows (what the next prune and the input
        buffer may need)."""
        assert self._pending_from == self._store.n
        self._live = None
        rows = self._store.keys_view()
        if isinstance(self._summary, GramSummary):
            with ingest_threads() as n_threads:
                keep = self._summary.exact_keep(rows, self._keep_threshold(), n_threads)
        else:
            keep = ~(
                self._summary.scores(rows) < self._keep_threshold()
            )  # a nan score keeps its row
        self._store.keep_from(0, keep)
        # the state is whole from here on (should the trim fail, no memory or an interruption, it still is)
        self._pending_from = self._store.n
        self._pruned_rows = self._store.n
        if room is None:  # settling: hold the candidates and G, nothing more
            self._store.trim()
            if isinstance(self._summary, GramSummary):
                self._summary.release_factors()
        else:  # keep room for the candidates to double before the next prune, and for the input buffer
            self._store.trim(self._store.n + room, slack=1.5)

    # ------------------------------------------------------------------ merge
    def _part_options(self) -> dict[str, Any]:
        """The options (all but ``dim``) of an empty sketch that merges with this one: what a later part of the
        same stream is built with (the command line's parallel append, ``build_sketch(..., **options)``)."""
        options: dict[str, Any] = {
            "eps": self._eps,
            "p": self._p,
            "block_rows": self._block_rows,
            "value_dim": self._value_dim,
            "exact_output": self.exact_output,
            "decay": self._decay,
        }
        summary = self._summary
        if isinstance(summary, LiftedSummary):
            options.update(exact=True, memory_budget=summary.memory_budget)
        elif isinstance(summary, CoresetSummary):
            options.update(exact=False, delta=summary.delta, oversampling=summary.beta)
        return options

    def _check_compatible(self, other: Any) -> None:
        if not isinstance(other, KeySketch):
            raise TypeError(f"can only merge a KeySketch; got {type(other).__name__} instead.")
        pairs = [
            ((self._dim, self._eps, self._p), (other._dim, other._eps, other._p), "(dim, eps, p)"),
            (
                (self._value_dim, self.exact_output),
                (other._value_dim, other.exact_output),
                "(value_dim, exact_output)",
            ),
            (self._summary.config, other._summary.config, "normaliser summaries"),
            (self._decay, other._decay, "decay"),
        ]
        for mine, theirs, what in pairs:
            if mine != theirs:
                raise ValueError(
                    f"cannot merge sketches with different {what}: {mine} vs {theirs}."
                )

    def merge(self, other: KeySketch) -> KeySketch:
        """Fold ``other`` (same dim, eps, p; disjoint ids) into this sketch in place; returns ``self``.

        The result is the sketch of the union of both key streams: merging is associative and commutative,
        so any reduction tree over shards gives the same universal set.  ``other`` is not modified.

        Streams that forget (``decay`` or gates) merge only as consecutive parts of one stream, ordered by id:
        the earlier part is decayed by the later part's gates (either may be ``self``); parts whose ids
        interleave are refused.  Any reduction tree that merges neighbouring parts gives the same sketch.
        Should the merge fail (no memory, an interruption), this sketch is as it was.
        """
        return self._merge(other, atomic=True)

    def _merge(self, other: KeySketch, atomic: bool) -> KeySketch:
        """:meth:`merge`; ``atomic=False`` merges in place, for a sketch no caller sees (a copy of one)."""
        self._check_compatible(other)
        if other is self:
            raise ValueError("cannot merge a sketch with itself (every id would clash).")
        hit = self._seen.clash_with(other._seen)
        if hit is None:
            both = np.intersect1d(self._store.ids_view(), other._store.ids_view())
            hit = int(both[0]) if both.size else None
        if hit is not None:
            raise ValueError(
                f"cannot merge: both sketches contain key id {hit}. Shards of one stream need "
                "disjoint ids: pass offset= or ids= to update_many."
            )
        src = other.copy()
        src._flush()
        with self._lock:
            later = self._order_for_merge(src) if (self.forgets or src.forgets) else None
            if not atomic:
                self._merge_settled(src, later)
                return self
            # merged into a copy, taken over once whole
            work = self.copy()
            work._merge_settled(src, later)
            self._take_state(work)
        return self

    def _order_for_merge(self, other: KeySketch) -> bool | None:
        """For streams that forget: True when ``other`` is the part right after this one, False when it is
        the part right before it (None when one of them is empty); raises when the parts interleave.  Parts are
        ordered by id: every id of the later part exceeds every id of the earlier one."""
        mine, theirs = self._seen.ranges, other._seen.ranges
        if self._n == 0 or other._n == 0 or not mine.shape[0] or not theirs.shape[0]:
            return None
        if theirs[0, 0] >= mine[-1, 1]:
            return True
        if mine[0, 0] >= theirs[-1, 1]:
            return False
        raise ValueError(
            "cannot merge sketches of streams that forget unless they are consecutive parts of one stream "
            f"(every id of one part after every id of the other): ids {mine[0, 0]}..{mine[-1, 1] - 1} and "
            f"{theirs[0, 0]}..{theirs[-1, 1] - 1} interleave. The order of the parts decides how much the "
            'earlier one has decayed (docs/theory.md, "Decay and gates").'
        )

    def _merge_settled(self, src: KeySketch, later: bool | None = None) -> None:
        self._flush()
        if later is not None or self.forgets or src.forgets:
            if later is None:  # one part is empty: its frame is the other's
                self._frame = src._frame if self._n == 0 else self._frame
            elif later:  # src follows: this part decays by src's gates, into src's frame
                self._decay_into(src._frame)
                self._frame = self._frame.then(src._frame)
            else:
                src._decay_into(self._frame)
                self._frame = src._frame.then(self._frame)
        self._summary.merge(src._summary)
        if self._moments is not None:
            assert src._moments is not None
            self._moments.merge(src._moments)
        self._store.extend(src._store)
        self._pending_from = self._store.n
        self._seen = self._seen.union(src._seen)
        self._n += src._n
        self._next_id = max(self._next_id, src._next_id)
        self._prune()

    def _decay_into(self, later: Frame) -> None:
        """Move this (earlier, settled) part's state into the frame of the part that follows it."""
        shift, factor = self._frame.merge_scaling(later)
        self._scale_state(factor)
        self._rebase(shift)

    def __iadd__(self, other: KeySketch) -> KeySketch:  # noqa: PYI034 (Self: Python 3.11)
        return self.merge(other)

    def __add__(self, other: KeySketch) -> KeySketch:
        return self.copy()._merge(other, atomic=False)

    @classmethod
    def merge_all(cls, sketches: Iterable[KeySketch]) -> KeySketch:
        """Merge an iterable of sketches pairwise in a balanced tree and return a new sketch."""
        level = [s.copy() for s in sketches]
        if not level:
            raise ValueError("merge_all needs at least one sketch; got none.")
        while len(level) > 1:
            level = [
                level[i]._merge(level[i + 1], atomic=False) if i + 1 < len(level) else level[i]
                for i in range(0, len(level), 2)
            ]
        return level[0]

    # ------------------------------------------------------------------ queries (never change the sketch)
    def _view(self) -> _query.HeadView:
        """The rows and summary a query reads (call with the lock held).

        For the Gram summary (p = 2) the pending rows are summarised for queries on the fly, once each: their
        Gram matrix is added to a copy of ``G``, and only the rows whose score bound against a factor of an
        earlier ``G`` (``u / (1 + u)``, docs/theory.md, "Stale factors") reaches the pruning threshold are
        scanned.  That cache is derived data: it is never serialized and is dropped whenever rows are folded.
        """
        st, summary = self._store, self._summary
        pf, n = self._pending_from, st.n
        live = self._live
        if live is not None and live.view is not None and live.upto == n and pf < n:
            # the live step: nothing a query reads has moved since the view was made
            return live.view
        values = None if st.values is None else st.values[:pf]
        G = summary.gram_sum() if isinstance(summary, GramSummary) else None
        if G is None or pf == n:
            return self._plain_view(G if pf == n else None)
        live = self._live_rows(G)
        if live.upto < n:
            assert isinstance(summary, GramSummary)
            try:
                live.add(st, n, live.bound_factor(summary), live.threshold)
            except BaseException:  # the cache may hold part of the rows: it goes (derived data)
                self._live = None
                raise
        if live.view is not None:  # nothing a query reads has moved since the last view
            return live.view
        rows, cand = live.rows, live.cand
        norms, ids_sorted, int8, scales = None, st.ids_sorted, None, None
        if cand is None:
            keys, ids = st.keys[:pf], st.ids[:pf]
        else:  # the candidates still alive, by descending norm (see _LiveRows)
            keys, ids, values = cand.keys_view(), cand.ids_view(), cand.values_view()
            norms, ids_sorted = live.cand_norms, ids_sorted and cand.ids_sorted
            int8, scales = live.cand_int8, live.cand_scale
        extra = rows.n
        live.view = _query.HeadView(
            self._summary,
            keys,
            ids,
            values,
            rows.keys_view(),
            rows.ids_view(),
            rows.values_view(),
            live.gram,
            ids_sorted,
            self._moments,
            norms,
            live.row_norms[:extra],
            self._plain_view,
            live.row_int8[:extra],
            live.row_scale[:extra],
            int8,
            scales,
        )
        live.view = live.view._replace(scan=_query.scan_arrays(live.view))
        return live.view

    def _held_view(self) -> _query.HeadView:
        """Every row held, the candidates and every pending row, with ``Z`` over every key fed: what :meth:`top_k`
        ranks (a function of the sketch's state alone; the live cache scans only the pending rows that can be
        heavy, and which those are depends on when its factor was made).  Call with the lock held."""
        summary = self._summary
        G = summary.gram_sum() if isinstance(summary, GramSummary) else None
        return self._plain_view(G if self._pending_from == self._store.n else None)

    def _plain_view(self, total_gram: np.ndarray | None = None) -> _query.HeadView:
        """The candidates and every pending row, ``Z`` from the summary plus the pending rows' terms (or from
        ``total_gram``, the summary's ``G`` when nothing is pending, with this view without it as the fallback):
        what a query reads when the live cache cannot answer it (call with the lock held)."""
        st = self._store
        pf, n = self._pending_from, st.n
        return _query.HeadView(
            self._summary,
            st.keys[:pf],
            st.ids[:pf],
            None if st.values is None else st.values[:pf],
            st.keys[pf:n],
            st.ids[pf:n],
            None if st.values is None else st.values[pf:n],
            total_gram,
            st.ids_sorted,
            self._moments,
            fallback=None if total_gram is None else self._plain_view,
        )

    def _live_rows(self, G: np.ndarray) -> _LiveRows:
        """The live cache of the pending rows (Gram path), new or reset when rows were folded since.  A new
        cache starts from a fresh factor of ``G``: the candidates still alive are then all a query scans (they
        are pruned only when their number has doubled, so up to half of them may be below ``eps``; this costs
        ``|candidates| d^2`` once per fold, paid by the first query after it)."""
        live = self._live
        if live is None or live.upto < self._pending_from:
            floor = self._eps * (1.0 - margin(gram_rel_error_max(self._dim), prune=True))
            live = _LiveRows(G, self._dim, self._value_dim, self._pending_from, floor)
            live.threshold = (
                self._keep_threshold()
            )  # the summary stays as it is while the cache lives
            if self._pending_from:
                # (a cache that failed halfway, no memory or an interruption, is not kept: it would hold part of
                # the candidates)
                self._live = None
                live.refresh(self._store)
            self._live = live
        return live

    def _queries(self, Q: Any) -> np.ndarray:
        rows = fast_float64(Q)
        # no nan/inf (finite squares that overflow take the long way)
        if (
            rows is not None
            and rows.ndim == 2
            and rows.shape[1] == self._dim
            and np.isfinite(sq_total(rows))
        ):
            return rows
        Q = as_matrix(
            Q,
            "Q",
            self._dim,
            hint="Pass queries as a 2-D array, one row per query.",
            allow_empty=True,
        )
        _check_magnitude(
            Q, "Q"
        )  # their weights would overflow Z (a multi-head sketch refuses them too)
        return Q

    def _query_eps(self, eps: Any) -> float:
        if eps is None:
            return self._eps
        eps = check_eps(eps)
        if eps < self._eps:
            raise ValueError(
                f"eps must be >= the sketch's eps ({self._eps:g}); got {eps:g}. "
                "Build the sketch with a smaller eps to query lower thresholds."
            )
        return eps

    def universal_set(self) -> UniversalSet:
        """Every key whose sensitivity score over all keys fed is ``>= eps`` (exact for p = 2).

        Computed on a settled copy: the sketch itself is not changed.  For a stream that forgets, the scores and
        ``keys`` are those of the weighted keys ``sqrt(c_j(t)) k_j``.
        """
        with self._lock:
            settled = self.copy()
        settled._flush()
        store = settled._store
        scores = settled._summary.scores(store.keys_view())
        report = margin(settled._summary.rel_error, prune=False)
        sel = np.flatnonzero(scores >= self._eps * (1.0 - report))
        ids = store.ids_view()[sel]
        order = np.argsort(ids, kind="stable")
        sel = sel[order]
        keys = store.keys_view()[sel]
        if settled.forgets:  # the weighted keys sqrt(c_j(t)) k_j, out of the frame
            keys = keys * math.exp(-0.5 * settled._frame.exponent)
        # the copy's n: a writer may have fed more since the lock was released
        return UniversalSet(ids[order], keys, scores[sel], self._eps, self._p, settled._n, report)

    def normalizer(self, Q: Any) -> np.ndarray:
        """``Z(q) = sum_l f(<q, k_l>)`` over *all* keys fed, for every query row (exact for p = 2).

        Examples
        --------
        >>> import numpy as np, levstream as ls
        >>> K = np.array([[1.0, 0.0], [1.0, 1.0]])
        >>> ls.KeySketch(2, eps=0.5).update_many(K).normalizer([[1.0, 2.0]]).tolist()
        [10.0]
        """
        Q = self._queries(Q)
        with self._lock:
            return self._normalizer(Q)

    def _normalizer(self, Q: np.ndarray) -> np.ndarray:
        """:meth:`normalizer` of validated queries (call with the lock held)."""
        z = _query.normalizer(self._view(), Q, self._p)
        if (
            self.forgets
        ):  # the frame's weights are e^E times the keys' (docs/theory.md, "Decay and gates")
            z *= math.exp(-self._frame.exponent)
        return z

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
            rounding.  Queries orthogonal to every key (``Z = 0``) have no entries.  The sketch is not changed.
        """
        eps = self._query_eps(eps)
        rows = fast_float64(Q)
        if rows is not None and rows.ndim == 2 and rows.shape[1] == self._dim and self._p == 2.0:
            # the live step's query: one compiled call on rows not validated yet (it reports a query that is not
            # finite as one it cannot answer; such queries then take the general path, which refuses them)
            with self._lock:
                found = self._live_heavy_entries(rows, eps)
            if found is not None:
                return found
        Q = self._queries(Q)
        with self._lock:
            return _query.heavy_entries(self._view(), Q, self._p, eps)

    def _live_heavy_entries(self, Q: np.ndarray, eps: float) -> HeavyEntries | None:
        """:func:`~levstream._query.live_heavy_entries` (call with the lock held).  The rows fed since the live cache
        was last current, up to ``_WAITING_ROWS_SCANNED`` of them, are scanned as they are (their terms added to
        ``Z``), without folding them into the cache first."""
        live, st = self._live, self._store
        if live is not None and live.view is not None and live.upto >= self._pending_from:
            waiting = st.n - live.upto
            if waiting == 0:
                return _query.live_heavy_entries(live.view, Q, eps)
            if waiting <= _WAITING_ROWS_SCANNED and st.keys.dtype == np.float64:
                keys, ids = st.keys[live.upto : st.n], st.ids[live.upto : st.n]
                return _query.live_heavy_entries(live.view, Q, eps, keys, ids)
        return _query.live_heavy_entries(self._view(), Q, eps)

    def top_k(self, Q: Any, k: int) -> TopK:
        """The ``k`` largest attention entries of each query among the keys held (a superset of the universal set).

        ``certified[i]`` is true when row ``i``'s ``k``-th value is ``>= eps``: every key outside the
        universal set has ``A < eps``, so the result is then the true top-``k`` over all keys.  With a coreset
        normaliser (values ``A~``, true values ``>= A~ (1 - delta)``) the test is ``A~ (1 - delta) >= eps``.

        Examples
        --------
        >>> import numpy as np, levstream as ls
        >>> K = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
        >>> top = ls.KeySketch(2, eps=0.3).update_many(K).top_k([[1.0, 0.0]], 2)
        >>> top.key_ids.tolist(), bool(top.certified[0])
        ([[0, 2]], True)
        """
        Q = self._queries(Q)
        k = check_int(k, "k", minimum=1)
        with self._lock:
            view = self._view()
            # a few queries, k of a few dozen at most: one compiled pass over every row held (a heap of k entries
            # each, O(n log k); beyond, the ranking's sort is faster when most rows enter the heap)
            if k <= _TOP_K_PASS_MAX and _query.is_live(view, Q, self._p):
                assert view.total_gram is not None
                st = self._store
                found = _query.top_k_held(
                    view.total_gram, st.keys_view(), st.ids_view(), Q, k, self._eps
                )
                if found is not None:
                    return found
            return _query.top_k(self._held_view(), Q, self._p, k, self._eps)

    def attend(self, Q: Any, eps: float | None = None) -> AttentionResult:
        """Attention of queries ``Q`` over every key fed: heavy entries, their output and mass, exact output.

        Needs ``value_dim``.  ``output`` (p = 2 with ``exact_output=True``) is ``sum_j A_j v_j`` over *every*
        key fed, exact; ``heavy_output`` and ``captured_mass`` sum ``A_j v_j`` and ``A_j`` over the entries
        ``A_j >= eps`` only (for coreset p, with the coreset's values ``A~``).  The sketch is not changed.

        Examples
        --------
        >>> import numpy as np, levstream as ls
        >>> rng = np.random.default_rng(0)
        >>> K, V, Q = rng.standard_normal((500, 4)), rng.standard_normal((500, 3)), rng.standard_normal((2, 4))
        >>> sk = ls.KeySketch(4, eps=0.05, value_dim=3, exact_output=True).update_many(K, V)
        >>> W = (Q @ K.T) ** 2
        >>> bool(np.allclose(sk.attend(Q).output, W @ V / W.sum(axis=1, keepdims=True), rtol=1e-10))
        True
        """
        Q = self._queries(Q)
        eps = self._query_eps(eps)
        with self._lock:
            return _query.attend(self._view(), Q, self._p, eps)

    def prefill(
        self,
        K: Any,
        V: Any,
        Q: Any,
        ids: Any = None,
        offset: Any = None,
        eps: float | None = None,
        gates: Any = None,
    ) -> AttentionResult:
        """Causal attention of a chunk, then fold the chunk in: query ``i`` sees every key fed before and the
        chunk's keys ``0..i`` (its own included).

        ``K`` and ``Q`` have shape (c, dim), ``V`` (c, value_dim); row ``i`` of the result is what dense causal
        attention gives query ``i`` (exact output with ``exact_output=True``, p = 2).  A decode step is the case
        c = 1.  Cost ``O(c^2 (d + dv) + c d^2 dv)`` plus ``O(c |candidates| d)``.  Ids as for
        :meth:`update_many`.  ``gates`` (shape (c,), in ``(0, 1]``, p = 2): row ``i``'s gate multiplies the weight
        of every key before it, so query ``i`` sees the decayed attention at its own time.  On bad input nothing
        changes.

        Examples
        --------
        >>> import numpy as np, levstream as ls
        >>> rng = np.random.default_rng(1)
        >>> K, V = rng.standard_normal((8, 3)), rng.standard_normal((8, 2))
        >>> sk = ls.KeySketch(3, eps=0.1, value_dim=2, exact_output=True)
        >>> r = sk.prefill(K, V, K)                           # self-attention of a prompt
        >>> W = np.tril((K @ K.T) ** 2)
        >>> bool(np.allclose(r.output, W @ V / W.sum(axis=1, keepdims=True))), sk.n
        (True, 8)
        """
        if ids is None and offset is None and eps is None and self._value_dim is not None:
            if gates is None:
                result = self._decode_plain(K, V, Q)
                if result is not None:
                    return result
            step = _step_rows(K, V, Q, self._dim, self._value_dim)
            if step is not None:
                return self._decode_step(K, *step, gates)
        given, K = K, as_matrix(K, "K", self._dim, allow_empty=True)
        c = K.shape[0]
        Q = as_matrix(Q, "Q", self._dim, allow_empty=True)
        _check_magnitude(Q, "Q")
        if Q.shape[0] != c:
            raise ValueError(
                f"Q must have one query per key of the chunk: shape ({c}, {self._dim}); got "
                f"shape {Q.shape}."
            )
        Vc = self._value_chunk(V, c)
        if Vc is None:
            raise ValueError("prefill needs value rows: build the sketch with value_dim=.")
        eps = self._query_eps(eps)
        _check_magnitude(K, "K")
        neg = self._neg_log_gates(gates, c)
        with self._lock:
            if neg is None or c == 0:
                # float32 keys are held as float32, as update_many holds them
                K = _kept_row(given, K, isinstance(self._summary, GramSummary))
                return self._prefill(K, Vc, Q, ids, offset, eps)
            return self._prefill_gated(K, Vc, Q, ids, offset, eps, neg)

    def _decode_plain(self, K: Any, V: Any, Q: Any) -> AttentionResult | None:
        """:meth:`prefill` of one row when nothing but taking it is due: the common decode step, by the general
        path's own kernels (the same answer and state, bit for bit) with its checks made in one compiled call.

        Taken when ``K``, ``V`` and ``Q`` are float64 rows of shapes (1, dim), (1, value_dim) and (1, dim), each
        C-contiguous and writeable, finite, and within the moment state's range; the stream does not forget; the
        next id extends the ids seen; the live cache is current; and nothing needs to grow, fold or refresh.  None,
        with nothing changed, otherwise: then :meth:`_decode_step` takes the row."""
        dim, value_dim = self._dim, self._value_dim
        if not (
            value_dim is not None
            and _plain_step_row(K, dim)
            and _plain_step_row(Q, dim)
            and _plain_step_row(V, value_dim)
        ):
            return None
        with self._lock:
            live, store, moments = self._live, self._store, self._moments
            ranges = self._seen.ranges
            i = self._next_id
            if (
                live is None
                or self._p != 2.0
                or self.forgets
                or not ranges.shape[0]
                or ranges[-1, 1] != i
                or i > _ID_MAX - 1
                or store.n + 1 - self._pending_from >= self._block_rows
                or not live.takes_row(store, K)
            ):
                return None
            view = self._view()
            if view.total_gram is None:
                return None
            key_id = live.step_id  # (the kernel copies it into the result)
            key_id[0] = i
            summary = self._summary
            assert isinstance(summary, GramSummary)  # a live cache exists only for it
            factor = live.bound_factor(summary)
            # the row is taken as _append_token takes it (the moment state first, then the live step).  When the
            # moment state only buffers it, one compiled call checks the rows, answers the query and takes the row;
            # otherwise the same call checks and answers (so nothing new loads at such a step) and the row is taken
            # here
            buffer = _query.NO_BUFFER if moments is None else moments.buffer_slot()
            take = buffer is not None
            ints, floats, norm = _query.decode_take(
                view,
                K,
                V,
                Q,
                key_id,
                self._eps,
                _query.NO_BUFFER if buffer is None else buffer,
                live.append_arrays(store, factor),
                take,
            )
            if norm == NOT_TAKEN:  # the general path validates the rows, or answers another way
                return None
            if take:
                if moments is not None:
                    moments.took_buffered_row()
                refresh = live.appended(store, i, norm)
            else:
                # the moment state may settle or hand over a product (should that fail, nothing has changed);
                # the live step cannot fail
                assert moments is not None
                moments.add_row(K[0], V[0], checked=True)
                refresh = live.append(store, K[0], i, V[0], factor)
            self._n += 1
            ranges[-1, 1] = i + 1
            self._next_id = i + 1
            if refresh:
                live.refresh_due = True
        return _query.decode_result(ints, floats, V.shape[1], self._eps, moments is not None)

    def _decode_step(
        self, given: Any, K: np.ndarray, V: np.ndarray, Q: np.ndarray, gates: Any
    ) -> AttentionResult:
        """:meth:`prefill` of one row (``K``, ``V``, ``Q`` validated by :func:`_step_rows`; ``given`` the keys as
        passed: float32 keys are held as float32, as :meth:`update` holds them)."""
        # whether the stream forgets is read under the lock too: another writer may gate it
        with self._lock:
            step_neg = None
            if gates is not None or self.forgets:
                step_neg = self._neg_log_gate(_one_gate(gates))
            self._check_next_id()
            chunk_ids = np.array([self._next_id], dtype=np.int64)  # (before the frame moves)
            before, n, frame = None, self._n, self._frame
            try:
                if step_neg is not None and (step_neg or self.forgets):
                    if self._moments is not None:  # before the frame moves (see _append_token)
                        self._moments.prepare(1)
                    xw, before = self._weigh_row(K[0], step_neg, "K", V[0])
                    K = kept = xw[None, :]
                else:
                    kept = K
                    if K is not given:
                        kept = _kept_row(given, K, isinstance(self._summary, GramSummary))
                    if self._moments is not None:  # refused before the query is answered
                        self._moments.check_row(kept[0], V[0])
                result = _query.prefill(self._view(), K, V, Q, chunk_ids, self._p, self._eps)
                self._append_token(kept[0], V[0], checked=True)
            except BaseException:  # the row not counted: nor its gate
                self._uncounted(n, frame, before)
                raise
        return result

    def _prefill_gated(
        self,
        K: np.ndarray,
        Vc: np.ndarray,
        Q: np.ndarray,
        ids: Any,
        offset: Any,
        eps: float,
        neg: np.ndarray,
    ) -> AttentionResult:
        """A gated causal chunk, in segments between the frame's rebases: within a segment every row is weighed
        in one frame (weights within ``e^100`` of each other, none flushed), so each query sees the decayed
        attention at its own time (docs/theory.md, "Decay and gates")."""
        new_ids, start, _ = self._new_ids(
            K.shape[0], ids, offset
        )  # checked before anything changes
        return self._prefill_planned(Vc, Q, new_ids, start, eps, self._plan_segments(K, neg, Vc))

    def _plan_segments(
        self, K: np.ndarray, neg: np.ndarray, V: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, Frame]:
        """A gated chunk's rows weighted, each in the frame of its segment (rows between two rebases), the
        cumulative rebases per row and the frame after the chunk (nothing changes; raises on overflow, of a
        row's weighted squares or of the moment state's terms of a row and its value)."""
        scales, shifts, frame = self._frame.rows(neg)
        Kw = K * scales[:, None]
        if not np.isfinite(sq_total(Kw)) and _rows_overflow(Kw):
            raise _too_large_weighted(K, "K")
        if self._moments is not None:
            self._moments.check(Kw, V)
        return Kw, shifts, frame

    def _prefill_planned(
        self,
        Vc: np.ndarray,
        Q: np.ndarray,
        new_ids: np.ndarray | None,
        start: int,
        eps: float,
        plan: tuple[np.ndarray, np.ndarray, Frame],
    ) -> AttentionResult:
        Kw, shifts, frame = plan
        c = Kw.shape[0]
        cuts = [0, *(np.flatnonzero(np.diff(shifts)) + 1).tolist(), c]
        # a chunk that rebases the state is fed in several parts: should a later part fail (no memory, an
        # interruption), the sketch goes back to a copy made first (one more pass over the rows a rebase rescales)
        saved = self.copy() if c and shifts[-1] else None
        results, done = [], 0
        try:
            for a, b in itertools.pairwise(cuts):
                self._rebase(int(shifts[a]) - done)
                done = int(shifts[a])
                part_ids = None if new_ids is None else new_ids[a:b]
                part_offset = start + a if new_ids is None else None
                results.append(self._prefill(Kw[a:b], Vc[a:b], Q[a:b], part_ids, part_offset, eps))
        except BaseException:
            if saved is not None:
                self._take_state(saved)
            raise
        self._frame = frame
        return results[0] if len(results) == 1 else concat_attention(results)

    def _prefill(
        self, K: np.ndarray, Vc: np.ndarray, Q: np.ndarray, ids: Any, offset: Any, eps: float
    ) -> AttentionResult:
        c = K.shape[0]
        new_ids, start, srt = self._new_ids(c, ids, offset)
        if self._moments is not None:  # (as _ingest will) before any work on the chunk
            self._moments.check(K, Vc)
        chunk_ids = np.arange(start, start + c, dtype=np.int64) if new_ids is None else new_ids
        result = _query.prefill(self._view(), K, Vc, Q, chunk_ids, self._p, eps)
        if c:
            self._ingest(K, Vc, new_ids, start, srt)
        return result

    # ------------------------------------------------------------------ copies and persistence
    def copy(self) -> KeySketch:
        """An independent deep copy."""
        out = KeySketch.__new__(KeySketch)
        with self._lock:  # a writer in another thread never leaves a half-updated copy
            out.__dict__.update(self.__dict__)
            out._summary = self._summary.copy()
            out._seen = self._seen.copy()
            out._store = self._store.copy()
            out._moments = None if self._moments is None else self._moments.copy()
        out._lock = threading.RLock()
        out._live = None
        return out

    __copy__ = copy

    def __deepcopy__(self, memo: dict) -> KeySketch:
        return self.copy()

    def to_bytes(self) -> bytes:
        """Serialize (versioned, checksummed; buffered rows included, nothing is lost).

        Keys-only sketches write format version 1 (as levstream 0.1.0); sketches with values version 2;
        sketches of streams that forget (``decay`` or gates) version 3; sketches holding float32 key rows (fed
        float32 keys) version 4, which keeps the rows in float32.
        """
        with self._lock:
            return self._to_bytes()

    def _to_bytes(self) -> bytes:
        smeta, sarrays = self._summary.to_state()
        meta: dict[str, Any] = {
            "kind": _SKETCH_KIND,
            "dim": self._dim,
            "eps": self._eps,
            "p": self._p,
            "block_rows": self._block_rows,
            "n": self._n,
            "next_id": self._next_id,
            "ids_exact": self._seen.exact,
            "summary": smeta,
        }
        # when the next prune is due: a sketch loaded mid-stream prunes where this one would
        if self._pruned_rows:
            meta["pruned_rows"] = self._pruned_rows
        arrays = {f"summary.{k}": v for k, v in sarrays.items()}
        arrays.update(self._store.arrays(0, self._pending_from, "cand"))
        arrays.update(self._store.arrays(self._pending_from, self._store.n, "buf"))
        arrays["id_ranges"] = self._seen.ranges
        version = 1
        if self._value_dim is not None:
            meta["value_dim"], meta["exact_output"] = self._value_dim, self.exact_output
            if self._moments is not None:
                arrays.update(self._moments.to_state())
            version = _FORMAT_WITH_VALUES
        if self.forgets:
            meta["decay"], meta["frame"] = self._decay, self._frame.to_meta()
            version = _FORMAT_WITH_DECAY
        if self._store.held_dtype == np.float32:
            version = _FORMAT_FLOAT32_ROWS
        return _serialize.pack(meta, arrays, version)

    @classmethod
    def from_bytes(cls, data: bytes) -> KeySketch:
        """Inverse of :meth:`to_bytes`; raises ``ValueError`` for corrupted, truncated or foreign bytes."""
        meta, arrays, version = _serialize.unpack(data)
        try:
            if meta.get("kind") != _SKETCH_KIND:
                raise ValueError(f"bytes hold a {meta.get('kind')!r}, not a KeySketch")
            value_dim = meta.get("value_dim")
            forgets = "frame" in meta
            if version < _FORMAT_WITH_DECAY and (
                forgets or (value_dim is not None) != (version >= _FORMAT_WITH_VALUES)
            ):
                raise ValueError(f"format version {version} and the value header disagree")
            if version == _FORMAT_WITH_DECAY and not forgets:
                raise ValueError(f"format version {version} needs a decay frame")
            exact_output = bool(meta.get("exact_output", False)) if value_dim is not None else False
            lifted: dict[str, Any] = {}
            if (
                exact_output and meta["summary"].get("kind") == "lifted"
            ):  # exact p = 4 outputs need it
                lifted = {"exact": True, "memory_budget": int(meta["summary"]["memory_budget"])}
            out = cls(
                int(meta["dim"]),
                eps=float(meta["eps"]),
                p=float(meta["p"]),
                block_rows=int(meta["block_rows"]),
                value_dim=None if value_dim is None else int(value_dim),
                exact_output=exact_output,
                decay=None if meta.get("decay") is None else float(meta["decay"]),
                **lifted,
            )
            if forgets:
                out._check_gates_allowed()
                out._frame = Frame.from_meta(meta["frame"])
            d = out._dim
            for (
                name,
                arr,
            ) in arrays.items():  # a valid checksum does not make the content consistent
                if name.startswith("summary.") and arr.dtype.kind != "f":
                    continue
                want: Any = np.int64 if name.endswith("_ids") or name == "id_ranges" else np.float64
                if version >= _FORMAT_FLOAT32_ROWS and name in ("cand_rows", "buf_rows"):
                    want = np.float32 if arr.dtype == np.float32 else np.float64  # rows in either
                if arr.dtype != want:
                    raise ValueError(
                        f"stored array {name!r} must be {np.dtype(want)}; got {arr.dtype}"
                    )
                if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                    raise ValueError(f"stored array {name!r} must be finite")
            summary_arrays = {
                k.split(".", 1)[1]: v for k, v in arrays.items() if k.startswith("summary.")
            }
            out._summary = summary_from_state(meta["summary"], summary_arrays)
            parts = [
                (arrays[f"{s}_rows"], arrays[f"{s}_ids"], arrays.get(f"{s}_values"))
                for s in ("cand", "buf")
            ]
            out._store = RowStore.from_arrays(d, out._value_dim, parts)
            out._pending_from = parts[0][0].shape[0]
            if out._moments is not None:
                assert out._value_dim is not None
                out._moments = MomentState.from_state(
                    d, out._value_dim, arrays, out._moments.degree
                )
            ranges = arrays["id_ranges"]
            if ranges.ndim != 2 or ranges.shape[1] != 2:
                raise ValueError("id ranges must have shape (r, 2)")
            out._seen = IdRanges(ranges, bool(meta["ids_exact"]))
            out._n, out._next_id = int(meta["n"]), int(meta["next_id"])
            if out._next_id < 0:
                raise ValueError(f"next_id must be >= 0; got {out._next_id}")
            # (bytes written before the thirteenth session have none: the next prune then comes as after a load)
            pruned = meta.get("pruned_rows", 0)
            if type(pruned) is not int or not 0 <= pruned <= out._n:
                raise ValueError(f"pruned_rows must be an integer in 0..n; got {pruned!r}")
            out._pruned_rows = pruned
            n_pending = out._store.n - out._pending_from
            if out._summary.dim != d or out._n < out._summary.n_rows + n_pending:
                raise ValueError("summary does not match the sketch header")
        except (KeyError, TypeError, NotImplementedError) as exc:
            raise ValueError(f"serialized sketch is malformed: {exc}.") from exc
        return out

    def __reduce__(self) -> tuple:
        return (KeySketch.from_bytes, (self.to_bytes(),))

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`to_bytes` to ``path`` atomically (a temporary file renamed into place)."""
        _serialize.write_atomic(path, self.to_bytes())

    def __eq__(
        self, other: object
    ) -> bool:  # identity semantics; sketches are compared by their answers
        return self is other

    __hash__ = object.__hash__


#: Row scales (square roots of weights) below this are flushed to zero: weights below ``2^-1800`` of the frame.
_FLUSH_SCALE = 2.0**-FORGET_SHIFT

#: A rebase multiplies the state by at most ``4^-_REBASE_PIECE`` at a time (a power of 4 in the normal range).
_REBASE_PIECE = 256

#: Rows newly buffered since the last query are summarised by a compiled loop up to this many, by BLAS beyond.
_SMALL_LIVE_ROWS = 32

#: ``update_many`` of at most this many rows of a key-only stream is a copy into the store (the live step's path).
_FEW_ROWS = 16

#: The largest key id (ids are int64).
_ID_MAX = int(np.iinfo(np.int64).max)
#: The sorted ids ``_ingest`` takes for rows numbered by the running counter (none).
_NO_ID_ROWS = np.zeros(0, dtype=np.int64)

#: A live query scans up to this many rows fed since the live cache was current as they are, and folds them into
#: the cache beyond (:meth:`_LiveRows.add`: BLAS for more than ``_SMALL_LIVE_ROWS`` rows).
_WAITING_ROWS_SCANNED = 63

#: The live cache refactors its Gram matrix once the largest diagonal entry has grown _LIVE_REFRESH times,
#: looked at every _LIVE_CHECK_ROWS rows, and the rows it scans have grown to _REFRESH_ROWS_GROWTH times (plus
#: _LIVE_REFRESH_ROWS) the rows its last refactoring kept: a refactoring pays by the rows it drops.
_LIVE_REFRESH = 2.0
_LIVE_CHECK_ROWS = 16
_LIVE_REFRESH_ROWS = 64
_REFRESH_ROWS_GROWTH = 2
_NO_FACTOR = np.zeros((0, 0))


class _LiveRows:
    """Derived from the pending rows for queries (p = 2): ``G`` plus their Gram matrix, and the pending rows
    whose score bound reaches the pruning threshold.  Rows ``start..upto-1`` of the store are accounted for.

    Once the largest diagonal entry of that ``G`` has grown ``_LIVE_REFRESH`` times since the cache was made (a
    decaying stream's weights grow in its frame; a young stream's ``G`` grows fast) and the rows it scans have
    more than doubled (plus ``_LIVE_REFRESH_ROWS``) since its last refresh (a refresh pays by the rows it drops;
    a fast-forgetting stream's ``G`` doubles in its frame every ``log 2 / -log g`` rows, far more often than
    that), the cache factors it afresh (``d^3``) and keeps only the rows whose exact score reaches ``floor``, the
    lowest threshold any later prune can use: the bound of later rows is then tight again.  It rescores the
    candidates too and keeps the ones still alive (``cand``) for queries to scan instead of all of them (a decaying
    stream's candidates fall below ``eps`` long before the next fold rescores them); the sketch's own candidates
    are not touched.  That copy is ordered by descending norm, with the norms in ``cand_norms``, so that a query
    reads only the candidates long enough to be heavy for it (:func:`~levstream._kernels.live.heavy_p2`)."""

    __slots__ = (
        "cand",
        "cand_int8",
        "cand_norms",
        "cand_scale",
        "diag_mark",
        "factor",
        "floor",
        "gram",
        "refresh_due",
        "row_int8",
        "row_norms",
        "row_scale",
        "rows",
        "rows_mark",
        "scratch",
        "start",
        "step_id",
        "threshold",
        "upto",
        "view",
    )

    def __init__(
        self, gram: np.ndarray, dim: int, value_dim: int | None, start: int, floor: float
    ) -> None:
        self.upto = self.start = start
        self.gram = gram.copy()
        self.rows = RowStore(dim, value_dim)
        # the scans' filters of rows[:rows.n], room to grow: norms (scan_norms), int8 rows and their scales
        # (int8_rows: a decaying stream keeps thousands of recent rows here, most of them read by every query)
        self.row_norms = np.empty(16)
        self.row_int8 = np.empty((16, dim), dtype=np.int8)
        self.row_scale = np.empty(16)
        # the kernels of kept rows and refreshes are compiled (or loaded) now, with the first query, not at a live
        # loop's first kept row or refresh
        for dtype in (np.float64, np.float32):
            rows = np.empty((0, dim), dtype=dtype)
            int8_rows_into(rows, self.row_int8, self.row_scale, 0)
            _alive(rows, np.eye(dim), floor)
        self.cand: RowStore | None = None
        self.cand_norms = _query.NO_NORMS
        # the candidates' int8 rows and scales (the scans' int8 bound), in the order of the copy
        self.cand_int8 = _query.NO_INT8
        self.cand_scale = _query.NO_NORMS
        self.factor: np.ndarray | None = None
        self.floor = floor
        #: the sketch's keep threshold (set by the sketch; the summary does not change while the cache lives)
        self.threshold = floor
        self.diag_mark = float(np.diag(self.gram).max()) if dim else 0.0
        #: the view queries read (:meth:`KeySketch._view`), kept until the rows or their order change
        self.view: _query.HeadView | None = None
        #: ``G`` has grown enough for a refresh (:meth:`refresh`), made before the next row is taken
        self.refresh_due = False
        #: the scanned rows the last refactoring kept (0: none yet)
        self.rows_mark = 0
        self.scratch = np.empty(dim)  # for the live step's bound (:meth:`append`)
        self.step_id = np.zeros(1, dtype=np.int64)  # a decode step's id, as its kernel takes it

    def bound_factor(self, summary: GramSummary) -> np.ndarray | None:
        """The factor the next rows are tested with: this cache's own, or the summary's."""
        return self.factor if self.factor is not None else summary.bound_factor()

    def room_for_row(self, x: np.ndarray) -> None:
        """Grow now, if needed, so that :meth:`append` of ``x`` allocates nothing (may raise; nothing changes)."""
        self._room_for_rows(self.rows.n + 1)
        self.rows.room_for_row(x)

    def takes_row(self, store: RowStore, x: np.ndarray) -> bool:
        """Whether :meth:`append` of ``x`` (a row of the store's key type) to ``store``, which keeps values, needs
        nothing first: the cache is current, no refresh is due, and neither the store nor the scanned rows and their
        filters need to grow (:meth:`room_for_row`)."""
        rows = self.rows
        return (
            not self.refresh_due
            and self.upto == store.n
            and store.values is not None
            and store.n < store.capacity
            and store.keys.dtype == x.dtype
            and rows.n < rows.capacity
            and rows.keys.dtype == x.dtype
            and rows.n < self.row_norms.shape[0]
        )

    def append(
        self,
        store: RowStore,
        x: np.ndarray,
        key_id: int,
        value: np.ndarray | None,
        factor: np.ndarray | None,
    ) -> bool:
        """Append a row to the store and account for it here, in one compiled call (the live step; the cache is
        current: ``upto == store.n``; :meth:`room_for_row` made room, so nothing here can fail).  Does what
        :meth:`add` of the row would do at the next query but the refresh: returns whether one is due
        (:meth:`refresh`, for the caller to run once the row is recorded)."""
        a = self.append_arrays(store, factor)
        row = (x, key_id, _NO_VALUE_ROW if value is None else value)
        norm = append_row_and_keep(*a[:4], *row, *a[4:])
        return self.appended(store, key_id, norm)

    def append_arrays(self, store: RowStore, factor: np.ndarray | None) -> _query.AppendArrays:
        """The arguments of :func:`~levstream._kernels.live.append_row_and_keep` but the row, its id and its value
        (the store's arrays and row count, then this cache's): the first four come before those three."""
        rows = self.rows
        return (
            store.keys,
            store.ids,
            _NO_VALUE_ROWS if store.values is None else store.values,
            store.n,
            self.gram,
            _NO_FACTOR if factor is None else factor,
            self.threshold,
            self.scratch,
            rows.keys,
            rows.ids,
            _NO_VALUE_ROWS if rows.values is None else rows.values,
            rows.n,
            self.row_norms,
            self.row_int8,
            self.row_scale,
        )

    def appended(self, store: RowStore, key_id: int, norm: float) -> bool:
        """Account for the row a compiled call appended to the store (and, when ``norm >= 0``, to the scanned rows
        too) with :meth:`append_arrays`; returns whether a refresh is due (see :meth:`append`)."""
        store.appended(key_id)
        if norm >= 0.0:
            self.view = None
            self.rows.appended(key_id)
        return self._mark(store.n)

    def add(self, store: RowStore, n: int, factor: np.ndarray | None, threshold: float) -> None:
        if n - self.upto == 1:  # the live step: one compiled call, nothing allocated
            i = self.upto
            norm = add_row_and_bound(
                store.keys[i], self.gram, _NO_FACTOR if factor is None else factor, threshold
            )
            if norm >= 0.0:
                self._keep_row(store, i, norm)
            self._advance(store, n)
            return
        X = store.keys[self.upto : n]
        if X.shape[0] <= _SMALL_LIVE_ROWS:  # a few rows: one compiled loop, no temporaries
            keep = np.empty(X.shape[0], dtype=np.bool_)
            norms = np.empty(X.shape[0])
            add_rows_and_bound(
                X, self.gram, _NO_FACTOR if factor is None else factor, threshold, keep, norms
            )
        else:
            norms = scan_norms(X)
            X = X.astype(np.float64, copy=False)  # float32 rows: a float64 Gram update
            self.gram += X.T @ X
            if factor is None:
                keep = np.ones(X.shape[0], dtype=bool)
            else:
                Y = X @ factor
                u = np.einsum("ij,ij->i", Y, Y)
                # u / (1 + u) >= threshold: the score after its inclusion (a nan bound keeps the row)
                keep = ~(u < threshold * (1.0 + u))
        self.accept(store, n, keep, norms)

    def scale(self, factor: float, root: float) -> None:
        """The frame changed (a decaying stream's rebase): ``G`` times ``factor``, the rows times ``root``."""
        self.view = None
        self.gram *= factor
        self.rows.scale_keys(root)
        self.row_norms[: self.rows.n] = scan_norms(self.rows.keys_view())
        int8_rows_into(self.rows.keys_view(), self.row_int8, self.row_scale, 0)
        if self.cand is not None:
            self.cand.scale_keys(root)
            self._order_cand()  # rows may have fallen below the norm floor (see scan_norms)
        self.diag_mark *= factor
        # the factor is dropped when it leaves float64's range (the summary's factor bounds the rows then)
        if self.factor is not None:
            with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
                scaled = self.factor / root if root else None
            self.factor = scaled if scaled is not None and np.isfinite(scaled).all() else None

    def refresh(self, store: RowStore) -> None:
        with lowered_blas(1):  # d x d products: threads only wait for each other
            self._refactor(store)

    def _refactor(self, store: RowStore) -> None:
        self.view = None
        self.refresh_due = False
        W = inverse_upper_factor(self.gram)
        if W is None:  # not positive definite (rank-deficient keys): keep the bounds held
            self.diag_mark = float(np.diag(self.gram).max())
            return
        if self.rows.n:
            n = self.rows.n
            alive = _alive(self.rows.keys_view(), W, self.floor)
            self.rows.keep_from(0, alive)
            for filt in (self.row_norms, self.row_int8, self.row_scale):
                filt[: self.rows.n] = filt[:n][alive]
        fresh = self.cand is None
        if self.cand is None:  # the candidates still alive: a copy the queries scan
            self.cand = RowStore(store.dim, store.value_dim)
            values = None if store.values is None else store.values[: self.start]
            self.cand.append(store.keys[: self.start], store.ids[: self.start], values)
        if self.cand.n:
            alive = _alive(self.cand.keys_view(), W, self.floor)
            self.cand.keep_from(0, alive)
            if not fresh:
                self.cand_norms = self.cand_norms[alive]
                self.cand_int8, self.cand_scale = self.cand_int8[alive], self.cand_scale[alive]
        if fresh:
            self._order_cand()
        self.factor = W
        self.diag_mark = float(np.diag(self.gram).max())
        self.rows_mark = self.rows.n

    def _room_for_rows(self, rows: int) -> None:
        """Room for the filters of ``rows`` scanned rows (the rows themselves grow in their store)."""
        if rows > self.row_norms.shape[0]:
            size, n = max(rows, 2 * self.row_norms.shape[0]), self.rows.n
            for name in ("row_norms", "row_int8", "row_scale"):
                old = getattr(self, name)
                grown = np.empty((size, *old.shape[1:]), dtype=old.dtype)
                grown[:n] = old[:n]
                setattr(self, name, grown)

    def _order_cand(self) -> None:
        """Order the candidate copy by descending norm and keep the norms."""
        assert self.cand is not None
        norms = scan_norms(self.cand.keys_view())
        order = np.argsort(-norms, kind="stable")
        self.cand.permute(order)
        self.cand_norms = norms[order]
        n = self.cand.n
        self.cand_int8 = np.empty((n, self.cand.dim), dtype=np.int8)
        self.cand_scale = np.empty(n)
        int8_rows_into(self.cand.keys_view(), self.cand_int8, self.cand_scale, 0)

    def accept(self, store: RowStore, n: int, keep: np.ndarray, norms: np.ndarray) -> None:
        """Rows ``upto..n-1`` of the store are summarised (their Gram already added); keep the marked ones (with
        their ``norms``, for the scans' norm bound)."""
        if keep.any():
            self.view = None
            X = store.keys[self.upto : n]
            values = None if store.values is None else store.values[self.upto : n][keep]
            kept, rows = norms[keep], X[keep]
            self._room_for_rows(self.rows.n + kept.shape[0])
            self.row_norms[self.rows.n : self.rows.n + kept.shape[0]] = kept
            int8_rows_into(rows, self.row_int8, self.row_scale, self.rows.n)
            self.rows.append(rows, store.ids[self.upto : n][keep], values)
        self._advance(store, n)

    def _keep_row(self, store: RowStore, i: int, norm: float) -> None:
        """Row ``i`` of the store joins the scanned rows (the live step)."""
        self.view = None
        self._room_for_rows(self.rows.n + 1)
        self.row_norms[self.rows.n] = norm
        int8_rows_into(store.keys[i : i + 1], self.row_int8, self.row_scale, self.rows.n)
        self.rows.append_row(
            store.keys[i], int(store.ids[i]), None if store.values is None else store.values[i]
        )

    def _advance(self, store: RowStore, n: int) -> None:
        """Rows up to ``n`` are accounted for; refresh when ``G`` has grown enough (see the class docstring)."""
        if self._mark(n):
            self.refresh(store)

    def _mark(self, n: int) -> bool:
        """Rows up to ``n`` are accounted for; returns whether ``G`` and the rows scanned have grown enough for a
        refresh (see the class docstring)."""
        before, self.upto = self.upto, n
        # the diagonal is looked at every _LIVE_CHECK_ROWS rows (a few microseconds saved per live step)
        return bool(
            (before - self.start) // _LIVE_CHECK_ROWS != (n - self.start) // _LIVE_CHECK_ROWS
            and self.rows.n >= _REFRESH_ROWS_GROWTH * self.rows_mark + _LIVE_REFRESH_ROWS
            and self.gram.shape[0]
            and self.gram.diagonal().max() > _LIVE_REFRESH * self.diag_mark
        )


# ---------------------------------------------------------------------- the ingest path of p = 2
#
# A chunk's blocks are folded in *waves*: every slab (about 1024 rows) of the blocks of one wave is computed on
# the library's threads -- one compiled pass (norms, pre-filter, candidate test against a stale triangular
# factor) and its Gram block (BLAS syrk, from the same compiled call; its trace is the finite check), runs of a
# block's slabs one call each -- and the blocks are then folded
# into the summary one after the other, in stream order, by the calling thread.  The slabs, the bounds a wave
# uses and the order of every sum are fixed by the stream alone, never by the threads, so the sketch is the
# same bit for bit on any number of threads.

#: Rows per slab (the syrk of fewer rows runs markedly slower on the reference machine).
_SLAB_ROWS = 1024

#: Rows per piece of the weighing of a gated chunk (:func:`_weigh_in_pieces`).
_WEIGH_PIECE_ROWS = 4096

#: Largest total size of the slab Gram blocks of one wave.
_WAVE_GRAM_BYTES = 16 << 20

#: ``top_k`` of at most this many entries per query takes the compiled pass over the rows held (see top_k).
_TOP_K_PASS_MAX = 64

#: Candidates are rescored once they exceed twice the number left by the last prune, and at least this many.
_PRUNE_MIN_ROWS = 256

_NO_SCALE = np.zeros(0)
_NO_TRIANGLE = np.zeros((0, 0))


class _NoTest:
    """The arguments of a slab pass that tests no row (:func:`_run_slabs` with no plan: Gram blocks only)."""

    scale, limit, W, threshold = _NO_SCALE, 0.0, _NO_TRIANGLE, 0.0
    W32, w_inv = float32_factor(_NO_TRIANGLE)


def _as_keys(X: Any, dim: int, keep_float32: bool) -> np.ndarray:
    """A chunk of keys as a C-contiguous array: float32 kept as float32 when ``keep_float32`` (the Gram path
    widens every row exactly), anything else float64; shape checked, finiteness not (see :func:`_check_rows`)."""
    X = as_ndarray(X)
    if (
        keep_float32
        and isinstance(X, np.ndarray)
        and X.dtype == np.float32
        and X.ndim == 2
        and X.shape[1] == dim
    ):
        return np.ascontiguousarray(X)
    return as_matrix(X, "X", dim, hint="Use update(x) for one row.", allow_empty=True, finite=False)


def _at_most_one_item(iterable: Iterable[Any]) -> bool:
    """Whether ``extend``'s iterable is known to hold at most one item: it then needs no snapshot to be all or
    nothing (a rejected first item changes nothing by itself; a copy per call costs more than a step)."""
    return hasattr(iterable, "__len__") and len(iterable) <= 1  # type: ignore[arg-type]


def _kernel_layout(row: np.ndarray) -> np.ndarray:
    """``row`` C-contiguous and writable, copied if it is not (a strided or read-only row): the layout the live
    step's kernel is compiled for."""
    return row if row.flags.c_contiguous and row.flags.writeable else np.array(row)


def _alive(rows: np.ndarray, W: np.ndarray, floor: float) -> np.ndarray:
    """Which ``rows`` score ``||x W||^2 >= floor`` for an upper-triangular ``W`` (BLAS trmm; a nan keeps the
    row)."""
    scores = np.empty(rows.shape[0])
    upper_scores(rows, W, dtrmm_function(), scores)
    return ~(scores < floor)


def _kept_row(x: Any, row: np.ndarray, gram: bool) -> np.ndarray:
    """The row (or rows) to store for validated keys ``row`` (float64) given as ``x``: a float32 array of the
    same shape stays float32 on the Gram path, as :func:`_as_keys` keeps float32 chunks."""
    x = as_ndarray(x)
    if gram and isinstance(x, np.ndarray) and x.dtype == np.float32 and x.shape == row.shape:
        return np.ascontiguousarray(x)
    return row


def _rows(V: np.ndarray | None, a: int, b: int) -> np.ndarray | None:
    return None if V is None else V[a:b]


def _chunk_ids(new_ids: np.ndarray | None, start: int, a: int, b: int) -> np.ndarray:
    """Ids of rows ``a..b-1`` of a chunk numbered from ``start`` (or given as ``new_ids``)."""
    return np.arange(start + a, start + b, dtype=np.int64) if new_ids is None else new_ids[a:b]


def _too_large(X: np.ndarray) -> ValueError:
    return ValueError(
        f"X has values so large that their squares overflow float64 (largest |x| = "
        f"{float(np.abs(X).max()):.3g}); rescale the keys (leverage scores are scale-invariant)."
    )


def _too_large_weighted(X: np.ndarray, name: str) -> ValueError:
    return ValueError(
        f"{name} has values so large that their squares, weighted in the decaying stream's frame (by up to "
        f"e^100), overflow float64 (largest |x| = {float(np.abs(X).max()):.3g}); rescale the keys (leverage "
        "scores are scale-invariant)."
    )


def _check_rows(part: np.ndarray, X: np.ndarray) -> None:
    """Refuse the rows ``part`` of chunk ``X`` if one has a nan/inf (the error names the first in ``X``) or its
    squares overflow float64 (one compiled pass when none does: :func:`_refuse_rows`)."""
    if part.shape[0] and not np.isfinite(sq_total(part)):
        _refuse_rows(part, X)


def _rows_overflow(X: np.ndarray) -> bool:
    """Whether a row of ``X`` (finite entries) has squares whose sum overflows float64."""
    P = X.astype(np.float64, copy=False)
    with np.errstate(over="ignore"):
        return not np.isfinite(np.einsum("ij,ij->i", P, P)).all()


def _refuse_rows(part: np.ndarray, X: np.ndarray) -> None:
    """For rows ``part`` (of chunk ``X``, or a block holding some of its rows) whose sum of squares is not finite:
    raise for a nan/inf in ``X`` or a row of ``part`` whose own squares overflow float64; return when only the
    sum overflows.  Such rows are valid keys, as they are fed one at a time: a Gram matrix that overflows makes
    the summary keep an R factor instead (docs/theory.md, "Numerics")."""
    check_finite(X, "X")
    if _rows_overflow(part):
        raise _too_large(part)


def _weigh_in_pieces(X: np.ndarray, scales: np.ndarray, out: np.ndarray) -> float:
    """``out = scales[:, None] * X`` (float64) and the sum of its squares (nan/inf iff an entry of ``X`` is, or a
    weighted square overflows): the weighing of a gated chunk, in pieces of ``_WEIGH_PIECE_ROWS`` on the
    library's threads when the chunk has several (a pass over memory, half the time on two cores)."""
    m = X.shape[0]
    k = m // _WEIGH_PIECE_ROWS
    if k < 2:
        return float(weigh_rows(X, scales, out))
    # the pieces depend on m alone (not on the threads), and so does the order of the sum
    cuts = [m * i // k for i in range(k + 1)]
    totals = np.empty(k)

    def piece(i: int) -> None:
        a, b = cuts[i], cuts[i + 1]
        totals[i] = weigh_rows(X[a:b], scales[a:b], out[a:b])

    run_items(piece, k, get_num_threads())
    return float(totals.sum())


class _Plan:
    """The candidate test of a block: the summary's plan in force once the block is added (docs/theory.md, "The
    norm pre-filter" and "Stale factors"): rows whose scaled squared norm reaches ``limit`` and, when a
    triangular factor ``W`` of an earlier Gram matrix (possibly holding the block) is at hand, whose
    ``||x W||^2`` reaches ``threshold``.

    ``threshold`` is the keep threshold lowered by the largest margin the Gram path can reach, so it stays
    below the keep threshold whatever the next conditioning check finds; the bounds hold for every later ``G``
    (it only grows)."""

    __slots__ = ("W", "W32", "lam", "limit", "scale", "threshold", "until", "w_inv")

    def __init__(self, sk: KeySketch, made: tuple | None = None) -> None:
        """The plan in force after a block is added (made now when one is due: ``ingest_plan``), or ``made``."""
        summary = sk._summary
        assert isinstance(summary, GramSummary)
        scale, self.lam, W, self.until = summary.ingest_plan() if made is None else made
        self.threshold = sk._eps * (1.0 - margin(gram_rel_error_max(sk._dim), prune=True))
        self.scale = _NO_SCALE if scale is None else scale
        self.W = _NO_TRIANGLE if W is None else W
        self.limit = self.threshold * self.lam
        self.W32, self.w_inv = summary.plan_factor32(self.W)

    def same_as(self, other: _Plan) -> bool:
        return (
            self.W is other.W
            and self.lam == other.lam
            and self.threshold == other.threshold
            and np.array_equal(self.scale, other.scale)
        )


class _BlockResult:
    """What the slabs of one block give: its Gram block and sum of squares (non-finite when the block must be
    refused), and, under ``plan``, the rows that may reach the threshold and whether the factor test ran."""

    __slots__ = ("gram", "plan", "rows", "tested", "total")

    def __init__(
        self,
        gram: np.ndarray | None,
        total: float,
        plan: _Plan | None,
        rows: np.ndarray | None,
        tested: bool,
    ) -> None:
        self.gram, self.total, self.plan, self.rows, self.tested = gram, total, plan, rows, tested


@functools.lru_cache(maxsize=64)
def _slab_cuts(rows: int) -> np.ndarray:
    """Where the slabs of a block of ``rows`` rows start, and its end: ``max(1, rows // _SLAB_ROWS)`` near-equal
    runs (read-only; cached, as blocks have few sizes)."""
    k = max(1, rows // _SLAB_ROWS)
    cuts = rows * np.arange(k + 1, dtype=np.int64) // k
    cuts.flags.writeable = False
    return cuts


def _slab_groups(n_slabs: int, n_threads: int) -> list[tuple[int, int]]:
    """The runs of a block's slabs handed to one thread at a time: the whole block on one thread; else up to
    two runs per thread (a thread that comes free takes the next), each a compiled call."""
    k = 1 if n_threads <= 1 else min(n_slabs, 2 * n_threads)
    return list(itertools.pairwise(n_slabs * i // k for i in range(k + 1)))


_NO_GRAMS = np.zeros((0, 0, 0))


def _run_slabs(
    blocks: list[np.ndarray], plan: _Plan | None, n_threads: int, gram: bool
) -> list[tuple[np.ndarray | None, float, np.ndarray | None, bool]]:
    """Per block: ``(Gram block, its trace, candidate rows, tested)``, its slabs computed on up to ``n_threads``
    threads (``gram=False``: the candidate test only, no Gram block; ``plan=None``: the Gram blocks only, no
    candidate rows).  A slab's Gram block is computed in the same compiled call as its candidate test, while
    the slab is in cache (:func:`~levstream._kernels.ingest.slab_run`), and the slabs' parts are combined in
    slab order, so that no sum depends on which thread computed which part."""
    dtrmm, strmm, syrk = dtrmm_function(), strmm_function(), dsyrk_function()
    dim = blocks[0].shape[1]
    test: _Plan | type[_NoTest] = _NoTest if plan is None else plan
    blocks = [X if X.flags.c_contiguous else np.ascontiguousarray(X) for X in blocks]
    cuts = [_slab_cuts(X.shape[0]) for X in blocks]
    totals = [np.zeros(c.shape[0] - 1) for c in cuts]
    runs = [_slab_groups(c.shape[0] - 1, n_threads) for c in cuts]
    items = [(k, f, g) for k, groups in enumerate(runs) for f, g in groups]
    found: list[Any] = [None] * len(items)

    def item(i: int) -> None:
        k, f, g = items[i]
        X, c = blocks[k], cuts[k]
        a, b = int(c[f]), int(c[g])
        widen = gram and X.dtype != np.float64
        wide = np.empty((int(np.max(np.diff(c[f : g + 1]))) if widen else 0, dim))
        # allocated by the threads that fill them (a wave's are megabytes)
        Gs = np.zeros((g - f, dim, dim)) if gram else _NO_GRAMS
        rows, tested = slab_run(
            X[a:b],
            c[f : g + 1] - a,
            test.scale,
            test.limit,
            test.W,
            test.threshold,
            wide,
            dtrmm,
            test.W32,
            test.w_inv,
            strmm,
            Gs,
            totals[k][f:g],
            syrk,
            gram and g - f == c.shape[0] - 1,  # the whole block: its Gram block summed here
        )
        found[i] = (rows + a if a else rows, tested, Gs)

    run_items(item, len(items), n_threads)
    out = []
    i = 0
    for k in range(len(blocks)):
        parts = found[i : i + len(runs[k])]
        i += len(parts)
        total = sum(totals[k].tolist())  # (an overflow is inf, with no warning)
        G = None
        if gram and math.isfinite(total):
            G = parts[0][2][0]
            if len(parts) > 1:  # else summed by the one call, in the same order
                for slab in itertools.chain(parts[0][2][1:], *(p[2] for p in parts[1:])):
                    G += slab
        rows = None
        if plan is not None:
            rows = parts[0][0] if len(parts) == 1 else np.concatenate([p[0] for p in parts])
        out.append((G, total, rows, bool(parts[0][1])))
    return out


def _block_results(
    blocks: list[np.ndarray], plan: _Plan | None, n_threads: int
) -> list[_BlockResult]:
    """Compute every slab of ``blocks`` under ``plan`` (``None``: their Gram blocks only, the candidate test is
    left to :func:`_fold_result`), combined per block (:func:`_run_slabs`)."""
    return [
        _BlockResult(G, total, plan, rows, tested)
        for G, total, rows, tested in _run_slabs(blocks, plan, n_threads, gram=True)
    ]


def _retest(
    blocks: list[np.ndarray], results: list[_BlockResult], plan: _Plan, n_threads: int
) -> None:
    """Redo the candidate test of ``blocks`` under ``plan`` (the summary's bounds changed during a wave), or do
    it (blocks whose Gram blocks were computed alone)."""
    for result, (_, _, rows, tested) in zip(
        results, _run_slabs(blocks, plan, n_threads, gram=False)
    ):
        result.rows, result.tested, result.plan = rows, tested, plan


def _fold_result(sk: KeySketch, X: np.ndarray, result: _BlockResult, n_threads: int) -> np.ndarray:
    """Fold block ``X`` into the summary with its Gram block; return the indices of its rows that may still
    be heavy (upper bounds, never lower ones).

    The rows are tested under the plan in force once the block is added: the summary makes a new one, from
    the Gram matrix that holds the block, when the block made one due (docs/theory.md, "Stale factors").  A
    block computed under another plan, or with no test yet (``result.plan`` None), is tested again here."""
    summary = sk._summary
    summary.add(X, result.gram)
    plan = _Plan(sk)
    if result.plan is None or not plan.same_as(result.plan):
        _retest([X], [result], plan, n_threads)
    keep = sk._keep_threshold()
    rows = result.rows
    assert rows is not None
    if result.tested and summary.mode == "gram" and keep >= plan.threshold:
        return rows
    X64 = X.astype(np.float64, copy=False)
    if (
        result.tested
    ):  # the summary left the Gram path (or its margin widened): test again from the start
        rows = summary.prefilter(X64, keep)
    if rows.size == 0:
        return rows
    return rows[~(summary.score_upper_bounds(X64[rows]) < keep)]  # a nan bound keeps its row


def _wave_size(sk: KeySketch, plan: _Plan | None, remaining: int) -> int:
    """Blocks computed together: those the plan in force covers (it changes when the summary's row count has
    doubled, so waves grow with the stream; one block when there is none), at most ``_WAVE_GRAM_BYTES`` of
    Gram blocks."""
    if plan is None or sk.forgets:  # (a decaying stream's plan may be renewed block by block)
        covered = 1
    else:
        covered = -(-(plan.until - sk._summary.n_rows) // sk._block_rows)
    by_bytes = _WAVE_GRAM_BYTES // (
        (_slab_cuts(sk._block_rows).shape[0] - 1) * sk._dim * sk._dim * 8
    )
    return max(1, min(remaining, covered, by_bytes))


def _plan_in_force(sk: KeySketch) -> _Plan | None:
    """The plan in force between blocks, or None when there is none (before the first block, and after a
    settle, a merge or a rebase dropped it).  Nothing changes here: plans are made only once a block is added
    (:func:`_fold_result`), so every way of feeding a stream makes them at the same points."""
    summary = sk._summary
    assert isinstance(summary, GramSummary)
    made = summary.plan_in_force()
    return None if made is None else _Plan(sk, made)


def _first_test(sk: KeySketch, plan: _Plan | None, rows: int) -> _Plan | None:
    """The plan to test the next blocks (the first of ``rows`` rows) under while their Gram blocks are computed
    (``plan``, the one in force), or None to compute the Gram blocks alone.  Either way the outcome is the same
    (:func:`_fold_result` tests each block under the plan in force once it is added); this only chooses where
    the test runs, so that a block is tested once where it can be: the test waits for the add when the block
    will make a new plan (the row count doubles), or is likely to (a decaying stream whose last block made one:
    its ``G`` grows in the frame by the weights, with a short window after every block)."""
    if plan is None:
        return None
    summary = sk._summary
    assert isinstance(summary, GramSummary)
    if summary.n_rows + rows >= plan.until or (sk.forgets and summary.plan_is_new):
        return None
    return plan


def _maybe_prune(sk: KeySketch, room: int) -> None:
    """Rescore the candidates once they exceed twice the number left by the last prune (at least
    ``_PRUNE_MIN_ROWS``, at most the capacity): amortised O(d^2) per candidate, and few rows for queries.
    A decaying stream's universal set turns over all the time (recent keys in, old ones out), so its
    candidates are rescored sooner, at 1.5 times: queries then scan fewer rows that can no longer be heavy."""
    growth = 1.5 if sk.forgets else 2.0
    limit = min(max(int(growth * sk._pruned_rows), _PRUNE_MIN_ROWS), sk.capacity)
    if sk._pending_from > limit:
        sk._prune(room)


def _fold_pending(sk: KeySketch, n_threads: int) -> None:
    """Fold the pending rows of the store as one block; the ones that may still be heavy stay."""
    store = sk._store
    start = sk._pending_from
    X = store.keys_view(start)
    # the summary takes the block before its rows are sorted out in the store: should anything fail until they are
    # (no memory, an interruption), the state goes back to what it was, with the rows still pending (else Z counted
    # them twice, or lost the rows not kept)
    saved = sk._save_feed()
    try:
        (result,) = _block_results([X], _first_test(sk, _plan_in_force(sk), X.shape[0]), n_threads)
        keep = np.zeros(X.shape[0], dtype=bool)
        keep[_fold_result(sk, X, result, n_threads)] = True
        store.keep_from(start, keep)
        sk._pending_from = store.n
    except BaseException:
        sk._back_to(saved)
        raise
    finally:
        store.release()
    _maybe_prune(sk, sk._block_rows)


def _fold_chunk(
    sk: KeySketch,
    X: np.ndarray,
    V: np.ndarray | None,
    new_ids: np.ndarray | None,
    start: int,
    head: int,
    n_full: int,
    count: Callable[[], None],
) -> None:
    """Fold the block completed by ``X[:head]`` (when ``head`` completes the pending rows) and the ``n_full``
    whole blocks of ``X`` after it (p = 2), then ``count()`` (the caller's bookkeeping of the chunk: its ids, its
    rows left for the input buffer), all or nothing: should anything fail on the way (a block with a nan/inf or
    squares that overflow, no memory, an interruption), the sketch goes back to its state before the chunk and
    the error comes through.

    Each block is tested under the plan the summary gives once the block is added (:func:`_fold_result`),
    exactly as if the blocks came one call at a time: the state does not depend on the chunking nor on the
    threads.  Blocks are computed in waves, as many as the current plan covers, and tested under it in the
    same pass; should the plan change within a wave (a block made a new one, or the summary left the Gram
    path, or returned to it), the rest of the wave is tested again under the new one."""
    store = sk._store
    br = sk._block_rows
    pending_from = sk._pending_from
    saved = sk._save_feed()  # the state before the chunk

    blocks: list[np.ndarray] = []
    starts = [head + b * br for b in range(n_full)]

    def fold(
        wave: list[np.ndarray], done: int, results: list[_BlockResult], n_threads: int
    ) -> None:
        """Fold the blocks of one wave (its first is block ``done`` of the chunk), in stream order, each tested
        under the plan in force at its turn, its rows that may still be heavy kept."""
        sk._live = None
        for k in range(len(wave)):
            j = done + k
            plan = _plan_in_force(sk)
            tested = results[k].plan
            if tested is not None:  # a plan was in force at the wave's start: one still is
                assert plan is not None
                if not plan.same_as(tested):
                    _retest(wave[k:], results[k:], plan, n_threads)
            Xb = wave[k]
            keep = _fold_result(sk, Xb, results[k], n_threads)
            if head and j == 0:
                store.commit(
                    _chunk_ids(new_ids, start, 0, head),
                    _rows(V, 0, head),
                    increasing=new_ids is None,
                )
                mask = np.zeros(Xb.shape[0], dtype=bool)
                mask[keep] = True
                store.keep_from(pending_from, mask)
                room = br
            else:
                a = starts[j - (1 if head else 0)]
                if keep.size:
                    ids = (start + a + keep) if new_ids is None else new_ids[a + keep]
                    store.append(
                        Xb[keep],
                        ids,
                        None if V is None else V[a + keep],
                        increasing=new_ids is None,
                    )
                room = 0
            sk._pending_from = store.n
            _maybe_prune(sk, room)

    with ingest_threads() as n_threads:
        try:
            if head:  # the pending rows and the head, as one block of the store (committed once validated)
                store.stage(X[:head])
                blocks.append(store.keys[pending_from : store.n + head])
            blocks += [X[s : s + br] for s in starts]
            done = 0
            while done < len(blocks):
                plan = _plan_in_force(sk)
                size = _wave_size(sk, plan, len(blocks) - done)
                wave = blocks[done : done + size]
                first = _first_test(sk, plan, wave[0].shape[0])
                results = _block_results(wave, first, n_threads)
                for Xb, result in zip(wave, results):
                    if np.isfinite(result.total):
                        continue
                    _refuse_rows(Xb, X)  # names the first bad entry, or the rows too large
                    # only the block's sum of squares overflows: the summary takes the rows without the Gram block
                    # (it moves to its R factor) and they are tested under what it then holds
                    result.gram, result.plan = None, None
                fold(wave, done, results, n_threads)
                done += size
            count()
        except BaseException:
            sk._back_to(saved)
            raise
        finally:
            store.release()


def _one_gate(gates: Any) -> Any:
    """The gate of a one-row chunk, given as a number or a length-1 array (None stays None)."""
    if gates is None or np.ndim(gates) == 0:
        return gates
    arr = np.asarray(gates)
    if arr.shape != (1,):
        raise ValueError(f"gates must have one gate per row: shape (1,); got shape {arr.shape}.")
    return arr[0]


def _plain_step_row(X: Any, width: int) -> bool:
    """Whether ``X`` is one float64 row of shape (1, ``width``), C-contiguous, aligned and writeable: a decode step's
    input as :meth:`KeySketch._decode_plain` takes it."""
    return (
        type(X) is np.ndarray and X.dtype == np.float64 and X.shape == (1, width) and X.flags.carray
    )


def _step_rows(
    K: Any, V: Any, Q: Any, dim: int, value_dim: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``(K, V, Q)`` as float64 (1, width) C-contiguous writeable arrays when each is one float64 or float32 row
    (:func:`~levstream._validation.fast_float64`) and all are finite with squares that do not overflow (one
    compiled check of the three): a decode step's input, which then needs no further validation; else None."""
    Kf, Vf, Qf = fast_float64(K), fast_float64(V), fast_float64(Q)
    if (
        Kf is None
        or Vf is None
        or Qf is None
        or Kf.shape != (1, dim)
        or Qf.shape != (1, dim)
        or Vf.shape != (1, value_dim)
        or not largest_sq_norm(Kf[0], Qf[0], Vf[0]) < math.inf  # true for a nan as well
    ):
        return None
    return Kf, Vf, Qf


def _check_magnitude(X: np.ndarray, name: str) -> None:
    """Refuse finite rows whose squares overflow float64 (the Gram matrix could not hold them, nor ``Z`` a query's
    weights)."""
    if X.size and _rows_overflow(X):  # row by row: a chunk's sum may overflow
        if name.startswith("Q"):
            what = "the queries (attention weights do not depend on a query's scale)"
        elif name.lower().startswith("v"):
            what = "the values (outputs scale with them)"
        else:
            what = "the keys (leverage scores are scale-invariant)"
        raise ValueError(
            f"{name} has values so large that their squares overflow float64 (largest |x| = "
            f"{float(np.abs(X).max()):.3g}); rescale {what}."
        )


def load(path: str | os.PathLike) -> KeySketch | MultiHeadKeySketch:
    """Read a sketch written by :meth:`KeySketch.save` or :meth:`MultiHeadKeySketch.save` (the bytes say which).

    Examples
    --------
    >>> import os, tempfile, numpy as np, levstream as ls
    >>> path = os.path.join(tempfile.mkdtemp(), "heads.lvs")
    >>> ls.MultiHeadKeySketch(2, 3, eps=0.5).update_many(np.ones((2, 4, 3))).save(path)
    >>> again = ls.load(path)
    >>> type(again).__name__, again.n
    ('MultiHeadKeySketch', 4)
    """
    with open(os.fspath(path), "rb") as fh:
        data = fh.read()
    from .multihead import _KIND, MultiHeadKeySketch

    if _serialize.kind(data) == _KIND:
        return MultiHeadKeySketch.from_bytes(data)
    return KeySketch.from_bytes(data)
