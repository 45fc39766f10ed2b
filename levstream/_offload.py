"""Moment products computed off the caller's thread by a worker that never takes the GIL.

A decode loop hands the moment state a full buffer's product ``phi(X)^T V`` every 128 tokens
(:class:`levstream.moments._PendingFold`).  An ingest helper (:func:`levstream._threads.start_items`) is a Python
thread: it needs the GIL to start the product and again to return from it, and on the 2-vCPU reference machine each
of those hand-overs stalled the stream's own thread for tens to hundreds of microseconds, or for the whole product
(``benchmarks/RESULTS.md``, "Values and decoding").  The worker here is one resident thread that runs a compiled
loop (:func:`levstream._kernels.offload.serve_products`) and never leaves it: a submission writes the addresses of
the job's arrays into a slot, queues the slot and posts a POSIX semaphore (a few microseconds, no thread switch);
whoever needs the product waits on the slot's semaphore, which the worker posts when the product is in.  The
product is computed by the kernel the helpers run, so it is the same bit for bit.  The worker starts with the first
row a moment state takes one at a time (:func:`prepare`), and Linux is asked to keep it off the CPU of the thread
that submits (:meth:`_Worker._keep_off`).

Where it is not used, :func:`submit` returns None and the caller goes on as before (its ingest helpers):

* not Linux (glibc's ``sem_*`` functions are looked up with ctypes), or a semaphore that cannot be made;
* a thread budget below 2 (:func:`levstream.get_num_threads`: the worker is one of the library's threads);
* inputs that are not C-contiguous float64, or all :data:`SLOTS` slots in flight.

A process forked while products were in flight has no worker: there, whoever asks for such a product gets None from
:meth:`Ticket.wait` and computes it itself (the child starts its own worker at its next submission).  At exit the
worker is stopped after its current job (the interpreter then frees the arrays of the jobs), and a job it had not
taken is computed by whoever waits for it.
"""

from __future__ import annotations

import atexit
import ctypes
import errno
import os
import sys
import threading
import weakref
from typing import Any

import numpy as np

from ._kernels.lift import dgemm_function
from ._kernels.offload import SEMAPHORE_BYTES, SLOT_FIELDS, STOP, serve_products
from ._threads import get_num_threads

#: Products in flight at once (one per moment state between a hand-over and its settle); a submission that finds
#: every slot taken is declined.
SLOTS = 64


class Ticket:
    """A submitted product: :meth:`wait` for it (once)."""

    __slots__ = ("__weakref__", "_slot", "_worker", "product")

    def __init__(self, worker: _Worker, slot: int, product: np.ndarray) -> None:
        self._worker = worker
        self._slot = slot
        #: where the worker writes the product (read it only after :meth:`wait` returned it)
        self.product = product

    def wait(self) -> np.ndarray | None:
        """The product once the worker has written it, or None when no worker of this process will (a forked
        child, a stopped worker): the caller computes it then."""
        return self._worker.wait(self._slot)


class _Worker:
    """The resident worker of this process, its slots and semaphores."""

    def __init__(self, functions: tuple[Any, Any, Any, Any]) -> None:
        self.sem_init, self.sem_wait, self.sem_trywait, self.sem_post = functions
        # semaphore 0 counts the queued jobs; semaphore 1 + s is posted when slot s's product is in
        self.semaphores = np.zeros((1 + SLOTS) * SEMAPHORE_BYTES // 8, dtype=np.int64)
        self.base = int(self.semaphores.ctypes.data)
        for i in range(1 + SLOTS):
            if self.sem_init(self.address(i), 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "sem_init failed")
        self.control = np.zeros(2, dtype=np.int64)
        self.queue = np.zeros(SLOTS, dtype=np.int64)
        self.jobs = np.zeros((SLOTS, SLOT_FIELDS), dtype=np.int64)
        self.queued = 0
        self.free = list(range(SLOTS))
        #: slot -> (the ticket, weakly; the job's arrays, alive until the worker is done with them)
        self.held: dict[int, tuple[weakref.ref[Ticket], tuple[np.ndarray, ...]]] = {}
        self.lock = threading.Lock()
        self.pid = os.getpid()
        self.stopped = False
        #: slots of jobs the worker stopped before: their waiters compute them
        self.abandoned: set[int] = set()
        args = (
            self.control,
            self.queue,
            self.jobs,
            self.semaphores,
            dgemm_function(),
            self.sem_wait,
            self.sem_post,
        )
        # compiled (or loaded) here, not on the worker while a stream waits: a call that finds the stop request
        self.control[STOP] = 1
        self.sem_post(self.address(0))
        serve_products(*args)
        self.control[STOP] = 0
        self.thread = threading.Thread(
            target=serve_products, args=args, name="levstream-products", daemon=True
        )
        self.thread.start()
        # the CPUs the worker may use: those of the thread that started it; it is kept off the CPU of the thread
        # that submits (see :meth:`_keep_off`)
        self.cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
        self.kept_off = -1
        self.sched_getcpu = _getcpu_function()

    def address(self, i: int) -> int:
        return self.base + SEMAPHORE_BYTES * i

    def submit(
        self,
        X: np.ndarray,
        V: np.ndarray,
        ia: np.ndarray,
        ib: np.ndarray,
        block: int,
        D: int,
    ) -> Ticket | None:
        # everything the job writes, allocated here (the worker allocates nothing)
        product = np.empty((D, V.shape[1]))
        XT = np.empty((X.shape[1], X.shape[0]))
        buf = np.empty(max(1, block * X.shape[0]))
        with self.lock:
            if self.stopped:
                return None
            self._reclaim()
            if not self.free:
                return None
            slot = self.free.pop()
            ticket = Ticket(self, slot, product)
            self.held[slot] = (weakref.ref(ticket), (X, V, ia, ib, XT, buf, product))
            self.jobs[slot] = (
                X.ctypes.data,
                X.shape[0],
                X.shape[1],
                V.ctypes.data,
                V.shape[1],
                ia.ctypes.data,
                ib.ctypes.data,
                D,
                block,
                product.ctypes.data,
                XT.ctypes.data,
                buf.ctypes.data,
            )
            self.queue[self.queued % SLOTS] = slot
            self.queued += 1
            self._keep_off()
            self.sem_post(self.address(0))  # after the slot is written: the worker's wait sees it
        return ticket

    def _keep_off(self) -> None:
        """Keep the worker off the CPU this thread runs on.  Woken by this thread's post, Linux would often run it
        right here (the waker's CPU), preempting this thread for the whole product (~1 ms at d = dv = 64) while the
        other CPU idles; measured on the 2-vCPU reference machine (benchmarks/RESULTS.md, "Values and decoding").
        Only when this thread has moved since the last submission (one ``sched_setaffinity`` then)."""
        cpu = -1 if self.sched_getcpu is None else self.sched_getcpu()
        worker = self.thread.native_id
        if cpu == self.kept_off or cpu not in self.cpus or len(self.cpus) < 2 or worker is None:
            return
        try:
            os.sched_setaffinity(worker, self.cpus - {cpu})
        except OSError:  # the CPUs allowed changed meanwhile: the worker runs where Linux puts it
            self.cpus = set()
            return
        self.kept_off = cpu

    def wait(self, slot: int) -> np.ndarray | None:
        if os.getpid() != self.pid:
            return None  # a forked child: the parent's worker is not here
        address = self.address(1 + slot)
        while self.sem_wait(address) != 0:
            if ctypes.get_errno() != errno.EINTR:
                raise OSError(ctypes.get_errno(), "sem_wait failed")
        with self.lock:
            product = None if slot in self.abandoned else self.held[slot][1][-1]
            self.abandoned.discard(slot)
            self._release(slot)
        return product

    def _release(self, slot: int) -> None:
        del self.held[slot]
        self.free.append(slot)

    def _reclaim(self) -> None:
        """Free the slots of done jobs whose tickets are gone (their owners never asked)."""
        for slot, (ticket, _) in list(self.held.items()):
            if ticket() is None and self.sem_trywait(self.address(1 + slot)) == 0:
                self._release(slot)

    def stop(self) -> None:
        """Stop the worker after its current job; the jobs it did not take are left to whoever waits for them."""
        with self.lock:
            if self.stopped:
                return
            self.stopped = True
        self.control[STOP] = 1
        self.sem_post(self.address(0))
        self.thread.join(timeout=10)
        with self.lock:
            for slot in self.held:
                address = self.address(1 + slot)
                if self.sem_trywait(address) != 0:  # not computed: its waiter is told so
                    self.abandoned.add(slot)
                self.sem_post(address)


def _semaphore_functions() -> tuple[Any, Any, Any, Any] | None:
    """glibc's ``sem_init``, ``sem_wait``, ``sem_trywait`` and ``sem_post`` as ctypes functions that take the
    semaphore's address as an int64 (callable from compiled code too), or None where there are none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        out = []
        for name, argtypes in (
            ("sem_init", [ctypes.c_int64, ctypes.c_int, ctypes.c_uint]),
            ("sem_wait", [ctypes.c_int64]),
            ("sem_trywait", [ctypes.c_int64]),
            ("sem_post", [ctypes.c_int64]),
        ):
            fn = getattr(libc, name)
            fn.argtypes = argtypes
            fn.restype = ctypes.c_int
            out.append(fn)
    except (OSError, AttributeError):
        return None
    return out[0], out[1], out[2], out[3]


def _getcpu_function() -> Any:
    """glibc's ``sched_getcpu`` as a ctypes function, or None."""
    try:
        fn = ctypes.CDLL(None).sched_getcpu
    except (OSError, AttributeError):
        return None
    fn.argtypes = []
    fn.restype = ctypes.c_int
    return fn


_worker: _Worker | None = None
_worker_lock = threading.Lock()
#: False once this process found it cannot have a worker (no semaphores, or the worker failed to start)
_available = True


def _get_worker() -> _Worker | None:
    global _worker, _available
    worker = _worker
    if worker is not None and worker.pid == os.getpid():
        return worker
    with _worker_lock:
        if _worker is None or _worker.pid != os.getpid():
            _worker = None
            functions = _semaphore_functions() if _available else None
            if functions is None:
                _available = False
                return None
            try:
                _worker = _Worker(functions)
            except Exception:  # noqa: BLE001 - no worker: the caller's helpers take the products
                _available = False
                return None
        return _worker


def prepare() -> None:
    """Start this process's worker now, if it may have one (its kernel is compiled or loaded here): called with
    the first row a moment state takes one at a time, so that a decode loop compiles nothing after its first
    steps."""
    if _worker is None and _available and get_num_threads() >= 2:
        _get_worker()


def submit(
    X: np.ndarray, V: np.ndarray, ia: np.ndarray, ib: np.ndarray, block: int, D: int
) -> Ticket | None:
    """Hand ``phi(X)^T V`` (``D`` lifted features of the rows ``X``, pairs ``ia``/``ib``, ``block`` features per
    BLAS call; see :func:`~levstream._kernels.lift.features_product`) to the worker: a ticket, or None when the
    worker does not take it (see the module docstring).  ``X``, ``V``, ``ia`` and ``ib`` must not be written until
    the ticket's :meth:`~Ticket.wait` has returned (or the ticket is gone and the job done)."""
    if get_num_threads() < 2 or not all(
        a.flags.c_contiguous and a.dtype == np.float64 for a in (X, V)
    ):
        return None
    if not (ia.flags.c_contiguous and ib.flags.c_contiguous and ia.dtype == ib.dtype == np.int64):
        return None
    worker = _get_worker()
    return None if worker is None else worker.submit(X, V, ia, ib, block, D)


def _forget_worker() -> None:  # a forked child has none of its parent's threads (nor their locks)
    global _worker, _worker_lock
    _worker = None
    _worker_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_worker)


@atexit.register
def _stop_at_exit() -> None:
    worker = _worker
    if worker is not None and worker.pid == os.getpid():
        worker.stop()
