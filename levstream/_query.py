"""The one query path: heavy entries, top-k, normalisers and attention outputs, for every sketch type.

A query reads a :class:`HeadView` — the normaliser summary and the rows a sketch holds — and changes nothing.
The rows are the candidates (keys folded into the summary whose score may still reach ``eps``) followed by the
pending rows (fed, not yet folded in).  Exactness needs only two things (docs/theory.md, "Live streams"):

* the normaliser over *every* key fed: the summary's ``Z`` plus the pending rows' terms, summed directly;
* a superset of the universal set: candidates and pending rows together are one.

Every entry's value is computed exactly against that normaliser and thresholded; keys outside the universal set
have ``A < eps`` and drop out.  With an approximate normaliser (coreset, ``delta > 0``) the threshold is lowered
to ``eps (1 - delta)`` and every value carries the interval ``[A~ (1 - delta), A~ (1 + delta)]``
(docs/theory.md, "General p").  One margin rule (``levstream._config.margin``) applies everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from ._config import QUERY_BLOCK_ROWS, margin
from ._kernels.live import (
    GRAM_FORM_REL,
    UNRELIABLE,
    checked_quadratic_rows,
    decode_and_take,
    decode_p2,
    heavy_p2,
    top_k_p2,
)
from ._kernels.query import threshold_power_csr
from ._threads import lowered_blas
from .moments import MomentState
from .results import AttentionResult, HeavyEntries, TopK
from .summaries.base import NormalizerSummary
from .summaries.gram import gram_normalizer


class HeadView(NamedTuple):
    """What a query reads of one head.

    ``keys``/``ids``/``values`` are the candidates (folded into ``summary``).  ``extra_*`` are rows fed but not
    folded in that a query must scan: every pending row, or — when ``total_gram`` is given (p = 2) — only the
    pending rows that passed the arrival test.  ``Z`` is ``q^T total_gram q`` when ``total_gram`` is given
    (the Gram matrix of every key fed), otherwise the summary's ``Z`` plus the extra rows' terms.
    """

    summary: NormalizerSummary
    keys: np.ndarray
    ids: np.ndarray
    values: np.ndarray | None
    extra_keys: np.ndarray
    extra_ids: np.ndarray
    extra_values: np.ndarray | None
    total_gram: np.ndarray | None
    ids_sorted: bool
    moments: MomentState | None = None
    #: norms of the rows of ``keys`` when they come by descending norm (:func:`scan_norms`; the live scan then
    #: reads only the rows long enough to be heavy), else None
    norms: np.ndarray | None = None
    #: norms of the rows of ``extra_keys`` (any order; the live scan skips those too short), else None
    extra_norms: np.ndarray | None = None
    #: with ``total_gram``: the view without it (the summary and every pending row), for the queries along which
    #: ``q^T total_gram q`` cannot be trusted (docs/theory.md, "Numerics")
    fallback: Callable[[], HeadView] | None = None
    #: with ``extra_norms``: the rows of ``extra_keys`` as int8 and their scales
    #: (:func:`~levstream._kernels.live.int8_rows`), for the live scan's int8 bound, else None
    extra_int8: np.ndarray | None = None
    extra_scales: np.ndarray | None = None
    #: with ``norms``: the rows of ``keys`` as int8 and their scales, for the same bound, else None
    int8: np.ndarray | None = None
    scales: np.ndarray | None = None
    #: with ``total_gram``, when the view is kept for many queries (the live cache's): :func:`scan_arrays` of it,
    #: made once
    scan: _ScanArrays | None = None

    @property
    def all_ids(self) -> np.ndarray:
        return self.ids if self.extra_ids.size == 0 else np.concatenate([self.ids, self.extra_ids])

    @property
    def all_values(self) -> np.ndarray | None:
        if self.values is None or self.extra_values is None or self.extra_ids.size == 0:
            return self.values
        return np.concatenate([self.values, self.extra_values])


_NO_VALUES = np.zeros((0, 0))


def _power(P: np.ndarray, p: float) -> np.ndarray:
    return P * P if p == 2.0 else np.abs(P) ** p


#: The reporting threshold's factor for exact values (the tie margin).
_REPORT_SCALE = 1.0 - margin(0.0, prune=False)


def report_threshold(eps: float, distortion: float) -> float:
    """Values are reported when ``>= eps (1 - margin) (1 - delta)``: the tie margin, and for an approximate
    normaliser the lowering that keeps every true heavy entry while ``Z~`` is within ``(1 ± delta) Z``."""
    return eps * _REPORT_SCALE * (1.0 - distortion)


def _z(view: HeadView, Q: np.ndarray, extra_products: np.ndarray | None, p: float) -> np.ndarray:
    if view.total_gram is not None:
        if view.fallback is not None and is_live(view, Q, p):  # a few queries: one compiled call
            z = checked_quadratic_rows(Q, view.total_gram)
            if not _untrusted(z):
                return z
        else:
            z = gram_normalizer(Q, view.total_gram)
            if view.fallback is None or _gram_form_trusted(Q, view.total_gram, z):
                return z
        view = (
            view.fallback()
        )  # the summary and every pending row: the same keys, summed without cancellation
        extra_products = None
    # weights beyond float64 give Z = inf (a query the callers refuse; normalizer reports it)
    with np.errstate(over="ignore"):
        z = view.summary.normalizer(Q)
        if view.extra_ids.size:
            P = Q @ view.extra_keys.T if extra_products is None else extra_products
            z = z + _power(P, p).sum(axis=1)
    return z


def normalizer(view: HeadView, Q: np.ndarray, p: float) -> np.ndarray:
    """``Z(q)`` over every key fed, for unscaled queries."""
    return _z(view, Q, None, p)


def _scored_block(
    view: HeadView, Qb: np.ndarray, p: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For one block of queries: ``(Qs, P, z)`` with ``Qs`` the (possibly rescaled) queries, ``P = Qs K^T`` over
    the candidates and extra rows and ``z`` the normaliser of ``Qs`` over every key fed."""
    if view.summary.rescales_queries:
        rows = (
            view.keys if view.extra_ids.size == 0 else np.concatenate([view.keys, view.extra_keys])
        )
        scale = view.summary.query_scale(Qb, rows)
        if scale is not None:
            Qb = Qb * scale[:, None]
    # products beyond float64 show in z, refused below
    with np.errstate(over="ignore", invalid="ignore"):
        P = Qb @ view.keys.T
        Pe = None
        if view.extra_ids.size:
            Pe = Qb @ view.extra_keys.T
            P = np.concatenate([P, Pe], axis=1)
        z = _z(view, Qb, Pe, p)
    _check_weights(z)
    return Qb, P, z


def _check_weights(z: np.ndarray) -> None:
    """Refuse queries whose normaliser (the sum of their attention weights) is beyond float64's range: their
    weights cannot be compared with it (docs/theory.md, "Numerics")."""
    bad = ~np.isfinite(z)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"the attention weights of query row {i} sum beyond float64's range (Z = {z[i]}); rescale the queries "
            "(attention does not depend on their scale) or the keys."
        )


def _sorted_by_row_and_id(counts: np.ndarray, key_ids: np.ndarray, *arrays: np.ndarray) -> tuple:
    """Entries in CSR order with key ids ascending within each row (rows are already grouped)."""
    rows = np.repeat(np.arange(counts.shape[0]), counts)
    order = np.lexsort((key_ids, rows))
    return (key_ids[order], *(a[order] for a in arrays))


class _Entries(NamedTuple):
    indptr: np.ndarray  # CSR row pointer: query row i's entries are indptr[i]:indptr[i + 1]
    positions: np.ndarray  # column of each entry in the thresholded matrix
    key_ids: np.ndarray
    values: np.ndarray


def _threshold(
    P: np.ndarray, z: np.ndarray, p: float, thresh: float, ids: np.ndarray, ids_sorted: bool
) -> _Entries:
    positions = np.arange(P.shape[1], dtype=np.int64)
    counts, pos, vals = threshold_power_csr(P, z, p, thresh, positions)
    key_ids = ids[pos]
    if not ids_sorted and key_ids.size > 1:
        key_ids, pos, vals = _sorted_by_row_and_id(counts, key_ids, pos, vals)
    indptr = np.zeros(counts.shape[0] + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    return _Entries(indptr, pos, key_ids, vals)


def _concat(parts: list[_Entries], n_queries: int) -> _Entries:
    if len(parts) == 1:
        return parts[0]
    if not parts:
        empty = np.zeros(0, np.int64)
        return _Entries(np.zeros(n_queries + 1, np.int64), empty, empty, np.zeros(0))
    offsets = np.cumsum([0] + [int(part.indptr[-1]) for part in parts[:-1]])
    indptr = np.concatenate(
        [parts[0].indptr[:1]] + [part.indptr[1:] + off for part, off in zip(parts, offsets)]
    )
    return _Entries(indptr, *(np.concatenate(x) for x in list(zip(*parts))[1:]))


def _heavy(entries: _Entries, eps: float, distortion: float) -> HeavyEntries:
    lower = upper = None
    if distortion:
        # |Z~ - Z| <= delta Z gives A = A~ Z~ / Z in [A~ (1 - delta), A~ (1 + delta)] (docs/theory.md, "General p")
        lower, upper = entries.values * (1.0 - distortion), entries.values * (1.0 + distortion)
    return HeavyEntries.of(entries.indptr, entries.key_ids, entries.values, eps, lower, upper)


#: Up to this many queries (p = 2, exact Gram) the whole query is one compiled call (the live path).
LIVE_QUERY_ROWS = 8

#: The live path's rows outside ``G`` (a decode step's own key, the rows waiting for the live cache): none.
#: Writable, as the store's rows they stand in for (a read-only array is another type to numba: a second version
#: of the kernel); they have no element to change.
_NO_ROWS = np.zeros((0, 0))
_NO_IDS = np.zeros(0, dtype=np.int64)

#: The live path's row norms when the rows are not ordered by norm (every row scanned).  Writable, as the norms
#: it stands in for: a read-only array is another type to numba, and the first query of a plain view (right
#: after a flush) then compiled or loaded a second version of the kernels (25-35 ms, measured).  It has no
#: element to change.
NO_NORMS = np.zeros(0)
#: The same for the int8 rows of the scanned pending rows (writable, for the same reason).
NO_INT8 = np.zeros((0, 0), dtype=np.int8)


#: ``G``, candidates, their norms, int8 rows, scales and ids, scanned pending rows, their norms, int8 rows,
#: scales and ids
_ScanArrays = tuple[
    np.ndarray,
    np.ndarray,
    np.ndarray,
    np.ndarray,
    np.ndarray,
    np.ndarray,
    np.ndarray,
    np.ndarray,
    np.ndarray,
    np.ndarray,
    np.ndarray,
]


def scan_arrays(view: HeadView) -> _ScanArrays:
    """The arrays the live kernels scan: ``G``, the candidates (their norms, int8 rows, scales, ids), the scanned
    pending rows (their norms, int8 rows, scales, ids)."""
    assert view.total_gram is not None
    return (
        view.total_gram,
        view.keys,
        NO_NORMS if view.norms is None else view.norms,
        NO_INT8 if view.int8 is None else view.int8,
        NO_NORMS if view.scales is None else view.scales,
        view.ids,
        view.extra_keys,
        NO_NORMS if view.extra_norms is None else view.extra_norms,
        NO_INT8 if view.extra_int8 is None else view.extra_int8,
        NO_NORMS if view.extra_scales is None else view.extra_scales,
        view.extra_ids,
    )


def _live_find(view: HeadView, Q: np.ndarray, thresh: float) -> tuple[_Entries, np.ndarray]:
    """The live path (p = 2, exact ``G`` of every key fed, a few queries): one compiled call; also returns ``Z``.
    The arrays returned are read-only (ids ascending per query row)."""
    ints, floats = _live_scan(view, Q, thresh)
    m = Q.shape[0]
    end = m + 1 + ints.item(m)
    return _Entries(ints[: m + 1], ints[end:], ints[m + 1 : end], floats[m:]), floats[:m]


def _live_scan(
    view: HeadView,
    Q: np.ndarray,
    thresh: float,
    waiting: np.ndarray = _NO_ROWS,
    waiting_ids: np.ndarray = _NO_IDS,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`~levstream._kernels.live.heavy_p2` of the view's arrays and the rows ``waiting`` (see
    :func:`live_heavy_entries`), its two arrays made read-only (the slices handed to the results are read-only with
    them)."""
    ints, floats = heavy_p2(Q, *(view.scan or scan_arrays(view)), waiting, waiting_ids, thresh)
    ints.flags.writeable = False
    floats.flags.writeable = False
    return ints, floats


def live_heavy_entries(
    view: HeadView,
    Q: np.ndarray,
    eps: float,
    waiting: np.ndarray = _NO_ROWS,
    waiting_ids: np.ndarray = _NO_IDS,
) -> HeavyEntries | None:
    """:func:`heavy_entries` of a few p = 2 queries *not yet validated* (any float64 rows of the sketch's width), the
    live path alone: None when the view has no live state or some query's ``Z`` cannot be trusted (the kernel
    reports a nan/inf query, or one whose squares overflow, that way too); the caller then validates the queries
    and answers the general way.  The live step's query: one compiled call and the result, nothing else.

    ``waiting`` (float64, ids ``waiting_ids``): rows fed that the view does not hold, neither in ``total_gram`` nor
    among its rows: scanned exactly, their terms added to every ``Z``."""
    if view.total_gram is None or Q.shape[0] > LIVE_QUERY_ROWS or not Q.flags.c_contiguous:
        return None
    ints, floats = _live_scan(view, Q, eps * _REPORT_SCALE, waiting, waiting_ids)
    m = Q.shape[0]
    if (floats.item(0) == UNRELIABLE) if m == 1 else (floats[:m] == UNRELIABLE).any():
        return None
    end = m + 1 + ints.item(m)
    return HeavyEntries.of_frozen(ints[: m + 1], ints[m + 1 : end], floats[m:], eps)


def is_live(view: HeadView, Q: np.ndarray, p: float) -> bool:
    return (
        view.total_gram is not None
        and p == 2.0
        and Q.shape[0] <= LIVE_QUERY_ROWS
        and Q.flags.c_contiguous
    )


def _gram_form_trusted(Q: np.ndarray, G: np.ndarray, z: np.ndarray) -> bool:
    """Whether ``z = q^T G q`` is accurate for every row of ``Q``: its rounding bound ``(d + 2) u |q|^T |G| |q|``
    is at most ``GRAM_FORM_REL`` of it (as the live kernels test)."""
    A = np.abs(Q)
    bound = np.einsum("ij,ij->i", A @ np.abs(G), A)
    return bool(((Q.shape[1] + 2) * 2.0**-53 * bound <= GRAM_FORM_REL * np.maximum(z, 0.0)).all())


def _untrusted(z: np.ndarray) -> bool:
    """Whether a live kernel could not trust the normaliser of some query (it then reported ``UNRELIABLE``)."""
    return bool(z[0] == UNRELIABLE if z.shape[0] == 1 else (z == UNRELIABLE).any())


def _find(view: HeadView, Q: np.ndarray, p: float, eps: float) -> _Entries:
    thresh = report_threshold(eps, view.summary.distortion)
    if is_live(view, Q, p):
        found, z = _live_find(view, Q, thresh)
        if not _untrusted(z):
            return found
        assert view.fallback is not None
        return _find(view.fallback(), Q, p, eps)
    ids = view.all_ids
    parts = []
    for start in range(0, Q.shape[0], QUERY_BLOCK_ROWS):
        _, P, z = _scored_block(view, Q[start : start + QUERY_BLOCK_ROWS], p)
        parts.append(_threshold(P, z, p, thresh, ids, view.ids_sorted))
    return _concat(parts, Q.shape[0])


def heavy_entries(view: HeadView, Q: np.ndarray, p: float, eps: float) -> HeavyEntries:
    """Every entry ``A[i, j] >= eps`` of the queries ``Q`` over every key fed (see the module docstring)."""
    if is_live(view, Q, p):  # exact values: the kernel's entries are the result
        entries, z = _live_find(view, Q, report_threshold(eps, 0.0))
        if not _untrusted(z):
            return HeavyEntries.of_frozen(entries.indptr, entries.key_ids, entries.values, eps)
        assert view.fallback is not None
        return heavy_entries(view.fallback(), Q, p, eps)
    return _heavy(_find(view, Q, p, eps), eps, view.summary.distortion)


def top_k(view: HeadView, Q: np.ndarray, p: float, k: int, eps: float) -> TopK:
    """The ``k`` largest entries per query among the rows held; ``certified`` where provably the true top-k.

    Every key outside the universal set has ``A < eps``, so a row whose ``k``-th value is ``>= eps`` (with an
    approximate normaliser: ``A~ (1 - delta) >= eps``) is the true top-``k`` over all keys.
    """
    ids = view.all_ids
    m, c = Q.shape[0], ids.shape[0]
    out_ids = np.full((m, k), -1, dtype=np.int64)
    out_vals = np.full((m, k), np.nan)
    certified = np.zeros(m, dtype=bool)
    kk = min(k, c)
    dist = view.summary.distortion
    for start in range(0, m, QUERY_BLOCK_ROWS):
        _, P, z = _scored_block(view, Q[start : start + QUERY_BLOCK_ROWS], p)
        live = z > 0
        if kk == 0 or not live.any():
            continue
        A = np.where(live[:, None], _power(P, p) / np.where(live, z, 1.0)[:, None], 0.0)
        if kk < c:
            part = _top_positions(A, kk, ids)
        else:
            part = np.broadcast_to(np.arange(c), (A.shape[0], c))
        top = np.take_along_axis(A, part, axis=1)
        # descending value, ties by ascending key id
        order = np.lexsort((ids[part], -top), axis=1)
        part = np.take_along_axis(part, order, axis=1)
        top = np.take_along_axis(top, order, axis=1)
        sl = slice(start, start + A.shape[0])
        out_ids[sl, :kk] = np.where(live[:, None], ids[part], -1)
        out_vals[sl, :kk] = np.where(live[:, None], top, np.nan)
        if kk == k:
            certified[sl] = live & (top[:, -1] * (1.0 - dist) >= eps)
    return TopK(out_ids, out_vals, certified, eps)


def _top_positions(A: np.ndarray, kk: int, ids: np.ndarray) -> np.ndarray:
    """Per row of ``A``, the positions of its ``kk`` largest values, ties at the ``kk``-th value going to the
    smallest ids (``argpartition`` alone settles those ties arbitrarily)."""
    part = np.argpartition(-A, kk - 1, axis=1)[:, :kk]
    kth = np.take_along_axis(A, part, axis=1).min(axis=1)
    straddle = np.flatnonzero((A >= kth[:, None]).sum(axis=1) > kk)  # a tie across the cut: rare
    for i in straddle:
        cand = np.flatnonzero(A[i] >= kth[i])
        part[i] = cand[np.lexsort((ids[cand], -A[i, cand]))[:kk]]
    return part


def top_k_held(
    total_gram: np.ndarray, keys: np.ndarray, ids: np.ndarray, Q: np.ndarray, k: int, eps: float
) -> TopK | None:
    """:func:`top_k` of a few queries over every row held (``keys``, ids ``ids``: the candidates and every pending
    row), p = 2 with ``total_gram`` the Gram matrix of every key fed: one compiled pass
    (:func:`~levstream._kernels.live.top_k_p2`); None when some query's ``Z`` cannot be trusted (the caller then
    answers through the held view)."""
    out_ids, out_vals, z = top_k_p2(Q, total_gram, keys, ids, k)
    if _untrusted(z):
        return None
    certified = (
        (z > 0) & (out_vals[:, -1] >= eps) if k <= keys.shape[0] else np.zeros(Q.shape[0], bool)
    )
    return TopK(out_ids, out_vals, certified, eps)


def _rows_at(
    view: HeadView, positions: np.ndarray, chunk_values: np.ndarray | None = None
) -> np.ndarray:
    """Value rows at ``positions`` of ``[values; extra_values; chunk_values]`` (gathered, not concatenated)."""
    assert view.values is not None
    c, e = view.values.shape[0], view.extra_ids.shape[0]
    out = np.empty((positions.shape[0], view.values.shape[1]))
    cand = positions < c
    out[cand] = view.values[positions[cand]]
    if e or chunk_values is not None:
        extra = ~cand & (positions < c + e)
        if e:
            assert view.extra_values is not None
            out[extra] = view.extra_values[positions[extra] - c]
        if chunk_values is not None:
            chunk = positions >= c + e
            out[chunk] = chunk_values[positions[chunk] - c - e]
    return out


def _outputs(
    entries: _Entries, value_rows: np.ndarray, n_queries: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(heavy_output, captured_mass)``: sums of ``A_j v_j`` and of ``A_j`` over each query's entries, from the
    value rows of the entries (in entry order)."""
    out = np.zeros((n_queries, value_rows.shape[1]))
    mass = np.zeros(n_queries)
    bounds = entries.indptr
    for i in np.flatnonzero(np.diff(bounds)):
        a, b = bounds[i], bounds[i + 1]
        out[i] = entries.values[a:b] @ value_rows[a:b]
        mass[i] = entries.values[a:b].sum()
    return out, mass


def _output_bounds(
    heavy_out: np.ndarray, mass: np.ndarray, abs_out: np.ndarray | None, distortion: float
) -> dict[str, tuple[np.ndarray, np.ndarray] | None]:
    """Bounds on the true mass and output of the returned entries when their values are the coreset's ``A~``:
    each true value lies in ``[A~ (1 - delta), A~ (1 + delta)]`` (docs/theory.md, "General p"), so the output
    is within ``delta sum A~ |v|`` (``abs_out``) componentwise."""
    if not distortion or abs_out is None:
        return {"captured_mass_bounds": None, "heavy_output_bounds": None}
    spread = distortion * abs_out
    return {
        "captured_mass_bounds": (mass * (1.0 - distortion), mass * (1.0 + distortion)),
        "heavy_output_bounds": (heavy_out - spread, heavy_out + spread),
    }


def attend(view: HeadView, Q: np.ndarray, p: float, eps: float) -> AttentionResult:
    """Heavy entries of ``Q`` with their output and mass, and the exact output when the view has moments
    (the moment state holds every key fed, so ``o(q) = phi(q)^T S / Z(q)``)."""
    if view.values is None:
        raise ValueError(
            "attend needs value rows: build the sketch with value_dim= and feed update(k, v)."
        )
    thresh = report_threshold(eps, view.summary.distortion)
    if Q.shape[0] == 1 and is_live(view, Q, p):  # one query: one compiled call, as a decode step
        return _decode_step(view, _NO_ROWS, view.values[:0], Q, _NO_IDS, eps)
    if is_live(view, Q, p):
        entries, z = _live_find(view, Q, thresh)
        if _untrusted(z):
            assert view.fallback is not None
            return attend(view.fallback(), Q, p, eps)
    else:
        entries, z = _find(view, Q, p, eps), None
    rows = _rows_at(view, entries.positions)
    heavy_out, mass = _outputs(entries, rows, Q.shape[0])
    output = None
    if view.moments is not None:
        num = view.moments.numerator(Q)
        if z is None:
            z = _z(view, Q, None, p)
        output = np.divide(num, z[:, None], out=np.zeros_like(num), where=z[:, None] > 0)
    dist = view.summary.distortion
    abs_out = _outputs(entries, np.abs(rows), Q.shape[0])[0] if dist else None
    bounds = _output_bounds(heavy_out, mass, abs_out, dist)
    return AttentionResult(_heavy(entries, eps, dist), heavy_out, mass, output, **bounds)


def prefill(
    view: HeadView,
    K: np.ndarray,
    V: np.ndarray,
    Q: np.ndarray,
    chunk_ids: np.ndarray,
    p: float,
    eps: float,
) -> AttentionResult:
    """Causal attention of a chunk (docs/theory.md, "Causal chunks"): query ``i`` sees every key of the view
    and the chunk's keys ``0..i``.  Heavy entries of row ``i`` lie among the rows held and those chunk keys,
    because a key fed earlier whose score over the prefix up to ``i`` reaches ``eps`` reached it before the
    chunk.  The caller folds the chunk in afterwards (the moment state does not hold the chunk yet)."""
    if view.values is None:
        raise ValueError(
            "prefill needs value rows: build the sketch with value_dim= and feed update(k, v)."
        )
    c = K.shape[0]
    if c == 0:
        return AttentionResult(
            HeavyEntries.from_counts(
                np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), eps
            ),
            np.zeros((0, V.shape[1])),
            np.zeros(0),
            None if view.moments is None else np.zeros((0, V.shape[1])),
        )
    if c == 1 and is_live(view, Q, p):
        return _decode_step(view, K, V, Q, chunk_ids, eps)
    # medium-sized products: multithreaded BLAS on them loses more to waiting for its threads than it gains
    # (measured on the 2-core machine: a 10^5-token prefill 6.4 s with one BLAS thread, 22.5 s with two)
    with lowered_blas(1):
        return _prefill_chunk(view, K, V, Q, chunk_ids, p, eps)


def _prefill_chunk(
    view: HeadView,
    K: np.ndarray,
    V: np.ndarray,
    Q: np.ndarray,
    chunk_ids: np.ndarray,
    p: float,
    eps: float,
) -> AttentionResult:
    c = K.shape[0]
    held_values = view.all_values
    assert held_values is not None
    held_ids = view.all_ids
    held = held_ids.shape[0]
    dist = view.summary.distortion
    thresh = report_threshold(eps, dist)
    ids = np.concatenate([held_ids, chunk_ids])
    ids_sorted = (
        view.ids_sorted
        and (held == 0 or chunk_ids[0] > held_ids[-1])
        and (c < 2 or bool((np.diff(chunk_ids) > 0).all()))
    )
    values = np.concatenate([held_values, V])
    parts, heavy_parts, mass_parts, out_parts, spread_parts = [], [], [], [], []
    for start in range(0, c, QUERY_BLOCK_ROWS):
        stop = min(c, start + QUERY_BLOCK_ROWS)
        Qs, P, z = _scored_block(view, Q[start:stop], p)
        Pc = np.tril(Qs @ K[:stop].T, k=start)  # query start + i sees chunk keys 0..start + i
        Wc = _power(Pc, p)
        z = z + Wc.sum(axis=1)
        entries = _threshold(
            np.concatenate([P, Pc], axis=1), z, p, thresh, ids[: held + stop], ids_sorted
        )
        parts.append(entries)
        ho, mass = _outputs(entries, values[entries.positions], stop - start)
        heavy_parts.append(ho)
        mass_parts.append(mass)
        if dist:
            spread_parts.append(
                _outputs(entries, np.abs(values[entries.positions]), stop - start)[0]
            )
        if (
            view.moments is not None
        ):  # exact numerator: the moment state (every key fed) and the visible chunk
            num = view.moments.numerator(Qs) + Wc @ V[:stop]
            out_parts.append(
                np.divide(num, z[:, None], out=np.zeros_like(num), where=z[:, None] > 0)
            )
    hits = _heavy(_concat(parts, c), eps, dist)
    output = np.concatenate(out_parts) if view.moments is not None else None
    heavy_out, mass = np.concatenate(heavy_parts), np.concatenate(mass_parts)
    abs_out = np.concatenate(spread_parts) if dist else None
    bounds = _output_bounds(heavy_out, mass, abs_out, dist)
    return AttentionResult(hits, heavy_out, mass, output, **bounds)


def _decode_step(
    view: HeadView, k: np.ndarray, v: np.ndarray, q: np.ndarray, key_id: np.ndarray, eps: float
) -> AttentionResult:
    """A causal chunk of one row (a decode step), p = 2 with the exact Gram matrix: the new key joins the rows
    scanned and ``k k^T`` joins ``G`` for this one query; one compiled call finds the entries, their output and
    mass, and the exact output (:func:`decode_arrays`).  With no row (``k`` of shape (0, d)): :func:`attend` of
    the one query ``q``."""
    ints, floats = decode_arrays(view, k, v, q, key_id, eps)
    if floats[0] == UNRELIABLE:  # answered from the summary and every pending row instead
        assert view.fallback is not None
        if k.shape[0] == 0:
            return attend(view.fallback(), q, 2.0, eps)
        return _prefill_chunk(view.fallback(), k, v, q, key_id, 2.0, eps)
    return decode_result(ints, floats, v.shape[1], eps, view.moments is not None)


#: The arguments of :func:`~levstream._kernels.live.decode_p2`: the query, :func:`scan_arrays`, the step's key and
#: its id, the report threshold, the value rows, the step's value, the moment state's arrays.
_DecodeArgs = tuple[
    np.ndarray,
    np.ndarray,
    np.ndarray,
    np.ndarray,
    np.ndarray,
    np.ndarray,
    np.ndarray,
    np.ndarray,
    np.ndarray,
    np.ndarray,
    np.ndarray,
    np.ndarray,
    np.ndarray,
    np.ndarray,
    float,
    np.ndarray,
    np.ndarray,
    np.ndarray,
    np.ndarray,
    np.ndarray,
    np.ndarray,
]
#: The arguments of :func:`~levstream._kernels.live.append_row_and_keep` but the row, its id and its value
#: (``levstream.sketch._LiveRows.append_arrays``): the store's keys, ids, values and row count, then the live
#: cache's Gram matrix, factor, threshold, scratch, scanned rows (keys, ids, values, count) and their filters.
AppendArrays = tuple[
    np.ndarray,
    np.ndarray,
    np.ndarray,
    int,
    np.ndarray,
    np.ndarray,
    float,
    np.ndarray,
    np.ndarray,
    np.ndarray,
    np.ndarray,
    int,
    np.ndarray,
    np.ndarray,
    np.ndarray,
]


#: A decode step's moment buffer when there is none to write to (:func:`decode_take`).
NO_BUFFER: tuple[np.ndarray, np.ndarray, int] = (np.zeros((0, 0)), np.zeros((0, 0)), 0)
#: Whether :func:`decode_arrays`' kernel has run in this process (:func:`decode_take` runs it once).
_decode_p2_loaded = False


def decode_arrays(
    view: HeadView, k: np.ndarray, v: np.ndarray, q: np.ndarray, key_id: np.ndarray, eps: float
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`~levstream._kernels.live.decode_p2` of a decode step (see :func:`_decode_step`) on a live view with
    values: its ``(ints, floats)``, ``floats[0] == UNRELIABLE`` when the view cannot answer the query (nothing is
    changed either way)."""
    return decode_p2(*_decode_args(view, k, v, q, key_id, eps))


def decode_take(
    view: HeadView,
    k: np.ndarray,
    v: np.ndarray,
    q: np.ndarray,
    key_id: np.ndarray,
    eps: float,
    buffer: tuple[np.ndarray, np.ndarray, int],
    append: AppendArrays,
    take: bool = True,
) -> tuple[np.ndarray, np.ndarray, float]:
    """:func:`decode_arrays`, and the step's row taken in the same compiled call
    (:func:`~levstream._kernels.live.decode_and_take`): into the moment state's ``buffer`` (its keys, values and
    the row to write; :meth:`MomentState.buffer_slot`), and into the store and the live cache (``append``:
    :meth:`levstream.sketch._LiveRows.append_arrays`).  Returns ``(ints, floats, norm)``; ``norm`` is
    ``NOT_TAKEN`` when nothing was written (the rows or the query need the general path).  ``take=False``: the
    rows checked and the query answered, nothing written (the caller takes the row)."""
    global _decode_p2_loaded
    if not _decode_p2_loaded:
        # the general path's kernel (the same argument types), loaded with a decode loop's first step rather
        # than at a later step that takes the general path (a fold, a float32 row); it changes nothing
        decode_arrays(view, k, v, q, key_id, eps)
        _decode_p2_loaded = True
    return decode_and_take(*_decode_args(view, k, v, q, key_id, eps), *buffer, *append, take)


def _decode_args(
    view: HeadView, k: np.ndarray, v: np.ndarray, q: np.ndarray, key_id: np.ndarray, eps: float
) -> _DecodeArgs:
    """The arguments of :func:`~levstream._kernels.live.decode_p2` for a decode step on a live view with values."""
    assert view.values is not None
    moments = view.moments
    S, BK, BV = _NO_VALUES, _NO_VALUES, _NO_VALUES
    if moments is not None:
        S, BK, BV = moments.query_arrays()
    # the rows held are scanned in place (no copy of them per step); the new key is the one extra row
    return (
        q,
        *(view.scan or scan_arrays(view)),
        k,
        key_id,
        report_threshold(eps, 0.0),
        view.values,
        _NO_VALUES if view.extra_values is None else view.extra_values,
        v,
        S,
        BK,
        BV,
    )


def decode_result(
    ints: np.ndarray, floats: np.ndarray, dv: int, eps: float, exact: bool
) -> AttentionResult:
    """The result of a decode step's reliable :func:`decode_arrays` (``exact``: the view has a moment state)."""
    ints.flags.writeable = False  # the slices below, handed to the result, are read-only with them
    floats.flags.writeable = False
    h = 1 + int(ints[1])
    return AttentionResult.of_frozen(
        HeavyEntries.of_frozen(ints[:2], ints[2 : h + 1], floats[1:h], eps),
        floats[h : h + dv].reshape(1, dv),
        floats[h + dv : h + dv + 1],
        floats[h + dv + 1 :].reshape(1, dv) if exact else None,
    )
