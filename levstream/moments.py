"""``MomentState``: the exact p = 2 attention output of every key fed so far, from a state that does not grow.

For ``f(x) = x^2`` the output of query ``q`` over keys ``k_j`` with values ``v_j`` is

    o(q) = sum_j <q, k_j>^2 v_j / sum_j <q, k_j>^2 = phi(q)^T S / q^T G q,   S = sum_j phi(k_j) v_j^T,

with ``phi`` the symmetric degree-2 features (``<phi(q), phi(k)> = <q, k>^2``, ``D = d (d + 1) / 2`` of them) and
``G`` the Gram matrix the sketch keeps anyway (docs/theory.md, "Values and exact outputs").  ``S`` is the
recurrent state of symmetric-power ("power attention") transformers; merging two states adds them.

Rows fed one at a time wait in a small buffer (``BUFFER_ROWS``) and are folded into ``S`` together by one
matrix product; a query adds the waiting rows' terms ``<q, k>^2 v`` directly.  That product of a full buffer
is computed by an ingest helper while the stream goes on and added ``_SETTLE_ROWS`` rows later
(docs/theory.md, "Values and exact outputs": rows fed one at a time).  A rank-one update of ``S`` per
key would read and write all ``D x dv`` numbers for every key; the buffer makes that a BLAS-3 product.

A fold never forms ``phi(X)`` (``rows x D`` floats: for d = 64 it is 33 times the keys).  The rows of ``S``
are cut into blocks of about ``_FEATURE_BLOCK`` lifted features, the work items of the library's ingest
threads (:func:`levstream._threads.run_items`); an item lifts its features of ``_PIECE_ROWS`` rows at a time
into a small reused buffer that stays in cache and multiplies it by those rows' values with one BLAS
``dgemm`` (:func:`levstream._kernels.lift.fold_features`).  Every item owns its rows of ``S``, so the state
is the same bit for bit whatever the number of threads, and nothing of size ``rows x D`` is allocated, so
a long stream's memory does not creep with the allocator's growth.  The products of ``_GROUP_PIECES``
pieces (``_PIECE_ROWS * _GROUP_PIECES`` rows) are summed by BLAS in float64 and then added to the state
with a compensated (two-sum) addition, so the rounding error of ``S`` does not grow with the stream.  The
pair is renormalised in the same pass (``hi`` the rounded value of ``hi + lo``, ``lo`` the remainder), so queries
read ``hi`` as the state: no third array, no pass over the state after a fold.

A short stream is read another way (docs/theory.md, "Values and exact outputs": short streams).  Reading ``S``
costs ``D x dv`` multiply-adds per query whatever the number of keys, while the terms ``<q, k_j>^2 v_j`` of ``n``
keys cost ``n (d + dv)``: below ``n* = D dv / (d + dv)`` keys (1 040 at d = dv = 64) summing them is cheaper, and
more accurate.  So a new state records every row it is fed (a :class:`_RowRecord`) until their number would pass
``n*``, and queries sum their terms and do not read ``S``.  Meanwhile the rows are folded into ``S`` by an ingest
helper ``_RECORD_FOLD_ROWS`` at a time, straight from the record, after the row that completes them (their
product is added to ``S`` when the next hand-over is due: once per that many rows, not once per buffer).  The
row that would take the record past ``n*`` hands the rows not yet folded to a helper, and the state goes on
with its buffer as above; queries read the record until that product lands (at the latest when the buffer
fills), and ``S`` from then on.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from typing import Any

import numpy as np

from . import _offload
from ._buffers import grown_rows
from ._kernels.lift import (
    add_product,
    dgemm_function,
    feature_pairs,
    features_product,
    fold_features,
    lift_degree2,
    lift_rows,
)
from ._kernels.live import moment_numerator
from ._kernels.rows import first_moment_overflow, moment_row_fits
from ._threads import finish_items, get_num_threads, ingest_threads, run_items, start_items
from ._validation import check_finite
from .summaries.gram import _two_sum_add
from .summaries.lifted import lifted_dim

#: Keys waiting before they are folded into ``S`` (a query costs ``O(BUFFER_ROWS (d + dv))`` for them).
BUFFER_ROWS = 128
#: A full buffer of rows fed one at a time is not folded on the spot: another thread (the product worker of
#: :mod:`levstream._offload`, or an ingest helper) computes its product
#: ``phi(X)^T V`` while the stream goes on (queries read those rows directly meanwhile), and the product is added
#: to ``S`` when this many more rows have arrived, waiting for it only if it is not ready by then.  A decode
#: step then never stalls for a fold (a 128-row fold is ~1 ms at d = dv = 64), and the state is the same bit
#: for bit whatever the threads and their timing.
_SETTLE_ROWS = 32

#: Lifted features per work item of a fold (rows of ``S``; d = 64 makes 8 items of 260): the threads take items
#: as they come free, so a few items per thread balance the load.
_FEATURE_BLOCK = 256

#: Rows lifted at a time by an item: its lifted block (``_FEATURE_BLOCK x _PIECE_ROWS`` floats, 1 MiB) and
#: BLAS's packed copies of it stay in the core's L2 cache.
_PIECE_ROWS = 512

#: Pieces whose products BLAS sums before the compensated addition into ``(hi, lo)`` (the plain float64 sum
#: covers ``_PIECE_ROWS * _GROUP_PIECES`` rows; the two-sum then costs ~1% of the products).
_GROUP_PIECES = 2

#: Rows of a chunk transposed and shared by the items at a time (``X^T``: ``dim x _PASS_ROWS`` floats, 2 MiB
#: for d = 64; fewer rows for wider keys, never fewer than a group of pieces).
_PASS_ROWS = 4096

#: Folds of fewer multiply-adds (rows x D x dv) than this run on the calling thread alone.
_THREADED_WORK = 2**24

#: Up to this many rows are lifted by a serial loop: a parallel region costs more to start than it saves, and on a
#: busy machine it can wait milliseconds for a core.
_SERIAL_LIFT_ROWS = 1024


#: Rows the record of a short stream's rows holds at first (grown by doubling).
_RECORD_FIRST_ROWS = 256

#: A recording state hands its rows to an ingest helper this many at a time (their product is added to ``S``
#: before the next ones are handed over): four buffers' worth, so ``S`` is written a quarter as often.
_RECORD_FOLD_ROWS = 4 * BUFFER_ROWS

#: Up to this many queries the numerator is one compiled loop over ``S`` (a decode step).
_LOOP_QUERY_ROWS = 8

#: No rows (the compiled numerator's second set of rows when there is none).
_NO_ROWS = np.zeros((0, 0))
_NO_ROWS.flags.writeable = False


def direct_rows_limit(inner: int, value_dim: int, degree: int = 2) -> int:
    """The most rows a state records for direct queries (module docstring): the break-even ``D dv / (d + dv)``
    of summing their terms against reading ``S``, or 0 when that is no more than the buffer it reads directly
    anyway (or for degree 4, whose lifted rows are as wide as ``S``'s rows)."""
    if degree != 2:
        return 0
    limit = lifted_dim(inner) * value_dim // (inner + value_dim)
    return limit if limit > BUFFER_ROWS else 0


def _lift(X: np.ndarray) -> np.ndarray:
    return lift_rows(X) if X.shape[0] <= _SERIAL_LIFT_ROWS else lift_degree2(X)


_pairs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
#: This thread's buffers of every fold ("block": an item's lifted block and product; "xt": a pass's ``X^T``).
_scratch = threading.local()


#: Whether this process has loaded the kernels of a pending fold (:func:`_load_fold_kernels`).
_fold_kernels_loaded = False


def _load_fold_kernels() -> None:
    """Load (or compile) the kernels a pending fold runs, on a product of one row: once per process, when its
    first state is made, not at the first full buffer of a decode loop (there it cost ~10 ms from numba's cache,
    ~0.7 s on a fresh install, in the middle of the loop)."""
    global _fold_kernels_loaded
    ia, ib = feature_pairs(2)
    D = ia.shape[0]
    product = np.zeros((D, 1))
    features_product(
        np.zeros((2, 1)), np.zeros((1, 1)), ia, ib, 1, np.empty(D), product, dgemm_function()
    )
    add_product(np.zeros((D, 1)), np.zeros((D, 1)), product)
    _fold_kernels_loaded = True


def _scratch_floats(name: str, n: int) -> np.ndarray:
    """A float64 array of at least ``n`` elements, this thread's own, kept between folds (grown when needed)."""
    flat = getattr(_scratch, name, None)
    if flat is None or flat.size < n:
        flat = np.empty(n)
        setattr(_scratch, name, flat)
    return flat


def _pass_rows(inner: int) -> int:
    """Rows per pass over the feature blocks: ``_PASS_ROWS`` for keys up to width 64, fewer for wider ones (degree
    4 lifts the keys first), a whole number of groups of pieces."""
    group = _PIECE_ROWS * _GROUP_PIECES
    return max(group, min(_PASS_ROWS, (_PASS_ROWS * 64 // max(inner, 1)) // group * group))


def _feature_bounds(D: int) -> list[int]:
    """The feature blocks of a fold (work items): about ``_FEATURE_BLOCK`` lifted features each."""
    n_blocks = max(1, round(D / _FEATURE_BLOCK))
    return [D * i // n_blocks for i in range(n_blocks + 1)]


def _fold_pass(
    hi: np.ndarray, lo: np.ndarray, XT: np.ndarray, V: np.ndarray, bounds: list[int], n_threads: int
) -> None:
    """One pass: every feature block ``bounds[i] .. bounds[i + 1]`` of ``hi + lo += phi(X)^T V`` is a work item."""
    ia, ib = _pairs[XT.shape[0]]
    dv = V.shape[1]
    width = max(b - a for a, b in itertools.pairwise(bounds))
    dgemm = dgemm_function()

    def item(i: int) -> None:
        f0, f1 = bounds[i], bounds[i + 1]
        flat = _scratch_floats("block", width * (_PIECE_ROWS + dv))
        C = flat[width * _PIECE_ROWS : width * _PIECE_ROWS + (f1 - f0) * dv].reshape(f1 - f0, dv)
        fold_features(XT, V, ia, ib, f0, f1, _PIECE_ROWS, _GROUP_PIECES, flat, C, hi, lo, dgemm)

    run_items(item, len(bounds) - 1, n_threads)


def _fold_moments(hi: np.ndarray, lo: np.ndarray, X: np.ndarray, V: np.ndarray) -> None:
    """``hi + lo += phi(X)^T V`` (module docstring): the feature blocks on the ingest threads, ``X^T`` of
    :func:`_pass_rows` rows at a time shared by them.  Nothing of size ``rows x D`` is allocated."""
    m, inner = X.shape
    D, dv = hi.shape
    if m == 0 or D == 0 or dv == 0:
        return
    if inner not in _pairs:
        _pairs[inner] = feature_pairs(inner)
    bounds = _feature_bounds(D)
    V = np.ascontiguousarray(V, dtype=np.float64)
    step = _pass_rows(inner)
    with ingest_threads() as n_threads:
        threads = n_threads if m * D * dv >= _THREADED_WORK else 1
        xt = _scratch_floats("xt", inner * min(m, step))
        for s in range(0, m, step):
            e = min(m, s + step)
            XT = xt[: inner * (e - s)].reshape(inner, e - s)
            np.copyto(XT, X[s:e].T)
            _fold_pass(hi, lo, XT, V[s:e], bounds, threads)


#: The most multiply-adds of one BLAS ``dgemm`` that OpenBLAS runs on the calling thread alone, whatever its
#: thread setting (``m n k <= 65536 x 4``, its ``GEMM_MULTITHREAD_THRESHOLD``): a pending product is cut into
#: products of that size, so that the helper computing it starts no BLAS thread next to the stream's own.
_SINGLE_THREAD_GEMM = 65536 * 4


class _PendingFold:
    """The product ``phi(X)^T V`` of a full buffer, computed off the caller's thread: by the product worker, which
    never takes the GIL (:mod:`levstream._offload`), or where that is not available by an ingest helper
    (:func:`levstream._threads.start_items`); with a thread budget of 1 by whoever asks for it first.  Either runs
    one compiled call that holds no lock and changes no thread setting (BLAS calls small enough to stay on that
    thread, for ``value_dim <= 2048``), the same bit for bit.  ``X`` and ``V`` are read, never written, until the
    product is computed: the caller leaves them alone until :meth:`result` has returned.  The product is read-only
    once computed and may be shared by copies of the state (and asked for by several threads at once)."""

    __slots__ = ("_compute", "_job", "_lock", "_ticket", "inputs", "nbytes", "product")

    def __init__(self, X: np.ndarray, V: np.ndarray, D: int) -> None:
        m, inner = X.shape
        dv = V.shape[1]
        if inner not in _pairs:
            _pairs[inner] = feature_pairs(inner)
        ia, ib = _pairs[inner]
        block = max(1, min(D, _SINGLE_THREAD_GEMM // max(1, m * dv)))
        dgemm = dgemm_function()
        self.nbytes = D * dv * 8
        #: the rows it reads (views: the state counts their arrays unless it holds them itself)
        self.inputs = (X, V)
        self.product = _NO_ROWS
        self._lock = threading.Lock()

        def compute(
            _: int,
        ) -> None:  # on a helper, or the caller: the copies and the product are made there
            product = np.zeros((D, dv))
            if D and dv and m:
                buf = _scratch_floats("block", block * m)
                features_product(np.ascontiguousarray(X.T), V, ia, ib, block, buf, product, dgemm)
            self.product = product

        self._compute = compute
        self._job: Any = None
        self._ticket = _offload.submit(X, V, ia, ib, block, D)
        if self._ticket is None:
            self._job = start_items(compute, 1, get_num_threads())

    def result(self) -> np.ndarray:
        """The product, once computed: by the worker or the helper, or here when neither has started it (or the
        helper failed).  One thread at a time; an interruption here (``KeyboardInterrupt``) propagates and leaves
        the product to be computed by the next call."""
        with self._lock:
            if self.product is _NO_ROWS and self._ticket is not None:
                ticket, self._ticket = (
                    self._ticket,
                    None,
                )  # whatever happens, the ticket is not asked again
                product = ticket.wait()  # None in a forked child: computed below
                if product is not None:
                    self.product = product
            if self.product is _NO_ROWS and self._job is not None:
                job, self._job = self._job, None  # whatever happens, the job is not asked again
                # the helper failed (no memory for the product?): computed below, on this thread
                with contextlib.suppress(Exception):
                    finish_items(job)
            if self.product is _NO_ROWS:
                self._compute(0)
            return self.product


def _moment_state_from(
    dim: int, value_dim: int, degree: int, arrays: dict[str, np.ndarray]
) -> MomentState:
    """Unpickling: :meth:`MomentState.from_state`."""
    return MomentState.from_state(dim, value_dim, arrays, degree)


def _moment_overflow(x: np.ndarray, v: np.ndarray, degree: int, which: str) -> ValueError:
    with np.errstate(over="ignore", invalid="ignore"):
        kk = float(np.sum(np.square(x.astype(np.float64))))
        vm = float(np.max(np.abs(v)))
    lifted = " of the lifted keys (exact p = 4)" if degree == 4 else ""
    return ValueError(
        f"exact outputs: the moment state cannot hold this key and value ({which}: ||k||^2 = {kk:.3g}, "
        f"max |v| = {vm:.3g}); its terms k_a k_b v_c{lifted} overflow float64.  Rescale the values (outputs "
        "scale with them) or the keys."
    )


class _RowRecord:
    """Every row of a short stream's state in the order fed: keys (the state's inner width) and values, in arrays
    grown by doubling.  Rows ``0 .. folded - 1`` are in ``S`` or in a pending product; rows are never written once
    recorded (a pending product reads them), except by a rescale, which adds the pending product first."""

    __slots__ = ("folded", "keys", "most", "n", "values")

    def __init__(self, inner: int, value_dim: int, rows: int, most: int) -> None:
        rows = min(rows, most)
        self.keys = np.empty((rows, inner))
        self.values = np.empty((rows, value_dim))
        self.n = 0
        self.folded = 0
        #: the most rows it will hold (its arrays grow no larger)
        self.most = most

    @property
    def nbytes(self) -> int:
        return int(self.keys.nbytes + self.values.nbytes)

    def room(self, m: int) -> None:
        """Make room for ``m`` more rows (new arrays, the rows copied: a pending product keeps reading the old
        ones); raises (``MemoryError``) changing nothing."""
        n = self.n
        keys = grown_rows(self.keys, n, n + m, self.most)
        values = grown_rows(self.values, n, n + m, self.most)
        self.keys, self.values = keys, values

    def append(self, X: np.ndarray, V: np.ndarray) -> None:
        self.room(X.shape[0])
        n, m = self.n, X.shape[0]
        self.keys[n : n + m] = X
        self.values[n : n + m] = V
        self.n = n + m

    def unfolded(self) -> tuple[np.ndarray, np.ndarray]:
        """The rows not in ``S`` nor in a pending product."""
        return self.keys[self.folded : self.n], self.values[self.folded : self.n]

    def copy(self) -> _RowRecord:
        out = _RowRecord.__new__(_RowRecord)
        out.keys, out.values = self.keys[: self.n].copy(), self.values[: self.n].copy()
        out.n, out.folded, out.most = self.n, self.folded, self.most
        return out


class MomentState:
    """``S = sum_j phi(k_j) v_j^T`` (shape ``(D, value_dim)``), accumulated in float64 with a compensated sum.

    ``degree=4`` keeps the same state over lifted keys (``<q, k>^4 = <phi(q), phi(k)>^2``) for exact p = 4
    outputs: ``D`` is then ``d (d + 1) / 2`` lifted once more, which only small ``d`` afford.

    Examples
    --------
    >>> import numpy as np
    >>> from levstream.moments import MomentState
    >>> rng = np.random.default_rng(0)
    >>> K, V, q = rng.standard_normal((50, 3)), rng.standard_normal((50, 2)), rng.standard_normal((1, 3))
    >>> S = MomentState(3, 2); S.add(K[:20], V[:20]); S.add_row(K[20], V[20]); S.add(K[21:], V[21:])
    >>> w = (K @ q[0]) ** 2
    >>> bool(np.allclose(S.numerator(q)[0], w @ V))
    True
    """

    def __init__(self, dim: int, value_dim: int, degree: int = 2) -> None:
        if degree not in (2, 4):
            raise ValueError(f"degree must be 2 or 4; got {degree} instead.")
        self.dim, self.value_dim, self.degree = int(dim), int(value_dim), int(degree)
        if not _fold_kernels_loaded:
            _load_fold_kernels()
        #: degree 4: ``<q, k>^4 = <phi(q), phi(k)>^2``, so the state of degree 2 over lifted keys and queries
        self._inner = self.dim if degree == 2 else lifted_dim(self.dim)
        D = lifted_dim(self._inner)
        self._hi = np.zeros((D, self.value_dim))
        self._lo = np.zeros((D, self.value_dim))
        self._sum: np.ndarray | None = None
        # rows not in S: the first BUFFER_ROWS rows hold a full buffer whose product is pending (while
        # ``_pending`` is set), the next ones the buffer (``_buf_n`` rows), so the rows a query reads directly
        # are one contiguous slice
        self._rows_keys = np.empty((2 * BUFFER_ROWS, self._inner))
        self._rows_values = np.empty((2 * BUFFER_ROWS, self.value_dim))
        self._buf_keys = self._rows_keys[BUFFER_ROWS:]
        self._buf_values = self._rows_values[BUFFER_ROWS:]
        self._buf_n = 0
        self._pending: _PendingFold | None = None
        # a short stream's rows (module docstring): recorded from the start while ``_recording``; kept after that
        # only until the product of the rows not folded then lands
        self._direct_limit = direct_rows_limit(self._inner, self.value_dim, degree)
        self._record: _RowRecord | None = None
        self._recording = False
        if self._direct_limit:
            # up to the limit while recording, and a buffer's worth after it until the last product lands
            most = self._direct_limit + BUFFER_ROWS
            self._record = _RowRecord(self._inner, self.value_dim, _RECORD_FIRST_ROWS, most)
            self._recording = True

    @property
    def nbytes(self) -> int:
        """Bytes held (the compensated state, the row buffers, a pending product and a short stream's rows)."""
        pending = 0 if self._pending is None else self._pending.nbytes + self._retired_nbytes()
        record = 0 if self._record is None else self._record.nbytes
        return int(
            self._hi.nbytes
            + self._lo.nbytes
            + self._rows_keys.nbytes
            + self._rows_values.nbytes
            + pending
            + record
        )

    def _retired_nbytes(self) -> int:
        """Bytes of the arrays a pending product reads that the state no longer holds itself (a record's arrays
        before it grew: alive until the product lands)."""
        assert self._pending is not None
        held = {id(self._rows_keys), id(self._rows_values)}
        if self._record is not None:
            held.update((id(self._record.keys), id(self._record.values)))
        total = 0
        for arr in self._pending.inputs:
            base = arr if arr.base is None else arr.base
            if id(base) not in held and isinstance(base, np.ndarray):
                total += base.nbytes
        return total

    @property
    def direct(self) -> bool:
        """Whether queries sum the terms of every row held (a short stream's record) instead of reading ``S``."""
        return self._record is not None

    def _drop_record(self) -> None:
        self._record = None
        self._recording = False

    def _start_product(self, X: np.ndarray, V: np.ndarray) -> bool:
        """Start the product of rows ``X``, ``V`` (left alone until it lands) on an ingest helper, as the pending
        product; False (nothing changed) when that cannot be started."""
        try:
            self._pending = _PendingFold(X, V, self._hi.shape[0])
        except Exception:  # noqa: BLE001 - the caller still has the rows
            return False
        return True

    def _hand_over(self, X: np.ndarray, V: np.ndarray) -> None:
        """:meth:`_start_product`, or a fold on the spot when that cannot be started."""
        if not self._start_product(X, V):
            self._fold(X, V)

    def _last_hand_over(self) -> int:
        """The row count of the one hand-over made before the limit whatever the rows since the last one: half a
        hand-over before it, so that the product before has landed when the record fills."""
        return self._direct_limit - _RECORD_FOLD_ROWS // 2

    def _hand_over_due(self, n: int) -> bool:
        """Whether a recording state that holds ``n`` rows hands its rows not yet folded over (after the row that
        makes ``n``): every ``_RECORD_FOLD_ROWS`` rows, and once at :meth:`_last_hand_over`."""
        record = self._record
        assert record is not None
        folded = record.folded
        last = self._last_hand_over()
        return n - folded >= _RECORD_FOLD_ROWS or (n > folded and folded < last <= n)

    def _hand_over_record(self) -> None:
        """Hand the record's rows not yet folded to a helper (after the product before: :meth:`prepare` adds it
        before anything changes).  Never raises for want of a helper: the rows then stay unfolded, in the record,
        and the next row tries again."""
        record = self._record
        assert record is not None
        self.settle()  # a no-op after prepare()
        if self._start_product(*record.unfolded()):
            record.folded = record.n

    def _stop_recording(self) -> None:
        """The record is full: its rows not yet folded go to a helper, and the state takes rows in its buffer.
        The record stays for queries until that product lands (:meth:`settle`).  Called by :meth:`add_row` and
        :meth:`add` with fewer than a buffer's worth of rows, after :meth:`prepare` added the product before."""
        record = self._record
        assert record is not None and self._buf_n == 0
        self.settle()  # a no-op after prepare()
        keys, values = record.unfolded()
        if keys.shape[0]:
            self._hand_over(keys, values)  # should it fail, nothing has changed
        self._recording = False
        record.folded = record.n
        if self._pending is None:  # nothing pending: S holds every row
            self._drop_record()

    def piece_rows(self) -> int:
        """The most rows the next :meth:`add` may take for the state to end as if they were fed one at a time:
        up to where the buffer fills, or, while recording, up to the record's next hand-over (made after the
        piece's last row) or to its limit (the row past it starts a piece of fewer than a buffer's worth, which
        stops recording), and never a chunk that :meth:`add` folds on the spot.  A multi-head sketch hands its
        tokens to the heads in such pieces."""
        record = self._record
        if not self._recording:
            return BUFFER_ROWS - self._buf_n
        assert record is not None
        n, folded, limit = record.n, record.folded, self._direct_limit
        if n >= limit:
            return BUFFER_ROWS - 1
        end = min(folded + _RECORD_FOLD_ROWS, limit)
        last = self._last_hand_over()
        if folded < last and last > n:
            end = min(end, last)
        return max(1, min(end - n, BUFFER_ROWS))

    def _settle_rows(self) -> int:
        """Buffered rows at which a pending product is added: ``_SETTLE_ROWS``, or the whole buffer while a
        full record's last product is pending (its rows are read from the record meanwhile)."""
        return _SETTLE_ROWS if self._record is None else BUFFER_ROWS

    def _fold(self, X: np.ndarray, V: np.ndarray) -> None:
        if X.shape[0] == 0:
            return
        _fold_moments(self._hi, self._lo, X, V)
        # a fold leaves every entry of hi the rounded value of hi + lo (fold_features): hi is the state to read
        # (no copy, no pass); after a merge or a rescale ``_sum`` is rebuilt once, on the next query
        self._sum = self._hi

    def _fold_buffer(self) -> None:
        self.settle()
        if self._buf_n:
            self._fold(self._buf_keys[: self._buf_n], self._buf_values[: self._buf_n])
            self._buf_n = 0

    def settle(self) -> None:
        """Add a pending product to ``S`` now (waiting for it if needed); the rows it covers leave the buffer.
        Should that fail, nothing has changed."""
        pending = self._pending
        if pending is None:
            return
        # leaves hi the rounded value of hi + lo, as a fold does
        add_product(self._hi, self._lo, pending.result())
        self._pending = None
        self._sum = self._hi
        # a full record's last product: S holds its rows
        if self._record is not None and not self._recording:
            self._drop_record()

    def _settled_pair(self) -> tuple[np.ndarray, np.ndarray]:
        """``(hi, lo)`` as they are once the pending product is added (that sum made on copies: this state is left
        as it is), so that what is read from a state never depends on when its product lands."""
        if self._pending is None:
            return self._hi, self._lo
        hi, lo = self._hi.copy(), self._lo.copy()
        add_product(hi, lo, self._pending.result())
        return hi, lo

    def prepare(self, m: int) -> None:
        """Make ready for ``m`` more rows: add a pending product when they bring the buffer to ``_SETTLE_ROWS``
        rows (or past its room), or, while recording, when they call for a hand-over, a fold on the spot or the
        end of the record; make room for them in the record.  Called before anything else changes (by
        :meth:`add_row` and :meth:`add` themselves, and by a sketch before it records the rows anywhere): should
        it fail, nothing has changed, and the bytes of the state are the same (they hold a pending product
        added).  A full buffer therefore never meets a pending product, and after it :meth:`add` waits for none."""
        record = self._record
        if self._recording:
            assert record is not None
            n = record.n + m
            if n > self._direct_limit or m > BUFFER_ROWS or self._hand_over_due(n):
                self.settle()
            # rows past the limit (fewer than a buffer's worth) join the record until its last product lands
            if n <= self._direct_limit or m < BUFFER_ROWS:
                record.room(m)
            return
        if self._pending is not None and self._buf_n + m >= self._settle_rows():
            self.settle()
        if self._record is not None:
            self._record.room(m)

    def _after_adding(self) -> None:
        """Hand a full buffer to the helpers (:class:`_PendingFold`); lifted states, and a hand-over that cannot
        be made, fold it on the spot (a lifted state's memory budget counts two arrays of its size, not the third
        a pending product adds)."""
        if self._buf_n < BUFFER_ROWS:
            return
        if self.degree == 4 or self._pending is not None:
            self._fold_buffer()
            return
        self._rows_keys[:BUFFER_ROWS] = self._buf_keys
        self._rows_values[:BUFFER_ROWS] = self._buf_values
        if not self._start_product(self._rows_keys[:BUFFER_ROWS], self._rows_values[:BUFFER_ROWS]):
            self._fold_buffer()  # the rows are still in the buffer: folded here
            return
        self._buf_n = 0

    @staticmethod
    def nbytes_for(dim: int, value_dim: int, degree: int = 2) -> int:
        """Bytes of the state for keys of width ``dim`` (two ``D x value_dim`` float64 arrays)."""
        inner = dim if degree == 2 else lifted_dim(dim)
        return 2 * 8 * lifted_dim(inner) * value_dim

    def _inner_rows(self, X: np.ndarray) -> np.ndarray:
        return X if self.degree == 2 else _lift(X)

    def check(self, X: np.ndarray, V: np.ndarray, where: str = "") -> None:
        """Refuse keys ``X`` with values ``V`` whose terms the state could not hold: ``||k||^2 max |v|`` (degree 4:
        ``||k||^4 max |v|``) overflows float64, though each row alone is finite.  Called before anything changes
        (``where`` prefixes the row named in the error)."""
        i = first_moment_overflow(X, V, self.degree // 2)
        if i >= 0:
            # a key with a nan/inf (a chunk's keys are checked for that later) shows here as a term that overflows
            check_finite(X, "X")
            raise _moment_overflow(X[i], V[i], self.degree, f"{where}row {i}")

    def check_row(self, x: np.ndarray, v: np.ndarray) -> None:
        """Refuse one key and value as :meth:`add_row` would (:meth:`check` of one row), changing nothing."""
        if not moment_row_fits(x, v, self.degree // 2):
            raise _moment_overflow(x, v, self.degree, "the row")

    def add_row(self, x: np.ndarray, v: np.ndarray, checked: bool = False) -> None:
        """Add one key and its value (buffered, or recorded); refused, changing nothing, as by :meth:`check`
        (``checked``: :meth:`check_row` passed already)."""
        if not checked:
            self.check_row(x, v)
        _offload.prepare()  # (the worker that takes the products of rows fed one at a time)
        if self.degree == 4:
            x = _lift(x[None, :])[0]
        if self._record is not None:  # a short stream
            self.prepare(1)
            if self._recording and self._record.n < self._direct_limit:
                self._record.append(x[None, :], v[None, :])
                if self._hand_over_due(self._record.n):
                    self._hand_over_record()
                return
            if self._recording:
                self._stop_recording()
        elif self._pending is not None and self._buf_n + 1 >= _SETTLE_ROWS:
            self.settle()  # prepare(1), inline: the decode step's path
        n = self._buf_n
        self._buf_keys[n] = x
        self._buf_values[n] = v
        self._buf_n = n + 1
        # a full record whose last product is pending: queries read the record till it lands
        if self._record is not None:
            self._record.append(x[None, :], v[None, :])
        if n + 1 == BUFFER_ROWS:
            self._after_adding()

    def add(self, X: np.ndarray, V: np.ndarray) -> None:
        """Fold keys ``X`` (m, dim) and their values ``V`` (m, value_dim): ``S += phi(X)^T V``."""
        if X.shape[0] == 0:
            return
        X = self._inner_rows(X)
        m = X.shape[0]
        if self._recording:
            record = self._record
            assert record is not None
            self.prepare(m)
            if record.n + m <= self._direct_limit:
                record.append(X, V)
                # a chunk (a prompt) is folded here, as a chunk past the buffer is
                if m > BUFFER_ROWS:
                    self._fold(*record.unfolded())
                    record.folded = record.n
                elif self._hand_over_due(record.n):
                    self._hand_over_record()
                return
            if m < BUFFER_ROWS:
                self._stop_recording()
            else:  # a chunk past the limit: the record's rows not folded, then the chunk, folded here
                self._leave_record()
        if self._buf_n + m <= BUFFER_ROWS:
            self.prepare(m)
            self._buf_keys[self._buf_n : self._buf_n + m] = X
            self._buf_values[self._buf_n : self._buf_n + m] = V
            self._buf_n += m
            if self._record is not None:
                self._record.append(X, V)
            self._after_adding()
            return
        self._fold_buffer()  # adds a full record's last product: the record goes
        self._fold(X, V)

    def _leave_record(self) -> None:
        """Fold a record's rows not in ``S`` (on the spot) and drop it: the state reads ``S`` from then on."""
        record = self._record
        if record is None:
            return
        self.settle()
        if self._record is not None:
            self._fold(*record.unfolded())
            self._drop_record()

    def _rows_not_in_state(self) -> tuple[np.ndarray, np.ndarray]:
        """The rows whose terms are in neither ``S`` nor a pending product: a recording state's unfolded rows,
        otherwise the buffer."""
        if self._recording:
            assert self._record is not None
            return self._record.unfolded()
        return self._buf_keys[: self._buf_n], self._buf_values[: self._buf_n]

    def merge(self, other: MomentState) -> None:
        """Add ``other``'s state (keys of another shard): ``S = S1 + S2``.  A merged state reads ``S``."""
        self._leave_record()
        self._fold_buffer()
        ohi, olo = other._settled_pair()
        _two_sum_add(self._hi, self._lo, ohi)
        self._lo += olo
        keys, values = other._rows_not_in_state()
        if keys.shape[0]:
            self._fold(keys, values)
        self._sum = None

    def scale(self, factor: float) -> None:
        """Multiply the state by ``factor`` (``S <- factor S``; the waiting keys by ``sqrt(factor)``): a decaying
        stream's change of reference frame (docs/theory.md, "Decay and gates").  Exact for a power of 4."""
        self.settle()
        self._hi *= factor
        self._lo *= factor
        self._buf_keys[: self._buf_n] *= np.sqrt(factor)
        record = self._record  # its product settled above: nothing reads its rows meanwhile
        if record is not None:
            record.keys[: record.n] *= np.sqrt(factor)
        self._sum = None

    def copy(self) -> MomentState:
        """An independent copy."""
        out = MomentState.__new__(MomentState)
        out.dim, out.value_dim, out._buf_n = self.dim, self.value_dim, self._buf_n
        out.degree, out._inner = self.degree, self._inner
        out._hi, out._lo, out._sum = self._hi.copy(), self._lo.copy(), None
        out._rows_keys, out._rows_values = self._rows_keys.copy(), self._rows_values.copy()
        out._buf_keys = out._rows_keys[BUFFER_ROWS:]
        out._buf_values = out._rows_values[BUFFER_ROWS:]
        out._pending = self._pending  # shared: computed once, never written after
        out._direct_limit, out._recording = self._direct_limit, self._recording
        out._record = None if self._record is None else self._record.copy()
        return out

    __copy__ = copy

    def __deepcopy__(self, memo: dict) -> MomentState:
        return self.copy()

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # the row buffer is a view of the rows array, and a pending product is a job: through to_state
        return _moment_state_from, (self.dim, self.value_dim, self.degree, self.to_state())

    def query_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(S, keys waiting, their values)``: what a query reads (``S`` as :func:`moment_numerator` takes it).
        A short stream's: no rows of ``S`` (shape ``(0, value_dim)``) and every row it holds."""
        record = self._record
        if record is not None:
            return self._no_state(), record.keys[: record.n], record.values[: record.n]
        if self._sum is None:
            self._sum = self._hi + self._lo
        # a pending product's rows are read directly too
        first = 0 if self._pending is not None else BUFFER_ROWS
        last = BUFFER_ROWS + self._buf_n
        return self._sum, self._rows_keys[first:last], self._rows_values[first:last]

    def buffer_slot(self) -> tuple[np.ndarray, np.ndarray, int] | None:
        """``(buffer keys, buffer values, row)`` when :meth:`add_row` of the next row would only write it to that
        row of the buffer (no record, no lift, no settle, and not the row that fills the buffer): a compiled decode
        step then writes it there itself and calls :meth:`took_buffered_row`.  None otherwise."""
        n = self._buf_n
        if (
            self._record is None
            and self.degree == 2
            and n + 1 < BUFFER_ROWS
            and (self._pending is None or n + 1 < _SETTLE_ROWS)
        ):
            return self._buf_keys, self._buf_values, n
        return None

    def took_buffered_row(self) -> None:
        """The row :meth:`buffer_slot` named was written there (checked as :meth:`check_row` checks): the state
        holds it, as after :meth:`add_row` of it."""
        _offload.prepare()  # as add_row (the worker that takes the products of rows fed one at a time)
        self._buf_n += 1

    def _no_state(self) -> np.ndarray:
        return np.zeros((0, self.value_dim))

    def numerator(
        self, Q: np.ndarray, keys: np.ndarray | None = None, values: np.ndarray | None = None
    ) -> np.ndarray:
        """``sum_j <q, k_j>^degree v_j`` for every row of ``Q`` (shape (m, value_dim)), over the keys of the state
        and the rows ``keys`` (with ``values``) not fed yet, when given (a decode step's own key)."""
        Q = self._inner_rows(Q)
        S, BK, BV = self.query_arrays()
        XK, XV = (_NO_ROWS, _NO_ROWS) if keys is None else (self._inner_rows(keys), values)
        if Q.shape[0] <= _LOOP_QUERY_ROWS and Q.flags.c_contiguous:
            return moment_numerator(Q, S, BK, BV, XK, XV)  # no lifted copy, no threaded GEMV
        out = _lift(Q) @ S if S.shape[0] else np.zeros((Q.shape[0], self.value_dim))
        for K, V in ((BK, BV), (XK, XV)):
            if K.shape[0]:
                W = Q @ K.T
                out += (W * W) @ V
        return out

    def to_state(self) -> dict[str, np.ndarray]:
        """Named arrays for serialization (the state and the waiting rows; a pending product is added to copies
        of the state, so the bytes do not depend on when it is added).

        A recording state writes its rows not in ``S`` as the waiting rows (more than a buffer's worth, possibly:
        bytes an older reader refuses with a clear error rather than lose rows) and its rows in ``S`` as
        ``moments_folded_*`` (which an older reader does not need), so that a state loaded mid-stream records and
        answers as the one saved, to the last bit.  A full record whose last product is pending is written as
        the state it becomes when that product lands."""
        hi, lo = self._settled_pair()
        keys, values = self._rows_not_in_state()
        out = {
            "moments_hi": hi,
            "moments_lo": lo,
            "moments_buf_keys": keys,
            "moments_buf_values": values,
        }
        if self._recording:
            assert self._record is not None
            f = self._record.folded
            out["moments_folded_keys"] = self._record.keys[:f]
            out["moments_folded_values"] = self._record.values[:f]
        return out

    @classmethod
    def from_state(
        cls, dim: int, value_dim: int, arrays: dict[str, np.ndarray], degree: int = 2
    ) -> MomentState:
        """Inverse of :meth:`to_state` (raises ``ValueError`` for inconsistent shapes)."""
        out = cls(dim, value_dim, degree)
        for name in ("moments_hi", "moments_lo"):
            arr = arrays[name]
            if arr.shape != out._hi.shape:
                raise ValueError(
                    f"stored array {name!r} must have shape {out._hi.shape}; got {arr.shape}"
                )
        out._hi, out._lo = arrays["moments_hi"].copy(), arrays["moments_lo"].copy()
        keys, values = arrays["moments_buf_keys"], arrays["moments_buf_values"]
        m = keys.shape[0]
        if keys.shape != (m, out._inner) or values.shape != (m, value_dim):
            raise ValueError(
                f"stored moment rows must have shapes ({m}, {out._inner}) and ({m}, {value_dim}); got "
                f"{keys.shape} and {values.shape}"
            )
        if "moments_folded_keys" in arrays:  # a recording state (see to_state)
            fk, fv = arrays["moments_folded_keys"], arrays["moments_folded_values"]
            f = fk.shape[0]
            if (
                fk.shape != (f, out._inner)
                or fv.shape != (f, value_dim)
                or f + m > out._direct_limit
            ):
                raise ValueError(
                    f"stored recorded rows must be at most {out._direct_limit} rows of width {out._inner} "
                    f"(values {value_dim}) with the waiting rows; got {fk.shape}, {fv.shape} and {m} waiting"
                )
            assert out._record is not None
            out._record.append(fk, fv)
            out._record.folded = f
            out._record.append(keys, values)
            return out
        if m >= BUFFER_ROWS:
            raise ValueError(
                f"stored moment buffer must hold fewer than {BUFFER_ROWS} rows; got {m}"
            )
        out._drop_record()  # bytes of a state reading S (or written before records existed)
        out._buf_keys[:m], out._buf_values[:m], out._buf_n = keys, values, m
        return out
