"""Thread control: one cap on every thread levstream starts, and the helpers that apply it.

:func:`set_num_threads` / :func:`get_num_threads` (exported as ``levstream.set_num_threads`` and
``levstream.get_num_threads``, named as in numba) hold the library's thread budget: by default the cores
this process may run on.  The budget caps

* the shard threads of :func:`levstream.build_sketch` (``n_jobs`` shards run on at most that many
  threads; the shards, hence the result, do not depend on the cap) and the default ``n_jobs``;
* numba's threads (``numba.set_num_threads``) and the BLAS threads (threadpoolctl) in every section the
  library caps itself (:func:`capped_threads`): the builds, their tasks and shards, the command line, the
  demo and the benchmarks;
* the product worker of rows fed one at a time (:mod:`levstream._offload`): none below a budget of 2.

A cap only ever lowers: a BLAS limit the caller set with ``threadpoolctl.threadpool_limits``, or numba's
thread count in the calling thread, is never raised, and everything is restored on exit.  The budget is
process-wide; inside a capped section :func:`get_num_threads` also reports that section's lower cap (per
thread), so that code called from a shard thread plans for the threads it has.

Thread policy of the parallel builds
------------------------------------
A task that runs next to ``slots`` other tasks gets ``max(1, budget // slots)`` threads for BLAS and for
numba, never more than the BLAS limit its process already has (distributed's nanny sets that to 1 per
worker process).  The BLAS limit is process-wide (one OpenBLAS thread pool per process, changed by one
thread at a time), so where several tasks share a process it is lowered once by the thread that runs them
all (the caller of the thread pool, or of Dask's threaded scheduler) and tasks only check it; numba's limit
is per thread and set in every task.  numba's ``workqueue`` threading layer aborts the process when two
threads launch parallel kernels at once, so under that layer the threads of one process take turns, chunk
by chunk (:func:`numba_turn`; install ``tbb``, or use the default OpenMP layer, to run them side by side).

Thread policy of one stream (``update_many``, ``extend``, ``update``)
--------------------------------------------------------------------
Folding blocks of keys into a sketch runs in an *ingest section* (:func:`ingest_threads`): BLAS is held to
one thread for the section (process-wide, then restored) and the slabs of the blocks are shared among the
calling thread and up to ``get_num_threads() - 1`` persistent helper threads (:func:`run_items`), each
running single-threaded BLAS (``syrk``, ``trmm``) and serial numba kernels.  Measured on the 2-core
reference machine: multithreaded OpenBLAS barely speeds up the tall-skinny ``syrk`` of a key block, and
under load from other processes it slows it by 10-50x, while two threads on separate slabs take half the
time.  Serial numba kernels start no numba threads, so nothing spins between BLAS calls.  The split into
slabs does not depend on the number of threads, and partial results are combined in a fixed order, so
the sketch is the same bit for bit whatever the thread budget.

Rows fed one at a time with exact outputs (``update``, a decode step): a full buffer's moment product goes to the
product worker (:mod:`levstream._offload`: one thread that never takes the GIL, none below a budget of 2), or
where there is none, as a job handed to a helper without waiting (:func:`start_items`), whose result whoever needs
it later finishes (:func:`finish_items`: the item runs there if no helper took it), so nothing waits on a busy
pool.
"""

from __future__ import annotations

import itertools
import os
import queue
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

from ._validation import check_int

__all__ = ["get_num_threads", "set_num_threads"]

_budget: int | None = None  # set_num_threads; None: the available cores
_section = threading.local()  # .cap: the cap of the innermost capped_threads section of this thread
_workqueue_lock = threading.Lock()
_controller: Any = (
    None  # threadpoolctl.ThreadpoolController of the libraries loaded when it was made
)
_controller_modules = -1  # len(sys.modules) then: an import since may have loaded another BLAS


def available_cores() -> int:
    """Cores this process may run on (CPU affinity where the OS reports it)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def set_num_threads(n: int) -> None:
    """Cap every thread levstream starts at ``n``: its own threads, numba's and the BLAS threads it sets.

    Parameters
    ----------
    n : int
        The thread budget, ``>= 1``.  Process-wide; the default is the number of cores this process may
        run on.  numba's threads are further limited to ``numba.config.NUMBA_NUM_THREADS``.

    Raises
    ------
    TypeError
        If ``n`` is not an integer.
    ValueError
        If ``n < 1``.

    Notes
    -----
    ``levstream.build_sketch`` runs its ``n_jobs`` shards (default: ``n``) on at most ``n`` threads, with
    ``max(1, n // threads)`` BLAS and numba threads each; the shards, and so the sketch, are the same
    whatever the cap.  Sections that levstream caps itself never raise a BLAS limit set by the caller
    (``threadpoolctl.threadpool_limits``) nor numba's count in the calling thread, and restore both.

    Examples
    --------
    >>> import levstream as ls
    >>> before = ls.get_num_threads()
    >>> ls.set_num_threads(1)
    >>> ls.get_num_threads()
    1
    >>> ls.set_num_threads(before)
    """
    global _budget
    _budget = check_int(n, "n", minimum=1)


def get_num_threads() -> int:
    """The thread budget set by :func:`set_num_threads` (default: the cores this process may run on).

    Inside a section levstream caps itself (a build's shard, a Dask task) it is that section's lower cap.

    Examples
    --------
    >>> import levstream as ls
    >>> ls.get_num_threads() >= 1
    True
    """
    budget = available_cores() if _budget is None else _budget
    section = getattr(_section, "cap", None)
    return budget if section is None else min(budget, section)


def _threadpools() -> Any:
    """A cached ``ThreadpoolController``, remade after any import (it may have loaded another library).

    Making one scans the loaded shared libraries (about 1 ms); reading and limiting its pools costs
    microseconds, which keeps capped sections cheap.
    """
    global _controller, _controller_modules
    if _controller is None or _controller_modules != len(sys.modules):
        from threadpoolctl import ThreadpoolController

        _controller_modules = len(sys.modules)
        _controller = ThreadpoolController()
    return _controller


def blas_threads(user_api: str | None = "blas") -> int:
    """The largest thread limit of the BLAS libraries loaded in this process (0 if none is found).

    ``user_api=None`` includes every thread pool threadpoolctl knows (BLAS and OpenMP).
    """
    return max(
        (
            lib.num_threads
            for lib in _threadpools().lib_controllers
            if user_api is None or lib.user_api == user_api
        ),
        default=0,
    )


_blas_lock = threading.Lock()
# the open lowered_blas sections of every thread of this process: (thread ident, limit, a token of its own)
_blas_sections: list[tuple[int, int, object]] = []
# the process-wide BLAS pools levstream lowered: filepath -> [controller, limit found, limit levstream set]
_blas_changed: dict[str, list[Any]] = {}


def _process_wide(lib: Any) -> bool:
    """Whether a library's thread limit is one per process (a BLAS on pthreads) rather than per thread
    (OpenMP's ``omp_set_num_threads``, and BLAS built on OpenMP)."""
    return bool(lib.user_api == "blas" and getattr(lib, "threading_layer", None) != "openmp")


# filepath -> (get, set): the C functions of a process-wide pool's limit, or None where threadpoolctl does not
# expose them (then its controller methods are used)
_limit_functions: dict[str, tuple[Callable[[], int], Callable[[int], None]] | None] = {}


def _c_limit(lib: Any) -> tuple[Callable[[], int], Callable[[int], None]] | None:
    """The library's own ``get``/``set`` functions of its thread limit, found once (the callers pass process-wide
    pools only: OpenBLAS on pthreads; None for any other library, or where threadpoolctl does not expose them).

    A live step lowers BLAS around a few small products now and then; through threadpoolctl's methods a
    section cost ~28 us (its per-call symbol look-ups and controlling-thread bookkeeping), with these ~11 us.
    """
    path = lib.filepath
    if path not in _limit_functions:
        symbol = getattr(lib, "_get_symbol", None)
        found = None
        if lib.internal_api == "openblas" and symbol is not None:
            get, put = symbol("openblas_get_num_threads"), symbol("openblas_set_num_threads")
            if get is not None and put is not None:
                found = (get, put)
        _limit_functions[path] = found
    return _limit_functions[path]


def _limit(lib: Any) -> int:
    """A process-wide pool's thread limit."""
    c = _c_limit(lib)
    return int(c[0]()) if c is not None else int(lib.num_threads)


def _set_limit(lib: Any, n_threads: int) -> None:
    """Set a library's limit from whichever thread holds ``_blas_lock``.

    threadpoolctl >= 3.8 lets only one Python thread (the first to set it, while alive) change a pthreads
    OpenBLAS and silently ignores the others; levstream serialises its changes itself, so it sets the limit
    through the library's own function where it can (leaving threadpoolctl's bookkeeping, and the caller's own
    ``threadpool_limits``, untouched), else takes that control for the call and gives it back.
    """
    c = _c_limit(lib)
    if c is not None:
        c[1](n_threads)
        return
    release = getattr(type(lib), "clear_controlling_thread", None)
    if release is not None:
        release(force=True)
    lib.set_num_threads(n_threads)
    if release is not None:
        release()


def _apply_blas_sections() -> None:
    """Lower every process-wide pool to the lowest limit the open sections ask for, never above the limit it had
    when levstream first lowered it; with no section open, put back the limits levstream found.  A pool whose
    limit someone else has set since levstream last did is theirs again: levstream neither lowers it further
    for sections already counted nor restores it later.  Call with ``_blas_lock`` held."""
    if not _blas_sections:
        for lib, found, mine in _blas_changed.values():
            if _limit(lib) == mine:  # still levstream's setting
                _set_limit(lib, found)
        _blas_changed.clear()
        return
    lowest = min(section[1] for section in _blas_sections)
    for lib in _threadpools().lib_controllers:
        if not _process_wide(lib):
            continue
        now = _limit(lib)
        entry = _blas_changed.get(lib.filepath)
        if entry is not None and now != entry[2]:  # set by someone else since
            del _blas_changed[lib.filepath]
            entry = None
        if entry is None:
            if now > lowest:
                _blas_changed[lib.filepath] = [lib, now, lowest]
                _set_limit(lib, lowest)
        elif min(entry[1], lowest) != now:
            entry[2] = min(entry[1], lowest)
            _set_limit(lib, entry[2])


@contextmanager
def lowered_blas(n_threads: int, user_api: str | None = "blas") -> Iterator[None]:
    """Lower the BLAS thread limit to ``n_threads`` for a ``with`` block; never raise it.

    A BLAS on pthreads (OpenBLAS as NumPy and SciPy ship it) has one thread pool per process, so the sections
    of every thread are counted together: while any is open the pool runs at the lowest limit they ask for
    (never above the limit it had when levstream lowered it), and when the last closes the limit levstream
    found is put back (unless someone else has set the pool since) -- threads never restore a limit under
    each other, whatever the order in which their sections open and close.  Per-thread limits (BLAS built on
    OpenMP) are lowered in the calling thread only.  ``user_api=None`` lowers the OpenMP pools too, in the
    calling thread.  An error while entering leaves nothing behind.
    """
    n_threads = max(1, int(n_threads))
    section = (threading.get_ident(), n_threads, object())
    lowered: list[tuple[Any, int]] = []
    try:
        with _blas_lock:
            _blas_sections.append(section)
            _apply_blas_sections()
        for lib in _threadpools().lib_controllers:
            if not _process_wide(lib) and (user_api is None or lib.user_api == user_api):
                before = lib.num_threads
                if before > n_threads:
                    lowered.append((lib, before))
                    lib.set_num_threads(n_threads)
        yield
    finally:
        for lib, before in lowered:
            lib.set_num_threads(before)
        with _blas_lock:
            if section in _blas_sections:
                _blas_sections.remove(section)
            _apply_blas_sections()


@contextmanager
def capped_threads(n_threads: int | None = None, *, user_api: str | None = "blas") -> Iterator[int]:
    """Run a block with at most ``n_threads`` (default and upper bound: :func:`get_num_threads`) threads.

    Lowers BLAS (:func:`lowered_blas`, process-wide) and numba's threads in this thread, and the budget that
    :func:`get_num_threads` reports in this thread; raises none of them; restores all three on exit.
    Yields the cap.
    """
    import numba

    cap = get_num_threads() if n_threads is None else min(max(1, int(n_threads)), get_num_threads())
    outer = getattr(_section, "cap", None)
    numba_before = numba.get_num_threads()
    _section.cap = cap
    try:
        with lowered_blas(cap, user_api):
            if cap >= numba_before:
                yield cap
                return
            numba.set_num_threads(cap)
            try:
                yield cap
            finally:
                numba.set_num_threads(numba_before)
    finally:
        _section.cap = outer


_layer: str | None = None


def numba_turn() -> AbstractContextManager[Any]:
    """Exclusive use of numba's parallel runtime when it is the non-thread-safe ``workqueue`` layer.

    That layer aborts the process when two threads launch parallel kernels at once, so under it threads
    take turns (hold this around one chunk or one task, never around a wait for another thread).  Under the
    OpenMP or TBB layers it is a no-op.
    """
    global _layer
    if _layer is None:
        import numba

        numba.get_num_threads()  # launches the threading layer if needed, so that it can be named
        _layer = numba.threading_layer()
    return _workqueue_lock if _layer == "workqueue" else nullcontext()


def describe_threads() -> str:
    """The thread settings in effect, for benchmark and report headers.

    Examples
    --------
    >>> "levstream" in describe_threads()
    True
    """
    import numba

    pools = ", ".join(
        f"{lib.internal_api}={lib.num_threads}" for lib in _threadpools().lib_controllers
    )
    from ._kernels.blas import syrk_library

    numba.get_num_threads()
    return (
        f"BLAS/OpenMP: {pools or 'none found'}; numba: {numba.get_num_threads()} "
        f"({numba.threading_layer()} layer); levstream: {get_num_threads()}; Gram syrk: {syrk_library()}"
    )


# ---------------------------------------------------------------------- one stream on several threads
_ingest = (
    threading.local()
)  # .threads: thread budget of the innermost ingest section of this thread
_helpers: list[threading.Thread] = []
_helper_jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
_helpers_lock = threading.Lock()
_fork_lock = threading.Lock()  # serialises the reset of jobs found open in a forked child


@contextmanager
def ingest_threads() -> Iterator[int]:
    """The section in which a sketch folds blocks of keys; yields the number of threads it may use.

    BLAS is lowered to one thread (process-wide; never raised) while any thread of the process is in such a
    section, and restored when the last one leaves, so that writers feeding their own sketches from several
    threads do not restore each other's limit halfway: the section parallelises over slabs itself
    (:func:`run_items`).  The thread count is :func:`get_num_threads` (inside a capped section, that section's
    cap).  Nested sections reuse the outer one at no cost.
    """
    outer = getattr(_ingest, "threads", None)
    if outer is not None:
        yield outer
        return
    n = get_num_threads()
    with lowered_blas(1):
        _ingest.threads = n
        try:
            yield n
        finally:
            _ingest.threads = None


def in_ingest_section() -> bool:
    """Whether this thread is inside :func:`ingest_threads` (every BLAS held to one thread)."""
    return getattr(_ingest, "threads", None) is not None


def _no_item(i: int) -> None:
    pass


class _Job:
    """Items ``0..n_items-1`` of one call of :func:`run_items` (or :func:`start_items`), taken in order by whoever
    is free: helpers, and every thread that finishes the job."""

    __slots__ = ("active", "closed", "errors", "fn", "idle", "items", "lock", "n_items", "pid")

    def __init__(self, fn: Callable[[int], None], n_items: int) -> None:
        self.pid = os.getpid()
        self.fn = fn
        self.n_items = n_items
        self.items = itertools.count()
        self.lock = threading.Lock()
        self.active = 0  # threads inside work(): helpers and finishing callers
        self.closed = False  # finished: threads that arrive later take no item
        self.idle = threading.Event()
        self.idle.set()
        self.errors: list[tuple[int, BaseException]] = []

    def work(self) -> None:
        while True:
            with self.lock:
                i = next(self.items)
            if i >= self.n_items:
                return
            try:
                self.fn(i)
            except BaseException as exc:  # noqa: BLE001 - re-raised by the caller of run_items
                with self.lock:
                    self.errors.append((i, exc))
                    self.items = itertools.count(self.n_items)  # nobody starts another item

    def joins(self) -> bool:
        with self.lock:
            if self.closed:
                return False
            self.active += 1
            self.idle.clear()
            return True

    def leaves(self) -> None:
        with self.lock:
            self.active -= 1
            if self.active == 0:
                self.idle.set()

    def work_share(self) -> None:
        """Take items until none is left (counted as active meanwhile, so :meth:`finish` waits for it)."""
        if self.joins():
            try:
                self.work()
            finally:
                self.leaves()

    def finish(self) -> None:
        """Close the job, wait for every thread still on an item, then drop ``fn`` (a helper may pick this job
        from the queue much later: it must not keep the caller's arrays alive)."""
        with self.lock:
            self.closed = True
        self.idle.wait()
        self.fn = _no_item

    def forked(self) -> None:
        """In a child process forked while the job was open: the helpers (and any other thread) that had items
        are not in this process, and may have held the lock.  Fresh synchronisation, nobody active, and an
        unfinished job's items open again (items write where their index says, so redoing one is harmless);
        then it is finished as usual."""
        self.lock, self.idle, self.active = threading.Lock(), threading.Event(), 0
        self.idle.set()
        if self.fn is not _no_item:  # not finished before the fork
            self.items, self.errors, self.closed = itertools.count(), [], False
        self.pid = os.getpid()


def _helper_loop() -> None:
    import numpy as np

    # the items are the library's kernels, whose callers check their results for nan/inf (a refused chunk's
    # Gram block overflows): no floating-point warnings from these threads
    np.seterr(over="ignore", invalid="ignore")
    while True:
        job = _helper_jobs.get()
        job.work_share()
        del job  # its items may hold a caller's large arrays


def _ensure_helpers(n: int) -> None:
    with _helpers_lock:
        while len(_helpers) < n:
            t = threading.Thread(
                target=_helper_loop, name=f"levstream-ingest-{len(_helpers)}", daemon=True
            )
            t.start()
            _helpers.append(t)


def _forget_helpers() -> None:  # a forked child has none of its parent's threads
    global _helper_jobs, _helpers_lock, _blas_lock, _fork_lock
    _helpers.clear()
    _helper_jobs = queue.SimpleQueue()
    _helpers_lock = threading.Lock()
    _blas_lock = threading.Lock()
    _fork_lock = threading.Lock()
    # the sections other threads had open are gone with them: their limits off (the forking thread's stay)
    me = threading.get_ident()
    _blas_sections[:] = [section for section in _blas_sections if section[0] == me]
    _apply_blas_sections()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_helpers)


def run_items(fn: Callable[[int], None], n_items: int, n_threads: int) -> None:
    """Call ``fn(i)`` for ``i`` in ``range(n_items)`` on this thread and up to ``n_threads - 1`` helpers.

    Items are taken in increasing order by whichever thread is free; ``fn`` must write its result where the
    caller finds it by ``i`` (so results never depend on which thread ran an item).  This thread works too,
    so the call completes even when every helper is busy elsewhere.  The first exception (lowest item) is
    re-raised once every started item has finished.
    """
    n_threads = min(int(n_threads), n_items)
    if n_threads <= 1:
        for i in range(n_items):
            fn(i)
        return
    finish_items(start_items(fn, n_items, n_threads))


def start_items(fn: Callable[[int], None], n_items: int, n_threads: int) -> _Job:
    """:func:`run_items` without waiting: up to ``n_threads - 1`` helpers start on the items and this call
    returns at once (with ``n_threads <= 1`` nobody does).  :func:`finish_items` does the items still untaken
    on its caller's thread and waits for the rest, so the work completes even when no helper is free."""
    job = _Job(fn, n_items)
    helpers = min(int(n_threads) - 1, n_items)
    if helpers > 0:
        # when no new thread can be started, the helpers there are (maybe none) take it
        try:
            _ensure_helpers(helpers)
        except RuntimeError:
            pass
        for _ in range(min(helpers, len(_helpers))):
            _helper_jobs.put(job)
    return job


def finish_items(job: _Job) -> None:
    """Complete a job of :func:`start_items` (idempotent, from any number of threads at once): the items nobody
    has taken run on this thread, then every thread still on one is waited for; the first exception (lowest
    item) is re-raised.  In a process forked while the job was open, its items run again there."""
    if job.pid != os.getpid():
        with _fork_lock:  # the first thread of the child to get here resets it
            if job.pid != os.getpid():
                job.forked()
    job.work_share()
    job.finish()
    if job.errors:
        raise min(job.errors, key=lambda e: e[0])[1]
