"""Growable row storage shared by the sampling summaries (amortised doubling, no per-append reallocation)."""

from __future__ import annotations

import numpy as np


def grown_rows(storage: np.ndarray, used: int, need: int, most: int | None = None) -> np.ndarray:
    """``storage`` when it has ``need`` rows, else a new array of twice its rows (at least 64 and ``need``, at
    most ``most`` unless ``need`` is more) holding a copy of its first ``used`` rows: ``storage`` itself is
    left as it was (a reader of it may go on)."""
    if need <= storage.shape[0]:
        return storage
    rows = max(2 * storage.shape[0], 64)
    if most is not None:
        rows = min(rows, most)
    grown = np.empty((max(need, rows), storage.shape[1]))
    grown[:used] = storage[:used]
    return grown


def append_rows(storage: np.ndarray, used: int, rows: np.ndarray) -> tuple[np.ndarray, int]:
    """Write ``rows`` after the first ``used`` rows of ``storage``, growing it by doubling when full.

    Returns the (possibly new) storage array and the new number of rows used.
    """
    need = used + rows.shape[0]
    storage = grown_rows(storage, used, need)
    storage[used:need] = rows
    return storage, need
