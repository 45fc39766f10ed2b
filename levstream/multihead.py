"""``MultiHeadKeySketch``: one :class:`~levstream.KeySketch` per attention head behind a single object.

What is shared and what is per head:

* **shared** — validation of every chunk (done once for all heads), key ids (key ``j`` of every head is
  the same token, so one id stream, one ``offset``/``ids`` check), the bytes container, and the
  heavy-entry query path: the inner products of all heads are one batched BLAS call
  (``np.matmul`` over the head axis) and the thresholding is one numba call over all ``heads x queries``
  rows;
* **per head** — the normaliser summary (each head's ``K_h^T K_h``) and its candidate store, i.e. the
  state of an ordinary ``KeySketch``: every head is folded and pruned exactly as an independent sketch would
  be, so the results equal those of ``n_heads`` independent ``KeySketch`` objects.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import numpy as np

from . import _serialize
from ._config import QUERY_BLOCK_ROWS
from ._config import REPORT_RTOL as TIE_RTOL
from ._kernels.query import threshold_power_csr
from ._validation import as_ids, as_real_array, check_eps, check_finite, check_int, check_p
from .results import HeavyEntries, UniversalSet
from .sketch import KeySketch

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
        Exponent of ``f(x) = |x|^p`` (p = 2 in this version, as for :class:`KeySketch`).
    block_rows : int, optional
        Rows per processing block of each head's sketch.

    Notes
    -----
    Same contract as :class:`KeySketch`, with a head axis in front: chunks have shape
    ``(n_heads, m, dim)``, ``universal_set()`` and ``heavy_entries(Q)`` return one result per head.  For
    p = 2 every per-head result is exact and equal to that of an independent ``KeySketch`` fed the same
    keys.  See the module docstring for what is computed once for all heads.

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

    def __init__(self, n_heads: int, dim: int, *, eps: float, p: float = 2, block_rows: int | None = None) -> None:
        n_heads = check_int(n_heads, "n_heads", minimum=1)
        self._heads = [KeySketch(dim, eps=eps, p=p, block_rows=block_rows) for _ in range(n_heads)]

    # ------------------------------------------------------------------ properties
    @property
    def n_heads(self) -> int:
        return len(self._heads)

    @property
    def dim(self) -> int:
        return self._heads[0].dim

    @property
    def eps(self) -> float:
        return self._heads[0].eps

    @property
    def p(self) -> float:
        return self._heads[0].p

    @property
    def n(self) -> int:
        """Number of keys (tokens) fed so far; every head has seen this many."""
        return self._heads[0].n

    @property
    def num_retained(self) -> int:
        """Key rows held in memory over all heads."""
        return sum(h.num_retained for h in self._heads)

    def is_empty(self) -> bool:
        return self.n == 0

    @property
    def nbytes(self) -> int:
        return sum(h.nbytes for h in self._heads)

    @property
    def next_id(self) -> int:
        return self._heads[0].next_id

    @property
    def heads(self) -> tuple[KeySketch, ...]:
        """The per-head sketches (read-only use; feed keys through this object so the heads stay in step)."""
        return tuple(self._heads)

    def __repr__(self) -> str:
        return (f"MultiHeadKeySketch(n_heads={self.n_heads}, dim={self.dim}, eps={self.eps:g}, p={self.p:g}, "
                f"n={self.n}, retained={self.num_retained})")

    # ------------------------------------------------------------------ ingest
    def _validate_chunk(self, X: Any, name: str) -> np.ndarray:
        arr = as_real_array(X, name)
        H, d = self.n_heads, self.dim
        if arr.ndim != 3 or arr.shape[0] != H or arr.shape[2] != d:
            raise ValueError(f"{name} must have shape (n_heads, m, dim) = ({H}, m, {d}); got shape {arr.shape}.")
        if arr.shape[1] == 0:
            raise ValueError(f"{name} must hold at least one key per head; got shape {arr.shape}.")
        check_finite(arr, name)
        out = np.ascontiguousarray(arr, dtype=np.float64)
        check_finite(out, name)
        return out

    def update_many(self, X: Any, ids: Any = None, offset: Any = None) -> MultiHeadKeySketch:
        """Feed one chunk of keys of every head, shape ``(n_heads, m, dim)``; returns ``self``.

        ``ids``/``offset`` number the ``m`` keys (tokens) as in :meth:`KeySketch.update_many`; they are the
        same for every head.  On a bad chunk, bad ids or an id clash nothing is changed.
        """
        X = self._validate_chunk(X, "X")
        m = X.shape[1]
        if ids is not None:
            ids = as_ids(ids, m)
        # The first head checks ids and offset against the shared id history; the others, holding the same
        # history, then cannot fail, so either every head takes the chunk or none does.
        self._heads[0].update_many(X[0], ids=ids, offset=offset)
        for h in range(1, self.n_heads):
            self._heads[h].update_many(X[h], ids=ids, offset=offset)
        return self

    def update(self, x: Any) -> MultiHeadKeySketch:
        """Feed one key (token) of every head, shape ``(n_heads, dim)``; returns ``self``."""
        arr = as_real_array(x, "x")
        if arr.ndim != 2 or arr.shape != (self.n_heads, self.dim):
            raise ValueError(f"x must have shape (n_heads, dim) = ({self.n_heads}, {self.dim}); got shape "
                             f"{arr.shape}. Use update_many(X) for a chunk of shape (n_heads, m, dim).")
        return self.update_many(arr[:, None, :])

    def extend(self, iterable: Iterable[Any]) -> MultiHeadKeySketch:
        """Feed tokens ``(n_heads, dim)`` and/or chunks ``(n_heads, m, dim)`` from an iterable; returns ``self``.

        All or nothing: if an item is rejected the sketch is restored to its state before the call and the
        error names the item.
        """
        snapshot = [h.copy() for h in self._heads]
        try:
            for index, item in enumerate(iterable):
                try:
                    arr = as_real_array(item, f"item {index}")
                    self.update(arr) if arr.ndim == 2 else self.update_many(arr)
                except (ValueError, TypeError) as exc:
                    raise type(exc)(f"extend: item {index} rejected ({exc}); the sketch was left as before "
                                    "the call.") from exc
        except BaseException:
            self._heads = snapshot
            raise
        return self

    # ------------------------------------------------------------------ merge
    def merge(self, other: MultiHeadKeySketch) -> MultiHeadKeySketch:
        """Fold ``other`` (same n_heads, dim, eps, p; disjoint ids) into this sketch; returns ``self``."""
        if not isinstance(other, MultiHeadKeySketch):
            raise TypeError(f"can only merge a MultiHeadKeySketch; got {type(other).__name__} instead.")
        mine = (self.n_heads, self.dim, self.eps, self.p)
        theirs = (other.n_heads, other.dim, other.eps, other.p)
        if mine != theirs:
            raise ValueError(f"cannot merge sketches with different (n_heads, dim, eps, p): {mine} vs {theirs}.")
        if other is self:
            raise ValueError("cannot merge a sketch with itself (every id would clash).")
        # Head 0 detects id clashes before changing anything; the other heads share its id history.
        self._heads[0].merge(other._heads[0])
        for h in range(1, self.n_heads):
            self._heads[h].merge(other._heads[h])
        return self

    def __iadd__(self, other: MultiHeadKeySketch) -> MultiHeadKeySketch:
        return self.merge(other)

    def __add__(self, other: MultiHeadKeySketch) -> MultiHeadKeySketch:
        return self.copy().merge(other)

    def copy(self) -> MultiHeadKeySketch:
        """An independent deep copy."""
        out = MultiHeadKeySketch.__new__(MultiHeadKeySketch)
        out._heads = [h.copy() for h in self._heads]
        return out

    __copy__ = copy

    def __deepcopy__(self, memo: dict) -> MultiHeadKeySketch:
        return self.copy()

    # ------------------------------------------------------------------ queries
    def universal_set(self) -> list[UniversalSet]:
        """The universal set of every head (exact for p = 2), one :class:`UniversalSet` per head."""
        return [h.universal_set() for h in self._heads]

    def normalizer(self, Q: Any) -> np.ndarray:
        """``Z(q)`` over all keys of each head, for ``Q`` of shape ``(n_heads, m, dim)``; shape (n_heads, m)."""
        Q = self._queries(Q)
        return np.stack([h.normalizer(Q[i]) for i, h in enumerate(self._heads)])

    def _queries(self, Q: Any) -> np.ndarray:
        arr = as_real_array(Q, "Q")
        H, d = self.n_heads, self.dim
        if arr.ndim != 3 or arr.shape[0] != H or arr.shape[2] != d:
            raise ValueError(f"Q must have shape (n_heads, m, dim) = ({H}, m, {d}); got shape {arr.shape}.")
        check_finite(arr, "Q")
        return np.ascontiguousarray(arr, dtype=np.float64)

    def heavy_entries(self, Q: Any, eps: float | None = None) -> list[HeavyEntries]:
        """Every entry ``A_h[i, j] >= eps`` of each head's attention, for ``Q`` of shape ``(n_heads, m, dim)``.

        Returns one :class:`HeavyEntries` per head, equal to ``KeySketch.heavy_entries`` of an independent
        sketch of that head.  Inner products of all heads are one batched matrix product and the
        thresholding is one numba call over all ``n_heads x m`` query rows.
        """
        Q = self._queries(Q)
        eps = self.eps if eps is None else check_eps(eps)
        if eps < self.eps:
            raise ValueError(f"eps must be >= the sketch's eps ({self.eps:g}); got {eps:g}. "
                             "Build the sketch with a smaller eps to query lower thresholds.")
        H, m, d = Q.shape
        sets = self.universal_set()
        keep = [U.scores >= eps * (1.0 - U.margin) for U in sets]
        widths = [int(k.sum()) for k in keep]
        width = max(widths + [1])
        # Candidates of all heads padded to one width: padded columns are zero rows, whose weight 0 is never
        # reported (the threshold is positive), so one kernel call serves every head.
        C = np.zeros((H, width, d))
        col_ids = np.zeros((H, width), dtype=np.int64)
        for h, (U, k) in enumerate(zip(sets, keep)):
            C[h, :widths[h]] = U.keys[k]
            col_ids[h, :widths[h]] = U.ids[k]
        Z = self.normalizer(Q)
        thresh = eps * (1.0 - TIE_RTOL)
        positions = np.arange(width, dtype=np.int64)
        counts = np.zeros((H, m), dtype=np.int64)
        keys: list[list[np.ndarray]] = [[] for _ in range(H)]
        vals: list[list[np.ndarray]] = [[] for _ in range(H)]
        for start in range(0, m, QUERY_BLOCK_ROWS):
            stop = min(m, start + QUERY_BLOCK_ROWS)
            P = np.matmul(Q[:, start:stop], C.transpose(0, 2, 1))       # (H, b, width), one batched BLAS call
            c, pos, v = threshold_power_csr(P.reshape(-1, width), np.ascontiguousarray(Z[:, start:stop]).ravel(),
                                            2.0, thresh, positions)
            c = c.reshape(H, stop - start)
            counts[:, start:stop] = c
            bounds = np.concatenate([[0], np.cumsum(c.sum(axis=1))])
            for h in range(H):
                keys[h].append(col_ids[h][pos[bounds[h]:bounds[h + 1]]])
                vals[h].append(v[bounds[h]:bounds[h + 1]])
        out = []
        for h in range(H):
            k = np.concatenate(keys[h]) if keys[h] else np.zeros(0, np.int64)
            v = np.concatenate(vals[h]) if vals[h] else np.zeros(0)
            out.append(HeavyEntries.from_counts(counts[h], k, v, eps))
        return out

    # ------------------------------------------------------------------ persistence
    def to_bytes(self) -> bytes:
        """Serialize (versioned, checksummed): every head's ``KeySketch`` bytes in one container."""
        meta = {"kind": _KIND, "n_heads": self.n_heads, "dim": self.dim, "eps": self.eps, "p": self.p}
        arrays = {f"head{h}": np.frombuffer(sk.to_bytes(), dtype=np.uint8) for h, sk in enumerate(self._heads)}
        return _serialize.pack(meta, arrays)

    @classmethod
    def from_bytes(cls, data: bytes) -> MultiHeadKeySketch:
        """Inverse of :meth:`to_bytes`; raises ``ValueError`` for corrupted, truncated or foreign bytes."""
        meta, arrays, _ = _serialize.unpack(data)
        try:
            if meta.get("kind") != _KIND:
                raise ValueError(f"bytes hold a {meta.get('kind')!r}, not a {_KIND}")
            H = check_int(meta["n_heads"], "n_heads", minimum=1)
            heads = [KeySketch.from_bytes(arrays[f"head{h}"].tobytes()) for h in range(H)]
            header = (int(meta["dim"]), float(meta["eps"]), check_p(meta["p"]))
            for sk in heads:
                if (sk.dim, sk.eps, sk.p) != header or sk.n != heads[0].n:
                    raise ValueError("heads disagree with the header or with each other")
        except (KeyError, TypeError) as exc:
            raise ValueError(f"serialized multi-head sketch is malformed: {exc}.") from exc
        out = cls.__new__(cls)
        out._heads = heads
        return out

    def __reduce__(self):
        return (MultiHeadKeySketch.from_bytes, (self.to_bytes(),))

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`to_bytes` to ``path`` atomically."""
        _serialize.write_atomic(path, self.to_bytes())
