"""``RowStore``: key rows with their ids (and value rows, when values travel with keys), in one growable block.

One store serves a sketch for both of its row sets: the *candidates* (keys folded into the normaliser summary
whose leverage score may still reach ``eps``) and, after them, the *pending* rows (the input buffer: keys fed
but not yet folded in).  Every operation that moves rows — append, drop the rows that failed a test, sort, copy,
serialize — moves ids, keys and values together, so no caller reorders parallel arrays by hand.

Storage grows geometrically (by half) with what is held and is trimmed on request (:meth:`trim`), so its size
follows the rows held, not a capacity fixed in advance; an input buffer whose growth would reach half its full
size is given its full size at once (:meth:`RowStore.reserve`).  Key rows are kept in the precision they arrived
in: float32 while every key held is float32 (exact: all arithmetic on them is float64), float64 as soon as a key
of another type joins them (the float32 rows are widened exactly).  Value rows are float64.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from ._kernels.ingest import copy_sq_total

#: Smallest allocation (rows) once anything is stored.
_MIN_ROWS = 16

#: Growth factor of the allocation: amortised O(1) copies per row, at most this much unused room after growth.
_GROWTH = 1.5

#: An input buffer given its full size (``RowStore.reserve``) of at least this many bytes is allocated afresh (the
#: rows held copied once) rather than extended in place: NumPy asks the kernel for transparent huge pages for
#: allocations this large, and rows written to them for the first time then fault in 2 MiB pages, not 4 KiB ones.
#: A 4 KiB fault costs 2.8-4.7 us on the virtual machines of benchmarks/RESULTS.md (a stream's input buffer of 8192
#: rows of d = 64 touches 1 024 of them, per head), the huge pages about a sixth of that per 4 KiB.
_FRESH_BYTES = 1 << 22

#: What the live step's kernel (``append_row_and_keep``) gets for the value rows of a store without values (writable: a
#: read-only array is another type to the compiled kernel, which would be compiled twice).
_NO_VALUE_ROWS = np.zeros((0, 0))
_NO_VALUE_ROW = np.zeros(0)


def _set_rows(
    store: RowStore, name: str, rows: int, dtype: type | None = None, buffer: bool = False
) -> None:
    """Give the array ``store.<name>`` room for ``rows`` rows, its first ``store.n`` rows kept (``dtype``: a new
    type for them, widened exactly).  In place when nothing else references the array (NumPy's ``resize``
    checks: a snapshot or a view holding it makes it copy instead): the allocator then extends the block without
    copying the rows held into freshly mapped pages.  An input buffer given its full size (``buffer``) of
    ``_FRESH_BYTES`` or more goes to a new array instead, whose huge pages make the first touch of the rows to
    come cheaper than the copy of the few held."""
    arr = getattr(store, name)
    try:
        setattr(store, name, None)  # only the local reference is left, so that the check can pass
        # afresh only for the input buffer: elsewhere (candidates appended, trims) a copy of many rows costs more
        # than the page faults it saves (measured: a d = 384 build 5% slower with every large growth afresh)
        itemsize = np.dtype(dtype or arr.dtype).itemsize
        fresh = buffer and rows * itemsize * int(np.prod(arr.shape[1:])) >= _FRESH_BYTES
        if not fresh and (dtype is None or dtype == arr.dtype):
            try:
                arr.resize((rows, *arr.shape[1:]), refcheck=True)
                return
            except ValueError:  # referenced elsewhere, or not owning its memory
                pass
        out = np.empty((rows, *arr.shape[1:]), dtype=dtype or arr.dtype)
        k = min(store.n, rows)
        out[:k] = arr[:k]
        arr = out
    finally:  # the grown array, the copy, or (should anything fail) the array unchanged
        setattr(store, name, arr)


class StoreState(NamedTuple):
    """What :meth:`RowStore.snapshot` saves besides the rows (those stay in the store's arrays, saved as needed)."""

    n: int
    ids_sorted: bool


class _SavedRows:
    """The rows of a snapshot's arrays overwritten in place since :meth:`RowStore.snapshot`, each saved just before
    its first overwrite: ``saved`` the ranges saved (sorted, disjoint), ``pieces`` the rows ``(row, ids, keys,
    values)``.

    The snapshot's arrays are the store's own, held by no reference here (so that the store can still grow them in
    place: NumPy resizes an array in place only when nothing else references it) until the store moves to new
    arrays; ``arrays`` then holds them (``(ids, keys, values)``; None before)."""

    __slots__ = ("arrays", "end", "pieces", "saved")

    def __init__(self, n: int) -> None:
        self.arrays: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None = None
        self.end = n
        self.saved: list[tuple[int, int]] = []
        self.pieces: list[tuple[int, np.ndarray, np.ndarray, np.ndarray | None]] = []

    def save(self, store: RowStore, start: int, stop: int) -> None:
        """Rows ``start..stop-1`` of ``store`` (whose arrays are still the snapshot's) are about to be overwritten:
        save those of the snapshot not saved yet."""
        a, b = max(start, 0), min(stop, self.end)
        if a >= b:
            return
        gaps, at = [], a
        for s, e in self.saved:
            if e <= at:
                continue
            if s >= b:
                break
            if s > at:
                gaps.append((at, s))
            at = e
            if at >= b:
                break
        if at < b:
            gaps.append((at, b))
        pieces = []  # copied before any is recorded: should a copy fail, nothing has changed
        for s, e in gaps:
            values = None if store.values is None else store.values[s:e].copy()
            pieces.append((s, store.ids[s:e].copy(), store.keys[s:e].copy(), values))
        self.pieces += pieces
        merged: list[tuple[int, int]] = []
        for s, e in sorted(self.saved + gaps):
            if merged and s <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], e))
            else:
                merged.append((s, e))
        self.saved = merged

    def put_back(self, store: RowStore) -> None:
        """Write the saved rows back into the snapshot's arrays (``store``'s again)."""
        for a, ids, keys, values in self.pieces:
            b = a + ids.shape[0]
            store.ids[a:b], store.keys[a:b] = ids, keys
            if store.values is not None:
                store.values[a:b] = values


class RowStore:
    """Rows ``keys[:n]`` (shape (n, dim)), ``ids[:n]`` (int64) and optional ``values[:n]`` (shape (n, value_dim)).

    Examples
    --------
    >>> import numpy as np
    >>> from levstream._store import RowStore
    >>> s = RowStore(2, value_dim=1)
    >>> s.append(np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), np.array([7, 8, 9]), np.ones((3, 1)))
    >>> s.keep_from(0, np.array([True, False, True]))
    >>> s.ids_view().tolist(), s.n
    ([7, 9], 2)
    >>> f = RowStore(2)
    >>> f.append(np.ones((2, 2), dtype=np.float32), np.array([0, 1]))
    >>> f.keys.dtype.name                           # float32 keys are kept as float32
    'float32'
    """

    __slots__ = ("_saved", "dim", "ids", "ids_sorted", "keys", "n", "value_dim", "values")

    def __init__(self, dim: int, value_dim: int | None = None) -> None:
        self.dim = int(dim)
        self.value_dim = None if value_dim is None else int(value_dim)
        self.ids = np.empty(0, dtype=np.int64)
        self.keys = np.empty((0, self.dim))
        self.values = None if value_dim is None else np.empty((0, int(value_dim)))
        self.n = 0
        #: whether ``ids[:n]`` is strictly increasing (queries then need not sort their entries by id)
        self.ids_sorted = True
        #: a snapshot's rows, saved as they are overwritten in place (None: no snapshot)
        self._saved: _SavedRows | None = None

    # ------------------------------------------------------------------ views
    def __len__(self) -> int:
        return self.n

    def ids_view(self, start: int = 0) -> np.ndarray:
        return self.ids[start : self.n]

    def keys_view(self, start: int = 0) -> np.ndarray:
        return self.keys[start : self.n]

    def values_view(self, start: int = 0) -> np.ndarray | None:
        return None if self.values is None else self.values[start : self.n]

    @property
    def held_dtype(self) -> type:
        """The type of the key rows held: float32 when every row held is float32 (none held: float64)."""
        return np.float32 if self.n and self.keys.dtype == np.float32 else np.float64

    @property
    def capacity(self) -> int:
        """Rows allocated (the keys and values have room for at least as many)."""
        return int(self.ids.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes allocated: at most about 1.5 times the bytes of the rows held, or of the rows held once the input
        buffer is full (``reserve``'s ``fill_to``), plus any room kept by :meth:`trim`."""
        extra = 0 if self.values is None else self.values.nbytes
        return int(self.ids.nbytes + self.keys.nbytes + extra)

    # ------------------------------------------------------------------ growth
    def _key_dtype(self, new: np.dtype) -> type:
        """Storage type once keys of type ``new`` join the rows held: float32 only if all are float32."""
        same = self.n == 0 or self.keys.dtype == np.float32
        return np.float32 if new == np.float32 and same else np.float64

    def _resize(self, rows: int, key_dtype: type | None = None, buffer: bool = False) -> None:
        # (NumPy resizes an array to its own size in place, shared or not.)  A retype goes to new arrays too, all
        # allocated before any is taken: a widening that failed after the keys would leave them widened
        retype = key_dtype is not None and key_dtype != self.keys.dtype
        if self._snapshot_held():
            # a growth under a snapshot: in place when nothing else references the arrays (rows already held stay
            # where they are, so the snapshot still holds them); otherwise, or for anything else, new arrays
            if retype or buffer or rows <= self.capacity or not self._grow_in_place(rows):
                self._unshare(key_dtype, rows)
            return
        if retype:
            self._unshare(key_dtype, rows)
            return
        # ids last: ``capacity`` is their length, so should a growth fail halfway (out of memory) the store
        # still claims only the room every array has, and the next growth tries again
        _set_rows(self, "keys", rows, key_dtype, buffer)
        if self.values is not None:
            _set_rows(self, "values", rows, None, buffer)
        _set_rows(self, "ids", rows)

    def _grow_in_place(self, rows: int) -> bool:
        """Give every array room for ``rows`` rows by NumPy's in-place resize (the allocator extends the block);
        False when one cannot be (referenced elsewhere, or not owning its memory): the arrays grown so far keep
        their room, the same objects with the same rows."""
        # ids last, as in _resize: their length is the capacity
        for name in ("keys", "values", "ids"):
            arr = getattr(self, name)
            if arr is None:
                continue
            try:
                # only the local reference is left, so that the check can pass (inside the try: an interruption
                # right after it still puts the array back)
                setattr(self, name, None)
                arr.resize((rows, *arr.shape[1:]), refcheck=True)
            except ValueError:
                return False
            finally:
                setattr(self, name, arr)
        return True

    def _leave_arrays(self) -> None:
        """The store is about to move to new arrays: a snapshot that holds the current ones keeps them."""
        saved = self._saved
        if saved is not None and saved.arrays is None:
            saved.arrays = (self.ids, self.keys, self.values)

    def _unshare(self, key_dtype: type | None = None, rows: int | None = None) -> None:
        """Copy the rows held into new arrays of the store's own, with room for ``rows`` rows (default: the same
        room) and keys as ``key_dtype`` (:meth:`_move_to_new_arrays`)."""
        n, rows = self.n, self.capacity if rows is None else max(int(rows), self.n)

        def rows_held(new: np.ndarray, old: np.ndarray) -> None:
            new[:n] = old[:n]

        self._move_to_new_arrays(rows, rows_held, key_dtype)

    def _move_to_new_arrays(
        self,
        rows: int,
        fill: Callable[[np.ndarray, np.ndarray], None],
        key_dtype: type | None = None,
    ) -> None:
        """Move the store to new arrays with room for ``rows`` rows (keys as ``key_dtype``), each filled by
        ``fill(new, old)`` from the current one.  All are allocated and filled before any is taken: should one
        allocation fail, nothing has changed; a snapshot holding the current ones keeps them (only then:
        :meth:`_leave_arrays`)."""
        keys = np.empty((rows, self.dim), dtype=key_dtype or self.keys.dtype)
        ids = np.empty(rows, dtype=np.int64)
        values = None if self.values is None else np.empty((rows, self.values.shape[1]))
        for new, old in ((keys, self.keys), (ids, self.ids), (values, self.values)):
            if new is not None and old is not None:
                fill(new, old)
        self._leave_arrays()
        self.keys, self.ids, self.values = keys, ids, values

    def reserve(self, rows: int, key_dtype: type | None = None, fill_to: int = 0) -> None:
        """Make room for ``rows`` rows in all (geometric growth), with keys stored as ``key_dtype``.

        ``fill_to``: the rows the store will hold once its owner's input buffer is full.  A growth that would
        reach half of it goes all the way, so that a buffer refilled block after block is allocated once (and in
        huge pages: ``_FRESH_BYTES``) instead of in a series of ever larger steps."""
        retype = key_dtype is not None and key_dtype != self.keys.dtype
        if rows > self.capacity or retype:
            grown, buffer = self.capacity, False
            if rows > self.capacity:
                grown = max(rows, int(_GROWTH * self.capacity), _MIN_ROWS)
                if 2 * grown >= fill_to > grown:
                    grown, buffer = fill_to, True
            self._resize(grown, key_dtype, buffer)

    def room_for(self, keys: np.ndarray, fill_to: int = 0) -> None:
        """Grow now, if needed, for ``keys`` (shape (m, dim)) to be appended (see :meth:`reserve` for
        ``fill_to``)."""
        if self.n + keys.shape[0] > self.capacity:
            self.reserve(self.n + keys.shape[0], self._key_dtype(keys.dtype), fill_to)

    def trim(self, room: int = 0, slack: float = 1.25) -> None:
        """Release storage beyond ``n + room`` rows when the allocation exceeds ``slack`` times that.

        A sketch trims tightly when it settles (``flush``, ``merge``) and loosely (``slack=2``) while it
        streams, so that the room its input buffer refills is not released and reallocated block after block.
        """
        want = max(self.n + int(room), _MIN_ROWS if self.n else 0)
        if self.capacity > slack * want + _MIN_ROWS:
            self._resize(want)

    # ------------------------------------------------------------------ appends
    def stage(self, keys: np.ndarray) -> np.ndarray:
        """Copy ``keys`` (shape (m, dim)) into the room after row ``n`` without adding them; returns the staged
        rows (a view).  :meth:`commit` adds them; anything else appended first overwrites them."""
        m = keys.shape[0]
        n = self.n
        self.reserve(n + m, self._key_dtype(keys.dtype))
        self._save_rows(n, n + m)
        self.keys[n : n + m] = keys
        return self.keys[n : n + m]

    def stage_checked(self, keys: np.ndarray) -> float:
        """:meth:`stage` and, in the same pass, the sum of all squared entries of ``keys`` in float64 (nan/inf
        iff a key holds a nan/inf or the squares overflow: the caller then commits nothing)."""
        m = keys.shape[0]
        n = self.n
        self.reserve(n + m, self._key_dtype(keys.dtype))
        self._save_rows(n, n + m)
        return float(copy_sq_total(keys, self.keys[n : n + m]))

    def commit(
        self, ids: np.ndarray, values: np.ndarray | None = None, increasing: bool = False
    ) -> None:
        """Add the ``len(ids)`` rows staged by :meth:`stage`, with their ids and value rows."""
        m = ids.shape[0]
        if m == 0:
            return
        n = self.n
        self._save_rows(n, n + m)
        self.ids[n : n + m] = ids
        if self.values is not None:
            self.values[n : n + m] = values
        if self.ids_sorted:
            after = n == 0 or ids[0] > self.ids[n - 1]
            self.ids_sorted = bool(after and (increasing or m == 1 or (np.diff(ids) > 0).all()))
        self.n = n + m

    def append(
        self,
        keys: np.ndarray,
        ids: np.ndarray,
        values: np.ndarray | None = None,
        increasing: bool = False,
    ) -> None:
        """Append rows (float32 or float64 keys of shape (m, dim), int64 ids, values of shape (m, value_dim) when
        the store holds values).  ``increasing=True`` promises that ``ids`` is strictly increasing (saves a
        check)."""
        if keys.shape[0] == 0:
            return
        self.stage(keys)
        self.commit(ids, values, increasing)

    def room_for_row(self, key: np.ndarray, fill_to: int = 0) -> None:
        """Grow now, if needed, so that :meth:`append_row` of ``key`` allocates nothing (may raise; the rows held
        do not change; ``fill_to`` as for :meth:`reserve`)."""
        if key.dtype != self.keys.dtype or self.n == self.capacity:
            self.reserve(self.n + 1, self._key_dtype(key.dtype), fill_to)

    def append_row(self, key: np.ndarray, key_id: int, value: np.ndarray | None = None) -> None:
        """Append one row (the live path: no temporary arrays)."""
        n = self.n
        if key.dtype != self.keys.dtype or n == self.capacity:
            self.reserve(n + 1, self._key_dtype(key.dtype))
        self.keys[n] = key
        self.ids[n] = key_id
        if self.values is not None:
            self.values[n] = value
        if self.ids_sorted and n and key_id <= self.ids[n - 1]:
            self.ids_sorted = False
        self.n = n + 1

    def appended(self, key_id: int) -> None:
        """Account for row ``n``, written in place by a compiled kernel (a live step's arrival), id ``key_id``."""
        n = self.n
        if self.ids_sorted and n and key_id <= self.ids[n - 1]:
            self.ids_sorted = False
        self.n = n + 1

    def extend(self, other: RowStore) -> None:
        """Append every row of ``other`` (same dim and value_dim)."""
        self.append(other.keys_view(), other.ids_view(), other.values_view())

    def scale_keys(self, factor: float) -> None:
        """Multiply every key row held by ``factor`` (a decaying stream's change of reference frame; exact for a
        power of 2 in float64).  float32 keys are widened to float64 first (exactly): in float32 the scaled rows
        would leave its far smaller range."""
        if self._snapshot_held() or (self.keys.dtype != np.float64 and factor != 1.0):
            self._resize(self.capacity, np.float64)
        self.keys[: self.n] *= factor

    # ------------------------------------------------------------------ drops
    def keep_from(self, start: int, mask: np.ndarray) -> None:
        """Keep, among rows ``start..n-1``, those where ``mask`` is true (in order); rows before ``start`` stay.

        Storage is not released here (see :meth:`trim`): a sketch refills its input buffer right after.
        """
        index = np.flatnonzero(mask)
        k = index.size
        if k == self.n - start:
            return
        src = index + start
        if self._snapshot_held() and k >= start:
            # the rows overwritten would be saved for the snapshot first, then written, and a trim after would copy
            # them again: the rows kept gathered into new arrays are one copy (a prune: ``start`` 0)
            self._move_kept(start, src)
            return
        # all or nothing: every array is gathered before any is written (a failure, out of memory, changes nothing)
        keys, ids = self.keys[src], self.ids[src]
        values = None if self.values is None else self.values[src]
        self._save_rows(start, start + k)
        self.keys[start : start + k] = keys
        self.ids[start : start + k] = ids
        if self.values is not None:
            self.values[start : start + k] = values
        self.n = start + k

    def _move_kept(self, start: int, src: np.ndarray) -> None:
        """Rows ``0..start-1``, then rows ``src``, into new arrays of the same room (:meth:`_move_to_new_arrays`)."""
        k = start + src.shape[0]

        def rows_kept(new: np.ndarray, old: np.ndarray) -> None:
            new[:start] = old[:start]
            np.take(old, src, axis=0, out=new[start:k])

        self._move_to_new_arrays(self.capacity, rows_kept)
        self.n = k

    def sort_by_id(self) -> None:
        """Order all rows by id (merges and caller-given ids can leave them unordered)."""
        if self.ids_sorted:
            return
        self.permute(np.argsort(self.ids[: self.n], kind="stable"))

    def permute(self, order: np.ndarray) -> None:
        """Put the rows in the order ``order`` (a permutation of ``0..n-1``): row ``i`` becomes the old row
        ``order[i]``."""
        n = self.n
        if self._snapshot_held():
            self._resize(self.capacity)
        self.keys[:n] = self.keys[:n][order]
        self.ids[:n] = self.ids[:n][order]
        if self.values is not None:
            self.values[:n] = self.values[:n][order]
        self.ids_sorted = bool(n < 2 or (self.ids[1:n] > self.ids[: n - 1]).all())

    # ------------------------------------------------------------------ undo
    def snapshot(self) -> StoreState:
        """The current rows, restorable by :meth:`restore` until :meth:`release`.  No copy is made now: a row is
        saved just before it is first overwritten in place (a sketch's fold overwrites few: the rows it keeps of
        the input buffer, the candidates a prune keeps); a growth extends the arrays in place when it can (the
        rows held do not move), and a rewrite of every row, or a growth that cannot be made in place, moves the
        store to new arrays, leaving the snapshot's as they are."""
        self._saved = _SavedRows(self.n)
        return StoreState(self.n, self.ids_sorted)

    def restore(self, state: StoreState) -> None:
        """Return to the :meth:`snapshot` that gave ``state`` (rows appended since then are dropped)."""
        saved = self._saved
        if saved is not None:
            if saved.arrays is not None:
                self.ids, self.keys, self.values = saved.arrays
            saved.put_back(self)
        self.n, self.ids_sorted = state
        self._saved = None

    def release(self) -> None:
        """Forget the snapshot: rows may be written in place again."""
        self._saved = None

    def _snapshot_held(self) -> bool:
        """Whether a snapshot holds the arrays held (they must then not be rewritten as a whole, nor shrunk, nor
        moved: see :meth:`_resize`)."""
        saved = self._saved
        return saved is not None and saved.arrays is None

    def _save_rows(self, start: int, stop: int) -> None:
        """Rows ``start..stop-1`` are about to be written in place: save those of a snapshot still unsaved (nothing to
        do without a snapshot, or once the arrays are new ones)."""
        saved = self._saved
        if saved is not None and self._snapshot_held():
            saved.save(self, start, stop)

    # ------------------------------------------------------------------ copies and persistence
    def copy(self) -> RowStore:
        out = RowStore.__new__(RowStore)
        out.dim, out.value_dim, out.n, out.ids_sorted = (
            self.dim,
            self.value_dim,
            self.n,
            self.ids_sorted,
        )
        out._saved = None
        out.ids, out.keys = self.ids[: self.n].copy(), self.keys[: self.n].copy()
        out.values = None if self.values is None else self.values[: self.n].copy()
        return out

    def arrays(self, start: int, stop: int, prefix: str) -> dict[str, np.ndarray]:
        """Rows ``start..stop-1`` as named arrays for serialization (``{prefix}_rows``, ``_ids``, ``_values``);
        key rows in the precision they are held in (:attr:`held_dtype`; float32 rows need format version 4)."""
        out: dict[str, np.ndarray] = {
            f"{prefix}_rows": self.keys[start:stop].astype(self.held_dtype, copy=False),
            f"{prefix}_ids": self.ids[start:stop],
        }
        if self.values is not None:
            out[f"{prefix}_values"] = self.values[start:stop]
        return out

    @classmethod
    def from_arrays(
        cls,
        dim: int,
        value_dim: int | None,
        parts: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]],
    ) -> RowStore:
        """A store holding the given ``(keys, ids, values)`` parts one after another (shapes checked)."""
        out = cls(dim, value_dim)
        for keys, ids, values in parts:
            if keys.ndim != 2 or keys.shape[1] != dim or ids.shape != (keys.shape[0],):
                raise ValueError(
                    f"stored rows and ids have inconsistent shapes: rows must be (m, {dim}) with one "
                    f"id each; got {keys.shape} rows and {ids.shape} ids"
                )
            if value_dim is not None and (
                values is None or values.shape != (keys.shape[0], value_dim)
            ):
                raise ValueError(
                    f"stored value rows have inconsistent shapes: must be ({keys.shape[0]}, "
                    f"{value_dim})"
                )
            out.append(keys, ids, values)
        return out
