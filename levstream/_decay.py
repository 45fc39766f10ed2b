"""Decaying streams: gates, the reference frame and its rebases (docs/theory.md, "Decay and gates").

With a gate ``g_t`` in ``(0, 1]`` on every row, the gated-attention convention is that the gate of row ``t``
multiplies everything before it, ``G_t = g_t G_{t-1} + k_t k_t^T``, so key ``j`` weighs ``c_j(t) = g_{j+1} ... g_t``
at time ``t``.  A sketch does not multiply its state at every row: it stores rows weighted in a *frame*,
``sqrt(w_j) k_j`` with ``w_j = c_j(t) e^E``, where the frame exponent ``E`` (a number in ``(-ln 4, FRAME_LIMIT]``)
is the same for every row.  Everything a query computes is a ratio of weights, so the frame cancels; only the
normaliser itself is multiplied back by ``e^-E``.  When ``E`` outgrows ``FRAME_LIMIT`` the state is multiplied by
an exact power of 4 (a *rebase*).  Weights that fall below ``2^-1800`` of the frame are flushed to zero.

:class:`Frame` is the frame's state (immutable: a sketch swaps it in once a change has been validated);
:func:`neg_log_gates` validates gates.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from ._kernels.decay import LN4_HI, LN4_LO, dd_add, frame_rows, frame_step, neg_log_gates_into
from ._validation import as_ndarray, check_real

#: A rebase by more than this many factors of 4 flushes the state to zero (weights below ``2^-1800``, rows
#: below ``2^-900`` of the frame: the smallest the summary's R factor holds exactly).
FORGET_SHIFT = 900

#: A merge factor ``e^-x`` with ``x`` beyond this is split into a power of 4 and a factor near ``4^-8``.
_MERGE_EXP_MIN = 600.0


class Frame(NamedTuple):
    """``E = e_hi + e_lo`` (the frame exponent) and ``T = t_hi + t_lo`` (the total log-gate, ``<= 0``)."""

    e_hi: float = 0.0
    e_lo: float = 0.0
    t_hi: float = 0.0
    t_lo: float = 0.0

    @property
    def exponent(self) -> float:
        return self.e_hi + self.e_lo

    @property
    def log_total(self) -> float:
        return self.t_hi + self.t_lo

    def step(self, neg_log: float) -> tuple[float, int, Frame]:
        """One row: ``(scale, shift, frame after it)`` (see :func:`levstream._kernels.decay.frame_step`)."""
        scale, shift, e_hi, e_lo, t_hi, t_lo = frame_step(neg_log, *self)
        return scale, shift, Frame(e_hi, e_lo, t_hi, t_lo)

    def rows(self, neg_logs: np.ndarray) -> tuple[np.ndarray, np.ndarray, Frame]:
        """A chunk: per-row scales (each in the frame after its own row), cumulative shifts, frame after it."""
        m = neg_logs.shape[0]
        scales, shifts = np.empty(m), np.empty(m, dtype=np.int64)
        state = frame_rows(neg_logs, *self, scales, shifts)
        return scales, shifts, Frame(*state)

    def merge_scaling(self, later: Frame) -> tuple[int, float]:
        """``(shift, factor)`` that move this (earlier) part's state into the frame of the ``later`` part that
        follows it: the earlier keys decayed by the later part's gates, ``exp(E_later + T_later - E_self) =
        factor 4^-shift`` with ``factor`` well inside float64's normal range (a subnormal factor would hold only
        a few bits: the rebase by ``4^-shift`` is exact, and flushes below ``2^-1800``)."""
        hi, lo = dd_add(later.e_hi, later.e_lo, later.t_hi)
        hi, lo = dd_add(hi, lo, later.t_lo)
        hi, lo = dd_add(hi, lo, -self.e_hi)
        hi, lo = dd_add(hi, lo, -self.e_lo)
        shift = 0
        # beyond e^-600: a factor near 4^-8 to scale by, the rest to an exact rebase
        if hi < -_MERGE_EXP_MIN:
            shift = math.ceil(-hi / LN4_HI) - 8
            hi, lo = dd_add(hi, lo, shift * LN4_HI)
            hi, lo = dd_add(hi, lo, shift * LN4_LO)
        return shift, math.exp(hi) * (1.0 + lo)

    def then(self, later: Frame) -> Frame:
        """The frame of this part followed by ``later``: ``later``'s exponent, the two totals added."""
        t_hi, t_lo = dd_add(self.t_hi, self.t_lo, later.t_hi)
        t_hi, t_lo = dd_add(t_hi, t_lo, later.t_lo)
        return Frame(later.e_hi, later.e_lo, t_hi, t_lo)

    def to_meta(self) -> list[float]:
        return [self.e_hi, self.e_lo, self.t_hi, self.t_lo]

    @classmethod
    def from_meta(cls, values: Any) -> Frame:
        parts = [float(x) for x in values]
        if len(parts) != 4 or not all(math.isfinite(x) for x in parts):
            raise ValueError(f"decay frame must be 4 finite numbers; got {values!r}")
        frame = cls(*parts)
        if not (-2.0 <= frame.exponent <= 101.0 and frame.log_total <= 0.0):
            raise ValueError(f"decay frame out of range: {values!r}")
        return frame


def check_gate(value: Any, name: str = "gate") -> float:
    """A gate or decay factor: a real number in ``(0, 1]`` (a 0-d array or tensor holding one is one: what a
    model's ``sigmoid`` of a scalar gives)."""
    value = as_ndarray(value)
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    gate = check_real(value, name)
    if not 0.0 < gate <= 1.0:
        raise ValueError(f"{name} must satisfy 0 < {name} <= 1; got {gate} instead.")
    return gate


def neg_log_gates(gates: Any, m: int, decay: float | None) -> np.ndarray:
    """``-log`` of the effective gate of each of ``m`` rows: ``decay`` (default 1) times ``gates`` (default 1),
    bit for bit as :func:`neg_log_gate` gives them one by one."""
    base = 0.0 if decay is None else -math.log(decay)
    if gates is None:
        return np.full(m, base)
    arr = np.asarray(gates)
    # one row's gate given as a number (as update and a decode step take it)
    if arr.ndim == 0 and m == 1:
        arr = arr.reshape(1)
    if arr.dtype.kind not in "fiu" or arr.dtype == np.bool_:
        raise TypeError(f"gates must be real numbers in (0, 1]; got an array of dtype {arr.dtype}.")
    if arr.shape != (m,):
        raise ValueError(f"gates must have one gate per row: shape ({m},); got shape {arr.shape}.")
    arr = np.ascontiguousarray(arr, dtype=np.float64)
    out = np.empty(m)
    i = neg_log_gates_into(arr, base, out)
    if i >= 0:
        raise ValueError(f"gates must satisfy 0 < gate <= 1; got {float(arr[i])!r} at row {i}.")
    return out


def neg_log_gate(gate: Any, decay: float | None) -> float:
    """``-log`` of one row's effective gate (``decay`` times ``gate``)."""
    base = 0.0 if decay is None else -math.log(decay)
    if gate is None:
        return base
    if (
        isinstance(gate, float) and 0.0 < gate <= 1.0
    ):  # a float or np.float64 (the decoding loop's case)
        return base - math.log(gate)
    return base - math.log(check_gate(gate))
