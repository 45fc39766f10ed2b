"""Live steps of a sketch without values: rows fed since the live cache was current wait in the store.

A key-only ``update`` on a live stream is a copy into the store; the next query scans up to
``_WAITING_ROWS_SCANNED`` waiting rows as they are (their terms added to ``Z``) and folds them into the cache beyond
that.  Every answer is checked against the dense attention of every key fed so far (``naive.NaiveStream``), across
the limit, for float64 and float32 keys, for gated streams, and for queries the live path cannot answer (not finite,
squares that overflow), which are refused as before and change nothing.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import heavy_tailed_keys
from naive import NaiveStream
from test_contract import GRAM, check_entries

import levstream as ls
from levstream import sketch as sketch_module

D = 6
EPS = 0.05
LIMIT = sketch_module._WAITING_ROWS_SCANNED


def _sketch_and_twin(seed: int, n0: int = 200, dtype: type = np.float64):
    K = heavy_tailed_keys(n0 + 1000, D, seed=seed).astype(dtype)
    sk = ls.KeySketch(D, eps=EPS, block_rows=4096).update_many(K[:n0])
    twin = NaiveStream(D).update_many(K[:n0].astype(np.float64))
    return sk, twin, K, n0


def _queries(seed: int, m: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((m, D))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("gap", [1, 2, LIMIT - 1, LIMIT, LIMIT + 1, 2 * LIMIT + 3])
def test_queries_after_a_gap_of_updates_see_every_row(dtype: type, gap: int) -> None:
    """``gap`` single-row updates between queries: the rows wait (scanned or folded) and every answer is dense."""
    sk, twin, K, t = _sketch_and_twin(seed=gap, dtype=dtype)
    sk.heavy_entries(_queries(0))  # the live cache is current from here on
    for step in range(6):
        for _ in range(gap):
            sk.update(K[t])
            twin.update(K[t].astype(np.float64))
            t += 1
        Q = _queries(step + 1, m=1 + step % 3)
        before = sk.to_bytes()
        hits = sk.heavy_entries(Q)
        check_entries(hits, twin, Q, EPS, GRAM, f"gap {gap}, step {step}")
        assert sk.to_bytes() == before, "a query changed the sketch"


def test_a_heavy_key_among_the_waiting_rows_is_found_with_its_exact_value() -> None:
    sk, twin, K, t = _sketch_and_twin(seed=7)
    sk.heavy_entries(_queries(0))
    q = np.zeros((1, D))
    q[0, 0] = 1.0
    spike = np.zeros(D)
    spike[0] = 50.0  # dominates the attention of q: it can only come from the waiting rows
    for i in range(LIMIT):
        row = spike if i == LIMIT // 2 else K[t]
        sk.update(row)
        twin.update(row)
        t += 1
        hits = sk.heavy_entries(q)
        check_entries(hits, twin, q, EPS, GRAM, f"waiting row {i}")
    ids, values = hits.row(0)
    spike_id = sk.n - LIMIT + LIMIT // 2
    assert values[ids.tolist().index(spike_id)] == values.max()


@pytest.mark.parametrize(
    "bad", [np.nan, np.inf, 1e200], ids=["nan", "inf", "squares-overflow"]
)
def test_a_query_the_live_path_cannot_answer_is_refused_and_changes_nothing(bad: float) -> None:
    sk, twin, K, t = _sketch_and_twin(seed=3)
    sk.heavy_entries(_queries(0))
    for _ in range(5):  # rows waiting: the refused query must not fold them, nor lose them
        sk.update(K[t])
        twin.update(K[t])
        t += 1
    before = sk.to_bytes()
    Q = _queries(1, m=2)
    Q[1, 2] = bad
    with pytest.raises(ValueError, match="finite|overflow"):
        sk.heavy_entries(Q)
    assert sk.to_bytes() == before
    check_entries(sk.heavy_entries(Q[:1]), twin, Q[:1], EPS, GRAM, "after the refused query")


def test_gated_rows_wait_too() -> None:
    """A gated stream's rows wait in its frame; the answers are those of dense decayed attention."""
    rng = np.random.default_rng(11)
    K = heavy_tailed_keys(300, D, seed=11)
    gates = rng.uniform(0.9, 1.0, size=300)
    sk = ls.KeySketch(D, eps=EPS, block_rows=4096).update_many(K[:100], gates=gates[:100])
    sk.heavy_entries(_queries(0))
    for t in range(100, 300):
        sk.update(K[t], gate=gates[t])
        if t % 37 == 0 or t == 299:
            Q = _queries(t)
            # the weight of key j at time t is the product of the gates after it: exp(sum_{j < s <= t} log g_s)
            logs = np.log(gates[: t + 1])
            w = np.exp(logs.sum() - np.cumsum(logs))
            A = (Q @ K[: t + 1].T) ** 2 * w
            A /= A.sum(axis=1, keepdims=True)
            hits = sk.heavy_entries(Q)
            for i in range(Q.shape[0]):
                ids, values = hits.row(i)
                want = np.flatnonzero(A[i] >= EPS * (1 + 1e-9))
                assert set(want.tolist()) <= set(ids.tolist()), f"step {t}, query {i}: missed"
                assert (A[i, ids] >= EPS * (1 - 1e-9)).all(), f"step {t}, query {i}: below eps"
                np.testing.assert_allclose(values, A[i, ids], rtol=1e-9)


def test_a_row_that_cannot_be_stored_changes_nothing(monkeypatch) -> None:
    """The key-only step grows the store before it writes anything: a failed growth leaves the sketch as it was."""
    from levstream import _store

    sk, twin, K, t = _sketch_and_twin(seed=5)
    sk.heavy_entries(_queries(0))
    while sk._store.n < sk._store.capacity:  # fill the store's room: the next row must grow it
        sk.update(K[t])
        twin.update(K[t])
        t += 1
    before = sk.to_bytes()

    def broken(*args, **kwargs):
        raise MemoryError("injected")

    monkeypatch.setattr(_store.RowStore, "reserve", broken)
    with pytest.raises(MemoryError, match="injected"):
        sk.update(K[t])
    monkeypatch.undo()
    assert sk.to_bytes() == before
    sk.update(K[t])
    twin.update(K[t])
    Q = _queries(1)
    check_entries(sk.heavy_entries(Q), twin, Q, EPS, GRAM, "after the failed growth")


def test_float64_rows_after_float32_rows_are_held_as_float64() -> None:
    sk, twin, K, t = _sketch_and_twin(seed=6, dtype=np.float32)
    assert sk._store.keys.dtype == np.float32
    sk.heavy_entries(_queries(0))
    for _ in range(10):
        row = K[t].astype(np.float64) * (1.0 + 1e-9)  # not a float32 value: it must be held exactly
        sk.update(row)
        twin.update(row)
        t += 1
    assert sk._store.keys.dtype == np.float64
    Q = _queries(2)
    check_entries(sk.heavy_entries(Q), twin, Q, EPS, GRAM, "mixed precision")


def test_small_chunks_are_the_stream_fed_at_once() -> None:
    """Chunks of 0 to 20 rows (the few-rows path up to 16, across block ends the general one), with queries between
    them: every answer is dense, and the sketch ends as one fed the same rows in one chunk, byte for byte."""
    rng = np.random.default_rng(12)
    K = heavy_tailed_keys(8000, D, seed=12)
    sk = ls.KeySketch(D, eps=EPS, block_rows=50)
    twin = NaiveStream(D)
    t = 0
    for step in range(300):
        m = int(rng.integers(0, 21))
        sk.update_many(K[t : t + m])
        twin.update_many(K[t : t + m])
        t += m
        if step % 7 == 0:
            Q = _queries(step)
            check_entries(sk.heavy_entries(Q), twin, Q, EPS, GRAM, f"step {step}")
    at_once = ls.KeySketch(D, eps=EPS, block_rows=50).update_many(K[:t])
    assert sk.to_bytes() == at_once.to_bytes()
    with pytest.raises(ValueError):
        sk.update_many(np.zeros((0, D + 1)))  # an empty chunk of the wrong width is still an error
    bad = K[t : t + 3].copy()
    bad[1, 0] = np.nan
    before = sk.to_bytes()
    with pytest.raises(ValueError, match="finite"):
        sk.update_many(bad)
    assert sk.to_bytes() == before


@pytest.mark.parametrize("how", ["update", "few rows", "one-row chunk", "heads update", "heads chunk"])
def test_the_running_counter_stops_at_int64s_end(how: str) -> None:
    """Ids are int64: the running counter's rows are refused, with a clear error and nothing changed, once their ids
    would leave it (the last range of ids seen ends one past the last id), by every path."""
    rng = np.random.default_rng(0)
    heads = how.startswith("heads")
    sk = ls.MultiHeadKeySketch(2, D, eps=EPS) if heads else ls.KeySketch(D, eps=EPS)
    first = 2**63 - 6
    sk.update_many(rng.standard_normal((2, 3, D) if heads else (3, D)), offset=first)
    sk.heavy_entries(rng.standard_normal((2, 1, D) if heads else (1, D)))
    fed = 3
    for _ in range(4):
        before = sk.to_bytes()
        m = 3 if how == "few rows" else 1
        try:
            if how == "update":
                sk.update(rng.standard_normal(D))
            elif how == "heads update":
                sk.update(rng.standard_normal((2, D)))
            elif heads:
                sk.update_many(rng.standard_normal((2, m, D)))
            else:
                sk.update_many(rng.standard_normal((m, D)))
        except ValueError as exc:
            assert "overflow int64" in str(exc)
            assert sk.to_bytes() == before
            assert first + fed + m > 2**63 - 1
        else:
            fed += m
            assert first + fed <= 2**63 - 1
        assert sk.n == fed
    assert fed < 6 + 3  # some call was refused
    again = type(sk).from_bytes(sk.to_bytes())
    assert again.to_bytes() == sk.to_bytes()


def test_a_failure_in_the_flush_counts_no_row_twice(monkeypatch) -> None:
    """The summary takes a full block before the store sorts out its rows: a failure in between (no memory) puts the
    summary back, the rows still pending, and the row that completed the block is not fed."""
    from levstream import _store

    K = heavy_tailed_keys(200, D, seed=9)
    sk = ls.KeySketch(D, eps=EPS, block_rows=20).update_many(K[:59])
    twin = NaiveStream(D).update_many(K[:59])
    sk.heavy_entries(_queries(0))
    before = sk.to_bytes()

    def broken(*args, **kwargs):
        raise MemoryError("injected")

    monkeypatch.setattr(_store.RowStore, "keep_from", broken)
    with pytest.raises(MemoryError, match="injected"):
        sk.update(K[59])  # completes the third block
    monkeypatch.undo()
    assert sk.to_bytes() == before
    Q = _queries(3)
    check_entries(sk.heavy_entries(Q), twin, Q, EPS, GRAM, "after the failed flush")
    np.testing.assert_allclose(sk.normalizer(Q), twin.normalizer(Q), rtol=1e-9)
    for t in range(59, 120):
        sk.update(K[t])
        twin.update(K[t])
    check_entries(sk.heavy_entries(Q), twin, Q, EPS, GRAM, "later")
