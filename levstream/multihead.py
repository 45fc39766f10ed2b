"""``MultiHeadKeySketch``: one :class:`~levstream.KeySketch` state per attention head behind a single object.

What is shared and what is per head:

* **shared** — validation of every chunk and of its ids (key ``j`` of every head is the same token, so one id
  stream, one ``offset``/``ids`` check, done once for all heads), the bytes container, and the query path
  (:mod:`levstream._query`, the same code as for one head);
* **per head** — the normaliser summary (each head's ``K_h^T K_h``), its row store (candidates and pending rows,
  with value rows when values travel with keys) and its moment state: every head is folded and pruned exactly
  as an independent sketch would be, so the results equal those of ``n_heads`` independent ``KeySketch``
  objects fed the same keys.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from typing import Any

import numpy as np

from . import _query, _serialize
from ._kernels.live import add_rows_and_bound_heads
from ._validation import as_real_array, check_finite, check_int, check_p
from .results import AttentionResult, HeavyEntries, TopK, UniversalSet
from .sketch import KeySketch, _check_magnitude

__all__ = ["MultiHeadKeySketch"]

_KIND = "MultiHeadKeySketch"


class MultiHeadKeySketch:
    """Streaming, mergeable sketches of the keys of ``n_heads`` attention heads.

    Parameters
    ----------
    n_heads : int
        Number of heads.
    dim : int
        Head dimension (width of every key row).
    eps : float
        Heaviness threshold, ``0 < eps <= 1``.
    p : float, default 2
        Exponent of ``f(x) = |x|^p``, any ``p > 0``, with the same summaries as :class:`KeySketch`.
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
    >>> hits = sk.heavy_entries(Q)                        # one HeavyEntries per head
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
        self._heads = [KeySketch(dim, eps=eps, p=p, rng=seed, **options) for seed in seeds]
        #: one lock for all heads: a query sees every head before or after an update, never a mix
        self._lock = threading.RLock()

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
        return self._heads[0].n

    @property
    def num_retained(self) -> int:
        """Key rows held in memory over all heads."""
        return sum(h.num_retained for h in self._heads)

    def is_empty(self) -> bool:
        """True when no token has been fed."""
        return self.n == 0

    @property
    def nbytes(self) -> int:
        """Bytes held over all heads."""
        return sum(h.nbytes for h in self._heads)

    @property
    def next_id(self) -> int:
        """The id the next token fed without ``ids=``/``offset=`` will get."""
        return self._heads[0].next_id

    @property
    def heads(self) -> tuple[KeySketch, ...]:
        """The per-head sketches (read-only use; feed keys through this object so the heads stay in step)."""
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

    def _neg_log_gates(self, gates: Any, m: int) -> list[np.ndarray] | None:
        """Per head, ``-log`` of each row's effective gate (None when no row carries a gate)."""
        if gates is None and self._heads[0].decay is None:
            return None
        if gates is not None:
            arr = np.asarray(gates)
            if arr.ndim == 1:  # the same gates in every head
                arr = np.broadcast_to(arr, (self.n_heads, *arr.shape))
            if arr.ndim != 2 or arr.shape[0] != self.n_heads:
                raise ValueError(
                    f"gates must have shape (n_heads, m) = ({self.n_heads}, {m}) or ({m},); got shape "
                    f"{np.shape(gates)}."
                )
            return [h._neg_log_gates(arr[i], m) for i, h in enumerate(self._heads)]  # type: ignore[misc]
        return [h._neg_log_gates(None, m) for h in self._heads]  # type: ignore[misc]

    # ------------------------------------------------------------------ ingest
    def update_many(
        self, X: Any, V: Any = None, ids: Any = None, offset: Any = None, gates: Any = None
    ) -> MultiHeadKeySketch:
        """Feed one chunk of keys of every head, shape ``(n_heads, m, dim)`` (values ``(n_heads, m, value_dim)``).

        ``ids``/``offset`` number the ``m`` keys (tokens) as in :meth:`KeySketch.update_many`; they are the
        same for every head and checked once.  ``m = 0`` is a no-op.  ``gates`` (p = 2): shape
        ``(n_heads, m)``, or ``(m,)`` for the same gates in every head (see :meth:`KeySketch.update_many`).  On a
        bad chunk, bad ids or an id clash nothing is changed.  Returns ``self``.
        """
        X = self._stack(X, "X", self.dim)
        m = X.shape[1]
        Vs = self._values(V, m)
        negs = self._neg_log_gates(gates, m)
        with self._lock:
            new_ids, start, srt = self._heads[0]._new_ids(m, ids, offset)
            if (
                m and negs is not None
            ):  # every head's rows weighed and checked before any head changes
                plans = [h._weigh_rows(X[i], negs[i], "X") for i, h in enumerate(self._heads)]
                for i, (head, (Xw, shift, frame)) in enumerate(zip(self._heads, plans)):
                    head._move_frame(shift, frame)
                    head._ingest(Xw, None if Vs is None else Vs[i], new_ids, start, srt)
            elif m:
                for h, head in enumerate(
                    self._heads
                ):  # every head holds the same id history: none can refuse
                    head._ingest(X[h], None if Vs is None else Vs[h], new_ids, start, srt)
        return self

    def update(self, x: Any, v: Any = None, gate: Any = None) -> MultiHeadKeySketch:
        """Feed one key (token) of every head, shape ``(n_heads, dim)`` (value ``(n_heads, value_dim)``).

        The token is validated and numbered once for all heads.  ``gate``: one per head (shape ``(n_heads,)``) or
        one number for all (see :meth:`KeySketch.update`)."""
        H, d, dv = self.n_heads, self.dim, self.value_dim
        if gate is not None or self._heads[0].decay is not None:
            gates = np.broadcast_to(np.asarray(1.0 if gate is None else gate), (H,))[:, None]
            arr = as_real_array(x, "x")
            val = None if v is None else as_real_array(v, "v")[:, None, :]
            return self.update_many(arr[:, None, :], val, gates=gates)
        if (
            type(x) is np.ndarray
            and x.dtype == np.float64
            and x.shape == (H, d)
            and (
                v is None
                if dv is None
                else (type(v) is np.ndarray and v.dtype == np.float64 and v.shape == (H, dv))
            )
            and np.isfinite(np.einsum("ij,ij->", x, x))
            and (v is None or np.isfinite(np.einsum("ij,ij->", v, v)))
        ):
            with self._lock:  # the live path: every head takes the token under the same id
                self._heads[0]._check_next_id()
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

    def extend(self, iterable: Iterable[Any]) -> MultiHeadKeySketch:
        """Feed tokens ``(n_heads, dim)`` and/or chunks ``(n_heads, m, dim)`` — or ``(keys, values)`` pairs of
        them — from an iterable; returns ``self``.

        All or nothing: if an item is rejected the sketch is restored to its state before the call and the
        error names the item.
        """
        snapshot = [h.copy() for h in self._heads]
        try:
            for index, item in enumerate(iterable):
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
        except BaseException:
            with self._lock:
                self._heads = snapshot
            raise
        return self

    def flush(self) -> MultiHeadKeySketch:
        """Settle every head (see :meth:`KeySketch.flush`); returns ``self``."""
        with self._lock:
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
        with self._lock:
            # Head 0 detects id clashes before changing anything; the other heads share its id history.
            self._heads[0].merge(other._heads[0])
            for h in range(1, self.n_heads):
                self._heads[h].merge(other._heads[h])
        return self

    def __iadd__(self, other: MultiHeadKeySketch) -> MultiHeadKeySketch:  # noqa: PYI034 (Self: Python 3.11)
        return self.merge(other)

    def __add__(self, other: MultiHeadKeySketch) -> MultiHeadKeySketch:
        return self.copy().merge(other)

    def copy(self) -> MultiHeadKeySketch:
        """An independent deep copy."""
        out = MultiHeadKeySketch.__new__(MultiHeadKeySketch)
        with self._lock:
            out._heads = [h.copy() for h in self._heads]
        out._lock = threading.RLock()
        return out

    __copy__ = copy

    def __deepcopy__(self, memo: dict) -> MultiHeadKeySketch:
        return self.copy()

    # ------------------------------------------------------------------ queries (never change the sketch)
    def _queries(self, Q: Any) -> np.ndarray:
        return self._stack(Q, "Q", self.dim)

    def universal_set(self) -> list[UniversalSet]:
        """The universal set of every head (exact for p = 2), one :class:`UniversalSet` per head."""
        return [h.universal_set() for h in self.copy()._heads]

    def normalizer(self, Q: Any) -> np.ndarray:
        """``Z(q)`` over all keys of each head, for ``Q`` of shape ``(n_heads, m, dim)``; shape (n_heads, m)."""
        Q = self._queries(Q)
        with self._lock:
            return np.stack(
                [_query.normalizer(h._view(), Q[i], self.p) for i, h in enumerate(self._heads)]
            )

    def heavy_entries(self, Q: Any, eps: float | None = None) -> list[HeavyEntries]:
        """Every entry ``A_h[i, j] >= eps`` of each head's attention, for ``Q`` of shape ``(n_heads, m, dim)``.

        Returns one :class:`HeavyEntries` per head, as :meth:`KeySketch.heavy_entries` of that head.
        """
        Q = self._queries(Q)
        eps = self._query_eps(eps)
        with self._lock:
            self._summarise_pending()
            views = [h._view() for h in self._heads]
            if Q.shape[1] <= _query.LIVE_QUERY_ROWS and all(
                _query.is_live(view, Q[0], self.p) for view in views
            ):
                return _query.heavy_entries_heads(views, Q, eps)
            return [_query.heavy_entries(view, Q[i], self.p, eps) for i, view in enumerate(views)]

    def top_k(self, Q: Any, k: int) -> list[TopK]:
        """The ``k`` largest entries of each query of each head (see :meth:`KeySketch.top_k`), one per head."""
        Q = self._queries(Q)
        k = check_int(k, "k", minimum=1)
        with self._lock:
            return [
                _query.top_k(h._view(), Q[i], self.p, k, self.eps)
                for i, h in enumerate(self._heads)
            ]

    def attend(self, Q: Any, eps: float | None = None) -> AttentionResult:
        """:meth:`KeySketch.attend` for every head: ``entries`` is a list (one per head), the arrays have a head
        axis in front (``heavy_output``/``output`` ``(n_heads, m, value_dim)``, ``captured_mass`` ``(n_heads, m)``)."""
        Q = self._queries(Q)
        eps = self._query_eps(eps)
        with self._lock:
            return _stacked(
                [_query.attend(h._view(), Q[i], self.p, eps) for i, h in enumerate(self._heads)]
            )

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
        negs = self._neg_log_gates(gates, c)
        with self._lock:
            new_ids, start, srt = self._heads[0]._new_ids(c, ids, offset)
            if (
                negs is not None and c
            ):  # every head's rows weighed and checked before any head changes
                plans = [h._plan_segments(K[i], negs[i]) for i, h in enumerate(self._heads)]
                return _stacked(
                    [
                        h._prefill_planned(Vs[i], Q[i], new_ids, start, eps, plan)
                        for i, (h, plan) in enumerate(zip(self._heads, plans))
                    ]
                )
            chunk_ids = np.arange(start, start + c, dtype=np.int64) if new_ids is None else new_ids
            results = [
                _query.prefill(h._view(), K[i], Vs[i], Q[i], chunk_ids, self.p, eps)
                for i, h in enumerate(self._heads)
            ]
            if (
                c == 1 and new_ids is None and start == self._heads[0].next_id
            ):  # a decode step: one row each
                for i, head in enumerate(self._heads):
                    head._append_token(K[i, 0], Vs[i, 0])
            elif c:
                for i, head in enumerate(self._heads):
                    head._ingest(K[i], Vs[i], new_ids, start, srt)
        return _stacked(results)

    def _summarise_pending(self) -> None:
        """Summarise every head's newly buffered rows for queries in one compiled call (the live path)."""
        batches = [h._live_batch() for h in self._heads]
        ready = [b for b in batches if b is not None]
        if len(ready) != len(batches) or len({b[1].shape[0] for b in ready}) != 1:
            return
        keeps = tuple(np.empty(b[1].shape[0], dtype=np.bool_) for b in ready)
        add_rows_and_bound_heads(
            tuple(b[1] for b in ready),
            tuple(b[0].gram for b in ready),
            tuple(b[2] for b in ready),
            np.array([b[3] for b in ready]),
            keeps,
        )
        for head, batch, keep in zip(self._heads, ready, keeps):
            batch[0].accept(head._store, head._store.n, keep)

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
        out._heads = heads
        out._lock = threading.RLock()
        return out

    def __reduce__(self) -> tuple:
        return (MultiHeadKeySketch.from_bytes, (self.to_bytes(),))

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`to_bytes` to ``path`` atomically."""
        _serialize.write_atomic(path, self.to_bytes())


def _stacked(results: list[AttentionResult]) -> AttentionResult:
    """Per-head results as one result with a head axis in front (entries as a list)."""
    outputs = [r.output for r in results]
    return AttentionResult(
        [r.entries for r in results],
        np.stack([r.heavy_output for r in results]),
        np.stack([r.captured_mass for r in results]),
        None if outputs[0] is None else np.stack([o for o in outputs if o is not None]),
    )
