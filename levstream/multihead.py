"""``MultiHeadKeySketch``: one :class:`~levstream.KeySketch` state per attention head behind a single object.

What is shared and what is per head:

* **shared** — validation of every chunk and of its ids (key ``j`` of every head is the same token, so one id
  stream, one ``offset``/``ids`` check, done once for all heads), the bytes container, and the query path
  (:mod:`levstream._query`, the same code as for one head);
* **per head** — the normaliser summary (each head's ``K_h^T K_h``), its row store (candidates and pending rows,
  with value rows when values travel with keys) and its moment state: every head is folded and pruned exactly
  as an independent sketch would be, so the results equal those of ``n_heads`` independent ``KeySketch``
  objects fed the same keys.

The step path (p = 2: a token of every head, then a few queries of every head, as in decoding) does the work of
all heads in one compiled call per operation, not in a loop over heads:

* tokens (``update``, ``update_many`` of a few rows, a decode step of ``prefill``; gated ones and those of a
  decaying stream weighed in every head's frame as they are copied in, docs/theory.md, "Decay and gates")
  wait in a shared buffer of ``_STEP_BUFFER_ROWS`` rows per head and are handed to the heads together, in pieces that leave every head's
  state bit for bit as if it had been fed the tokens one at a time (the heads' blocks are aligned to the
  stream, and the pieces end where the moment state's own buffer fills or its record of a short stream hands
  rows over: :meth:`~levstream.moments.MomentState.piece_rows`);
* queries read a live state stacked over heads (:class:`_Live`): every head's Gram matrix of every key fed,
  its candidates and the rows fed since its last fold whose score bound reaches the pruning threshold
  (docs/theory.md, "Live streams"), exactly what :meth:`KeySketch._view` gives one head.  It is derived
  data (never serialized), rebuilt from the heads when they fold.  The buffered tokens join it in batches
  (:func:`~levstream._kernels.live.absorb_rows_heads`); until then one compiled scan of every head
  (:func:`~levstream._kernels.live.heavy_p2_stacked`) reads them as recent rows.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from typing import Any

import numpy as np

from . import _query, _serialize
from ._config import LAMBDA_SAFETY, UNIT_ROUNDOFF, margin
from ._decay import Frame, neg_log_gate
from ._kernels.blas import dsyrk_function, dtrmm_function
from ._kernels.decay import neg_log_gates_into, weigh_heads
from ._kernels.live import (
    absorb_rows_heads,
    any_unreliable,
    heavy_p2_stacked,
    int8_rows,
    outputs_stacked,
)
from ._kernels.rows import copy_rows_sq, first_moment_overflow, sq_norm
from ._threads import lowered_blas
from ._validation import (
    as_ndarray,
    as_real_array,
    check_finite,
    check_int,
    check_p,
    fast_float64,
)
from .results import AttentionResult, HeadEntries, TopK, UniversalSet
from .sketch import _ID_MAX, _TOP_K_PASS_MAX, KeySketch, _at_most_one_item, _check_magnitude
from .summaries.gram import GramSummary

__all__ = ["MultiHeadKeySketch"]

_KIND = "MultiHeadKeySketch"

#: Tokens fed one at a time wait in a buffer of this many rows per head before they are handed to the heads (one
#: call per head per this many tokens; the queries see them through the live state meanwhile).
_STEP_BUFFER_ROWS = 64

#: Buffered tokens are absorbed into the live state (its Gram matrices and scanned rows: BLAS ``syrk`` and
#: ``trmm`` over the batch) once this many wait; until then queries scan them directly.
_ABSORB_ROWS = 32

#: ``update_many`` chunks of up to this many rows (with the running counter) take the step path.
_STEP_CHUNK_ROWS = 32

#: The live state tests pending rows against a fresh factor of its Gram matrix while the scores it gives are
#: accurate to this (relative); beyond, against the summary's stale factor.
_FRESH_MAX_REL_ERROR = 1e-6

_NO_IDS = np.zeros(0, dtype=np.int64)
_NO_ROWS = np.zeros((0, 0, 0))


class MultiHeadKeySketch:
    """Streaming, mergeable sketches of the keys of ``n_heads`` attention heads.

    Parameters
    ----------
    n_heads : int
        Number of heads.
    dim : int
        Head dimension (width of every key row).
    eps : float
        Heaviness threshold, ``1e-300 <= eps <= 1``.
    p : float, default 2
        Exponent of ``f(x) = |x|^p``, ``0.01 <= p <= 32``, with the same summaries as :class:`KeySketch`.
    rng : None, int, SeedSequence or Generator
        Seeds the randomised summaries (coreset p): head ``h`` gets the ``h``-th child of
        ``SeedSequence(rng).spawn(n_heads)``, so the heads sample independently and a seed reproduces them.
    **options
        Every other option of :class:`KeySketch` (``block_rows``, ``exact``, ``delta``, ``failure_prob``,
        ``oversampling``, ``memory_budget``, ``value_dim``, ``exact_output``), applied to every head.

    Notes
    -----
    Same contract as :class:`KeySketch`, with a head axis in front: chunks have shape ``(n_heads, m, dim)``
    (values ``(n_heads, m, value_dim)``), ``universal_set()``, ``heavy_entries(Q)`` and ``top_k`` return one
    result per head, ``attend``/``prefill`` one :class:`AttentionResult` whose arrays have a head axis.  Every
    per-head result equals that of an independent ``KeySketch`` fed the same keys.  See the module docstring
    for what is done once for all heads.

    Examples
    --------
    >>> import numpy as np, levstream as ls
    >>> rng = np.random.default_rng(0)
    >>> K = rng.standard_normal((4, 1000, 8))             # 4 heads, 1000 keys, head dim 8
    >>> sk = ls.MultiHeadKeySketch(4, 8, eps=0.05).update_many(K)
    >>> Q = rng.standard_normal((4, 10, 8))
    >>> hits = sk.heavy_entries(Q)                        # a HeadEntries: one HeavyEntries per head
    >>> len(hits)
    4
    >>> dense = ls.testing.heavy_entries_dense(Q[2], K[2], eps=0.05)
    >>> hits[2].as_set() == dense.as_set()
    True
    """

    def __init__(
        self, n_heads: int, dim: int, *, eps: float, p: float = 2, rng: Any = None, **options: Any
    ) -> None:
        n_heads = check_int(n_heads, "n_heads", minimum=1)
        if isinstance(rng, np.random.Generator):
            root = rng.bit_generator.seed_seq
            assert isinstance(root, np.random.SeedSequence)
            seeds: list[Any] = list(root.spawn(n_heads))
        elif rng is None:
            seeds = [None] * n_heads
        else:
            root = rng if isinstance(rng, np.random.SeedSequence) else np.random.SeedSequence(rng)
            seeds = list(root.spawn(n_heads))
        self._set_heads([KeySketch(dim, eps=eps, p=p, rng=seed, **options) for seed in seeds])
        #: one lock for all heads: a query sees every head before or after an update, never a mix
        self._lock = threading.RLock()

    def _set_heads(self, heads: list[KeySketch]) -> None:
        """Take ``heads`` (in step with each other) with an empty token buffer and no live state."""
        self._heads = heads
        #: the widths of every head's keys and values (read on every step)
        self._widths = (heads[0].dim, heads[0].value_dim)
        #: the step path (p = 2, every head on the Gram summary; gated and decaying streams too)
        self._step_ok = all(isinstance(h._summary, GramSummary) for h in heads)
        #: ``-log`` of the constant ``decay`` (0 without): the gate of a token fed without one
        self._base_neg = neg_log_gate(None, heads[0].decay)
        #: the frames of the heads, shape (n_heads, 4) (see :class:`~levstream._decay.Frame`), while tokens
        #: weighed in them wait in the buffer; None: the heads' own frames are current.  ``_starts[h]``: the
        #: buffered token with which head ``h`` starts to forget (its first gate below 1), -1 for none
        self._frames: np.ndarray | None = None
        self._starts = np.full(len(heads), -1, dtype=np.int64)
        self._note_forgetting()
        #: tokens not yet handed to the heads: ``_buf[:, :_nb]`` (values ``_bufv``), ids ``_buf_id0 + i``
        self._buf: np.ndarray | None = None
        self._bufv: np.ndarray = _NO_ROWS
        self._nb = 0
        self._buf_id0 = 0
        #: the live state of the queries (None: none built or the heads left the Gram path); ``_stale``: the
        #: heads changed since it was last brought up to date
        self._live: _Live | None = None
        self._stale = True

    # ------------------------------------------------------------------ properties
    @property
    def n_heads(self) -> int:
        """Number of heads."""
        return len(self._heads)

    @property
    def dim(self) -> int:
        """Head dimension."""
        return self._heads[0].dim

    @property
    def eps(self) -> float:
        """The heaviness threshold of every head."""
        return self._heads[0].eps

    @property
    def p(self) -> float:
        """Exponent of ``f(x) = |x|^p``."""
        return self._heads[0].p

    @property
    def value_dim(self) -> int | None:
        """Width of the value rows, or None for keys only."""
        return self._heads[0].value_dim

    @property
    def exact_output(self) -> bool:
        """Whether every head keeps the moment state for exact outputs."""
        return self._heads[0].exact_output

    @property
    def n(self) -> int:
        """Number of keys (tokens) fed so far; every head has seen this many."""
        with self._lock:  # the buffer and the heads change together
            return self._heads[0].n + self._nb

    @property
    def num_retained(self) -> int:
        """Key rows held in memory over all heads (the tokens waiting in the shared buffer included)."""
        with self._lock:
            return sum(h.num_retained for h in self._heads) + self.n_heads * self._nb

    def is_empty(self) -> bool:
        """True when no token has been fed."""
        return self.n == 0

    @property
    def nbytes(self) -> int:
        """Bytes held over all heads, the token buffer and the live queries' state."""
        with self._lock:
            own = 0
            if self._buf is not None:
                own += self._buf.nbytes + self._bufv.nbytes
            if self._live is not None:
                own += self._live.nbytes
            return sum(h.nbytes for h in self._heads) + own

    @property
    def next_id(self) -> int:
        """The id the next token fed without ``ids=``/``offset=`` will get."""
        with self._lock:
            return self._heads[0].next_id + self._nb

    @property
    def heads(self) -> tuple[KeySketch, ...]:
        """The per-head sketches (read-only use; feed keys through this object so the heads stay in step)."""
        with self._lock:
            self._sync()
            return tuple(self._heads)

    def __repr__(self) -> str:
        return (
            f"MultiHeadKeySketch(n_heads={self.n_heads}, dim={self.dim}, eps={self.eps:g}, p={self.p:g}, "
            f"n={self.n}, retained={self.num_retained})"
        )

    # ------------------------------------------------------------------ validation
    def _stack(self, X: Any, name: str, width: int, what: str = "dim") -> np.ndarray:
        """A finite ``(n_heads, m, width)`` float64 array (m may be 0)."""
        if not (type(X) is np.ndarray and X.dtype == np.float64):
            X = as_real_array(X, name)
        H = self.n_heads
        if X.ndim != 3 or X.shape[0] != H or X.shape[2] != width:
            raise ValueError(
                f"{name} must have shape (n_heads, m, {what}) = ({H}, m, {width}); got shape "
                f"{X.shape}."
            )
        check_finite(X, name)
        X = np.ascontiguousarray(X, dtype=np.float64)
        _check_magnitude(X.reshape(-1, width), name)
        return X

    def _is_steps(self, X: Any, width: int | None, rows: int, finite: bool = True) -> bool:
        """Whether ``X`` is a C-contiguous float64 ``(n_heads, m, width)`` array with ``1 <= m <= rows``, finite
        with squares that do not overflow (then it needs no further validation; ``finite=False``: that part is
        left to :meth:`_take`, which checks while it copies); ``width`` None: ``X`` must be None."""
        if width is None:
            return X is None
        return (
            type(X) is np.ndarray
            and X.dtype == np.float64
            and X.ndim == 3
            and X.shape[0] == len(self._heads)
            and 0 < X.shape[1] <= rows
            and X.shape[2] == width
            and X.flags.c_contiguous
            and (not finite or bool(sq_norm(X.reshape(-1)) < np.inf))
        )

    def _validate_steps(self, X: np.ndarray, V: np.ndarray | None, names: str = "XV") -> None:
        """Raise the error of the general path for tokens that are not finite (or whose own squares overflow);
        return when every row passes (only the sum of squares over the tokens overflowed, which is fine: the
        summaries take such rows); ``names``: the caller's names of the keys and the values."""
        self._stack(X, names[0], self.dim)
        if V is not None:
            self._stack(V, names[1], V.shape[2], "value_dim")

    def _values(self, V: Any, m: int) -> np.ndarray | None:
        dv = self.value_dim
        if dv is None:
            if V is not None:
                raise ValueError(
                    "this sketch keeps no values (value_dim=None); got V. Build it with value_dim= "
                    "to keep values with keys."
                )
            return None
        if V is None:
            raise ValueError(
                f"V (shape (n_heads, {m}, {dv})) is required: the sketch was built with "
                f"value_dim={dv}; got none."
            )
        V = self._stack(V, "V", dv, "value_dim")
        if V.shape[1] != m:
            raise ValueError(
                f"V must have one value row per key: shape ({self.n_heads}, {m}, {dv}); got shape "
                f"{V.shape}."
            )
        return V

    def _query_eps(self, eps: Any) -> float:
        return self._heads[0]._query_eps(eps)

    # ------------------------------------------------------------------ the token buffer
    def _check_moments(self, X: np.ndarray, V: np.ndarray | None) -> None:
        """Refuse, before any head changes, keys ``X`` (n_heads, m, dim) with values ``V`` whose terms a head's
        moment state could not hold (exact outputs; :meth:`~levstream.moments.MomentState.check`)."""
        moments = self._heads[0]._moments
        if moments is None or V is None:
            return
        H, m = X.shape[0], X.shape[1]
        if m == 0:
            return
        # every head's rows in one compiled call (the step path's tokens too)
        i = first_moment_overflow(X.reshape(H * m, -1), V.reshape(H * m, -1), moments.degree // 2)
        if i >= 0:
            moments.check(X[i // m], V[i // m], where=f"head {i // m}, ")

    def _take(
        self,
        X: np.ndarray,
        V: np.ndarray | None,
        checked: bool = True,
        names: str = "XV",
        negs: np.ndarray | None = None,
    ) -> bool:
        """Buffer the tokens ``X`` (n_heads, m, dim) (values ``V``), validated but for finiteness unless ``checked``,
        under the running counter's next ids (call with the lock held; raises, changing nothing, when one of
        those ids was already fed or, unchecked, a token is not finite: the copy into the buffer's free room
        checks it in the same pass; ``names``: the caller's names of ``X`` and ``V``, for the error).

        ``negs`` (n_heads, m): the tokens' ``-log`` gates; they are weighed in the heads' frames as they are
        copied in (``_frames`` advances; docs/theory.md, "Decay and gates": between rebases a row's weight in the
        frame never changes, so the buffered rows and the heads' rows stay in one frame).  Returns False, with
        nothing changed, when weighed tokens need the general path (a head's frame is due for a rebase, or a
        weighted row is not finite), True once they are buffered."""
        m = X.shape[1]
        if self._nb + m > _STEP_BUFFER_ROWS:
            if not checked and not (
                np.isfinite(np.einsum("ijk,ijk->", X, X))
                and (V is None or np.isfinite(np.einsum("ijk,ijk->", V, V)))
            ):
                self._validate_steps(X, V, names)
            checked = True
            self._sync()
        nb = self._nb
        if nb == 0:
            self._buf_id0 = self._heads[0]._next_id
            if self._buf is None:
                H, d, dv = self.n_heads, self.dim, self.value_dim
                self._buf = np.empty((H, _STEP_BUFFER_ROWS, d))
                if dv is not None:
                    self._bufv = np.empty((H, _STEP_BUFFER_ROWS, dv))
        first = self._buf_id0 + nb
        # the heads number their rows with int64 ids (the end of their last range of ids included)
        if first > _ID_MAX - m:
            raise ValueError(f"ids would overflow int64 from offset {first}.")
        seen = self._heads[0]._seen
        if seen.ranges.shape[0] and first < seen.ranges[-1, 1]:  # ids fed ahead of the counter
            hit = seen.clash(np.arange(first, first + m, dtype=np.int64))
            if hit is not None:
                raise ValueError(f"ids clash: id {hit} was already fed to this sketch.")
        assert self._buf is not None
        frames = None
        if negs is None:
            total = copy_rows_sq(self._buf, nb, X)
        else:
            frames = self._frames
            if frames is None:
                frames = np.array([h._frame for h in self._heads], dtype=np.float64)
            after = np.empty_like(frames)
            total = weigh_heads(X, negs, frames, self._buf, nb, after)
            if not 0.0 <= total < np.inf:  # a rebase due (-1), or a weighted row not finite
                return False
            frames = after
            X = self._buf[:, nb : nb + m]  # what the heads will hold, for the moment check
        if V is not None:
            total += copy_rows_sq(self._bufv, nb, V)
        # the rows past _nb are free room: a refused token has changed nothing
        if not checked and not total < np.inf:
            self._validate_steps(X, V, names)
        self._check_moments(X, V)
        if negs is not None:
            self._frames = frames
            if not self._all_forgetting:
                # a head that starts to forget with one of these tokens: the tokens before it reach the head while
                # it does not forget yet (it prunes sooner once it forgets: as row by row; see _sync)
                begins = (negs > 0.0) & ~self._forgetting[:, None]
                heads = np.flatnonzero(begins.any(axis=1))
                if heads.size:
                    self._starts[heads] = nb + begins[heads].argmax(axis=1)
                    self._set_forgetting(self._forgetting | begins.any(axis=1))
        self._nb = nb + m
        return True

    def _sync(self) -> None:
        """Hand the buffered tokens to the heads (call with the lock held).  In pieces that end where the moment
        state's buffer fills or its record hands rows over (``piece_rows``), so every head ends up bit for bit as
        if fed the tokens one at a time."""
        nb = self._nb
        if nb == 0:
            return
        assert self._buf is not None
        # the heads take the frames their buffered tokens were weighed in; a head that starts to forget with a
        # buffered token takes its frame there (the tokens before reach it while it does not forget yet)
        frames = None if self._frames is None else self._frames.tolist()
        starts = self._starts
        if frames is not None:
            for h, head in enumerate(self._heads):
                if starts[h] < 0:
                    head._frame = Frame(*frames[h])
        moments = self._heads[0]._moments
        a = 0
        try:
            while a < nb:
                b = nb if moments is None else min(nb, a + moments.piece_rows())
                if (
                    moments is not None
                ):  # pending moment products first: should one fail, no head has the piece
                    for head in self._heads:
                        assert head._moments is not None
                        head._moments.prepare(b - a)
                for h, head in enumerate(self._heads):
                    s = int(starts[h])
                    if frames is not None and a <= s < b:
                        self._hand_over(h, a, s)
                        head._frame = Frame(*frames[h])
                        self._hand_over(h, s, b)
                    else:
                        self._hand_over(h, a, b)
                a = b
        except BaseException:
            if a:  # the pieces every head took leave the buffer; the live state is rebuilt when next needed
                self._drop_synced(a, nb)
            raise
        live = self._live
        if live is not None and not self._stale:
            # the buffered rows are rows of the heads' stores now: the live state holds them all (a stale one
            # takes them from the stores when it is next brought up to date)
            self._absorb(live)
            live.upto += live.bup
            live.bup = 0
        self._nb = 0
        self._frames = None
        starts[:] = -1
        self._stale = True

    def _hand_over(self, h: int, a: int, b: int) -> None:
        """Buffered tokens ``a..b-1`` to head ``h`` (part of :meth:`_sync`)."""
        assert self._buf is not None
        head = self._heads[h]
        if head._next_id >= self._buf_id0 + b:
            # the head took these tokens in a hand-over that failed at a later head (no memory, an interruption):
            # the buffer kept them for the heads that did not, and this one is not fed them twice
            return
        if (
            self.value_dim is None
            and b > a
            and head._next_id == self._buf_id0 + a
            # (a head that forgets has the frame after these tokens already: they were weighed in it)
            and head._append_next_rows(
                self._buf[h, a:b], b - a, head._frame if head.forgets else None
            )
        ):
            return  # rows that only wait in the head's input buffer: stored as the live step stores a row
        if b > a:
            head._ingest(
                self._buf[h, a:b],
                self._bufv[h, a:b] if self.value_dim is not None else None,
                None,
                self._buf_id0 + a,
                _NO_IDS,
            )

    def _drop_synced(self, a: int, nb: int) -> None:
        """The first ``a`` of the ``nb`` buffered tokens reached every head before a later piece failed: they leave
        the buffer, and the live state is rebuilt from the heads when next needed."""
        assert self._buf is not None
        self._starts = np.where(self._starts >= a, self._starts - a, -1)
        self._buf[:, : nb - a] = self._buf[:, a:nb].copy()
        if self._bufv is not None:
            self._bufv[:, : nb - a] = self._bufv[:, a:nb].copy()
        self._nb, self._buf_id0 = nb - a, self._buf_id0 + a
        self._live, self._stale = None, True

    # ------------------------------------------------------------------ ingest
    def update_many(
        self, X: Any, V: Any = None, ids: Any = None, offset: Any = None, gates: Any = None
    ) -> MultiHeadKeySketch:
        """Feed one chunk of keys of every head, shape ``(n_heads, m, dim)`` (values ``(n_heads, m, value_dim)``).

        ``ids``/``offset`` number the ``m`` keys (tokens) as in :meth:`KeySketch.update_many`; they are the
        same for every head and checked once.  ``m = 0`` is a no-op.  ``gates`` (p = 2): shape ``(n_heads, m)``,
        or ``(m,)`` for the same gates in every head (see :meth:`KeySketch.update_many`).  On a bad chunk, bad
        ids or an id clash nothing is changed.  Returns ``self``.
        """
        if ids is None and offset is None and self._step_ok:
            # a slice of a larger array, float32 activations: a few tokens as the step path takes them
            X, V = _step_layout(X, _STEP_CHUNK_ROWS), _step_layout(V, _STEP_CHUNK_ROWS)
            d, dv = self._widths
            steps = (
                self._is_steps(X, d, _STEP_CHUNK_ROWS, finite=False)
                and self._is_steps(V, dv, _STEP_CHUNK_ROWS, finite=False)
                and (V is None or V.shape[1] == X.shape[1])
            )
        else:
            steps = False
        if steps:
            # a few tokens: buffered (weighed when the stream forgets), checked finite while they are copied in
            with self._lock:
                if self._take_steps(X, V, gates, "XV"):
                    return self
        if self._weighs(gates):
            return self._update_gated(X, V, ids, offset, gates)
        X = self._stack(X, "X", self.dim)
        m = X.shape[1]
        Vs = self._values(V, m)
        self._check_moments(X, Vs)
        if m == 0 and ids is None and offset is None:
            return self  # an empty chunk: nothing to feed (the tokens waiting in the buffer stay there)
        with self._lock:
            self._sync()
            new_ids, start, srt = self._heads[0]._new_ids(m, ids, offset)
            if m:
                self._stale = True
                for h, head in enumerate(
                    self._heads
                ):  # every head holds the same id history: none can refuse
                    head._ingest(X[h], None if Vs is None else Vs[h], new_ids, start, srt)
        return self

    def update(self, x: Any, v: Any = None, gate: Any = None) -> MultiHeadKeySketch:
        """Feed one key (token) of every head, shape ``(n_heads, dim)`` (value ``(n_heads, value_dim)``).

        The token is validated and numbered once for all heads.  ``gate``: one per head (shape ``(n_heads,)``)
        or one number for all (see :meth:`KeySketch.update`)."""
        H, d = self.n_heads, self.dim
        x, v = _step_layout(x, 1), _step_layout(v, 1)
        token = self._is_token(x, v)
        if token and self._step_ok:
            # the live path: every head takes the token under the same id, checked finite (and weighed when
            # the stream forgets) while it is copied into the buffer
            gates = _token_gates(gate)
            with self._lock:
                if self._take_steps(
                    x[:, None, :], None if v is None else v[:, None, :], gates, "xv"
                ):
                    return self
        if self._weighs(gate):
            arr = as_real_array(x, "x")
            if arr.shape != (H, d):
                raise ValueError(
                    f"x must have shape (n_heads, dim) = ({H}, {d}); got shape {arr.shape}."
                )
            val = None if v is None else as_real_array(v, "v")
            if val is not None and val.ndim != 2:
                raise ValueError(f"v must have shape (n_heads, value_dim); got shape {val.shape}.")
            gates = None if gate is None else np.asarray(gate)
            if gates is not None and gates.ndim == 0:
                gates = gates[None]  # one gate for every head: shape (1,) for the one token
            elif gates is not None:
                if gates.shape != (H,):
                    raise ValueError(
                        f"gate must be one number, or one per head: shape ({H},); got shape "
                        f"{gates.shape}."
                    )
                gates = gates[:, None]  # one per head: (n_heads, 1)
            return self._update_gated(
                arr[:, None, :], None if val is None else val[:, None, :], None, None, gates, "x"
            )
        if token:
            with self._lock:  # every head takes the token under the same id
                if not (
                    np.isfinite(np.einsum("ij,ij->", x, x))
                    and (v is None or np.isfinite(np.einsum("ij,ij->", v, v)))
                ):
                    self._validate_steps(x[:, None, :], None if v is None else v[:, None, :], "xv")
                # every head's moment terms before any head takes the token (a head refusing it alone would leave
                # the heads out of step)
                self._check_moments(x[:, None, :], None if v is None else v[:, None, :])
                self._sync()
                self._heads[0]._check_next_id()
                self._stale = True
                for h, head in enumerate(self._heads):
                    head._append_token(x[h], None if v is None else v[h])
            return self
        arr = as_real_array(x, "x")
        if arr.shape != (self.n_heads, self.dim):
            raise ValueError(
                f"x must have shape (n_heads, dim) = ({self.n_heads}, {self.dim}); got shape "
                f"{arr.shape}. Use update_many(X) for a chunk of shape (n_heads, m, dim)."
            )
        val = None
        if v is not None:
            val = as_real_array(v, "v")
            if val.ndim != 2:
                raise ValueError(f"v must have shape (n_heads, value_dim); got shape {val.shape}.")
            val = val[:, None, :]
        return self.update_many(arr[:, None, :], val)

    def _is_token(self, x: Any, v: Any) -> bool:
        """Whether ``x`` (and ``v``) are one token of every head as float64 ndarrays, ``(n_heads, dim)`` (and
        ``(n_heads, value_dim)``, or None without values)."""
        H, (d, dv) = len(self._heads), self._widths
        return (
            type(x) is np.ndarray
            and x.dtype == np.float64
            and x.shape == (H, d)
            and (
                v is None
                if dv is None
                else (type(v) is np.ndarray and v.dtype == np.float64 and v.shape == (H, dv))
            )
        )

    # ------------------------------------------------------------------ decay (see KeySketch)
    def _forgets(self) -> bool:
        return any(h.forgets for h in self._heads)

    def _note_forgetting(self) -> None:
        """Record which heads forget (read per token on the step path; call after the heads' frames change
        other than through the token buffer)."""
        self._set_forgetting(np.array([h.forgets for h in self._heads], dtype=np.bool_))

    def _set_forgetting(self, heads: np.ndarray) -> None:
        """``heads``: whether each head forgets."""
        self._forgetting: np.ndarray = heads
        self._any_forgetting: bool = bool(heads.any())
        self._all_forgetting: bool = bool(heads.all())

    def _weighs(self, gates: Any) -> bool:
        """Whether rows fed with ``gates`` must be weighed in the heads' frames (gates, or a stream that
        forgets)."""
        return gates is not None or self._any_forgetting

    def _step_negs(self, gates: Any, m: int) -> np.ndarray | None:
        """``-log`` of the effective gate of each of ``m`` tokens in every head, shape (n_heads, m), for the step
        path: ``gates`` of shape (n_heads, m) or (m,), one number when m = 1, or None (the ``decay`` alone).
        None when the gates are not valid gates of those shapes: the general path names what is wrong.  The
        arithmetic of :func:`~levstream._decay.neg_log_gates`, so every head gets the bits it would alone."""
        H = len(self._heads)
        if gates is None:
            return np.full((H, m), self._base_neg)
        arr = as_ndarray(gates)
        if type(arr) is not np.ndarray:
            arr = np.asarray(arr)
        if arr.dtype.kind not in "fiu" or arr.dtype == np.bool_ or arr.ndim > 2:
            return None
        if arr.shape not in ((H, m), (m,)) and not (arr.ndim == 0 and m == 1):
            return None
        if arr.shape == (H, m) and arr.dtype == np.float64 and arr.flags.c_contiguous:
            flat = arr.reshape(-1)  # (a token's gates per head, as update passes them)
        else:
            flat = np.ascontiguousarray(np.broadcast_to(arr, (H, m)), dtype=np.float64).reshape(-1)
        out = np.empty((H, m))
        if neg_log_gates_into(flat, self._base_neg, out.reshape(-1)) >= 0:
            return None
        return out

    def _take_steps(self, X: np.ndarray, V: np.ndarray | None, gates: Any, names: str) -> bool:
        """:meth:`_take` of a few unchecked tokens on the step path (call with the lock held), weighed in the
        heads' frames when ``gates`` are given or the stream forgets.  False, with nothing changed, when they
        need the general path (gates it must validate, a rebase due, weighted squares that overflow)."""
        negs = None
        if gates is not None or self._any_forgetting:
            negs = self._step_negs(gates, X.shape[1])
            if negs is None:
                return False
        if self._take(X, V, checked=False, names=names, negs=negs):
            return True
        assert negs is not None  # (unweighed tokens are taken, or refused with an error)
        m = X.shape[1]
        if m == 1 or not _tokens_fit(X, V):
            return False  # the general path: its errors, or the chunk whole (values near float64's limits)
        # a frame rebases within the chunk: token by token, those that rebase through the general path, so that
        # every head still equals one fed row by row (checked first: no token can be refused halfway)
        for i in range(m):
            Xi, Vi = X[:, i : i + 1], None if V is None else V[:, i : i + 1]
            if not self._take(Xi, Vi, names=names, negs=negs[:, i : i + 1]):
                self._update_gated(Xi, Vi, None, None, None, names[0], negs[:, i : i + 1])
        return True

    def _neg_log_gates(self, gates: Any, m: int) -> list[np.ndarray]:
        """Per head, ``-log`` of each row's effective gate (gates of shape (n_heads, m), or (m,) for all heads;
        a head that has not forgotten anything and gets no gate weighs its rows by 1, exactly)."""
        if gates is None:
            return [_or_ones(h._neg_log_gates(None, m), m) for h in self._heads]
        arr = np.asarray(gates)
        if arr.ndim == 0 and m == 1:  # one token's gate as a number, as update takes it
            arr = arr.reshape(1)
        if arr.ndim == 1:  # the same gates in every head
            arr = np.broadcast_to(arr, (self.n_heads, *arr.shape))
        if arr.ndim != 2 or arr.shape != (self.n_heads, m):
            raise ValueError(
                f"gates must have shape (n_heads, m) = ({self.n_heads}, {m}) or ({m},); got shape "
                f"{np.shape(gates)}."
            )
        out = []
        for i, h in enumerate(self._heads):
            try:
                out.append(_or_ones(h._neg_log_gates(arr[i], m), m))
            except ValueError as exc:  # name the head: the message's row is within it
                raise ValueError(f"head {i}: {exc}") from exc
        return out

    def _heads_change(self, rebase: bool) -> None:
        """The heads are about to take rows (or weights) other than through the token buffer (call with the lock
        held, the buffer synced): the live state is brought up to date when next needed, or rebuilt when a head
        rebases (its summary and rows are scaled where they are: the live state's copies would not be)."""
        self._stale = True
        if rebase:
            self._live = None

    def _update_gated(
        self,
        X: Any,
        V: Any,
        ids: Any,
        offset: Any,
        gates: Any,
        name: str = "X",
        step_negs: np.ndarray | None = None,
    ) -> MultiHeadKeySketch:
        """Feed a chunk weighed in the heads' frames through each head's general path (``step_negs``: the rows'
        ``-log`` gates as :meth:`_step_negs` gave them, instead of ``gates``)."""
        X = self._stack(X, name, self.dim)
        m = X.shape[1]
        Vs = self._values(V, m)
        negs = self._neg_log_gates(gates, m) if step_negs is None else list(step_negs)
        with self._lock:
            # the buffered tokens reach the heads first: the ids of this chunk come after theirs
            self._sync()
            new_ids, start, srt = self._heads[0]._new_ids(m, ids, offset)
            if not m:
                return self
            # every head's rows weighed and checked before any head changes
            plans = [
                h._weigh_rows(X[i], negs[i], name, None if Vs is None else Vs[i])
                for i, h in enumerate(self._heads)
            ]
            self._heads_change(any(shift for _, shift, _ in plans))
            try:
                for i, (head, (Xw, shift, frame)) in enumerate(zip(self._heads, plans)):
                    head._ingest_weighed(
                        Xw, None if Vs is None else Vs[i], new_ids, start, srt, shift, frame
                    )
            finally:
                self._note_forgetting()
        return self

    def extend(self, iterable: Iterable[Any]) -> MultiHeadKeySketch:
        """Feed tokens ``(n_heads, dim)`` and/or chunks ``(n_heads, m, dim)`` — or ``(keys, values)`` pairs of
        them — from an iterable; returns ``self``.

        All or nothing: if an item is rejected the sketch is restored to its state before the call and the
        error names the item.
        """
        snapshot = None
        if not _at_most_one_item(iterable):  # all or nothing, as KeySketch.extend
            with self._lock:
                self._sync()
                snapshot = [h.copy() for h in self._heads]
        try:
            # not enumerate(): its reused result tuple would keep the last item alive
            index = -1
            for item in iterable:
                index += 1
                try:
                    value = None
                    if isinstance(item, tuple):
                        if len(item) != 2:
                            raise ValueError(
                                f"a tuple item must be a (keys, values) pair; got {len(item)} items."
                            )
                        item, value = item
                    arr = as_real_array(item, "item")
                    if arr.ndim == 2:
                        self.update(arr, value)
                    else:
                        self.update_many(arr, value)
                except (ValueError, TypeError) as exc:
                    raise type(exc)(
                        f"extend: item {index} rejected ({exc}); the sketch was left as before "
                        "the call."
                    ) from exc
                del item, value, arr  # before the iterable makes the next item (KeySketch.extend)
        except BaseException:
            if snapshot is not None:
                with self._lock:
                    self._set_heads(snapshot)
            raise
        return self

    def flush(self) -> MultiHeadKeySketch:
        """Settle every head (see :meth:`KeySketch.flush`); returns ``self``."""
        with self._lock:
            self._sync()
            self._live = None
            for head in self._heads:
                head.flush()
        return self

    # ------------------------------------------------------------------ merge
    def merge(self, other: MultiHeadKeySketch) -> MultiHeadKeySketch:
        """Fold ``other`` (same n_heads and settings; disjoint ids) into this sketch; returns ``self``."""
        if not isinstance(other, MultiHeadKeySketch):
            raise TypeError(
                f"can only merge a MultiHeadKeySketch; got {type(other).__name__} instead."
            )
        if other.n_heads != self.n_heads:
            raise ValueError(
                f"cannot merge sketches with different n_heads: {self.n_heads} vs {other.n_heads}."
            )
        if other is self:
            raise ValueError("cannot merge a sketch with itself (every id would clash).")
        for mine, theirs in zip(self._heads, other._heads):
            mine._check_compatible(theirs)
        with other._lock:
            other._sync()
        with self._lock:
            self._sync()
            # Head 0 detects id clashes before changing anything; the other heads share its id history.  Parts
            # that interleave are refused when any head forgets, before any head changes (a head that forgets
            # nothing would take them)
            if self._forgets() or other._forgets():
                self._heads[0]._order_for_merge(other._heads[0])
            # every head merged into a copy, all taken over once merged: should a head's merge fail (no memory, an
            # interruption), no head has changed
            heads = [h.copy() for h in self._heads]
            for mine, theirs in zip(heads, other._heads):
                mine._merge(theirs, atomic=False)
            for head, merged in zip(
                self._heads, heads
            ):  # (the head objects stay: a caller may hold them)
                head._take_state(merged)
            self._live = None
            self._note_forgetting()  # a part that forgets makes every head forget (its gates decay this part's keys)
        return self

    def __iadd__(self, other: MultiHeadKeySketch) -> MultiHeadKeySketch:  # noqa: PYI034 (Self: Python 3.11)
        return self.merge(other)

    def __add__(self, other: MultiHeadKeySketch) -> MultiHeadKeySketch:
        return self.copy().merge(other)

    def copy(self) -> MultiHeadKeySketch:
        """An independent deep copy."""
        out = MultiHeadKeySketch.__new__(MultiHeadKeySketch)
        with self._lock:
            self._sync()
            out._set_heads([h.copy() for h in self._heads])
        out._lock = threading.RLock()
        return out

    __copy__ = copy

    def __deepcopy__(self, memo: dict) -> MultiHeadKeySketch:
        return self.copy()

    # ------------------------------------------------------------------ queries (never change the sketch)
    def _queries(self, Q: Any, finite: bool = True) -> np.ndarray:
        """``Q`` as a validated C-contiguous float64 ``(n_heads, m, dim)`` array.  ``finite=False`` leaves the
        finiteness of a float64 array to the live scan, which reports such a query ``UNRELIABLE`` (its callers
        then validate it in full before they answer any other way)."""
        rows = fast_float64(Q)
        if (
            rows is not None
            and rows.ndim == 3
            and rows.shape[0] == len(self._heads)
            and rows.shape[2] == self.dim
            and (not finite or sq_norm(rows.reshape(-1)) < np.inf)
        ):
            return rows
        return self._stack(Q, "Q", self.dim)

    def _live_state(self, m: int) -> _Live | None:
        """The live state with every token fed, for ``m`` queries per head, or None when the step path does not
        apply (call with the lock held)."""
        if not self._step_ok or m > _query.LIVE_QUERY_ROWS:
            return None
        if self._stale:
            live = self._live
            if live is not None and not live.same_folds(self._heads):
                live = None
            # d x d factorizations and products of a few rows: BLAS threads only wait for each other
            with lowered_blas(1):
                if live is None:
                    live = _Live.build(self._heads, self._nb)
                else:
                    live.add_store_rows(self._heads)
            self._live = live
            self._stale = False
        live = self._live
        if live is not None and self._nb - live.bup >= _ABSORB_ROWS:
            self._absorb(live)
        return live

    def _absorb(self, live: _Live) -> None:
        """The buffered tokens the live state sees as recent rows join it: its Gram matrices and scanned rows."""
        assert self._buf is not None
        nb = self._nb
        if nb == live.bup:  # every buffered token absorbed already (by the 64th token's query)
            return
        live.reserve(nb - live.bup)
        # syrk and trmm of at most a few dozen rows per head: with a second BLAS thread they took 63 ms a call
        # for 12 heads (5 ms per trmm) on the loaded 2-core machine, against 0.23 ms with one
        with lowered_blas(1):
            self._absorb_rows(live, nb)
        live.bup = nb

    def _absorb_rows(self, live: _Live, nb: int) -> None:
        absorb_rows_heads(
            self._buf,
            self._bufv,
            live.bup,
            nb,
            self._buf_id0,
            live.LG,
            live.W,
            live.has_w,
            live.kthr,
            live.scale,
            live.lam,
            live.Ke,
            live.Ke8,
            live.we,
            live.nke,
            live.Ie,
            live.Ve,
            live.ne,
            dsyrk_function(),
            dtrmm_function(),
        )

    def _find(self, live: _Live, Q: np.ndarray, eps: float) -> tuple[np.ndarray, ...]:
        """:func:`~levstream._kernels.live.heavy_p2_stacked` of ``Q`` (n_heads, m, dim) at threshold ``eps`` on the
        live state and the buffered tokens it has not absorbed."""
        return heavy_p2_stacked(
            Q,
            live.LG,
            live.Kc,
            live.Kc8,
            live.wc,
            live.nk,
            live.Ic,
            live.nc,
            live.Ke,
            live.Ke8,
            live.we,
            live.nke,
            live.Ie,
            live.ne,
            _NO_ROWS if self._buf is None else self._buf,
            live.bup,
            self._nb,
            self._buf_id0,
            _query.report_threshold(eps, 0.0),
        )

    def _head_entries(
        self,
        starts: np.ndarray,
        indptr: np.ndarray,
        key_ids: np.ndarray,
        values: np.ndarray,
        eps: float,
    ) -> HeadEntries:
        """Every head's entries as found by the stacked kernel (its arrays made read-only, not copied); a head's
        :class:`HeavyEntries` is made when a caller reads it."""
        for arr in (starts, indptr, key_ids, values):
            arr.flags.writeable = False
        return HeadEntries.of_frozen(starts, indptr, key_ids, values, eps)

    def universal_set(self) -> list[UniversalSet]:
        """The universal set of every head (exact for p = 2), one :class:`UniversalSet` per head."""
        return [h.universal_set() for h in self.copy()._heads]

    def normalizer(self, Q: Any) -> np.ndarray:
        """``Z(q)`` over all keys of each head, for ``Q`` of shape ``(n_heads, m, dim)``; shape (n_heads, m)."""
        Q = self._queries(Q)
        with self._lock:
            self._sync()
            return np.stack([h._normalizer(Q[i]) for i, h in enumerate(self._heads)])

    def heavy_entries(self, Q: Any, eps: float | None = None) -> HeadEntries:
        """Every entry ``A_h[i, j] >= eps`` of each head's attention, for ``Q`` of shape ``(n_heads, m, dim)``.

        Returns a :class:`~levstream.results.HeadEntries`: a sequence with one :class:`HeavyEntries` per head
        (as :meth:`KeySketch.heavy_entries` of that head), and the entries of every head in one block of arrays.
        """
        Q = self._queries(Q, finite=False)
        eps = self._query_eps(eps)
        with self._lock:
            live = self._live_state(Q.shape[1])
            if live is not None:
                starts, indptr, key_ids, values, _, z = self._find(live, Q, eps)
                # a head whose q^T G q the kernel could not trust: every head answers through its own view,
                # which falls back to its summary and every pending row (docs/theory.md, "Numerics")
                if not any_unreliable(z):
                    return self._head_entries(starts, indptr, key_ids, values, eps)
            Q = self._queries(Q)  # in full: a query that is not finite is refused here
            self._sync()
            return HeadEntries(
                [
                    _query.heavy_entries(h._view(), Q[i], self.p, eps)
                    for i, h in enumerate(self._heads)
                ]
            )

    def top_k(self, Q: Any, k: int) -> list[TopK]:
        """The ``k`` largest entries of each query of each head (see :meth:`KeySketch.top_k`), one per head."""
        Q = self._queries(Q)
        k = check_int(k, "k", minimum=1)
        with self._lock:
            self._sync()
            # a few queries: each head's compiled pass over every row it holds, with G from the stacked live state
            # (the heads' own live caches would copy their candidates once more)
            live = self._live_state(Q.shape[1]) if k <= _TOP_K_PASS_MAX else None
            out = []
            for i, h in enumerate(self._heads):
                found = None
                if live is not None:
                    st = h._store
                    found = _query.top_k_held(
                        live.LG[i], st.keys_view(), st.ids_view(), Q[i], k, self.eps
                    )
                out.append(
                    found
                    if found is not None
                    else _query.top_k(h._held_view(), Q[i], self.p, k, self.eps)
                )
            return out

    def attend(self, Q: Any, eps: float | None = None) -> AttentionResult:
        """:meth:`KeySketch.attend` for every head: ``entries`` is a :class:`~levstream.results.HeadEntries` (one
        :class:`HeavyEntries` per head), the arrays have a head axis in front (``heavy_output``/``output``
        ``(n_heads, m, value_dim)``, ``captured_mass`` ``(n_heads, m)``)."""
        Q = self._queries(Q, finite=False)
        eps = self._query_eps(eps)
        with self._lock:
            live = None if self.value_dim is None else self._live_state(Q.shape[1])
            if live is not None:
                return self._live_attend(live, Q, eps)
            Q = self._queries(Q)  # in full: a query that is not finite is refused here
            self._sync()
            return _stacked(
                [_query.attend(h._view(), Q[i], self.p, eps) for i, h in enumerate(self._heads)]
            )

    def _live_attend(self, live: _Live, Q: np.ndarray, eps: float) -> AttentionResult:
        """:meth:`attend` on the live state: one compiled call finds every head's entries, one sums their values
        (and the buffered tokens' terms of the exact output); the moment states add the rest."""
        starts, indptr, key_ids, values, positions, z = self._find(live, Q, eps)
        # a normaliser the kernel could not trust: each head answers from its summary and every pending row
        if any_unreliable(z):
            Q = self._queries(Q)  # in full: a query that is not finite is refused here
            self._sync()
            return _stacked(
                [_query.attend(h._view(), Q[i], self.p, eps) for i, h in enumerate(self._heads)]
            )
        exact = self.exact_output
        heavy_out, mass, buffered = outputs_stacked(
            Q,
            starts,
            indptr,
            positions,
            values,
            live.Vc,
            live.nc,
            live.Ve,
            live.ne,
            self._bufv,
            live.bup,
            self._buf if exact and self._buf is not None else _NO_ROWS,
            self._bufv,
            self._nb if exact else 0,
        )
        output = None
        if exact:
            num = buffered
            for h, head in enumerate(self._heads):
                assert head._moments is not None
                num[h] += head._moments.numerator(Q[h])
            w = z[:, :, None]
            output = np.divide(num, w, out=np.zeros_like(num), where=w > 0)
        entries = self._head_entries(starts, indptr, key_ids, values, eps)
        return AttentionResult(entries, heavy_out, mass, output)

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
        """:meth:`KeySketch.prefill` for every head: causal attention of a chunk ``(n_heads, c, dim)`` (values
        ``(n_heads, c, value_dim)``), then the chunk is folded into every head.  Results as :meth:`attend`.
        ``gates``: shape ``(n_heads, c)``, or ``(c,)`` for the same gates in every head.

        Examples
        --------
        >>> import numpy as np, levstream as ls
        >>> rng = np.random.default_rng(0)
        >>> K, V = rng.standard_normal((2, 6, 3)), rng.standard_normal((2, 6, 3))
        >>> mh = ls.MultiHeadKeySketch(2, 3, eps=0.1, value_dim=3, exact_output=True)
        >>> r = mh.prefill(K, V, K)
        >>> W = np.tril((K[1] @ K[1].T) ** 2)
        >>> bool(np.allclose(r.output[1], W @ V[1] / W.sum(axis=1, keepdims=True))), mh.n
        (True, 6)
        """
        d, dv = self._widths
        if ids is None and offset is None:
            # slices and float32 rows: a decode step's layout
            K, V, Q = _step_layout(K, 1), _step_layout(V, 1), _step_layout(Q, 1)
        if (
            ids is None
            and offset is None
            and dv is not None
            and self._step_ok
            and self._is_steps(K, d, 1, finite=False)
            and self._is_steps(Q, d, 1)
            and self._is_steps(V, dv, 1, finite=False)
        ):  # a decode step: the token joins the buffer (weighed when the stream forgets), then its queries see
            # every key fed, their own included
            step_eps = self._query_eps(eps)
            with self._lock:
                if self._take_steps(K, V, gates, "KV"):
                    live = self._live_state(1)
                    if live is not None:
                        return self._live_attend(live, Q, step_eps)
                    self._sync()
                    return _stacked(
                        [
                            _query.attend(h._view(), Q[i], self.p, step_eps)
                            for i, h in enumerate(self._heads)
                        ]
                    )
        return self._prefill_chunk(K, V, Q, ids, offset, eps, gates)

    def _prefill_chunk(
        self, K: Any, V: Any, Q: Any, ids: Any, offset: Any, eps: Any, gates: Any
    ) -> AttentionResult:
        """:meth:`prefill` of a chunk (any size) through the heads."""
        K = self._stack(K, "K", self.dim)
        c = K.shape[1]
        Q = self._queries(Q)
        if Q.shape[1] != c:
            raise ValueError(
                f"Q must have one query per key of the chunk: shape ({self.n_heads}, {c}, "
                f"{self.dim}); got shape {Q.shape}."
            )
        Vs = self._values(V, c)
        if Vs is None:
            raise ValueError("prefill needs value rows: build the sketch with value_dim=.")
        eps = self._query_eps(eps)
        negs = self._neg_log_gates(gates, c) if self._weighs(gates) else None
        with self._lock:
            self._sync()
            new_ids, start, srt = self._heads[0]._new_ids(c, ids, offset)
            if negs is not None and c:
                # every head's rows weighed and checked before any head changes
                plans = [h._plan_segments(K[i], negs[i], Vs[i]) for i, h in enumerate(self._heads)]
                self._heads_change(rebase=True)  # (a head may rebase within its chunk)
                try:
                    return _stacked(
                        [
                            h._prefill_planned(Vs[i], Q[i], new_ids, start, eps, plan)
                            for i, (h, plan) in enumerate(zip(self._heads, plans))
                        ]
                    )
                finally:
                    self._note_forgetting()
            self._check_moments(K, Vs)
            chunk_ids = np.arange(start, start + c, dtype=np.int64) if new_ids is None else new_ids
            results = [
                _query.prefill(h._view(), K[i], Vs[i], Q[i], chunk_ids, self.p, eps)
                for i, h in enumerate(self._heads)
            ]
            if c:
                self._stale = True
            if (
                c == 1 and new_ids is None and start == self._heads[0].next_id
            ):  # a decode step: one row each
                for i, head in enumerate(self._heads):
                    head._append_token(K[i, 0], Vs[i, 0])
            elif c:
                for i, head in enumerate(self._heads):
                    head._ingest(K[i], Vs[i], new_ids, start, srt)
        return _stacked(results)

    # ------------------------------------------------------------------ persistence
    def to_bytes(self) -> bytes:
        """Serialize (versioned, checksummed): every head's ``KeySketch`` bytes in one container."""
        meta = {
            "kind": _KIND,
            "n_heads": self.n_heads,
            "dim": self.dim,
            "eps": self.eps,
            "p": self.p,
        }
        with self._lock:
            self._sync()
            blobs = [sk.to_bytes() for sk in self._heads]
        arrays = {f"head{h}": np.frombuffer(b, dtype=np.uint8) for h, b in enumerate(blobs)}
        return _serialize.pack(meta, arrays, 1 if self.value_dim is None else 2)

    @classmethod
    def from_bytes(cls, data: bytes) -> MultiHeadKeySketch:
        """Inverse of :meth:`to_bytes`; raises ``ValueError`` for corrupted, truncated or foreign bytes."""
        meta, arrays, version = _serialize.unpack(data)
        try:
            if meta.get("kind") != _KIND:
                raise ValueError(f"bytes hold a {meta.get('kind')!r}, not a {_KIND}")
            H = check_int(meta["n_heads"], "n_heads", minimum=1)
            heads = [KeySketch.from_bytes(arrays[f"head{h}"].tobytes()) for h in range(H)]
            if (heads[0].value_dim is not None) != (version >= 2):
                raise ValueError(f"format version {version} and the heads' values disagree")
            header = (int(meta["dim"]), float(meta["eps"]), check_p(meta["p"]))
            for sk in heads:
                if (sk.dim, sk.eps, sk.p) != header or sk.n != heads[0].n:
                    raise ValueError("heads disagree with the header or with each other")
                heads[0]._check_compatible(sk)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"serialized multi-head sketch is malformed: {exc}.") from exc
        out = cls.__new__(cls)
        out._set_heads(heads)
        out._lock = threading.RLock()
        return out

    def __reduce__(self) -> tuple:
        return (MultiHeadKeySketch.from_bytes, (self.to_bytes(),))

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`to_bytes` to ``path`` atomically."""
        _serialize.write_atomic(path, self.to_bytes())


class _Live:
    """The live state of the queries of every head, stacked over heads (p = 2, every head on the Gram path).

    For head ``h``: ``LG[h]`` the Gram matrix of every key fed but the recent tokens (the summary's ``G``, the
    pending rows' and the first ``bup`` buffered tokens'); the candidates ``Kc[h, :nc[h]]`` (ids ``Ic``, values ``Vc``): the head's candidates
    whose score against ``LG[h]`` still reaches ``kthr[h]`` when the state is built (with a fresh factor; all of
    them otherwise), copied by descending norm (with their int8 rows, scales and norms, for the scan's
    pre-filter); the scanned rows ``Ke[h, :ne[h]]`` (ids ``Ie``, values ``Ve``): the rows fed since the head's last
    fold whose bound ``u / (1 + u)``, ``u = ||x W[h]||^2`` against a factor of an earlier Gram matrix, reaches
    the head's pruning threshold ``kthr[h]`` (docs/theory.md, "Stale factors"): the others have leverage
    scores below it now and later, so no query can find them heavy; ``scale[h]``/``lam[h]`` a norm bound on the
    scores for that test (``lam[h] = 0``: none).  ``upto[h]`` rows of the head's store and ``bup`` buffered tokens
    are accounted for; ``folds[h]`` tells whether the head has folded since.  The buffered tokens after the first
    ``bup`` are the recent ones: queries scan them directly until ``_ABSORB_ROWS`` of them wait, then they are
    absorbed in one batch (BLAS level 3 instead of a rank-one update and a triangular product per token).
    """

    __slots__ = (
        "Ic",
        "Ie",
        "Kc",
        "Kc8",
        "Ke",
        "Ke8",
        "LG",
        "Vc",
        "Ve",
        "W",
        "bup",
        "folds",
        "has_w",
        "kthr",
        "lam",
        "nc",
        "ne",
        "ne_bound",
        "nk",
        "nke",
        "scale",
        "upto",
        "wc",
        "we",
    )

    def __init__(self, H: int, d: int, dv: int, candidates: int) -> None:
        self.LG = np.empty((H, d, d))
        self.W = np.zeros((H, d, d))
        self.has_w = np.zeros(H, dtype=np.bool_)
        self.scale = np.zeros((H, d))
        self.lam = np.zeros(H)  # 0: no norm bound (absorb_rows_heads)
        self.kthr = np.zeros(H)
        self.Kc = np.empty((H, candidates, d))
        self.Kc8 = np.empty((H, candidates, d), dtype=np.int8)
        self.wc = np.empty((H, candidates))
        self.nk = np.empty((H, candidates))
        self.Ic = np.empty((H, candidates), dtype=np.int64)
        self.Vc = np.empty((H, candidates if dv else 0, dv))
        self.nc = np.zeros(H, dtype=np.int64)
        self.Ke = np.empty((H, 0, d))
        self.Ke8 = np.empty((H, 0, d), dtype=np.int8)
        self.we = np.empty((H, 0))
        self.nke = np.empty((H, 0))
        self.Ie = np.empty((H, 0), dtype=np.int64)
        self.Ve = np.empty((H, 0, dv))
        self.ne = np.zeros(H, dtype=np.int64)
        self.ne_bound = 0  # at least ne.max(), kept without a reduction per step (reserve)
        self.upto = np.zeros(H, dtype=np.int64)
        self.bup = 0
        self.folds: list[tuple[int, int, int]] = []

    @staticmethod
    def _folds(head: KeySketch) -> tuple[int, int, int]:
        summary = head._summary
        return (id(summary), summary.n_rows, head._pending_from)

    @classmethod
    def build(cls, heads: list[KeySketch], buffered: int) -> _Live | None:
        """From the heads' state (None when a head is not on the Gram path); room for ``buffered`` tokens."""
        grams = []
        for head in heads:
            summary = head._summary
            G = summary.gram_sum() if isinstance(summary, GramSummary) else None
            if G is None:
                return None
            grams.append(G)
        H, d, dv = len(heads), heads[0].dim, heads[0].value_dim or 0
        live = cls(H, d, dv, max(head._pending_from for head in heads))
        for h, head in enumerate(heads):
            summary = head._summary
            assert isinstance(summary, GramSummary)
            st, pf = head._store, head._pending_from
            live.LG[h] = grams[h]
            thr = head._keep_threshold()
            P = st.keys[pf : st.n].astype(np.float64, copy=False)
            if P.shape[0]:
                live.LG[h] += P.T @ P
            cand = np.arange(pf)
            fresh = _fresh_factor(live.LG[h], summary.n_rows + P.shape[0])
            if fresh is not None:  # the pending rows are in LG[h]: their scores against it, exactly
                live.W[h], slack, live.scale[h], live.lam[h] = fresh
                live.kthr[h] = thr * (1.0 - slack)
                Y = P @ live.W[h]
                keep = ~(np.einsum("ij,ij->i", Y, Y) < live.kthr[h])  # a nan score keeps its row
                # the candidates still alive: a score only falls as keys arrive, so one below the pruning
                # threshold now is below it for every query of this state (the sketch prunes it later)
                Y = st.keys[:pf].astype(np.float64, copy=False) @ live.W[h]
                cand = np.flatnonzero(~(np.einsum("ij,ij->i", Y, Y) < live.kthr[h]))  # nan: alive
            else:  # a stale factor of a Gram matrix without them: the score after their inclusion
                W = summary.bound_factor()
                live.kthr[h] = thr
                keep = np.ones(P.shape[0], dtype=bool)
                if W is not None:
                    if W.shape != (d, d):
                        return None
                    live.W[h] = W
                    Y = P @ W
                    u = np.einsum("ij,ij->i", Y, Y)
                    keep = ~(u < thr * (1.0 + u))  # a nan bound keeps the row
            K8, w, norms = int8_rows(st.keys[cand])
            # by descending norm: the scan stops at the first candidate too short to be heavy
            by_norm = np.argsort(-norms, kind="stable")
            order = cand[by_norm]
            c = order.shape[0]
            live.Kc[h, :c] = st.keys[order]
            live.Kc8[h, :c], live.wc[h, :c], live.nk[h, :c] = (
                K8[by_norm],
                w[by_norm],
                norms[by_norm],
            )
            live.Ic[h, :c] = st.ids[order]
            if dv:
                assert st.values is not None
                live.Vc[h, :c] = st.values[order]
            live.nc[h] = c
            live.has_w[h] = fresh is not None or summary.bound_factor() is not None
            values = None if st.values is None else st.values[pf : st.n][keep]
            live._extend(h, P[keep], st.ids[pf : st.n][keep], values)
            live.upto[h] = st.n
            live.folds.append(cls._folds(head))
        live.add_store_rows(heads)
        live.reserve(buffered)
        return live

    def same_folds(self, heads: list[KeySketch]) -> bool:
        """Whether no head has folded rows (or been replaced) since the state was built."""
        return all(f == self._folds(head) for f, head in zip(self.folds, heads))

    def add_store_rows(self, heads: list[KeySketch]) -> None:
        """Account for the rows the heads' stores gained since (none folded): ``G`` and the bound test."""
        for h, head in enumerate(heads):
            st = head._store
            a, b = int(self.upto[h]), st.n
            if a == b:
                continue
            X = st.keys[a:b].astype(np.float64, copy=False)
            self.LG[h] += X.T @ X
            keep = np.ones(b - a, dtype=bool)
            if self.has_w[h]:
                Y = X @ self.W[h]
                u = np.einsum("ij,ij->i", Y, Y)
                keep = ~(u < self.kthr[h] * (1.0 + u))  # a nan bound keeps the row
            values = None if st.values is None else st.values[a:b][keep]
            self._extend(h, X[keep], st.ids[a:b][keep], values)
            self.upto[h] = b

    def _extend(self, h: int, X: np.ndarray, ids: np.ndarray, values: np.ndarray | None) -> None:
        """Append rows to head ``h``'s scanned rows."""
        k = X.shape[0]
        if k == 0:
            return
        self._grow(int(self.ne[h]) + k)
        e = int(self.ne[h])
        self.Ke[h, e : e + k] = X
        self.Ke8[h, e : e + k], self.we[h, e : e + k], self.nke[h, e : e + k] = int8_rows(X)
        self.Ie[h, e : e + k] = ids
        if self.Ve.shape[2]:
            assert values is not None
            self.Ve[h, e : e + k] = values
        self.ne[h] = e + k
        self.ne_bound = max(self.ne_bound, e + k)

    def reserve(self, rows: int) -> None:
        """Room for ``rows`` more scanned rows in every head (which the caller may then add)."""
        if self.ne_bound + rows > self.Ke.shape[1]:
            self.ne_bound = int(self.ne.max())
            self._grow(self.ne_bound + rows)
        self.ne_bound += rows

    def _grow(self, rows: int) -> None:
        cap = self.Ke.shape[1]
        if rows <= cap:
            return
        cap = max(rows, cap + cap // 2, 64)
        H, e = self.Ke.shape[0], int(self.ne.max())
        Ke = np.empty((H, cap, self.Ke.shape[2]))
        Ke8 = np.empty((H, cap, self.Ke.shape[2]), dtype=np.int8)
        we = np.empty((H, cap))
        nke = np.empty((H, cap))
        Ie = np.empty((H, cap), dtype=np.int64)
        Ve = np.empty((H, cap if self.Ve.shape[2] else 0, self.Ve.shape[2]))
        Ke[:, :e], Ke8[:, :e], nke[:, :e] = self.Ke[:, :e], self.Ke8[:, :e], self.nke[:, :e]
        we[:, :e] = self.we[:, :e]
        Ie[:, :e] = self.Ie[:, :e]
        if self.Ve.shape[2]:
            Ve[:, :e] = self.Ve[:, :e]
        self.Ke, self.Ke8, self.we, self.nke, self.Ie, self.Ve = Ke, Ke8, we, nke, Ie, Ve

    @property
    def nbytes(self) -> int:
        return sum(
            int(a.nbytes)
            for a in (
                self.LG,
                self.W,
                self.scale,
                self.lam,
                self.Kc,
                self.Kc8,
                self.wc,
                self.nk,
                self.Ic,
                self.Vc,
                self.Ke,
                self.Ke8,
                self.we,
                self.nke,
                self.Ie,
                self.Ve,
            )
        )


def _fresh_factor(G: np.ndarray, n_rows: int) -> tuple[np.ndarray, float, np.ndarray, float] | None:
    """``(W, slack, scale, lam)`` with ``||x W||^2 = x^T G^-1 x`` to relative error ``slack`` (the library's margin
    rule for scores from the Cholesky factor of the equilibrated ``G``, docs/theory.md, "Numerics") and the norm
    bound ``x^T G^-1 x <= sum_a (x_a scale_a)^2 / lam`` (``scale = diag(G)^-1/2``, ``lam`` a lower bound on the
    smallest eigenvalue of the equilibrated ``G``, docs/theory.md, "The norm pre-filter"), or None when ``G`` is
    too ill-conditioned for that (the callers then use the summary's stale factor)."""
    d = G.shape[0]
    diag = np.diag(G).copy()
    if not (np.isfinite(diag).all() and (diag >= max(n_rows, 1) * np.finfo(np.float64).tiny).all()):
        return None
    scale = 1.0 / np.sqrt(diag)
    C = G * scale[:, None] * scale[None, :]
    try:
        lam = float(np.linalg.eigvalsh(C)[0])
        L = np.linalg.cholesky(C)
    except np.linalg.LinAlgError:
        return None
    if not lam > 0:
        return None
    rel = 4.0 * d * UNIT_ROUNDOFF * (2.0 * d / lam)  # as GramSummary.rel_error
    if rel > _FRESH_MAX_REL_ERROR:
        return None
    W = scale[:, None] * np.triu(np.linalg.inv(L).T)
    if not np.isfinite(W).all():
        return None
    return np.ascontiguousarray(W), margin(rel, prune=True), scale, lam * LAMBDA_SAFETY


def _step_layout(X: Any, rows: int) -> Any:
    """A few tokens ``X`` (an ndarray ``(n_heads, m <= rows, width)``, or one token ``(n_heads, width)``) of
    float64 or float32 in the layout the step path takes (C-contiguous writeable float64:
    :func:`~levstream._validation.fast_float64`); anything else as it is (validated in full later)."""
    if type(X) is not np.ndarray:
        if X is None:
            return X
        X = as_ndarray(X)
        if type(X) is not np.ndarray:
            return X
    if X.ndim == 2 or (X.ndim == 3 and X.shape[1] <= rows):
        converted = fast_float64(X)  # None for another dtype
        return X if converted is None else converted
    return X


def _token_gates(gate: Any) -> Any:
    """The gates of one token in the shapes :meth:`MultiHeadKeySketch._step_negs` takes: one per head
    ``(n_heads,)`` (an array, a list or a tuple) as ``(n_heads, 1)``, a number as it is; any other shape as one
    it refuses (the general path then names what is wrong)."""
    if gate is None:
        return None
    arr = as_ndarray(gate)
    if isinstance(arr, (list, tuple)):
        arr = np.asarray(arr)
    if type(arr) is np.ndarray and arr.ndim:
        return arr[:, None] if arr.ndim == 1 else arr[None]
    return arr


def _tokens_fit(X: np.ndarray, V: np.ndarray | None) -> bool:
    """Whether tokens ``X`` (values ``V``) are finite and small enough that no weight of a frame (at most
    ``e^100``) makes their squares or their moment terms overflow: ``||x||^2`` and ``||x||^2 max |v|`` below
    ``1e264``, and the values' own squares finite."""
    sq = np.einsum("hmd,hmd->hm", X, X)
    if not (np.isfinite(sq).all() and sq.max(initial=0.0) < 1e264):
        return False
    if V is None:
        return True
    vmax = np.abs(V).max(axis=2, initial=0.0)
    return bool(
        np.isfinite(np.einsum("hmd,hmd->hm", V, V)).all() and (sq * vmax).max(initial=0.0) < 1e264
    )


def _or_ones(neg: np.ndarray | None, m: int) -> np.ndarray:
    """``-log`` gates of ``m`` rows, 0 (gate 1) where none was needed."""
    return np.zeros(m) if neg is None else neg


def _stacked(results: list[AttentionResult]) -> AttentionResult:
    """Per-head results as one result with a head axis in front (entries as a :class:`HeadEntries`, the bounds of
    approximate values stacked too)."""
    outputs = [r.output for r in results]

    def bounds(name: str, of: str) -> tuple[np.ndarray, np.ndarray] | None:
        pairs = [getattr(r, name) for r in results]
        if all(b is None for b in pairs):
            return None
        # bounds of some heads only: an exact figure is its own lower and upper bound
        exact = [getattr(r, of) for r in results]
        return (
            np.stack([x if b is None else b[0] for b, x in zip(pairs, exact)]),
            np.stack([x if b is None else b[1] for b, x in zip(pairs, exact)]),
        )

    return AttentionResult(
        HeadEntries([r.entries for r in results]),  # type: ignore[misc]
        np.stack([r.heavy_output for r in results]),
        np.stack([r.captured_mass for r in results]),
        None if outputs[0] is None else np.stack([o for o in outputs if o is not None]),
        bounds("captured_mass_bounds", "captured_mass"),
        bounds("heavy_output_bounds", "heavy_output"),
    )
