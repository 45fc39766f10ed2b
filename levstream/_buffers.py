"""Growable row storage shared by the sampling summaries (amortised doubling, no per-append reallocation)."""

from __future__ import annotations

import numpy as np


def append_rows(storage: np.ndarray, used: int, rows: np.ndarray) -> tuple[np.ndarray, int]:
    """Write ``rows`` after the first ``used`` rows of ``storage``, growing it by doubling when full.

    Returns the (possibly new) storage array and the new number of rows used.
    """
    need = used + rows.shape[0]
    if need > storage.shape[0]:
        grown = np.empty((max(need, 2 * storage.shape[0], 64), storage.shape[1]))
        grown[:used] = storage[:used]
        storage = grown
    storage[used:need] = rows
    return storage, need
