"""The library's one thread knob: ``levstream.set_num_threads`` / ``get_num_threads`` (issue 14, point 4).

What is observed: the threads that feed ``build_sketch``'s shards (``threading.get_ident`` in a spy around
``feed_chunk``), numba's thread count there, and the BLAS limits read directly from ``threadpoolctl``.
Answers are compared with a single stream and with the same build at the default budget.
"""

from __future__ import annotations

import os
import threading

import numba
import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

import levstream as ls
import levstream._threads as threads
import levstream.build as build
from conftest import assert_matches_offline, heavy_tailed_keys
from naive import leverage_svd

EPS = 0.05


@pytest.fixture(autouse=True)
def default_budget(monkeypatch):
    """Every test starts at the default budget and leaves it there."""
    monkeypatch.setattr(threads, "_budget", None)


@pytest.fixture(params=["C functions", "threadpoolctl"])
def limit_calls(request, monkeypatch):
    """Sections set the process-wide BLAS limit through the library's own C functions where threadpoolctl
    exposes them, else through threadpoolctl's methods: both ways are checked."""
    if request.param == "threadpoolctl":
        monkeypatch.setattr(threads, "_c_limit", lambda lib: None)
    return request.param


@pytest.fixture(scope="module")
def K() -> np.ndarray:
    return heavy_tailed_keys(6000, 6, seed=3)


def blas_limits() -> set[int]:
    """The thread limits of the loaded BLAS libraries, read independently of levstream."""
    return {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}


def spy_on_shards(monkeypatch) -> list[tuple[int, int, frozenset[int]]]:
    """Record (thread id, numba threads, BLAS limits) every time a chunk is fed."""
    seen = []
    real = build.feed_chunk

    def spy(*args, **kwargs):
        seen.append((threading.get_ident(), numba.get_num_threads(), frozenset(blas_limits())))
        return real(*args, **kwargs)

    monkeypatch.setattr(build, "feed_chunk", spy)
    return seen


def test_default_is_the_available_cores():
    want = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert ls.get_num_threads() == want


def test_set_and_get_round_trip_and_are_exported():
    assert {"set_num_threads", "get_num_threads"} <= set(ls.__all__)
    ls.set_num_threads(1)
    assert ls.get_num_threads() == 1
    ls.set_num_threads(np.int64(3))  # NumPy integers are integers
    assert ls.get_num_threads() == 3


@pytest.mark.parametrize("bad, error, words", [
    (0, ValueError, "must be >= 1; got 0"),
    (-2, ValueError, "must be >= 1; got -2"),
    (1.5, TypeError, "must be an integer; got 1.5"),
    ("2", TypeError, "must be an integer"),
    (None, TypeError, "must be an integer"),
    (True, TypeError, "must be an integer"),
])
def test_bad_values_are_refused_and_change_nothing(bad, error, words):
    ls.set_num_threads(2)
    with pytest.raises(error, match=words):
        ls.set_num_threads(bad)
    assert ls.get_num_threads() == 2


def test_one_thread_builds_in_the_calling_thread_with_one_numba_and_blas_thread(K, monkeypatch):
    seen = spy_on_shards(monkeypatch)
    numba_before, blas_before = numba.get_num_threads(), blas_limits()
    ls.set_num_threads(1)
    sk = ls.build_sketch(K, eps=EPS, chunk_rows=1000)  # default n_jobs: the budget, 1
    assert len(seen) == 6
    assert {ident for ident, _, _ in seen} == {threading.get_ident()}
    assert {n for _, n, _ in seen} == {1}
    assert {limits for _, _, limits in seen} == {frozenset({1})}
    assert_matches_offline(sk.universal_set().ids, leverage_svd(K), EPS)
    # restored after the build, and the knob itself left numba and BLAS alone outside library calls
    assert numba.get_num_threads() == numba_before and blas_limits() == blas_before


def test_the_cap_bounds_the_shard_threads_but_not_the_shards(K, monkeypatch):
    """n_jobs=3 under a budget of 1: three shards fed by one thread, the same sketch as without the cap."""
    uncapped = ls.build_sketch(K, eps=EPS, n_jobs=3, chunk_rows=700)
    dealt_uncapped = ls.build_sketch(iter(np.array_split(K, 9)), eps=EPS, n_jobs=3)
    seen = spy_on_shards(monkeypatch)
    ls.set_num_threads(1)
    capped = ls.build_sketch(K, eps=EPS, n_jobs=3, chunk_rows=700)
    assert len({ident for ident, _, _ in seen}) == 1
    assert {n for _, n, _ in seen} == {1}
    assert capped.to_bytes() == uncapped.to_bytes()
    seen.clear()
    dealt = ls.build_sketch(iter(np.array_split(K, 9)), eps=EPS, n_jobs=3)  # chunks dealt to queues
    assert len({ident for ident, _, _ in seen}) == 1 and len(seen) == 9
    assert dealt.to_bytes() == dealt_uncapped.to_bytes()


def test_a_budget_of_two_runs_at_most_two_shard_threads(K, monkeypatch):
    seen = spy_on_shards(monkeypatch)
    ls.set_num_threads(2)
    sk = ls.build_sketch(K, eps=EPS, n_jobs=5, chunk_rows=500)
    assert 1 <= len({ident for ident, _, _ in seen}) <= 2
    assert threading.get_ident() not in {ident for ident, _, _ in seen}
    assert {n for _, n, _ in seen} == {1}  # 2 threads // 2 shard threads
    assert_matches_offline(sk.universal_set().ids, leverage_svd(K), EPS)


def test_capped_sections_lower_and_never_raise_the_callers_settings(limit_calls):
    numba_before = numba.get_num_threads()
    with threadpool_limits(limits=1, user_api="blas"):
        with threads.capped_threads(2) as cap:  # asks for more than the caller allows BLAS
            assert cap == min(2, ls.get_num_threads())
            assert blas_limits() == {1}
        assert blas_limits() == {1}
    if numba_before > 1:
        numba.set_num_threads(1)
        try:
            with threads.capped_threads(numba_before):
                assert numba.get_num_threads() == 1
        finally:
            numba.set_num_threads(numba_before)
    with threads.capped_threads(1):
        assert numba.get_num_threads() == 1 and ls.get_num_threads() == 1
        assert blas_limits() == {1}
    assert numba.get_num_threads() == numba_before


def test_a_section_cap_is_per_thread():
    """Inside a capped section get_num_threads reports the section's cap; other threads keep the budget."""
    other = []
    with threads.capped_threads(1):
        t = threading.Thread(target=lambda: other.append(ls.get_num_threads()))
        t.start()
        t.join()
        assert ls.get_num_threads() == 1
    assert other == [threads.available_cores()]


class _SectionThread:
    """A thread that opens and closes ``lowered_blas`` sections when told to, so that a test can interleave
    the sections of two threads in a chosen order."""

    def __init__(self) -> None:
        import queue

        self.orders: queue.SimpleQueue = queue.SimpleQueue()
        self.done: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import contextlib

        with contextlib.ExitStack() as stack:
            while (order := self.orders.get()) is not None:
                if order == "close":
                    stack.close()
                else:
                    stack.enter_context(threads.lowered_blas(order))
                self.done.put(order)

    def do(self, order) -> None:
        self.orders.put(order)
        assert self.done.get(timeout=30) == order

    def stop(self) -> None:
        self.orders.put(None)
        self.thread.join(timeout=30)


@pytest.mark.parametrize("limits", [(1, 1), (1, 2), (2, 1)])
@pytest.mark.parametrize("a_closes_first", [True, False])
def test_sections_of_several_threads_never_restore_under_each_other(limits, a_closes_first, limit_calls):
    """The BLAS pool is one per process: while any thread's section is open BLAS runs at the lowest limit the
    open sections ask for, and the last one to close restores the limits found before the first opened --
    whatever the order (the race CI hit: a section that opened while another thread held BLAS at 1 later
    restored 1 over the restored default)."""
    before = {(i["filepath"], i["num_threads"]) for i in threadpool_info()}
    top = max(blas_limits())
    a, b = _SectionThread(), _SectionThread()
    try:
        a.do(limits[0])
        assert blas_limits() == {min(top, limits[0])}
        b.do(limits[1])
        assert blas_limits() == {min(top, *limits)}
        first, second = (a, b) if a_closes_first else (b, a)
        first.do("close")
        assert blas_limits() == {min(top, limits[1] if a_closes_first else limits[0])}
        second.do("close")
        assert {(i["filepath"], i["num_threads"]) for i in threadpool_info()} == before
    finally:
        a.stop()
        b.stop()


def test_sections_never_raise_a_limit_the_caller_set_before(limit_calls):
    with threadpool_limits(limits=1, user_api="blas"):
        a = _SectionThread()
        try:
            a.do(2)
            assert blas_limits() == {1}
            a.do("close")
            assert blas_limits() == {1}
        finally:
            a.stop()


def test_an_error_entering_a_section_leaves_nothing_behind(monkeypatch, limit_calls):
    """An error while a section lowers BLAS (here: the first limit change fails) leaves no section counted and
    the limits as they were (found in review: a leaked section held BLAS at 1 thread for the process)."""
    before = {(i["filepath"], i["num_threads"]) for i in threadpool_info()}
    real = threads._set_limit
    calls = {"n": 0}

    def failing_once(lib, n):
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt("simulated, inside the section's entry")
        real(lib, n)

    monkeypatch.setattr(threads, "_set_limit", failing_once)
    if max(blas_limits()) > 1:
        with pytest.raises(KeyboardInterrupt), threads.lowered_blas(1):
            pass
    assert threads._blas_sections == []
    with threads.lowered_blas(1):
        pass
    assert {(i["filepath"], i["num_threads"]) for i in threadpool_info()} == before


def test_a_callers_temporary_limit_in_another_thread_is_not_restored_over_its_end(limit_calls):
    """A user's ``threadpool_limits(1)`` in another thread, a levstream section opened while it holds and closed
    after it ended: the limit is the user's original one, not the temporary 1 levstream found."""
    before = {(i["filepath"], i["num_threads"]) for i in threadpool_info()}
    entered, release, done = threading.Event(), threading.Event(), threading.Event()

    def user() -> None:
        with threadpool_limits(limits=1, user_api="blas"):
            entered.set()
            release.wait(30)
        done.set()

    t = threading.Thread(target=user)
    t.start()
    assert entered.wait(30)
    with threads.lowered_blas(1):
        release.set()
        assert done.wait(30)
    t.join(30)
    assert {(i["filepath"], i["num_threads"]) for i in threadpool_info()} == before


# ---------------------------------------------------------------------- jobs that run while the caller goes on
def test_a_started_job_runs_on_a_helper_and_finishing_it_twice_is_harmless():
    done = np.zeros(3)
    callers = []

    def fn(i):
        callers.append(threading.get_ident())
        done[i] = i + 1.0

    job = threads.start_items(fn, 3, 1)  # no helper: the items wait for finish_items
    assert not done.any()
    threads.finish_items(job)
    threads.finish_items(job)
    assert done.tolist() == [1.0, 2.0, 3.0] and set(callers) == {threading.get_ident()}
    started = threading.Event()
    job = threads.start_items(lambda i: (started.set(), done.__setitem__(i, -1.0)), 1, 2)
    assert started.wait(10)  # a helper took the item without the caller
    threads.finish_items(job)
    assert done[0] == -1.0


def test_an_error_in_a_started_job_is_raised_when_it_is_finished():
    def fn(i):
        raise RuntimeError(f"item {i}")

    job = threads.start_items(fn, 2, 2)
    with pytest.raises(RuntimeError, match="item 0"):
        threads.finish_items(job)


def _slow_item(value: float):
    """``(out, started, fn)``: item ``i`` sets ``started``, sleeps half a second, then writes ``value`` to
    ``out[i]``."""
    import time

    out = np.zeros(1)
    started = threading.Event()

    def fn(i):
        started.set()
        time.sleep(0.5)
        out[i] = value

    return out, started, fn


def test_a_job_finished_by_two_threads_at_once_returns_only_when_its_item_is_done():
    """No helper (budget 1): the first finisher takes the item; the second must wait for it, not return at once
    (copies of a moment state share one pending product and may settle it from two threads)."""
    out, started, fn = _slow_item(5.0)
    job = threads.start_items(fn, 1, 1)
    first = threading.Thread(target=threads.finish_items, args=(job,))
    first.start()
    assert started.wait(10)
    threads.finish_items(job)  # the second finisher
    assert out[0] == 5.0
    first.join()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX-only")
@pytest.mark.parametrize("parent_finishing", [False, True])
def test_a_job_open_at_a_fork_is_completed_by_the_child_again_and_again(parent_finishing):
    """The child redoes the item (a helper was on it, or the parent was already waiting for it), and finishing
    the job a second time there returns at once rather than waiting for threads that are not there."""
    import signal
    import time

    out, started, fn = _slow_item(7.0)
    job = threads.start_items(fn, 1, 2)
    assert started.wait(10)
    waiter = None
    if parent_finishing:  # the job is closed, its helper still on the item, when the process forks
        waiter = threading.Thread(target=threads.finish_items, args=(job,))
        waiter.start()
        time.sleep(0.1)
        assert job.closed
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            signal.alarm(20)
            out[0] = 0.0
            threads.finish_items(job)
            threads.finish_items(job)
            code = 0 if out[0] == 7.0 else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    threads.finish_items(job)
    if waiter is not None:
        waiter.join()
    assert os.waitstatus_to_exitcode(status) == 0
    assert out[0] == 7.0
