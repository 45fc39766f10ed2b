"""Immutable query results: :class:`UniversalSet`, :class:`HeavyEntries`, :class:`HeadEntries`, :class:`TopK`."""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import SupportsIndex, overload

import numpy as np


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    a.setflags(write=False)
    return a


@dataclass(frozen=True, eq=False)
class UniversalSet:
    """The keys that can carry a heavy attention entry for *some* query.

    Attributes
    ----------
    ids : ndarray of int64, shape (u,)
        Global key ids, sorted ascending.
    keys : ndarray of float64, shape (u, dim)
        The key rows, in the order of ``ids``.
    scores : ndarray of float64, shape (u,)
        Their sensitivity scores (leverage scores for p = 2) with respect to all keys seen.
    eps : float
        The threshold: every key with sensitivity ``>= eps`` is in the set.
    p : float
        The exponent of ``f(x) = |x|^p``.
    n : int
        Number of keys the sketch has seen.
    margin : float
        Relative margin used for reporting: keys with computed score ``>= eps * (1 - margin)`` are included.
        It exceeds the ``1e-9`` tie tolerance only for ill-conditioned keys or a large ``dim`` (it is
        ``4 rel_error``, which grows as ``dim^2``: docs/theory.md, "Numerics"), where it keeps extra keys rather
        than risk dropping one.

    Examples
    --------
    >>> import numpy as np, levstream as ls
    >>> U = ls.universal_set(np.eye(3), eps=0.5)
    >>> U.ids.tolist(), len(U)
    ([0, 1, 2], 3)
    """

    ids: np.ndarray
    keys: np.ndarray
    scores: np.ndarray
    eps: float
    p: float
    n: int
    margin: float = 0.0

    def __post_init__(self) -> None:
        for name in ("ids", "keys", "scores"):
            object.__setattr__(self, name, _frozen(getattr(self, name)))

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def __contains__(self, key_id: object) -> bool:
        if not isinstance(key_id, (int, np.integer)):
            return False
        i = np.searchsorted(self.ids, key_id)
        return bool(i < self.ids.shape[0] and self.ids[i] == key_id)

    @property
    def size_bound(self) -> float:
        """The a-priori bound ``d / eps`` (p <= 2) or ``d^(p/2) / eps`` (p > 2) on ``len(self)``."""
        d = self.keys.shape[1]
        return d ** max(1.0, self.p / 2.0) / self.eps

    def __repr__(self) -> str:
        return (
            f"UniversalSet(size={len(self)}, eps={self.eps:g}, p={self.p:g}, n={self.n}, "
            f"bound={self.size_bound:g})"
        )


@dataclass(frozen=True, eq=False, slots=True)
class HeavyEntries:
    """Every attention entry ``A[i, key] >= eps`` of a batch of queries, in CSR form (like faiss ``range_search``).

    Attributes
    ----------
    indptr : ndarray of int64, shape (m + 1,)
        Entries of query row ``i`` are ``key_ids[indptr[i]:indptr[i + 1]]``.
    key_ids : ndarray of int64
        Global key ids, ascending within each query row.
    values : ndarray of float64
        The attention values ``A[i, key]``.
    eps : float
        The threshold that was applied.
    lower, upper : ndarray of float64 or None
        Bounds on the true values for approximate normalisers; ``None`` when ``values`` are exact.

    Examples
    --------
    >>> import numpy as np, levstream as ls
    >>> K = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    >>> hits = ls.testing.heavy_entries_dense(np.array([[1.0, 0.0]]), K, eps=0.4, p=2)
    >>> hits.key_ids.tolist(), np.round(hits.values, 3).tolist()
    ([0, 2], [0.5, 0.5])
    >>> [(i, k.tolist()) for i, (k, v) in enumerate(hits)]
    [(0, [0, 2])]
    """

    indptr: np.ndarray
    key_ids: np.ndarray
    values: np.ndarray
    eps: float
    lower: np.ndarray | None = None
    upper: np.ndarray | None = None
    _n_queries: int = field(default=-1, repr=False)

    def __post_init__(self) -> None:
        for name in ("indptr", "key_ids", "values", "lower", "upper"):
            arr = getattr(self, name)
            if arr is not None:
                object.__setattr__(self, name, _frozen(arr))

    @classmethod
    def from_counts(
        cls,
        counts: np.ndarray,
        key_ids: np.ndarray,
        values: np.ndarray,
        eps: float,
        lower: np.ndarray | None = None,
        upper: np.ndarray | None = None,
    ) -> HeavyEntries:
        """Entries from per-row counts (contiguous int64 ids, float64 values, arrays the caller hands over)."""
        if counts.shape[0] == 1:  # one query (a live step): no cumulative sum needed
            indptr = np.array((0, counts[0]), dtype=np.int64)
        else:
            indptr = np.zeros(counts.shape[0] + 1, dtype=np.int64)
            np.cumsum(counts, out=indptr[1:])
        return cls.of(indptr, key_ids, values, eps, lower, upper)

    @classmethod
    def of(
        cls,
        indptr: np.ndarray,
        key_ids: np.ndarray,
        values: np.ndarray,
        eps: float,
        lower: np.ndarray | None = None,
        upper: np.ndarray | None = None,
    ) -> HeavyEntries:
        """Entries from a CSR ``indptr`` (arrays the caller hands over; made read-only, not copied)."""
        key_ids = np.ascontiguousarray(key_ids, dtype=np.int64)
        values = np.ascontiguousarray(values, dtype=np.float64)
        for arr in (indptr, key_ids, values, lower, upper):
            if arr is not None:
                arr.flags.writeable = False
        out = cls.of_frozen(indptr, key_ids, values, eps)
        if lower is not None or upper is not None:
            _set = object.__setattr__
            _set(out, "lower", lower)
            _set(out, "upper", upper)
        return out

    @classmethod
    def of_frozen(
        cls, indptr: np.ndarray, key_ids: np.ndarray, values: np.ndarray, eps: float
    ) -> HeavyEntries:
        """:meth:`of` of exact values in arrays already in final form: contiguous int64 ``indptr``/``key_ids``,
        float64 ``values``, all read-only (the constructor of the live query path, a few microseconds per step)."""
        out = object.__new__(cls)
        # the slots set directly (no __init__, no checks): a live step keeps this cheap, and a loop that keeps
        # every step's result holds no per-object dict (they cost a 4 KiB page every ~10 results)
        _he_indptr(out, indptr)
        _he_key_ids(out, key_ids)
        _he_values(out, values)
        _he_eps(out, float(eps))
        _he_lower(out, None)
        _he_upper(out, None)
        _he_n_queries(out, -1)
        return out

    @property
    def n_queries(self) -> int:
        """Number of query rows."""
        return int(self.indptr.shape[0] - 1)

    def __len__(self) -> int:
        """Total number of heavy entries."""
        return int(self.key_ids.shape[0])

    def rows(self) -> np.ndarray:
        """Query row index of every entry (the expanded ``indptr``)."""
        return np.repeat(np.arange(self.n_queries, dtype=np.int64), np.diff(self.indptr))

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """``(key_ids, values)`` of query row ``i``."""
        if not -self.n_queries <= i < self.n_queries:
            raise IndexError(f"query row must be in [0, {self.n_queries}); got {i}.")
        i %= self.n_queries
        s, e = self.indptr[i], self.indptr[i + 1]
        return self.key_ids[s:e], self.values[s:e]

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for i in range(self.n_queries):
            yield self.row(i)

    def to_scipy(self, n_keys: int):
        """The entries as a ``scipy.sparse.csr_matrix`` of shape ``(m, n_keys)``."""
        import scipy.sparse as sp

        if len(self) and int(self.key_ids.max()) >= n_keys:
            raise ValueError(
                f"n_keys must exceed the largest key id {int(self.key_ids.max())}; got {n_keys}."
            )
        return sp.csr_matrix(  # copies: an ordinary matrix, not a view of this (read-only) result
            (self.values, self.key_ids, self.indptr), shape=(self.n_queries, int(n_keys)), copy=True
        )

    def as_set(self) -> set[tuple[int, int]]:
        """The entries as a set of ``(query_row, key_id)`` pairs (handy in tests)."""
        return set(zip(self.rows().tolist(), self.key_ids.tolist()))

    def __repr__(self) -> str:
        return f"HeavyEntries(queries={self.n_queries}, entries={len(self)}, eps={self.eps:g})"


class HeadEntries(Sequence[HeavyEntries]):
    """The heavy entries of every head of a multi-head query: a read-only sequence with one :class:`HeavyEntries`
    per head (``hits[h]``, built when first read), over arrays that hold the entries of all heads in one block.

    A live step of many heads fills these arrays in one compiled pass; reading them directly costs nothing
    more, and a head's :class:`HeavyEntries` (views of them) is made only for the heads a caller reads.
    ``HeadEntries(heads)`` stacks per-head results (the same query rows and threshold in each).  It is a
    sequence, not a list: ``==`` compares identity (as for :class:`HeavyEntries`), ``list(hits)`` gives a list.

    Attributes
    ----------
    head_starts : ndarray of int64, shape (n_heads + 1,)
        The entries of head ``h`` are ``key_ids[head_starts[h]:head_starts[h + 1]]``.
    indptr : ndarray of int64, shape (n_heads, m + 1)
        ``indptr[h]`` is head ``h``'s :attr:`HeavyEntries.indptr` (offsets within the head's entries).
    key_ids, values : ndarray of int64, float64
        Every head's entries, head by head.
    eps : float
        The threshold that was applied.
    lower, upper : ndarray of float64 or None
        Bounds on the true values (head by head) for approximate normalisers; ``None`` when the values are exact.

    Examples
    --------
    >>> import numpy as np, levstream as ls
    >>> mh = ls.MultiHeadKeySketch(2, 2, eps=0.4)
    >>> _ = mh.update_many(np.array([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 1.0]]]))
    >>> hits = mh.heavy_entries(np.array([[[1.0, 0.0]], [[0.0, 1.0]]]))
    >>> len(hits), [h.key_ids.tolist() for h in hits]
    (2, [[0], [1]])
    >>> hits.head_starts.tolist(), hits.key_ids.tolist()
    ([0, 1, 2], [0, 1])
    """

    __slots__ = ("_heads", "eps", "head_starts", "indptr", "key_ids", "lower", "upper", "values")

    head_starts: np.ndarray
    indptr: np.ndarray
    key_ids: np.ndarray
    values: np.ndarray
    eps: float
    lower: np.ndarray | None
    upper: np.ndarray | None
    _heads: dict[int, HeavyEntries]

    def __init__(self, heads: Sequence[HeavyEntries]) -> None:
        heads = list(heads)
        if not heads:
            raise ValueError("HeadEntries needs at least one head; got none.")
        for what, got in (
            ("query rows", [h.n_queries for h in heads]),
            ("threshold eps", [h.eps for h in heads]),
        ):
            if any(g != got[0] for g in got):
                raise ValueError(f"every head must have the same {what}; got {got}.")
        starts = np.zeros(len(heads) + 1, dtype=np.int64)
        np.cumsum([len(h) for h in heads], out=starts[1:])

        def bounds(name: str) -> np.ndarray | None:
            arrays = [getattr(h, name) for h in heads]
            if all(a is None for a in arrays):
                return None
            # bounds of some heads only: an exact value is its own lower and upper bound
            return _frozen(
                np.concatenate([h.values if a is None else a for h, a in zip(heads, arrays)])
            )

        self._set(
            _frozen(starts),
            _frozen(np.stack([h.indptr for h in heads]).astype(np.int64, copy=False)),
            _frozen(np.concatenate([h.key_ids for h in heads])),
            _frozen(np.concatenate([h.values for h in heads])),
            heads[0].eps,
        )
        _hd_lower(self, bounds("lower"))
        _hd_upper(self, bounds("upper"))
        # the given objects are the heads (no second copy of their arrays)
        self._heads.update(enumerate(heads))

    def _set(
        self,
        head_starts: np.ndarray,
        indptr: np.ndarray,
        key_ids: np.ndarray,
        values: np.ndarray,
        eps: float,
    ) -> None:
        _hd_head_starts(self, head_starts)
        _hd_indptr(self, indptr)
        _hd_key_ids(self, key_ids)
        _hd_values(self, values)
        _hd_eps(self, float(eps))
        _hd_lower(self, None)
        _hd_upper(self, None)
        _hd_heads(self, {})

    @classmethod
    def of_frozen(
        cls,
        head_starts: np.ndarray,
        indptr: np.ndarray,
        key_ids: np.ndarray,
        values: np.ndarray,
        eps: float,
    ) -> HeadEntries:
        """Entries of exact values in arrays already in final form: int64 ``head_starts``, ``indptr``
        (n_heads, m + 1) and ``key_ids``, float64 ``values``, all contiguous and read-only (the live step's
        constructor: no copy, no check)."""
        out = object.__new__(cls)
        out._set(head_starts, indptr, key_ids, values, eps)
        return out

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"HeadEntries is read-only: cannot set {name!r}.")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"HeadEntries is read-only: cannot delete {name!r}.")

    def __len__(self) -> int:
        """Number of heads."""
        return int(self.indptr.shape[0])

    @property
    def n_queries(self) -> int:
        """Number of query rows (per head)."""
        return int(self.indptr.shape[1] - 1)

    @property
    def n_entries(self) -> int:
        """Total number of heavy entries over every head."""
        return int(self.key_ids.shape[0])

    def _head(self, h: int) -> HeavyEntries:
        hits = self._heads.get(h)
        if hits is None:
            # (results with bounds are stacked from their heads, which they hold: only exact values get here)
            s, e = int(self.head_starts[h]), int(self.head_starts[h + 1])
            made = HeavyEntries.of_frozen(
                self.indptr[h], self.key_ids[s:e], self.values[s:e], self.eps
            )
            # setdefault is atomic: threads reading the head at once all get the one object published first
            hits = self._heads.setdefault(h, made)
        return hits

    @overload
    def __getitem__(self, h: SupportsIndex) -> HeavyEntries: ...

    @overload
    def __getitem__(self, h: slice) -> list[HeavyEntries]: ...

    def __getitem__(self, h: SupportsIndex | slice) -> HeavyEntries | list[HeavyEntries]:
        """Head ``h``'s entries (a slice: a list of heads), indexed as a list is."""
        n = len(self)
        if isinstance(h, slice):
            return [self._head(i) for i in range(*h.indices(n))]
        try:
            i = operator.index(h)
        except TypeError:
            raise TypeError(
                f"head index must be an integer or a slice; got {type(h).__name__}."
            ) from None
        if not -n <= i < n:
            raise IndexError(f"head index must be in [{-n}, {n}); got {i}.")
        return self._head(i % n)

    def __iter__(self) -> Iterator[HeavyEntries]:
        for h in range(len(self)):
            yield self._head(h)

    def __reduce__(self) -> tuple[type[HeadEntries], tuple[list[HeavyEntries]]]:
        return HeadEntries, (list(self),)

    def __repr__(self) -> str:
        return (
            f"HeadEntries(heads={len(self)}, queries={self.n_queries}, entries={self.n_entries}, "
            f"eps={self.eps:g})"
        )


@dataclass(frozen=True, eq=False)
class TopK:
    """The ``k`` largest attention entries per query among the keys a sketch holds (a superset of the universal
    set: the candidates and the rows waiting in its input buffer).

    ``key_ids[i]``/``values[i]`` are sorted by decreasing value (ties by key id) and padded with ``-1``/``nan``
    when fewer than ``k`` keys are held.  ``certified[i]`` is true when row ``i`` is provably the true top-``k`` over
    *all* keys: its ``k``-th value is at least ``eps`` while every key outside the universal set has
    ``A < eps``.
    """

    key_ids: np.ndarray
    values: np.ndarray
    certified: np.ndarray
    eps: float

    def __post_init__(self) -> None:
        for name in ("key_ids", "values", "certified"):
            object.__setattr__(self, name, _frozen(getattr(self, name)))

    def __len__(self) -> int:
        return int(self.key_ids.shape[0])

    def __repr__(self) -> str:
        return (
            f"TopK(queries={len(self)}, k={self.key_ids.shape[1]}, "
            f"certified={int(self.certified.sum())}/{len(self)})"
        )


@dataclass(frozen=True, eq=False, slots=True)
class AttentionResult:
    """Attention of a batch of queries over every key fed so far: heavy entries and outputs.

    Attributes
    ----------
    entries : HeavyEntries, or a :class:`HeadEntries` (one HeavyEntries per head) for a multi-head sketch
        Every entry ``A[i, key] >= eps`` (as :meth:`KeySketch.heavy_entries`).
    heavy_output : ndarray of float64, shape (m, value_dim) (``(n_heads, m, value_dim)`` for many heads)
        ``sum_{A_j >= eps} A_j v_j``: the output carried by the heavy entries alone.
    captured_mass : ndarray of float64, shape (m,) (``(n_heads, m)``)
        ``sum_{A_j >= eps} A_j``: the share of the attention the heavy entries carry (1 means all of it).
    output : ndarray of float64 or None
        The exact output ``sum_j A_j v_j`` over *every* key fed (p = 2, ``exact_output=True``); None when the
        sketch does not keep the moment state.  Rows with ``Z = 0`` (no key has any weight) are zero.
    captured_mass_bounds, heavy_output_bounds : (lower, upper) pairs of arrays, or None
        For an approximate normaliser (coreset p, ``delta > 0``): ``heavy_output`` and ``captured_mass`` are
        computed with the coreset's values ``A~``, and the *true* ``sum A_j`` and ``sum A_j v_j`` over the
        returned entries lie within these bounds (``A~ (1 -+ delta)`` per entry, componentwise for the output)
        whenever the coreset normaliser is within ``(1 +- delta)`` of ``Z`` (per query, probability at least
        ``1 - failure_prob``).  None when the values are exact.
    """

    entries: object
    heavy_output: np.ndarray
    captured_mass: np.ndarray
    output: np.ndarray | None = None
    captured_mass_bounds: tuple[np.ndarray, np.ndarray] | None = None
    heavy_output_bounds: tuple[np.ndarray, np.ndarray] | None = None

    @classmethod
    def of_frozen(
        cls,
        entries: HeavyEntries,
        heavy_output: np.ndarray,
        captured_mass: np.ndarray,
        output: np.ndarray | None,
    ) -> AttentionResult:
        """A result of exact values from read-only arrays in final form (the decode step's constructor: no
        checks, no copies)."""
        out = object.__new__(cls)
        _ar_entries(out, entries)
        _ar_heavy_output(out, heavy_output)
        _ar_captured_mass(out, captured_mass)
        _ar_output(out, output)
        _ar_captured_mass_bounds(out, None)
        _ar_heavy_output_bounds(out, None)
        return out

    def __post_init__(self) -> None:
        for name in ("captured_mass_bounds", "heavy_output_bounds"):
            pair = getattr(self, name)
            if pair is not None:
                object.__setattr__(self, name, (_frozen(pair[0]), _frozen(pair[1])))
        for name in ("heavy_output", "captured_mass", "output"):
            arr = getattr(self, name)
            if arr is not None:
                flags = arr.flags
                # fresh arrays of the query path (numpy's, or a compiled kernel's: their base is not an array)
                if flags.c_contiguous and (flags.owndata or not isinstance(arr.base, np.ndarray)):
                    flags.writeable = False
                else:
                    object.__setattr__(self, name, _frozen(arr))

    def __repr__(self) -> str:
        exact = "exact output" if self.output is not None else "no exact output"
        return f"AttentionResult(queries={self.captured_mass.shape[-1]}, {exact})"


def _getstate(self: object) -> tuple:
    """The fields' values, in order (what a slotted frozen dataclass pickles)."""
    return tuple(getattr(self, f.name) for f in fields(self))  # type: ignore[arg-type]


def _setstate(self: object, state: tuple | dict) -> None:
    """Restore from :func:`_getstate`'s tuple, or from a ``__dict__`` (what the classes without slots pickle, and
    what earlier versions of the others did, so results pickled then load with their fields, not their names).
    Arrays come back read-only, as the results were (pickle and deepcopy hand them over writeable)."""
    items = state.items() if isinstance(state, dict) else zip((f.name for f in fields(self)), state)  # type: ignore[arg-type]
    for name, value in items:
        object.__setattr__(self, name, _frozen(value) if isinstance(value, np.ndarray) else value)


for _cls in (HeavyEntries, AttentionResult):
    setattr(_cls, "__getstate__", _getstate)  # noqa: B010 (set after the class: dataclass makes the slots)
for _result_cls in (HeavyEntries, AttentionResult, UniversalSet, TopK):
    setattr(_result_cls, "__setstate__", _setstate)  # noqa: B010


def _slot_setters(cls: type) -> tuple[Callable[[object, object], None], ...]:
    """The setters of the slots of ``cls``, in the order of its fields (a frozen class: its constructors that
    bypass ``__init__`` set the slots through these)."""
    return tuple(vars(cls)[f.name].__set__ for f in fields(cls))


(_he_indptr, _he_key_ids, _he_values, _he_eps, _he_lower, _he_upper, _he_n_queries) = _slot_setters(
    HeavyEntries
)
(
    _hd_head_starts,
    _hd_indptr,
    _hd_key_ids,
    _hd_values,
    _hd_eps,
    _hd_lower,
    _hd_upper,
    _hd_heads,
) = (
    vars(HeadEntries)[name].__set__
    for name in ("head_starts", "indptr", "key_ids", "values", "eps", "lower", "upper", "_heads")
)
(
    _ar_entries,
    _ar_heavy_output,
    _ar_captured_mass,
    _ar_output,
    _ar_captured_mass_bounds,
    _ar_heavy_output_bounds,
) = _slot_setters(AttentionResult)


def concat_entries(parts: list[HeavyEntries]) -> HeavyEntries:
    """The entries of consecutive batches of query rows, as one (same threshold; bounds kept when all have them)."""
    offsets = np.cumsum([0] + [len(p) for p in parts[:-1]])
    indptr = np.concatenate([[0]] + [p.indptr[1:] + o for p, o in zip(parts, offsets)])
    bounds = {}
    for name in ("lower", "upper"):
        arrays = [getattr(p, name) for p in parts]
        bounds[name] = None if any(a is None for a in arrays) else np.concatenate(arrays)
    return HeavyEntries.of(
        indptr.astype(np.int64),
        np.concatenate([p.key_ids for p in parts]),
        np.concatenate([p.values for p in parts]),
        parts[0].eps,
        **bounds,
    )


def concat_attention(parts: list[AttentionResult]) -> AttentionResult:
    """The results of consecutive batches of query rows (e.g. segments of one causal chunk), as one."""
    outputs = [p.output for p in parts]
    entries = parts[0].entries
    if isinstance(entries, HeavyEntries):
        joined: object = concat_entries([p.entries for p in parts])  # type: ignore[misc]
    else:  # one HeavyEntries per head
        heads = len(entries)  # type: ignore[arg-type]
        joined = HeadEntries(
            [concat_entries([p.entries[h] for p in parts]) for h in range(heads)]  # type: ignore[index]
        )
    axis = parts[0].captured_mass.ndim - 1  # the query axis (after the head axis of many heads)

    def bounds(name: str) -> tuple[np.ndarray, np.ndarray] | None:
        pairs = [getattr(p, name) for p in parts]
        if any(b is None for b in pairs):
            return None
        return (
            np.concatenate([b[0] for b in pairs], axis=axis),
            np.concatenate([b[1] for b in pairs], axis=axis),
        )

    return AttentionResult(
        joined,
        np.concatenate([p.heavy_output for p in parts], axis=axis),
        np.concatenate([p.captured_mass for p in parts], axis=axis),
        None if any(o is None for o in outputs) else np.concatenate(outputs, axis=axis),  # type: ignore[arg-type]
        bounds("captured_mass_bounds"),
        bounds("heavy_output_bounds"),
    )
