"""Numerical constants and numba settings shared by the whole package.

Every tolerance that decides whether a key is kept lives here, with the reason for its value, so that the
"no false negatives" policy can be audited in one place.
"""

from __future__ import annotations

import numpy as np

#: fastmath flags for numba kernels: everything except ``nnan``/``ninf`` (inputs are validated finite, but
#: kernels must still propagate inf/nan honestly if a caller bypasses validation) and ``arcp`` (it turns
#: ``v / z`` into ``v * (1 / z)``, and the reciprocal of a subnormal normaliser overflows to inf).
FASTMATH = set({"nsz", "contract", "afn", "reassoc"})

#: unit roundoff of float64.
UNIT_ROUNDOFF = float(np.finfo(np.float64).eps) / 2

#: The smallest cut ``thresh Z`` an entry is compared with (the smallest subnormal float64): when ``Z`` is a few
#: subnormal units, ``thresh Z`` rounds to 0, and a key of attention exactly 0 would pass ``v >= cut``
#: (docs/theory.md, "Numerics").
CUT_MIN = float(np.nextafter(0.0, 1.0))

#: The documented tie rule (docs/theory.md, "The guarantee"): a key or entry whose exact value is within this
#: relative distance of the threshold may go either way.  Brute-force checks (levstream.testing, the demo) use
#: it; the sketch itself reports with the narrower margin below.
TIE_RTOL = 1e-9

#: Reporting margin: an entry or key whose computed value is within this relative distance below the threshold
#: is still reported.  The documented tie rule (docs/theory.md, "The guarantee") lets values within 1e-9 of the
#: threshold go either way; reporting leans inclusive, well inside that band.
REPORT_RTOL = 1e-10

#: Lowest relative margin used when *pruning* candidates.  Pruning is irreversible, so it keeps a wider band
#: than reporting does; the extra candidates cost memory only.
PRUNE_RTOL = 1e-8


def margin(rel_error: float, *, prune: bool) -> float:
    """The one margin rule (docs/theory.md, "Numerics"): keep a key or entry whose computed value is at least
    ``threshold * (1 - margin)``.  The margin covers four times the estimated relative error of the computed
    scores, and never less than ``PRUNE_RTOL`` (pruning, irreversible) or ``REPORT_RTOL`` (reporting)."""
    return max(PRUNE_RTOL if prune else REPORT_RTOL, 4.0 * rel_error)


#: The Gram path is used while the equilibrated Gram matrix has condition number at most this; beyond it the
#: summary switches to an R factor (TSQR), whose scores do not square the condition number.
GRAM_KAPPA_MAX = 1e8

#: Hysteresis: an R-factor summary returns to the Gram path once the equilibrated condition number of R^T R
#: falls below this.
GRAM_KAPPA_RETURN = 1e6

#: Safety factor applied to the smallest-eigenvalue lower bound used by the norm pre-filter.
LAMBDA_SAFETY = 0.999

#: Target size in bytes of one processing block (rows x dim x 8): large enough for BLAS-3 efficiency,
#: small enough to stay in the last-level cache (measured: 8192 x 64 float64 blocks run the Gram update at
#: 40-55 GFLOP/s on the reference machine).
BLOCK_BYTES = 1 << 22
MIN_BLOCK_ROWS = 1024
MAX_BLOCK_ROWS = 65536

#: Queries are processed in blocks of this many rows so that the per-block score matrix stays bounded.
QUERY_BLOCK_ROWS = 256


def default_block_rows(dim: int) -> int:
    """Rows per processing block for keys of width ``dim`` (a power of two)."""
    rows = BLOCK_BYTES // (8 * max(int(dim), 1))
    rows = 1 << max(int(rows).bit_length() - 1, 0)
    return int(min(max(rows, MIN_BLOCK_ROWS), MAX_BLOCK_ROWS))
