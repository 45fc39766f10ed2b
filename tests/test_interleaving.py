"""Live streams: random interleavings of updates, queries, merges, copies and byte round trips.

A hypothesis program (float64 or float32 keys) drives ``update``, ``update_many`` (0 to 3 blocks of rows; a
running counter, ``offset=`` or explicit non-positional ids), ``extend``, ``heavy_entries``, ``top_k``, ``merge``
(with a sketch of a disjoint id range), ``copy`` and ``to_bytes``/``from_bytes`` on a ``KeySketch``
(p = 2) and on a ``MultiHeadKeySketch`` (3 heads, p = 2).  After every query the answer is compared
with the brute-force twin ``naive.NaiveStream`` fed the same prefix: identical entries (tie band
excepted), values to VALUE_RTOL, and ``to_bytes()`` unchanged by the query.  A long run (10^5 steps
of one update and one query, never settled explicitly) is checked on a sample of steps against
brute force over the prefix.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np
import pytest
from conftest import TIE_RTOL, VALUE_RTOL, heavy_tailed_keys
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from naive import NaiveStream
from test_contract import GRAM, check_entries, check_top_k

import levstream as ls

D = 4
EPS = 0.05
BLOCK_ROWS = 8
MAX_CHUNK = 3 * BLOCK_ROWS
MAX_STEPS = 30
POOL_ROWS = 4 * MAX_STEPS * MAX_CHUNK  # enough for any program (extend takes up to 3 chunks)
SIDE_IDS = 10**6  # merged side sketches number their keys from k * SIDE_IDS: disjoint from the rest
OPS = ["update", "update_many", "extend", "heavy_entries", "top_k", "merge", "copy", "bytes"]

INTERLEAVING_SETTINGS = settings(deadline=None, max_examples=40, derandomize=True,
                                 suppress_health_check=[HealthCheck.too_slow,
                                                        HealthCheck.data_too_large])


@cache
def key_pool(heads: int, seed: int) -> np.ndarray:
    """Heavy-tailed keys of every head, shape (heads, POOL_ROWS, D), consumed in order."""
    return np.stack([heavy_tailed_keys(POOL_ROWS, D, seed=seed + 10 * h) for h in range(heads)])


class Program:
    """The sketch under test, its twins (one per head) and the bookkeeping of a random program."""

    def __init__(self, data: Any, heads: int, seed: int) -> None:
        self.data, self.heads, self.multi = data, heads, heads > 1
        self.pool, self.used, self.merges = key_pool(heads, seed), 0, 0
        # float32 keys: the sketch holds them as float32, the twins their exact float64 values
        self.float32 = bool(data.draw(st.booleans(), label="float32 keys"))
        if self.float32:
            self.pool = self.pool.astype(np.float32).astype(np.float64)
        self.rng = np.random.default_rng(seed)
        self.sketch = self.new_sketch()
        self.twins = [NaiveStream(D) for _ in range(heads)]
        self.copies: list[tuple[Any, bytes]] = []  # originals left by copy(), with their bytes

    def new_sketch(self) -> Any:
        if self.multi:
            return ls.MultiHeadKeySketch(self.heads, D, eps=EPS, block_rows=BLOCK_ROWS)
        return ls.KeySketch(D, eps=EPS, block_rows=BLOCK_ROWS)

    def arg(self, X: np.ndarray) -> np.ndarray:
        return X if self.multi else X[0]

    def keys_arg(self, X: np.ndarray) -> np.ndarray:
        """Keys as the program feeds them (float32 in a float32 program)."""
        return self.arg(X.astype(np.float32) if self.float32 else X)

    def draw(self, strategy: Any, label: str) -> Any:
        return self.data.draw(strategy, label=label)

    def take(self, m: int) -> np.ndarray:
        X = self.pool[:, self.used:self.used + m]
        self.used += m
        return X

    # ------------------------------------------------------------------------------ feeding
    def update(self) -> None:
        x = self.take(1)
        self.sketch.update(self.keys_arg(x[:, 0]))
        for twin, row in zip(self.twins, x):
            twin.update(row[0])

    def update_many(self) -> None:
        m = self.draw(st.integers(0, MAX_CHUNK), "rows")
        X = self.take(m)
        how = self.draw(st.sampled_from(["counter", "offset", "ids"]), "numbering")
        gap = self.draw(st.sampled_from([0, 1, 7]), "id gap")
        start = self.twins[0].next_id + gap
        ids: dict[str, Any] = {}
        if how == "offset":
            ids["offset"] = start
        elif how == "ids":  # non-positional: a permutation of a range past every id fed
            ids["ids"] = start + np.asarray(self.draw(st.permutations(range(m)), "ids"), np.int64)
        self.sketch.update_many(self.keys_arg(X), **ids)
        for twin, part in zip(self.twins, X):
            twin.update_many(part, **ids)

    def extend(self) -> None:
        sizes = self.draw(st.lists(st.integers(-1, MAX_CHUNK), min_size=1, max_size=3), "items")
        items = []
        for size in sizes:  # -1: one row (1-D per head), otherwise a chunk of that many rows
            X = self.take(max(size, 1) if size else 0)
            items.append(X[:, 0] if size == -1 else X)
            for twin, part in zip(self.twins, X):
                twin.update_many(part)
        self.sketch.extend([self.keys_arg(item) for item in items])

    def merge(self) -> None:
        m = self.draw(st.integers(0, 2 * MAX_CHUNK), "side rows")
        X = self.take(m)
        self.merges += 1
        offset = self.merges * SIDE_IDS
        side = self.new_sketch()
        side.update_many(self.keys_arg(X), offset=offset)
        self.sketch.merge(side)
        for twin, part in zip(self.twins, X):
            twin.merge(NaiveStream(D).update_many(part, offset=offset))

    def copy(self) -> None:
        self.copies.append((self.sketch, self.sketch.to_bytes()))
        self.sketch = self.sketch.copy()

    def bytes(self) -> None:
        data = self.sketch.to_bytes()
        self.sketch = type(self.sketch).from_bytes(data)
        assert self.sketch.to_bytes() == data, "a restored sketch serializes differently"

    # ------------------------------------------------------------------------------ queries
    def queries(self) -> np.ndarray:
        """1 to 3 rows per head: random, aligned with a fed key, or adversarial (G^+ k_j)."""
        m = self.draw(st.integers(1, 3), "queries")
        kinds = self.draw(st.lists(st.sampled_from(["random", "key", "adversarial"]),
                                   min_size=m, max_size=m), "query kinds")
        Q = self.rng.standard_normal((self.heads, m, D))
        for h, twin in enumerate(self.twins):
            if twin.n == 0:
                continue
            picks = self.rng.integers(0, twin.n, size=m)
            for i, (kind, j) in enumerate(zip(kinds, picks)):
                if kind == "key":
                    Q[h, i] = twin.K[j]
                elif kind == "adversarial":
                    Q[h, i] = np.linalg.pinv(twin.K.T @ twin.K, hermitian=True) @ twin.K[j]
        return Q

    def heavy_entries(self) -> None:
        Q = self.queries()
        eps = self.draw(st.sampled_from([None, EPS, 0.1, 0.3]), "query eps")
        before = self.sketch.to_bytes()
        hits = self.sketch.heavy_entries(self.arg(Q), eps)
        assert self.sketch.to_bytes() == before, "heavy_entries changed the sketch"
        hits = list(hits) if self.multi else [hits]
        assert len(hits) == self.heads
        for h, twin in enumerate(self.twins):
            check_entries(hits[h], twin, Q[h], EPS if eps is None else eps, GRAM,
                          f"heavy_entries after {twin.n} keys, head {h}")

    def top_k(self) -> None:
        Q = self.queries()
        k = self.draw(st.integers(1, 4), "k")
        before = self.sketch.to_bytes()
        tops = self.sketch.top_k(self.arg(Q), k)
        assert self.sketch.to_bytes() == before, "top_k changed the sketch"
        tops = list(tops) if self.multi else [tops]
        assert len(tops) == self.heads
        for h, twin in enumerate(self.twins):
            check_top_k(tops[h], twin, Q[h], k, EPS, GRAM, f"top_k after {twin.n} keys, head {h}")

    def run(self) -> None:
        for _ in range(self.draw(st.integers(1, MAX_STEPS), "steps")):
            getattr(self, self.draw(st.sampled_from(OPS), "op"))()
            assert self.sketch.n == self.twins[0].n, "n differs from the number of keys fed"
        self.heavy_entries()  # every program ends with a checked query
        for original, data in self.copies:
            assert original.to_bytes() == data, "working on a copy changed the original"


@INTERLEAVING_SETTINGS
@given(data=st.data(), seed=st.sampled_from([0, 1, 2]))
def test_random_interleavings_on_one_head(data, seed):
    Program(data, heads=1, seed=seed).run()


@INTERLEAVING_SETTINGS
@given(data=st.data(), seed=st.sampled_from([0, 1, 2]))
def test_random_interleavings_on_three_heads(data, seed):
    Program(data, heads=3, seed=seed).run()


# ------------------------------------------------------------------------------- a long live run
LONG_STEPS = 100_000
LONG_EPS = 0.01


def long_run_checked_steps() -> np.ndarray:
    """The steps compared with brute force: the first 200 (small prefixes) and every 97th."""
    return np.union1d(np.arange(200), np.arange(0, LONG_STEPS, 97))


@pytest.mark.slow
def test_long_live_run_matches_brute_force_on_a_sample():
    """10^5 steps of update(one key) then heavy_entries(one query), never flushed or settled by
    hand; a sample of >= 1000 steps is checked against brute force over the prefix fed so far."""
    K = heavy_tailed_keys(LONG_STEPS, D, seed=11)
    rng = np.random.default_rng(12)
    # queries: random rows and rows aligned with a key fed so far (which makes that key heavy)
    Q = rng.standard_normal((LONG_STEPS, D))
    aligned = rng.random(LONG_STEPS) < 0.5
    Q[aligned] = K[(rng.random(LONG_STEPS) * (np.arange(LONG_STEPS) + 1)).astype(np.int64)][aligned]
    checked = long_run_checked_steps()
    assert checked.size >= 1000
    check = np.zeros(LONG_STEPS, dtype=bool)
    check[checked] = True
    sk = ls.KeySketch(D, eps=LONG_EPS)
    entries_checked = 0
    for t in range(LONG_STEPS):
        sk.update(K[t])
        if not check[t]:
            sk.heavy_entries(Q[t:t + 1])
            continue
        before = sk.to_bytes()
        hits = sk.heavy_entries(Q[t:t + 1])
        assert sk.to_bytes() == before, f"step {t}: the query changed the sketch"
        prefix = K[:t + 1]  # the dense keys fed so far (ids 0..t), grown one row per step
        a = (prefix @ Q[t]) ** 2
        z = a.sum()
        A = a / z if z > 0 else np.zeros_like(a)
        must = set(np.flatnonzero(A >= LONG_EPS * (1 + TIE_RTOL)).tolist())
        may = set(np.flatnonzero(A >= LONG_EPS * (1 - TIE_RTOL)).tolist())
        got = set(hits.key_ids.tolist())
        assert must <= got <= may, f"step {t}: entries {sorted(got)} vs dense {sorted(must)}"
        np.testing.assert_allclose(hits.values, A[hits.key_ids], rtol=VALUE_RTOL,
                                   err_msg=f"step {t}: values")
        entries_checked += len(must)
    assert sk.n == LONG_STEPS
    assert entries_checked >= 1000, f"only {entries_checked} heavy entries checked: a weak sample"


@pytest.mark.parametrize("precision", ["float64", "float32", "mixed"])
def test_single_rows_enter_a_current_live_cache_on_arrival(precision):
    """Once a query has made the live cache, every single-row update and decode step hands its row to the
    store and to the cache in one compiled call (the cache takes it on arrival instead of at the next query).
    Rows of every fate (kept as heavy, dropped, much longer than the rest), several updates between queries,
    flushes and the cache's refreshes on the way, float32 and mixed-precision keys: every answer equals brute
    force over the prefix, and the sketch's bytes equal those of a twin fed the same rows by ``update`` with no
    query at all (whose rows never meet a live cache; float32 keys are held as float32 whichever call fed
    them, ``prefill`` included)."""
    rng = np.random.default_rng(21)
    d, dv, eps, n = 5, 3, 0.05, 400
    K = heavy_tailed_keys(n, d, seed=22)
    K[rng.random(n) < 0.05] *= 1e3  # a few rows far longer than the rest: heavy for a while
    if precision != "float64":
        K = K.astype(np.float32).astype(np.float64)  # the twin's exact values of the float32 rows
    V = rng.standard_normal((n, dv))
    sk = ls.KeySketch(d, eps=eps, value_dim=dv, exact_output=True, block_rows=32)
    quiet = ls.KeySketch(d, eps=eps, value_dim=dv, exact_output=True, block_rows=32)
    twin = NaiveStream(d, value_dim=dv)
    for t in range(n):
        x = K[t].astype(np.float32) if precision == "float32" or (precision == "mixed" and t % 3) else K[t]
        quiet.update(x, V[t])
        twin.update(K[t], V[t])
        if t % 4 == 3:  # a decode step: the row is seen by its own query, then fed
            q = rng.standard_normal((1, d)) if t % 8 == 3 else K[rng.integers(0, t + 1)][None, :]
            res = sk.prefill(x[None, :], V[t][None, :], q)
            check_entries(res.entries, twin, q, eps, GRAM, f"step {t}, decode")
            out, heavy_out, mass = twin.attend(q, eps)
            np.testing.assert_allclose(res.output, out, rtol=1e-9, atol=1e-12 * np.abs(out).max())
            np.testing.assert_allclose(heavy_out, res.heavy_output, rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(mass, res.captured_mass, rtol=1e-9)
            continue
        sk.update(x, V[t])
        if t % 5 in (0, 2):
            q = K[rng.integers(0, t + 1)][None, :] + 0.1 * rng.standard_normal((1, d))
            check_entries(sk.heavy_entries(q), twin, q, eps, GRAM, f"step {t}")
    assert sk.to_bytes() == quiet.to_bytes()
    Q = rng.standard_normal((8, d))
    check_entries(sk.heavy_entries(Q), twin, Q, eps, GRAM, "end")
    check_entries(quiet.heavy_entries(Q), twin, Q, eps, GRAM, "end, no query before")


def _live_stream(seed: int, value_dim: int | None = None) -> tuple[ls.KeySketch, NaiveStream, np.ndarray]:
    """A sketch with a current live cache (a query after each row) and its brute-force twin, 60 rows fed (with
    random value rows when ``value_dim`` is given: the cache then takes each row at its update)."""
    K = heavy_tailed_keys(400, 4, seed=seed)
    sk, twin = ls.KeySketch(4, eps=0.05, block_rows=128, value_dim=value_dim), NaiveStream(4)
    for t in range(60):
        sk.update(K[t], None if value_dim is None else np.ones(value_dim))
        twin.update(K[t])
        sk.heavy_entries(K[t][None, :])
    return sk, twin, K


def _answers_match(sk: ls.KeySketch, twin: NaiveStream, K: np.ndarray, where: str) -> None:
    Q = np.vstack([K[:40:7], np.random.default_rng(0).standard_normal((4, 4))])
    check_entries(sk.heavy_entries(Q), twin, Q, 0.05, GRAM, where)
    np.testing.assert_allclose(sk.normalizer(Q), twin.normalizer(Q), rtol=VALUE_RTOL)


@pytest.mark.parametrize("where", ["room", "refresh", "query", "query-refresh"])
def test_a_failure_in_the_live_cache_loses_no_row_and_counts_none_twice(monkeypatch, where):
    """The live cache is derived data; a failure while it takes a row leaves the sketch consistent.  With values
    the cache takes each row at its update: making room for the row fails before anything changes (the update
    raises and the sketch is as before); a refactor of the cache a row made due runs before the next row changes
    anything, so its failure leaves that row unfed and the cache gone.  Without values rows wait for a query, which folds them into the cache once more
    wait than it scans as they are: the cache taking them (or refactoring after them) fails inside the query, which
    raises with the sketch as before.  Either way later answers equal brute force (a cache that held part of a row
    would count it twice in ``Z``) and the bytes load again."""
    import levstream.sketch as sketch_module

    on_update = where in ("room", "refresh")
    sk, twin, K = _live_stream(seed=41, value_dim=2 if on_update else None)
    t = 60
    if not on_update:  # more rows wait than a query scans as they are: the query folds them
        m = sketch_module._WAITING_ROWS_SCANNED + 1
        sk.update_many(K[t : t + m])
        twin.update_many(K[t : t + m])
        t += m
    before, n = sk.to_bytes(), sk.n

    def broken(*args: Any, **kwargs: Any) -> None:
        raise MemoryError("injected")

    name = {"room": "room_for_row", "refresh": "refresh", "query": "accept", "query-refresh": "refresh"}[where]
    monkeypatch.setattr(sketch_module._LiveRows, name, broken)
    if name == "refresh":  # due at the next row
        monkeypatch.setattr(sketch_module._LiveRows, "_mark", lambda self, m: setattr(self, "upto", m) or True)
    if where == "refresh":  # a row makes the refresh due; it runs before the next row changes anything
        sk.update(K[t], np.ones(2))
        twin.update(K[t])
        t += 1
        before, n = sk.to_bytes(), sk.n
    with pytest.raises(MemoryError, match="injected"):
        if on_update:
            sk.update(K[t], np.ones(2))
        else:
            sk.heavy_entries(K[:1])
    monkeypatch.undo()
    assert sk.to_bytes() == before and sk.n == n  # (the row whose refresh failed is not counted)
    if where == "refresh":
        assert sk._live is None  # the cache gone
    _answers_match(sk, twin, K, f"after a failure in {name}")
    assert ls.KeySketch.from_bytes(sk.to_bytes()).to_bytes() == sk.to_bytes()
    for t in range(t, t + 56):  # the stream goes on, with a new cache
        sk.update(K[t], np.ones(2) if on_update else None)
        twin.update(K[t])
        sk.heavy_entries(K[t][None, :])
    _answers_match(sk, twin, K, "later")


def test_rows_in_any_layout_take_the_live_step():
    """A strided or read-only row (a column of a Fortran-ordered array, a memory-mapped file) is fed through the
    live step like any other (copied first into the layout the compiled step takes)."""
    K = heavy_tailed_keys(80, 4, seed=43)
    V = np.random.default_rng(44).standard_normal((80, 2))
    KF, VF = np.asfortranarray(K), np.asfortranarray(V)
    KR, VR = K.copy(), V.copy()
    KR.flags.writeable = VR.flags.writeable = False
    sk = ls.KeySketch(4, eps=0.05, value_dim=2, exact_output=True, block_rows=32)
    twin = NaiveStream(4, value_dim=2)
    for t in range(80):
        keys, values = (KF, VF) if t % 2 else (KR, VR)
        sk.update(keys[t], values[t])
        twin.update(K[t], V[t])
        if t % 3 == 0:
            res = sk.prefill(KR[t : t + 1], VR[t : t + 1], KR[t : t + 1])
            twin.update(K[t], V[t])
            check_entries(res.entries, twin, K[t : t + 1], 0.05, GRAM, f"step {t}, decode")
    Q = K[::9]
    check_entries(sk.heavy_entries(Q), twin, Q, 0.05, GRAM, "end")
    np.testing.assert_allclose(sk.attend(Q).output, twin.attend(Q, 0.05)[0], rtol=1e-9)


@pytest.mark.parametrize("exact", [True, False])
def test_attend_of_one_query_between_single_rows(exact):
    """``update(k, v)`` then ``attend`` of one query, the decoding loop written without ``prefill``: one compiled
    call answers the query on the live cache (as a decode step does, with no row of its own).  Every answer
    equals brute force over the prefix: entries, heavy output and captured mass, and the exact output; a query
    orthogonal to every key has no entries and zero output; the bytes equal those of a twin fed without
    queries."""
    rng = np.random.default_rng(31)
    d, dv, eps, n = 5, 3, 0.05, 300
    K = heavy_tailed_keys(n, d, seed=32)
    K[:, -1] = 0.0  # e_{d-1} is orthogonal to every key: Z = 0
    V = rng.standard_normal((n, dv))
    make = lambda: ls.KeySketch(d, eps=eps, value_dim=dv, exact_output=exact, block_rows=32)  # noqa: E731
    sk, quiet, twin = make(), make(), NaiveStream(d, value_dim=dv)
    for t in range(n):
        sk.update(K[t], V[t])
        quiet.update(K[t], V[t])
        twin.update(K[t], V[t])
        if t % 3 == 2:
            q = K[rng.integers(0, t + 1)][None, :] + 0.1 * rng.standard_normal((1, d))
            q[0, -1] = 0.0
            if t % 27 == 2:
                q = np.eye(d)[None, -1]
            res = sk.attend(q)
            if exact:
                assert res.output is not None and res.output.shape == (1, dv)
            else:
                assert res.output is None
            if t % 27 == 2:  # Z = 0: no entries, zero outputs
                assert len(res.entries) == 0 and res.captured_mass.tolist() == [0.0]
                assert not res.heavy_output.any() and (res.output is None or not res.output.any())
                continue
            check_entries(res.entries, twin, q, eps, GRAM, f"step {t}")
            out, heavy_out, mass = twin.attend(q, eps)
            np.testing.assert_allclose(heavy_out, res.heavy_output, rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(mass, res.captured_mass, rtol=1e-9)
            if exact:
                np.testing.assert_allclose(res.output, out, rtol=1e-9, atol=1e-12 * np.abs(out).max())
    assert sk.to_bytes() == quiet.to_bytes()


def test_top_k_ranks_every_row_held_whatever_the_query_history():
    """``top_k`` ranks every row the sketch holds, the rows waiting in its input buffer included, by exact
    value: with every row still pending it is the dense top-k over all keys, certified or not; and two
    sketches in the same state (one queried as rows arrived, so with a live cache that scans only the pending
    rows that can be heavy; the other restored from its bytes) give the same answer."""
    rng = np.random.default_rng(0)
    d, n, k = 5, 300, 3
    K, Q = rng.standard_normal((n, d)), rng.standard_normal((50, d))
    sk = ls.KeySketch(d, eps=0.05).update_many(K)  # every row in the input buffer
    sk.heavy_entries(Q[:1])  # a live cache of the pending rows
    A = (Q @ K.T) ** 2
    A /= A.sum(axis=1, keepdims=True)
    top = sk.top_k(Q, k)
    want = np.argsort(-A, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(top.key_ids, want)
    np.testing.assert_allclose(top.values, np.take_along_axis(A, want, axis=1), rtol=1e-12)
    mh = ls.MultiHeadKeySketch(2, d, eps=0.05).update_many(np.stack([K, K]))
    mh.heavy_entries(np.stack([Q[:1], Q[:1]]))
    for got in mh.top_k(np.stack([Q, Q]), k):
        np.testing.assert_array_equal(got.key_ids, want)

    K = rng.standard_normal((n, d)) * rng.pareto(1.5, (n, 1))
    live = ls.KeySketch(d, eps=0.05, block_rows=64)
    live.update_many(K[:150])
    live.heavy_entries(Q[:1])
    for i in range(150, n):
        live.update(K[i])
        if i % 7 == 0:
            live.heavy_entries(Q[:1])
    restored = ls.KeySketch.from_bytes(live.to_bytes())
    a, b = live.top_k(Q, k), restored.top_k(Q, k)
    np.testing.assert_array_equal(a.key_ids, b.key_ids)
    np.testing.assert_allclose(a.values, b.values, rtol=1e-12)  # certified rows: from the live scan's values
    np.testing.assert_array_equal(a.certified, b.certified)


def test_top_k_in_a_live_loop_is_one_pass_over_every_row_held():
    """In a live loop, ``top_k`` of a query is one compiled pass over every row held (``top_k_held``), whether or
    not the query has ``k`` heavy entries (a query with fewer once paid a live scan, then the general ranking:
    175 us against 13 us for heavy_entries at n = 1e5).  Its answer equals dense top-k over every key fed when
    certified, and the general path's ranking of the rows held (ids, values to 1e-9, certified) always."""
    from levstream import _query

    rng = np.random.default_rng(33)
    d, eps, n = 4, 0.05, 400
    K = heavy_tailed_keys(n, d, seed=34)
    sk = ls.KeySketch(d, eps=eps, block_rows=32)
    fast = 0
    for t in range(n):
        sk.update(K[t])
        if t % 3:
            continue
        k = int(rng.integers(1, 6))
        q = K[rng.integers(0, t + 1)][None, :] + 0.05 * rng.standard_normal((1, d))
        top = sk.top_k(q, k)
        with sk._lock:
            view, st = sk._view(), sk._store
            if view.total_gram is not None:
                fast += _query.top_k_held(view.total_gram, st.keys_view(), st.ids_view(), q, k, eps) is not None
            general = _query.top_k(sk._held_view(), q, 2.0, k, eps)
        np.testing.assert_array_equal(top.key_ids, general.key_ids)
        np.testing.assert_allclose(top.values, general.values, rtol=1e-9)
        np.testing.assert_array_equal(top.certified, general.certified)
        A = (q @ K[: t + 1].T)[0] ** 2
        A /= A.sum()
        order = np.lexsort((np.arange(t + 1), -A))[:k]
        if top.certified[0]:
            assert top.key_ids[0].tolist() == order.tolist(), t
            np.testing.assert_allclose(top.values[0], A[order], rtol=1e-9)
        else:
            # uncertified only when fewer than k keys are held or the true k-th is below eps
            assert t + 1 < k or A[order[-1]] < eps * (1 + TIE_RTOL), t
    assert fast >= 100, f"the compiled pass answered only {fast} queries"


def test_top_k_ties_at_the_kth_place_go_to_the_smaller_id_on_every_path():
    """Two keys of opposite sign tie exactly for every query.  The top-1 is the smaller id whichever path
    answers: the live scan (one query), the ranking of every row held (a batch with a query without entries,
    a Fortran-ordered batch), a restored copy, a multi-head sketch.  (argpartition settled ties at the k-th
    place arbitrarily: key 58 came back for 57 on some paths with this seed, found in review.)"""
    d, n = 3, 60
    rng = np.random.default_rng(14)
    K = rng.standard_normal((n, d)) * (1 + rng.pareto(2.0, (n, 1)))
    i, j = sorted(rng.choice(np.arange(32, n), 2, replace=False))
    K[j] = -K[i]  # <q, k_i>^2 == <q, k_j>^2 for every q
    q = K[i] + 0.3 * rng.standard_normal(d)
    A = (K @ q) ** 2
    assert int(np.argmax(A)) in (i, j)
    sk = ls.KeySketch(d, eps=0.05, block_rows=64).update_many(K)
    answers = [
        sk.top_k(q[None], 1).key_ids[0, 0],
        sk.top_k(np.stack([q, np.zeros(d)]), 1).key_ids[0, 0],
        sk.top_k(np.asfortranarray(np.stack([q, q])), 1).key_ids[0, 0],
        ls.KeySketch.from_bytes(sk.to_bytes()).top_k(q[None], 1).key_ids[0, 0],
        ls.MultiHeadKeySketch(1, d, eps=0.05).update_many(K[None]).top_k(q[None, None], 1)[0].key_ids[0, 0],
    ]
    assert answers == [i] * 5
    # the ranking itself, on a row with a three-way tie across the cut
    from levstream._query import _top_positions

    ids = np.array([9, 4, 7, 1, 5])
    Arow = np.array([[0.2, 0.5, 0.5, 0.1, 0.5]])
    assert ids[_top_positions(Arow, 2, ids)[0]].tolist() == [4, 5]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_top_k_compiled_pass_equals_the_ranking_of_the_rows_held(dtype):
    """The compiled top-k pass against the general ranking of the rows held, over random streams: float32 and
    float64 rows, k from 1 to more than the rows held (padding), a zero query, duplicated keys (exact ties)."""
    from levstream import _query

    rng = np.random.default_rng(7)
    for trial in range(30):
        d = int(rng.integers(2, 9))
        n = int(rng.integers(1, 300))
        K = (rng.standard_normal((n, d)) * (1 + rng.pareto(2.0, (n, 1)))).astype(dtype)
        if n > 3:
            K[1] = -K[0]  # <q, k_0>^2 == <q, k_1>^2: a tie for every query
        sk = ls.KeySketch(d, eps=0.05, block_rows=int(rng.integers(8, 64)))
        for a in range(0, n, 7):
            sk.update_many(K[a : a + 7])
        sk.heavy_entries(rng.standard_normal((1, d)))  # a live view
        for q in (rng.standard_normal((1, d)), np.zeros((1, d)), K[:1].astype(np.float64)):
            k = int(rng.integers(1, sk.num_retained + 4))
            got = sk.top_k(q, k)
            with sk._lock:
                want = _query.top_k(sk._held_view(), q, 2.0, k, 0.05)
            np.testing.assert_array_equal(got.key_ids, want.key_ids, err_msg=f"trial {trial}")
            np.testing.assert_allclose(got.values, want.values, rtol=1e-9, equal_nan=True)
            np.testing.assert_array_equal(got.certified, want.certified)


def test_top_k_heap_ranks_rows_fed_in_increasing_order():
    """The compiled pass keeps a heap of the k best entries: rows whose values increase along the stream (each one
    enters the heap, the worst case) and k up to the pass's limit, against the general ranking and dense top-k."""
    from levstream import _query
    from levstream.sketch import _TOP_K_PASS_MAX

    rng = np.random.default_rng(3)
    d, n = 3, 500
    q = np.array([[1.0, 0.0, 0.0]])
    K = rng.standard_normal((n, d)) * 0.01
    K[:, 0] = np.linspace(0.1, 5.0, n)  # <q, k_j>^2 increases with j
    K[n // 2] = K[n // 2 - 1]  # an exact tie
    sk = ls.KeySketch(d, eps=0.5, block_rows=1024).update_many(K)  # every row pending: all held
    for k in (1, 2, 7, 33, _TOP_K_PASS_MAX):
        got = sk.top_k(q, k)
        with sk._lock:
            want = _query.top_k(sk._held_view(), q, 2.0, k, 0.5)
        np.testing.assert_array_equal(got.key_ids, want.key_ids)
        np.testing.assert_allclose(got.values, want.values, rtol=1e-12)
        A = (K @ q[0]) ** 2
        order = np.lexsort((np.arange(n), -A))[:k]
        np.testing.assert_array_equal(got.key_ids[0], order)
