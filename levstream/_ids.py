"""Bookkeeping of the key ids a sketch has seen, in memory independent of the number of keys.

Ids are kept as disjoint half-open intervals ``[start, stop)``.  The usual cases (a running counter, shards
numbered by ``offset=``) need one interval per shard.  Arbitrary ids could need one interval per key, so
tracking stops after ``MAX_RANGES`` intervals; from then on clashes are detected only among retained keys
(``exact`` becomes false and says so).
"""

from __future__ import annotations

import numpy as np

MAX_RANGES = 4096


def _runs(sorted_ids: np.ndarray) -> np.ndarray:
    """Maximal runs of consecutive integers in a sorted unique array, as an (r, 2) array of [start, stop)."""
    if sorted_ids.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    breaks = np.flatnonzero(np.diff(sorted_ids) != 1)
    starts = np.concatenate([[sorted_ids[0]], sorted_ids[breaks + 1]])
    stops = np.concatenate([sorted_ids[breaks], [sorted_ids[-1]]]) + 1
    return np.stack([starts, stops], axis=1).astype(np.int64)


def _normalise(ranges: np.ndarray) -> np.ndarray:
    """Sort and coalesce touching intervals (inputs are assumed disjoint)."""
    if ranges.shape[0] <= 1:
        return ranges
    ranges = ranges[np.argsort(ranges[:, 0], kind="stable")]
    out = [ranges[0].copy()]
    for start, stop in ranges[1:]:
        if start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], stop)
        else:
            out.append(np.array([start, stop]))
    return np.array(out, dtype=np.int64)


def _first_overlap(a: np.ndarray, b: np.ndarray) -> int | None:
    """Smallest integer in both interval sets, or None."""
    if a.shape[0] == 0 or b.shape[0] == 0:
        return None
    best = None
    for start, stop in b:
        i = np.searchsorted(a[:, 1], start, side="right")  # first interval of a ending after start
        if i < a.shape[0] and a[i, 0] < stop:
            hit = int(max(start, a[i, 0]))
            best = hit if best is None else min(best, hit)
    return best


class IdRanges:
    """Set of seen ids as intervals; see the module docstring."""

    def __init__(self, ranges: np.ndarray | None = None, exact: bool = True) -> None:
        self.ranges = (
            np.zeros((0, 2), dtype=np.int64) if ranges is None else np.asarray(ranges, np.int64)
        )
        self.exact = bool(exact)

    def copy(self) -> IdRanges:
        return IdRanges(self.ranges.copy(), self.exact)

    def clash(self, sorted_ids: np.ndarray) -> int | None:
        """An id of ``sorted_ids`` already seen, or None (only as far as tracking is exact)."""
        return _first_overlap(self.ranges, _runs(sorted_ids))

    def clash_with(self, other: IdRanges) -> int | None:
        return _first_overlap(self.ranges, other.ranges)

    def added(self, sorted_ids: np.ndarray) -> IdRanges:
        """A new IdRanges including ``sorted_ids`` (assumed not to clash)."""
        return self.union(IdRanges(_runs(sorted_ids)))

    def union(self, other: IdRanges) -> IdRanges:
        merged = _normalise(np.concatenate([self.ranges, other.ranges]))
        exact = self.exact and other.exact
        if merged.shape[0] > MAX_RANGES:
            return IdRanges(
                self.ranges if self.ranges.shape[0] <= MAX_RANGES else self.ranges[:MAX_RANGES],
                False,
            )
        return IdRanges(merged, exact)

    def count(self) -> int:
        return int((self.ranges[:, 1] - self.ranges[:, 0]).sum())
