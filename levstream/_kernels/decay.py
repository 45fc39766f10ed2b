"""Compiled arithmetic of a decaying stream's reference frame (docs/theory.md, "Decay and gates").

A gated stream weighs key ``j`` at time ``t`` by ``c_j(t) = g_{j+1} ... g_t``.  The sketch stores every row
multiplied by ``sqrt(w_j)`` with ``w_j = exp(E_j)`` its weight in the current *frame*; the frame exponent ``E``
grows by ``-log g`` with every row and is brought back below ``FRAME_LIMIT`` by a *rebase*: the whole state is
multiplied by ``4^-m`` (exact in floating point) and ``E`` lowered by ``m ln 4``.  ``E`` and the stream's total
log-gate are carried as double-double numbers (``hi + lo``), so that neither long streams nor many rebases
accumulate rounding: a row's weight is exact to one rounding of ``exp``.

:func:`frame_step` advances the frame by one row; :func:`frame_rows` by a chunk, with the same arithmetic
(it calls :func:`frame_step`), so a stream fed row by row or in chunks gets the same weights bit for bit.
"""

from __future__ import annotations

import numba
import numpy as np

from .._config import FASTMATH

#: ``ln 4`` split as ``LN4_HI + LN4_LO`` with ``LN4_HI`` on 28 fractional bits, so that ``m * LN4_HI`` is exact
#: for every shift ``m < 2^24`` a rebase can make.
LN4_HI = 1.386294361203909
LN4_LO = -8.401830145362169e-11

#: The frame exponent is rebased once it exceeds this (weights up to ``e^100`` in the frame).
FRAME_LIMIT = 100.0


@numba.njit(nogil=True, cache=True)
def _two_sum(a, b):  # pragma: no cover - compiled
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


@numba.njit(nogil=True, cache=True)
def dd_add(hi, lo, x):  # pragma: no cover - compiled
    """Double-double ``(hi + lo) + x`` (Knuth two-sum, renormalised)."""
    s, e = _two_sum(hi, x)
    e += lo
    t = s + e
    return t, e - (t - s)


@numba.njit(nogil=True, cache=True)
def frame_step(neg_log, e_hi, e_lo, t_hi, t_lo):  # pragma: no cover - compiled
    """One row with gate ``g = exp(-neg_log)``: ``(scale, shift, e_hi, e_lo, t_hi, t_lo)``.

    The frame exponent ``E`` grows by ``neg_log``; past ``FRAME_LIMIT`` it is lowered by ``shift * ln 4`` into
    ``(-ln 4, 0]`` (the state is to be multiplied by ``4^-shift``).  ``scale = sqrt(exp(E))`` multiplies the row.
    The total log-gate ``T`` decreases by ``neg_log``."""
    e_hi, e_lo = dd_add(e_hi, e_lo, neg_log)
    t_hi, t_lo = dd_add(t_hi, t_lo, -neg_log)
    shift = 0
    if e_hi > FRAME_LIMIT:
        shift = int(np.ceil(e_hi / LN4_HI))
        e_hi, e_lo = dd_add(e_hi, e_lo, -shift * LN4_HI)
        e_hi, e_lo = dd_add(e_hi, e_lo, -shift * LN4_LO)
    scale = np.exp(0.5 * e_hi) * (1.0 + 0.5 * e_lo)
    return scale, shift, e_hi, e_lo, t_hi, t_lo


@numba.njit(nogil=True, cache=True)
def frame_rows(neg_logs, e_hi, e_lo, t_hi, t_lo, scales, shifts):  # pragma: no cover - compiled
    """:func:`frame_step` for every row of a chunk: ``scales[i]`` (in the frame after row ``i``'s own rebase)
    and ``shifts[i]`` (the rebases up to and including row ``i``); returns ``(e_hi, e_lo, t_hi, t_lo)``."""
    total = 0
    for i in range(neg_logs.shape[0]):
        s, m, e_hi, e_lo, t_hi, t_lo = frame_step(neg_logs[i], e_hi, e_lo, t_hi, t_lo)
        total += m
        scales[i] = s
        shifts[i] = total
    return e_hi, e_lo, t_hi, t_lo


@numba.njit(nogil=True, cache=True)
def neg_log_gates_into(gates, base, out):  # pragma: no cover - compiled
    """``out[i] = base - log(gates[i])``, the arithmetic of one row's gate (libm's ``log``, as ``math.log``: a
    chunk and the same rows one by one get the same bits; NumPy's vectorised ``log`` differs in the last bit
    for about one gate in 300).  Returns the index of the first gate outside ``(0, 1]`` (a nan included), or -1
    when every gate is valid."""
    for i in range(gates.shape[0]):
        g = gates[i]
        if not (g > 0.0 and g <= 1.0):
            return i
        out[i] = base - np.log(g)
    return -1


@numba.njit(nogil=True, cache=True)
def weigh_row(x, neg_log, e_hi, e_lo, t_hi, t_lo, out):  # pragma: no cover - compiled
    """:func:`frame_step` for one row ``x``, writing the weighted row into ``out``: returns
    ``(sum of squares of out, shift, e_hi, e_lo, t_hi, t_lo)`` (the sum is inf/nan when they overflow)."""
    scale, shift, e_hi, e_lo, t_hi, t_lo = frame_step(neg_log, e_hi, e_lo, t_hi, t_lo)
    sq = 0.0
    for a in range(x.shape[0]):
        v = x[a] * scale
        out[a] = v
        sq += v * v
    return sq, shift, e_hi, e_lo, t_hi, t_lo


@numba.njit(nogil=True, cache=True, fastmath=FASTMATH)
def weigh_rows(X, scales, out):  # pragma: no cover - compiled
    """``out[i] = scales[i] * X[i]`` (float32 or float64 rows, float64 out) and the sum of all squared entries
    of ``out``, in one pass: nan/inf iff an entry is nan/inf or the weighted squares overflow."""
    n, d = X.shape
    total = 0.0
    for i in range(n):
        s = scales[i]
        for j in range(d):
            v = np.float64(X[i, j]) * s
            out[i, j] = v
            total += v * v
    return total


@numba.njit(nogil=True, cache=True)
def weigh_heads(X, neg_logs, frames, dst, start, frames_out):  # pragma: no cover - compiled
    """:func:`weigh_row` for the tokens ``X`` (heads, m, width) of every head, head ``h``'s rows with the gates
    ``neg_logs[h]`` in its frame ``frames[h] = (e_hi, e_lo, t_hi, t_lo)``: the weighted rows go to
    ``dst[h, start:start + m]``, the frames after them to ``frames_out``.  Returns the sum of all squares of the
    weighted rows (nan/inf when a row has a nan/inf, or the weighted squares of a row or their sum over the rows
    overflow), or -1.0 as soon as a head's frame would need a rebase (``dst`` and ``frames_out`` are then partly
    written: the caller takes the general path).  Each row gets the bits :func:`weigh_row` gives it: a head fed here equals one fed row by row."""
    H, m, w = X.shape
    acc = 0.0
    for h in range(H):
        e_hi, e_lo, t_hi, t_lo = frames[h, 0], frames[h, 1], frames[h, 2], frames[h, 3]
        for i in range(m):
            scale, shift, e_hi, e_lo, t_hi, t_lo = frame_step(
                neg_logs[h, i], e_hi, e_lo, t_hi, t_lo
            )
            if shift:
                return -1.0
            for a in range(w):
                v = X[h, i, a] * scale
                dst[h, start + i, a] = v
                acc += v * v
        frames_out[h, 0], frames_out[h, 1], frames_out[h, 2], frames_out[h, 3] = (
            e_hi,
            e_lo,
            t_hi,
            t_lo,
        )
    return acc
