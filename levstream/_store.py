"""``RowStore``: key rows with their ids (and value rows, when values travel with keys), in one growable block.

One store serves a sketch for both of its row sets: the *candidates* (keys folded into the normaliser summary
whose leverage score may still reach ``eps``) and, after them, the *pending* rows (the input buffer: keys fed
but not yet folded in).  Every operation that moves rows — append, drop the rows that failed a test, sort, copy,
serialize — moves ids, keys and values together, so no caller reorders parallel arrays by hand.

Storage grows geometrically with what is held and shrinks after large drops, so its size follows the rows
held, not a capacity fixed in advance.
"""

from __future__ import annotations

import numpy as np

#: Smallest allocation (rows) once anything is stored.
_MIN_ROWS = 16


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
    """

    __slots__ = ("dim", "value_dim", "ids", "keys", "values", "n", "ids_sorted")

    def __init__(self, dim: int, value_dim: int | None = None) -> None:
        self.dim = int(dim)
        self.value_dim = None if value_dim is None else int(value_dim)
        self.ids = np.empty(0, dtype=np.int64)
        self.keys = np.empty((0, self.dim))
        self.values = None if value_dim is None else np.empty((0, self.value_dim))
        self.n = 0
        #: whether ``ids[:n]`` is strictly increasing (queries then need not sort their entries by id)
        self.ids_sorted = True

    # ------------------------------------------------------------------ views
    def __len__(self) -> int:
        return self.n

    def ids_view(self, start: int = 0) -> np.ndarray:
        return self.ids[start:self.n]

    def keys_view(self, start: int = 0) -> np.ndarray:
        return self.keys[start:self.n]

    def values_view(self, start: int = 0) -> np.ndarray | None:
        return None if self.values is None else self.values[start:self.n]

    @property
    def nbytes(self) -> int:
        """Bytes allocated (storage grows geometrically, so at most about twice the bytes of the rows held)."""
        extra = 0 if self.values is None else self.values.nbytes
        return int(self.ids.nbytes + self.keys.nbytes + extra)

    # ------------------------------------------------------------------ growth
    def _resize(self, rows: int) -> None:
        n = self.n
        ids = np.empty(rows, dtype=np.int64)
        keys = np.empty((rows, self.dim))
        ids[:n], keys[:n] = self.ids[:n], self.keys[:n]
        self.ids, self.keys = ids, keys
        if self.values is not None:
            values = np.empty((rows, self.values.shape[1]))
            values[:n] = self.values[:n]
            self.values = values

    def reserve(self, rows: int) -> None:
        """Make room for ``rows`` rows in all (amortised doubling)."""
        if rows > self.ids.shape[0]:
            self._resize(max(rows, 2 * self.ids.shape[0], _MIN_ROWS))

    def _shrink_if_sparse(self) -> None:
        cap = self.ids.shape[0]
        if cap > 4 * max(self.n, _MIN_ROWS):
            self._resize(max(2 * self.n, _MIN_ROWS))

    # ------------------------------------------------------------------ appends
    def append(self, keys: np.ndarray, ids: np.ndarray, values: np.ndarray | None = None,
               increasing: bool = False) -> None:
        """Append rows (float64 keys of shape (m, dim), int64 ids, values of shape (m, value_dim) when the store
        holds values).  ``increasing=True`` promises that ``ids`` is strictly increasing (saves a check)."""
        m = keys.shape[0]
        if m == 0:
            return
        n = self.n
        self.reserve(n + m)
        self.keys[n:n + m] = keys
        self.ids[n:n + m] = ids
        if self.values is not None:
            self.values[n:n + m] = values
        if self.ids_sorted:
            after = n == 0 or ids[0] > self.ids[n - 1]
            self.ids_sorted = bool(after and (increasing or m == 1 or (np.diff(ids) > 0).all()))
        self.n = n + m

    def append_row(self, key: np.ndarray, key_id: int, value: np.ndarray | None = None) -> None:
        """Append one row (the live path: no temporary arrays)."""
        n = self.n
        if n == self.ids.shape[0]:
            self.reserve(n + 1)
        self.keys[n] = key
        self.ids[n] = key_id
        if self.values is not None:
            self.values[n] = value
        if self.ids_sorted and n and key_id <= self.ids[n - 1]:
            self.ids_sorted = False
        self.n = n + 1

    def extend(self, other: RowStore) -> None:
        """Append every row of ``other`` (same dim and value_dim)."""
        self.append(other.keys_view(), other.ids_view(), other.values_view())

    # ------------------------------------------------------------------ drops
    def keep_from(self, start: int, mask: np.ndarray) -> None:
        """Keep, among rows ``start..n-1``, those where ``mask`` is true (in order); rows before ``start`` stay."""
        index = np.flatnonzero(mask)
        k = index.size
        if k == self.n - start:
            return
        src = index + start
        self.keys[start:start + k] = self.keys[src]
        self.ids[start:start + k] = self.ids[src]
        if self.values is not None:
            self.values[start:start + k] = self.values[src]
        self.n = start + k
        self._shrink_if_sparse()

    def sort_by_id(self) -> None:
        """Order all rows by id (merges and caller-given ids can leave them unordered)."""
        if self.ids_sorted:
            return
        order = np.argsort(self.ids[:self.n], kind="stable")
        self.keys[:self.n] = self.keys[:self.n][order]
        self.ids[:self.n] = self.ids[:self.n][order]
        if self.values is not None:
            self.values[:self.n] = self.values[:self.n][order]
        self.ids_sorted = True

    # ------------------------------------------------------------------ copies and persistence
    def copy(self) -> RowStore:
        out = RowStore.__new__(RowStore)
        out.dim, out.value_dim, out.n, out.ids_sorted = self.dim, self.value_dim, self.n, self.ids_sorted
        out.ids, out.keys = self.ids[:self.n].copy(), self.keys[:self.n].copy()
        out.values = None if self.values is None else self.values[:self.n].copy()
        return out

    def arrays(self, start: int, stop: int, prefix: str) -> dict[str, np.ndarray]:
        """Rows ``start..stop-1`` as named arrays for serialization (``{prefix}_rows``, ``_ids``, ``_values``)."""
        out = {f"{prefix}_rows": self.keys[start:stop], f"{prefix}_ids": self.ids[start:stop]}
        if self.values is not None:
            out[f"{prefix}_values"] = self.values[start:stop]
        return out

    @classmethod
    def from_arrays(cls, dim: int, value_dim: int | None, parts: list[tuple[np.ndarray, np.ndarray,
                                                                           np.ndarray | None]]) -> RowStore:
        """A store holding the given ``(keys, ids, values)`` parts one after another (shapes checked)."""
        out = cls(dim, value_dim)
        for keys, ids, values in parts:
            if keys.ndim != 2 or keys.shape[1] != dim or ids.shape != (keys.shape[0],):
                raise ValueError(f"stored rows and ids have inconsistent shapes: rows must be (m, {dim}) with one "
                                 f"id each; got {keys.shape} rows and {ids.shape} ids")
            if value_dim is not None and (values is None or values.shape != (keys.shape[0], value_dim)):
                raise ValueError(f"stored value rows have inconsistent shapes: must be ({keys.shape[0]}, "
                                 f"{value_dim})")
            out.append(keys, ids, values)
        return out
