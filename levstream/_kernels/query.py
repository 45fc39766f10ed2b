"""Thresholding of attention scores into CSR pieces (the inner loop of ``heavy_entries``).

The caller computes, for one block of queries, the inner products ``P = Q_b @ C.T`` with BLAS and the
normalisers ``z``; these kernels turn ``|P|^p / z >= thresh`` into CSR without materialising a mask.
"""

from __future__ import annotations

import numba
import numpy as np

from .._config import CUT_MIN, FASTMATH


def _threshold_power_csr(P, z, p, thresh, col_ids):  # pragma: no cover - compiled
    """Entries ``A = |P[i, j]|**p / z[i] >= thresh`` row by row.

    Returns ``(counts, key_ids, values)``: ``counts[i]`` entries for query row ``i`` (rows with ``z <= 0``
    have none; the cut ``thresh z`` is at least ``CUT_MIN``), their key ids ``col_ids[j]`` sorted ascending when ``col_ids`` is sorted, and the values.
    """
    m, c = P.shape
    counts = np.zeros(m, dtype=np.int64)
    is_two = p == 2.0
    for i in numba.prange(m):
        zi = z[i]
        if zi <= 0.0:
            continue
        cut = max(thresh * zi, CUT_MIN)  # never 0 for a positive Z (see CUT_MIN)
        cnt = 0
        for j in range(c):
            x = abs(P[i, j])
            v = x * x if is_two else x**p
            if v >= cut:
                cnt += 1
        counts[i] = cnt
    offsets = np.zeros(m + 1, dtype=np.int64)
    for i in range(m):
        offsets[i + 1] = offsets[i] + counts[i]
    total = offsets[m]
    keys = np.empty(total, dtype=np.int64)
    vals = np.empty(total, dtype=np.float64)
    for i in numba.prange(m):
        if counts[i] == 0:
            continue
        zi = z[i]
        cut = max(thresh * zi, CUT_MIN)
        pos = offsets[i]
        for j in range(c):
            x = abs(P[i, j])
            v = x * x if is_two else x**p
            if v >= cut:
                keys[pos] = col_ids[j]
                vals[pos] = v / zi
                pos += 1
    return counts, keys, vals


#: Blocks with fewer score entries than this run serially: a parallel (OpenMP) region costs more to start
#: and synchronise than it saves on small blocks, and on a busy machine its barrier waits for a core.
PARALLEL_MIN_ENTRIES = 1 << 21

_serial = numba.njit(nogil=True, cache=True, fastmath=FASTMATH)(_threshold_power_csr)
_parallel = numba.njit(parallel=True, nogil=True, cache=True, fastmath=FASTMATH)(
    _threshold_power_csr
)


def threshold_power_csr(P, z, p, thresh, col_ids):
    """Dispatch to the serial or the parallel compiled kernel by block size (same results)."""
    kernel = _parallel if P.size >= PARALLEL_MIN_ENTRIES else _serial
    return kernel(P, z, float(p), float(thresh), col_ids)
