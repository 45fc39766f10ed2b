"""Readers and a writer at once (issue 11 point 7): four threads query one sketch, a fifth feeds it.

Every answer must be the answer of brute force over some prefix of the keys fed so far, where a
prefix ends after one of the writer's calls (``update`` of a row or ``update_many`` of a small
chunk): a query sees the sketch as it was before or after each update, never a mix.

Which prefix did a query see?  There is no public atomic (answer, n) pair, so each reader reads
``sk.n`` just before and just after its query.  ``n`` only grows and the query holds the sketch's
lock for the whole answer, so the prefix it saw has a length ``L`` with ``n_before <= L <= n_after``
that ends on a writer's call.  The check accepts the answer when brute force over one such prefix
gives it: the same entries (tie band excepted), the same values, outputs and captured mass.
Adjacent prefixes are told apart by the normaliser: one more key changes every value by a relative
``<q, k>^2 / Z``, far above ``VALUE_RTOL``.

The interpreter's switch interval is lowered during a run so that threads change often (inside
calls, not only between them); each test asserts that the readers saw many distinct prefixes, so it
cannot pass without interleaving.  Key norms grow along the stream, so that new keys keep entering
the candidates and the writer also prunes them (not only folds blocks) while the readers query.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from conftest import TIE_RTOL, VALUE_RTOL, heavy_tailed_keys

import levstream as ls

D = 8
DV = 3
EPS = 0.05
N = 1500
HEADS = 3
READERS = 4
BLOCK_ROWS = 16  # small blocks: the writer folds many blocks while the readers query
GROWTH = 10.0  # key norms grow by e^GROWTH along the stream: candidates overflow, the writer prunes
MAX_CHUNK = 5  # update_many chunks of 1..MAX_CHUNK rows
SWITCH_INTERVAL = 1e-5  # seconds; the default 5e-3 lets a thread make hundreds of calls in a row
MIN_PREFIXES_SEEN = 20  # distinct prefixes the readers must have seen (threads did interleave)
READER_PAUSE = 1e-4  # seconds between a reader's queries (else readers starve the writer)
TIME_LIMIT = 8.0  # seconds after which the writer stops early (a slow machine, not a failure)


@dataclass
class Record:
    n_before: int
    n_after: int
    #: per head: (HeavyEntries,), or (HeavyEntries, heavy_output, captured_mass, output)
    heads: list[tuple[Any, ...]]


def writer_program(seed: int) -> list[tuple[int, int, bool]]:
    """The writer's calls ``(first row, end row, single row?)``: rows in order, one call each."""
    rng = np.random.default_rng(seed)
    ops, a = [], 0
    while a < N:
        single = bool(rng.random() < 0.5)
        b = a + 1 if single else min(N, a + int(rng.integers(1, MAX_CHUNK + 1)))
        ops.append((a, b, single))
        a = b
    return ops


def data(seed: int, heads: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keys (heads, N, D) with growing norms, values (heads, N, DV) and queries (heads, 4, D): two
    random queries and two equal to large early keys (heavy entries from the first rows on)."""
    growth = np.exp(np.arange(N) * GROWTH / N)[:, None]
    K = np.stack([heavy_tailed_keys(N, D, seed=seed + 10 * h) * growth for h in range(heads)])
    V = np.random.default_rng(seed + 1).standard_normal((heads, N, DV))
    rng = np.random.default_rng(seed + 2)
    Q = []
    for h in range(heads):
        big = np.argsort(-np.linalg.norm(K[h, :200], axis=1))[:2]
        Q.append(np.vstack([rng.standard_normal((2, D)), K[h, big]]))
    return K, V, np.stack(Q)


def run(sketch: Any, feed: Callable[[int, int, bool], None],
        query: Callable[[], list[tuple[Any, ...]]],
        ops: list[tuple[int, int, bool]]) -> tuple[list[Record], int]:
    """One writer runs ``ops`` while READERS threads query; returns the readers' records and the
    number of rows fed."""
    records: list[list[Record]] = [[] for _ in range(READERS)]
    done = threading.Event()
    start = threading.Barrier(READERS + 1)
    errors: list[BaseException] = []
    fed = [0]

    def read(out: list[Record]) -> None:
        try:
            start.wait()
            while not done.is_set():
                n0 = sketch.n
                answer = query()
                out.append(Record(n0, sketch.n, answer))
                time.sleep(READER_PAUSE)
        except BaseException as exc:  # noqa: BLE001 - re-raised by the main thread
            errors.append(exc)
            done.set()

    def write() -> None:
        try:
            start.wait()
            t0 = time.perf_counter()
            for a, b, single in ops:
                if done.is_set() or time.perf_counter() - t0 > TIME_LIMIT:
                    break
                feed(a, b, single)
                fed[0] = b
                time.sleep(0)  # keys arrive over time: readers get in between the writer's calls
        except BaseException as exc:  # noqa: BLE001 - re-raised by the main thread
            errors.append(exc)
        finally:
            done.set()

    old = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL)
    try:
        threads = [threading.Thread(target=read, args=(out,)) for out in records]
        threads.append(threading.Thread(target=write))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    if errors:
        raise errors[0]
    return [r for out in records for r in out], fed[0]


class Prefixes:
    """Brute force over every prefix of one head's keys, from the running sums of ``<q, k_j>^2``."""

    def __init__(self, K: np.ndarray, V: np.ndarray, Q: np.ndarray) -> None:
        self.W = (Q @ K.T) ** 2
        self.Z = np.cumsum(self.W, axis=1)
        self.V = V

    def attention(self, L: int) -> np.ndarray:
        if L == 0:
            return np.zeros((self.W.shape[0], 0))
        Z = self.Z[:, L - 1:L]
        return np.divide(self.W[:, :L], Z, out=np.zeros((self.W.shape[0], L)), where=Z > 0)

    def matches(self, L: int, answer: tuple[Any, ...]) -> bool:
        """Whether ``answer`` is what brute force over the first ``L`` keys gives."""
        hits = answer[0]
        A = self.attention(L)
        rows, ids = hits.rows(), hits.key_ids
        if ids.size and int(ids.max()) >= L:
            return False
        got = np.zeros(A.shape, dtype=bool)
        got[rows, ids] = True
        if np.any(~got & (A >= EPS * (1.0 + TIE_RTOL))):
            return False
        if np.any(got & (A < EPS * (1.0 - TIE_RTOL))):
            return False
        if not np.allclose(hits.values, A[rows, ids], rtol=VALUE_RTOL, atol=0.0):
            return False
        if len(answer) == 1:
            return True
        _, heavy_output, mass, output = answer
        heavy = np.where(got, A, 0.0)
        V = self.V[:L]
        scale = (A @ np.abs(V)).max(axis=1, keepdims=True)  # outputs relative to each row's scale
        return (np.allclose(mass, heavy.sum(axis=1), rtol=VALUE_RTOL, atol=0.0)
                and bool(np.all(np.abs(heavy_output - heavy @ V) <= VALUE_RTOL * scale))
                and output is not None
                and bool(np.all(np.abs(output - A @ V) <= VALUE_RTOL * scale)))


def check(records: list[Record], prefixes: list[Prefixes], ops: list[tuple[int, int, bool]],
          fed: int, min_answers: int = 100, min_prefixes: int = MIN_PREFIXES_SEEN) -> None:
    """Every record equals brute force over one prefix that ends on a writer's call, the same
    prefix for every head."""
    ends = np.array([0] + [b for _, b, _ in ops if b <= fed])
    seen = set()
    for r in records:
        assert 0 <= r.n_before <= r.n_after <= fed
        window = ends[(ends >= r.n_before) & (ends <= r.n_after)]
        match = next((int(L) for L in window[::-1]
                      if all(p.matches(int(L), ans) for p, ans in zip(prefixes, r.heads))), None)
        assert match is not None, (
            f"an answer equals brute force over no prefix ending on a writer's call with n in "
            f"[{r.n_before}, {r.n_after}] (candidates {window.tolist()}): the query saw a mixed "
            "state")
        seen.add(match)
    assert len(records) >= min_answers, f"only {len(records)} answers recorded"
    assert len(seen) >= min_prefixes, f"readers saw only {len(seen)} prefixes: no interleaving"
    assert any(0 < L < fed for L in seen)


def _single_head(sk: ls.KeySketch, K: np.ndarray,
                 V: np.ndarray | None) -> Callable[[int, int, bool], None]:
    def feed(a: int, b: int, single: bool) -> None:
        if single:
            sk.update(K[a], None if V is None else V[a])
        else:
            sk.update_many(K[a:b], None if V is None else V[a:b])
    return feed


def _multi_head(mh: ls.MultiHeadKeySketch, K: np.ndarray,
                V: np.ndarray | None) -> Callable[[int, int, bool], None]:
    def feed(a: int, b: int, single: bool) -> None:
        if single:
            mh.update(K[:, a], None if V is None else V[:, a])
        else:
            mh.update_many(K[:, a:b], None if V is None else V[:, a:b])
    return feed


@pytest.mark.parametrize("with_values", [False, True], ids=["heavy_entries", "attend"])
def test_four_readers_and_a_writer_on_one_key_sketch(with_values):
    K, V, Q = data(seed=21, heads=1)
    ops = writer_program(seed=22)
    if with_values:
        sk = ls.KeySketch(D, eps=EPS, block_rows=BLOCK_ROWS, value_dim=DV, exact_output=True)

        def query() -> list[tuple[Any, ...]]:
            r = sk.attend(Q[0])
            return [(r.entries, r.heavy_output, r.captured_mass, r.output)]
    else:
        sk = ls.KeySketch(D, eps=EPS, block_rows=BLOCK_ROWS)

        def query() -> list[tuple[Any, ...]]:
            return [(sk.heavy_entries(Q[0]),)]
    records, fed = run(sk, _single_head(sk, K[0], V[0] if with_values else None), query, ops)
    check(records, [Prefixes(K[0], V[0], Q[0])], ops, fed)
    assert sk.n == fed
    assert Prefixes(K[0], V[0], Q[0]).matches(fed, query()[0])


@pytest.mark.parametrize("with_values", [False, True], ids=["heavy_entries", "attend"])
def test_four_readers_and_a_writer_on_one_multihead_sketch(with_values):
    """A query sees every head at the same prefix."""
    K, V, Q = data(seed=31, heads=HEADS)
    ops = writer_program(seed=32)
    if with_values:
        mh = ls.MultiHeadKeySketch(HEADS, D, eps=EPS, block_rows=BLOCK_ROWS, value_dim=DV,
                                   exact_output=True)

        def query() -> list[tuple[Any, ...]]:
            r = mh.attend(Q)
            return [(r.entries[h], r.heavy_output[h], r.captured_mass[h], r.output[h])
                    for h in range(HEADS)]
    else:
        mh = ls.MultiHeadKeySketch(HEADS, D, eps=EPS, block_rows=BLOCK_ROWS)

        def query() -> list[tuple[Any, ...]]:
            return [(hits,) for hits in mh.heavy_entries(Q)]
    records, fed = run(mh, _multi_head(mh, K, V if with_values else None), query, ops)
    prefixes = [Prefixes(K[h], V[h], Q[h]) for h in range(HEADS)]
    check(records, prefixes, ops, fed)
    assert mh.n == fed
    assert all(p.matches(fed, ans) for p, ans in zip(prefixes, query()))


def test_the_check_rejects_mixed_answers():
    """The check can fail: answers stitched from two states (heads at different prefixes, or the
    entries of one prefix with the outputs of another) match no single prefix."""
    K, V, Q = data(seed=31, heads=HEADS)
    ops = writer_program(seed=32)
    ends = [b for _, b, _ in ops]
    L1, L2 = ends[100], ends[101]
    prefixes = [Prefixes(K[h], V[h], Q[h]) for h in range(HEADS)]

    def state(L: int) -> ls.MultiHeadKeySketch:
        mh = ls.MultiHeadKeySketch(HEADS, D, eps=EPS, block_rows=BLOCK_ROWS, value_dim=DV,
                                   exact_output=True)
        return mh.update_many(K[:, :L], V[:, :L])

    def answers(L: int) -> list[tuple[Any, ...]]:
        r = state(L).attend(Q)
        return [(r.entries[h], r.heavy_output[h], r.captured_mass[h], r.output[h])
                for h in range(HEADS)]

    one, two = answers(L1), answers(L2)
    ops, fed = ops[:102], L2
    check([Record(L1, L2, one), Record(L1, L2, two)], prefixes, ops, fed, 2, 2)  # whole: pass
    heads_mixed = [one[0], *two[1:]]
    outputs_mixed = [(*one[h][:3], two[h][3]) for h in range(HEADS)]
    for mixed in (heads_mixed, outputs_mixed):
        with pytest.raises(AssertionError, match="saw a mixed state"):
            check([Record(L1, L2, mixed)], prefixes, ops, fed, 1, 1)


def test_a_gate_fed_by_another_writer_between_arrival_and_lock_is_honoured():
    """An ungated ``update`` decided whether the stream forgets before it took the lock: a second writer's
    gated row landing in between left the row unweighted in a stream that now forgets (Z 0.002 instead of
    1.001).  The decision is made under the lock.  The interleaving is forced by a lock that runs the other
    writer the first time the main thread takes it."""
    sk = ls.KeySketch(2, eps=0.05)
    sk.update(np.array([1.0, 0.0]))
    y, x = np.array([0.0, 1.0]), np.array([1.0, 1.0])
    real = sk._lock

    class Interleaving:
        armed = True

        def __enter__(self):
            if Interleaving.armed and threading.current_thread() is threading.main_thread():
                Interleaving.armed = False
                other = threading.Thread(target=lambda: sk.update(y, gate=1e-3))
                other.start()
                other.join()
            return real.__enter__()

        def __exit__(self, *exc):
            return real.__exit__(*exc)

    sk._lock = Interleaving()
    sk.update(x)
    sk._lock = real
    Q = np.array([[1.0, 0.0], [1.0, -1.0]])
    # brute force of the order the ids record: [1, 0], then y with gate 1e-3, then x
    K = np.array([[1.0, 0.0], y, x])
    w = np.array([1e-3, 1.0, 1.0])
    np.testing.assert_allclose(sk.normalizer(Q), ((Q @ K.T) ** 2) @ w, rtol=1e-12)


def test_universal_set_reports_the_n_of_the_state_it_was_computed_on(monkeypatch):
    """``universal_set`` settles a copy taken under the lock, then works without it: a writer that feeds a
    key meanwhile must not change the ``n`` it reports (it reported the live sketch's, a later state's, found
    by a stress test).  The writer is simulated deterministically: it feeds a key while the copy settles."""
    rng = np.random.default_rng(5)
    K = rng.standard_normal((40, D)) * (1.2 ** np.arange(40))[:, None]  # the newest key is always in U
    sk = ls.KeySketch(D, eps=EPS).update_many(K[:30])
    settle = ls.KeySketch._flush

    def settle_while_a_writer_feeds(self: ls.KeySketch) -> None:
        if self is not sk:  # the settled copy
            sk.update(K[30])
        settle(self)

    monkeypatch.setattr(ls.KeySketch, "_flush", settle_while_a_writer_feeds)
    U = sk.universal_set()
    assert sk.n == 31
    assert U.n == 30 and int(U.ids.max()) == 29
