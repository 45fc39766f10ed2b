"""``KeySketch`` (p = 2): one-pass exactness for any feeding pattern, shard split and merge order; the sketch contract.

Every expected answer comes from the naive twins in ``tests/naive.py`` applied to all keys at once.
"""

from __future__ import annotations

import copy
import tracemalloc
import weakref

import naive
import numpy as np
import pytest
from conftest import (
    MEMORY_GROWTH_RTOL,
    NORMALIZER_RTOL,
    SCORE_RTOL,
    SEEDS,
    answer,
    assert_heavy_matches_dense,
    assert_matches_offline,
    assert_no_ties,
    heavy_tailed_keys,
)

import levstream as ls

EPS = 0.02
DIM = 8


@pytest.fixture(scope="module")
def tau(keys):
    t = naive.leverage_svd(keys)
    assert_no_ties(t, EPS)
    return t


def _cuts(n: int, n_parts: int, rng: np.random.Generator) -> list[int]:
    return sorted(rng.choice(np.arange(1, n), size=n_parts - 1, replace=False).tolist())


# ---------------------------------------------------------------------------------------------- one stream
@pytest.mark.parametrize("block_rows", [None, 37, 1024])
def test_one_chunk_equals_offline(keys, queries, tau, block_rows):
    sk = ls.KeySketch(DIM, eps=EPS, block_rows=block_rows).update_many(keys)
    U = sk.universal_set()
    assert_matches_offline(U.ids, tau, EPS)
    np.testing.assert_allclose(U.scores, tau[U.ids], rtol=SCORE_RTOL)
    np.testing.assert_array_equal(U.keys, keys[U.ids])
    assert U.ids.dtype == np.int64 and np.all(np.diff(U.ids) > 0)
    assert len(U) > 10, "fixture must have heavy keys"
    assert_heavy_matches_dense(sk.heavy_entries(queries), naive.dense_heavy(queries, keys, EPS), EPS)
    np.testing.assert_allclose(sk.normalizer(queries), naive.dense_normalizer(queries, keys), rtol=NORMALIZER_RTOL)


def test_block_of_one_row_equals_offline(keys):
    K = keys[:400]
    sk = ls.KeySketch(DIM, eps=EPS, block_rows=1).update_many(K)
    assert_matches_offline(sk.universal_set().ids, naive.leverage_svd(K), EPS)


@pytest.mark.parametrize("seed", SEEDS)
def test_any_chunking_equals_offline(keys, tau, seed):
    rng = np.random.default_rng(seed)
    sk = ls.KeySketch(DIM, eps=EPS, block_rows=int(rng.integers(50, 700)))
    for part in np.split(keys, _cuts(len(keys), 25, rng)):
        sk.update_many(part)
    assert_matches_offline(sk.universal_set().ids, tau, EPS)


def test_row_at_a_time_equals_offline(keys, tau):
    sk = ls.KeySketch(DIM, eps=EPS, block_rows=256)
    for x in keys:
        sk.update(x)
    assert sk.n == len(keys)
    assert_matches_offline(sk.universal_set().ids, tau, EPS)


@pytest.mark.parametrize("seed", SEEDS)
def test_mix_of_update_update_many_and_extend(keys, queries, tau, seed):
    """Rows, chunks, a generator of rows and chunks, interleaved in a random order: same answer as offline."""
    rng = np.random.default_rng(seed)
    sk = ls.KeySketch(DIM, eps=EPS, block_rows=int(rng.integers(16, 500)))
    parts = np.split(keys, _cuts(len(keys), 30, rng))
    for part in parts:
        how = rng.integers(4)
        if how == 0:
            for x in part:
                sk.update(x)
        elif how == 1:
            sk.update_many(part)
        elif how == 2:  # a generator mixing single rows and chunks
            sk.extend(x if i % 2 else x[None, :] for i, x in enumerate(part))
        else:
            sk.extend(iter(np.array_split(part, min(3, len(part)))))
    assert sk.n == len(keys)
    assert_matches_offline(sk.universal_set().ids, tau, EPS)
    assert_heavy_matches_dense(sk.heavy_entries(queries), naive.dense_heavy(queries, keys, EPS), EPS)


def test_extend_with_progress_bar_gives_the_same_sketch(keys, capsys):
    plain = ls.KeySketch(DIM, eps=EPS, block_rows=300).extend(np.array_split(keys, 10))
    shown = ls.KeySketch(DIM, eps=EPS, block_rows=300).extend(iter(np.array_split(keys, 10)), progress=True)
    assert shown.to_bytes() == plain.to_bytes()
    assert "3.00k" in capsys.readouterr().err  # tqdm counted every row


@pytest.mark.parametrize("kind", ["keys", "pairs", "multihead pairs"])
def test_extend_lets_each_item_go_before_the_iterable_makes_the_next(kind, keys):
    """A generator of chunks never has two of them alive on extend's account (peak memory of a stream is one
    chunk, not two): when the generator makes item k + 1, every array of item k is already freed."""
    heads = 2 if kind == "multihead pairs" else None
    alive = []

    def chunks():
        refs: list[weakref.ref] = []
        for part in np.array_split(keys, 5):
            alive.append(sum(r() is not None for r in refs))
            K = np.tile(part, (heads, 1, 1)) if heads else part.copy()
            V = np.ones(K.shape[:-1] + (3,))
            refs = [weakref.ref(K), weakref.ref(V)]
            item = K if kind == "keys" else (K, V)
            del K, V
            yield item
            del item

    if heads:
        sk = ls.MultiHeadKeySketch(heads, DIM, eps=EPS, value_dim=3)
    else:
        sk = ls.KeySketch(DIM, eps=EPS, value_dim=None if kind == "keys" else 3)
    sk.extend(chunks())
    assert alive == [0] * 5
    assert sk.n == len(keys)


def test_queries_between_updates_do_not_change_the_result(keys, queries, tau):
    """Queries flush and prune; interleaving them with updates must not alter the final answer."""
    sk = ls.KeySketch(DIM, eps=EPS, block_rows=100)
    for part in np.array_split(keys, 9):
        sk.update_many(part)
        sk.universal_set()
        sk.heavy_entries(queries)
        sk.top_k(queries, 2)
    assert_matches_offline(sk.universal_set().ids, tau, EPS)


def test_long_stream_where_the_norm_prefilter_drops_most_rows():
    """100k rows: after the first blocks nearly every row is discarded by the norm bound alone; the few
    heavy ones (and nothing else) must still come out."""
    K = heavy_tailed_keys(100_000, DIM, seed=6, tail=1.5)
    eps = 0.002
    tau = naive.leverage_svd(K)
    assert_no_ties(tau, eps)
    sk = ls.KeySketch(DIM, eps=eps, block_rows=2048)
    for part in np.array_split(K, 61):
        sk.update_many(part)
    U = sk.universal_set()
    assert_matches_offline(U.ids, tau, eps)
    assert 50 < len(U) <= DIM / eps


def test_universal_set_of_prefix_is_offline_set_of_prefix(keys):
    sk = ls.KeySketch(DIM, eps=EPS, block_rows=128)
    for stop in (5, 50, 700, 3000):
        sk.update_many(keys[sk.n:stop])
        assert_matches_offline(sk.universal_set().ids, naive.leverage_svd(keys[:stop]), EPS)


# ---------------------------------------------------------------------------------------------- shards
def _shards(keys: np.ndarray, cuts: list[int], how: str, rng: np.random.Generator) -> list[ls.KeySketch]:
    out, start = [], 0
    for part in np.split(keys, cuts):
        sk = ls.KeySketch(DIM, eps=EPS, block_rows=int(rng.integers(32, 600)))
        if how == "offset":
            sk.update_many(part, offset=start)
        else:
            sk.update_many(part, ids=np.arange(start, start + len(part)))
        out.append(sk)
        start += len(part)
    return out


@pytest.mark.parametrize("how", ["offset", "ids"])
@pytest.mark.parametrize("seed", SEEDS)
def test_shards_merged_in_any_order_equal_offline(keys, queries, tau, how, seed):
    rng = np.random.default_rng(seed)
    shards = _shards(keys, _cuts(len(keys), 7, rng), how, rng)
    expected_hits = naive.dense_heavy(queries, keys, EPS)

    chain = shards[0].copy()
    for i in rng.permutation(np.arange(1, len(shards))):
        chain.merge(shards[i])
    tree = ls.KeySketch.merge_all([shards[i] for i in rng.permutation(len(shards))])
    plus = shards[3] + shards[0]
    for i in (6, 1, 5, 2, 4):
        plus = plus + shards[i]
    iadd = shards[6].copy()
    for s in shards[:6]:
        iadd += s
    left = (shards[0] + shards[1]) + (shards[2] + (shards[3] + shards[4])) + (shards[5] + shards[6])
    for merged in (chain, tree, plus, iadd, left):
        assert merged.n == len(keys)
        assert_matches_offline(merged.universal_set().ids, tau, EPS)
        assert_heavy_matches_dense(merged.heavy_entries(queries), expected_hits, EPS)
        np.testing.assert_allclose(merged.normalizer(queries), naive.dense_normalizer(queries, keys),
                                   rtol=NORMALIZER_RTOL)


def test_merge_of_interleaved_ids_equals_offline(keys, tau):
    """Shards need not hold contiguous id ranges: a random permutation split into shards."""
    rng = np.random.default_rng(11)
    perm = rng.permutation(len(keys))
    shards = []
    for part in np.array_split(perm, 5):
        shards.append(ls.KeySketch(DIM, eps=EPS, block_rows=200).update_many(keys[part], ids=part))
    merged = ls.KeySketch.merge_all(shards)
    assert_matches_offline(merged.universal_set().ids, tau, EPS)
    np.testing.assert_array_equal(merged.universal_set().keys, keys[merged.universal_set().ids])


def test_merge_leaves_the_other_sketch_unchanged(keys, queries):
    a = ls.KeySketch(DIM, eps=EPS).update_many(keys[:1000])
    b = ls.KeySketch(DIM, eps=EPS).update_many(keys[1000:], offset=1000)
    before = b.to_bytes()
    a.merge(b)
    assert b.to_bytes() == before


def test_empty_sketch_merge_is_identity(keys, queries):
    full = ls.KeySketch(DIM, eps=EPS, block_rows=300).update_many(keys)
    ref = answer(full.copy(), queries)
    assert answer(full.copy().merge(ls.KeySketch(DIM, eps=EPS)), queries) == ref
    assert answer(ls.KeySketch(DIM, eps=EPS).merge(full), queries) == ref
    assert answer(ls.KeySketch.merge_all([ls.KeySketch(DIM, eps=EPS), full, ls.KeySketch(DIM, eps=EPS)]),
                  queries) == ref
    empty = ls.KeySketch(DIM, eps=EPS).merge(ls.KeySketch(DIM, eps=EPS))
    assert empty.is_empty() and empty.n == 0 and len(empty.universal_set()) == 0


def test_merge_all_of_one_sketch_is_a_copy(keys, queries):
    sk = ls.KeySketch(DIM, eps=EPS).update_many(keys[:500])
    out = ls.KeySketch.merge_all([sk])
    assert out is not sk and answer(out, queries) == answer(sk, queries)
    with pytest.raises(ValueError, match="at least one sketch; got none"):
        ls.KeySketch.merge_all([])


def test_default_ids_continue_after_merge(keys, tau):
    """After merging shards numbered by offset=, rows fed without ids get fresh ids (no clash)."""
    a = ls.KeySketch(DIM, eps=EPS).update_many(keys[:1000])
    b = ls.KeySketch(DIM, eps=EPS).update_many(keys[1000:2000], offset=1000)
    merged = b.merge(a)
    assert merged.next_id == 2000
    merged.update_many(keys[2000:])
    assert_matches_offline(merged.universal_set().ids, tau, EPS)


# ---------------------------------------------------------------------------------------------- contract
@pytest.mark.parametrize("seed", SEEDS)
def test_check_sketch_contract(keys, queries, seed):
    ls.testing.check_sketch_contract(lambda: ls.KeySketch(DIM, eps=EPS, block_rows=128), keys[:1500], queries,
                                     rng=seed)


def test_contract_checker_can_fail():
    """The contract checker must catch a sketch that forgets keys (guard against a checker that cannot fail)."""

    class Forgetful(ls.KeySketch):
        def update_many(self, X, ids=None, offset=None):
            X = np.asarray(X)
            return super().update_many(X[: max(1, len(X) - 1)], ids=ids, offset=offset)

    with pytest.raises(AssertionError):
        ls.testing.check_sketch_contract(lambda: Forgetful(4, eps=0.1), heavy_tailed_keys(400, 4, 0),
                                         np.eye(4))


def test_bytes_round_trip_then_more_updates_equals_never_serialized(keys, queries):
    for cut in (1, 777, 1500):
        never = ls.KeySketch(DIM, eps=EPS, block_rows=500).update_many(keys[:cut])
        restored = ls.KeySketch.from_bytes(never.to_bytes())
        for sk in (never, restored):
            for x in keys[cut:cut + 40]:
                sk.update(x)
            sk.update_many(keys[cut + 40:])
        assert restored.to_bytes() == never.to_bytes()
        assert answer(restored, queries) == answer(never, queries)


@pytest.mark.parametrize("copier", [lambda s: s.copy(), copy.copy, copy.deepcopy])
def test_copy_is_independent(keys, queries, copier):
    sk = ls.KeySketch(DIM, eps=EPS, block_rows=400).update_many(keys[:1000])
    for x in keys[1000:1010]:
        sk.update(x)  # leave rows in the input buffer
    before_bytes, before = sk.to_bytes(), answer(sk.copy(), queries)
    clone = copier(sk)
    assert clone is not sk
    assert answer(clone.copy(), queries) == before
    clone.update_many(keys[1010:])
    clone.update(keys[0])
    assert sk.to_bytes() == before_bytes and answer(sk, queries) == before
    sk.update_many(keys[1010:2000])
    assert clone.n == len(keys) + 1


def test_input_arrays_are_neither_modified_nor_aliased(keys, queries):
    X = keys.copy()
    sk = ls.KeySketch(DIM, eps=EPS, block_rows=700).update_many(X[:2000])
    row = X[2000].copy()
    sk.update(row)
    sk.extend([X[2001:2500], X[2500]])
    np.testing.assert_array_equal(X, keys)
    ref = answer(sk.copy(), queries)
    X[:] = 0.0  # the caller reuses its buffers
    row[:] = 0.0
    assert answer(sk, queries) == ref


# ---------------------------------------------------------------------------------------------- state
def test_properties_of_a_fresh_and_a_fed_sketch(keys):
    sk = ls.KeySketch(DIM, eps=EPS)
    assert (sk.dim, sk.eps, sk.p, sk.n, sk.num_retained) == (DIM, EPS, 2.0, 0, 0)
    assert sk.is_empty() and isinstance(sk.nbytes, int) and sk.nbytes >= 2 * DIM * DIM * 8
    sk.update(keys[0])
    assert sk.n == 1 and not sk.is_empty() and sk.num_retained == 1
    sk.update_many(keys[1:])
    assert sk.n == len(keys)
    U = sk.universal_set()
    assert sk.num_retained >= len(U)  # queries read candidates and buffered rows and change nothing
    sk.flush()
    assert sk.num_retained == len(U)  # flush() settles: the buffer is folded in, the candidates rescored
    assert sk.nbytes >= sk.num_retained * DIM * 8
    assert "KeySketch(dim=8" in repr(sk)


def test_num_retained_bounded_while_streaming_rows_and_chunks():
    """Candidates + buffer never exceed capacity + block_rows, fed row by row or in chunks of any size."""
    d, eps, block = 6, 0.05, 64
    rng = np.random.default_rng(21)
    sk = ls.KeySketch(d, eps=eps, block_rows=block)
    bound = sk.capacity + block
    assert sk.capacity <= 2 * d / eps + 1 + 2
    # a stream where every fresh row is heavy against its prefix: norms keep growing
    growth = np.exp(np.linspace(0, 12, 6000))[:, None]
    X = rng.standard_normal((6000, d)) * growth
    for i, x in enumerate(X[:1500]):
        sk.update(x)
        assert sk.num_retained <= bound, f"row {i}: {sk.num_retained} > {bound}"
    for part in np.array_split(X[1500:], 40):
        sk.update_many(part)
        assert sk.num_retained <= bound
    sk.update_many(np.vstack([X[:10]] * 50), offset=10**6)  # one big chunk
    assert sk.num_retained <= bound
    assert_matches_offline(sk.universal_set().ids[sk.universal_set().ids < 6000],
                           naive.leverage_svd(np.vstack([X, np.vstack([X[:10]] * 50)]))[:6000], eps)


def test_memory_independent_of_n():
    """Memory does not grow with n.  nbytes stays below a bound set by d, eps and block_rows alone
    while 400k rows stream in; and, measured independently of nbytes, the allocations traced by
    tracemalloc peak no higher while streaming rows 20k..400k than while streaming the first 20k
    (a sketch keeping even one byte per row would add 380 kB).  The allowance, 5 % plus 128 KiB, is well below
    that: the peak also holds Python objects of the ingest threads (jobs, frames), and where it falls among
    their allocations varies by tens of kB from run to run; the 190 more calls give the threads more chances.
    On an AVX-512 EPYC (2026-12-02, thirteenth session) the excess of the second peak over the first measured
    21-58 kB in 11 runs, and the test failed once in a full-suite run with the allowance at 64 KiB.
    Measured after the tests of test_ingest.py in the same process, 6 times each: with the input buffer given
    its full size at once (the store reaches it in the warm-up) 126-127 kB after the first 20k rows and 155-190 kB
    after 400k; with the buffer grown in 1.5x steps (the first 20k rows then include growth) 150-164 kB and
    160-197 kB.  32 KiB, the allowance before, failed about one run in five with the first."""
    d, eps, block = 8, 0.05, 512
    rng = np.random.default_rng(5)
    sk = ls.KeySketch(d, eps=eps, block_rows=block)
    row_bytes = d * 8 + 8
    bound = 4 * d * d * 8 + d * 8 + (sk.capacity + 2 * block) * row_bytes + 64 * 16
    # Warm-up: geometrically growing norms make every row heavy against its prefix, so the candidate
    # store reaches its largest size before the measured phases (its growth is amortised doubling).
    sk.update_many(rng.standard_normal((3000, d)) * np.exp(np.linspace(0.0, 12.0, 3000))[:, None])
    sk.universal_set()
    # then heavy-tailed rows at the scale of the largest warm-up rows: fresh rows still turn heavy
    chunks = [rng.standard_normal((2000, d)) * (1 + rng.pareto(2.0, (2000, 1))) * np.exp(12.0)
              for _ in range(200)]
    peaks = []
    tracemalloc.start()
    try:
        for i, chunk in enumerate(chunks):
            sk.update_many(chunk)
            assert sk.nbytes <= bound, f"after {sk.n} rows: {sk.nbytes} > {bound}"
            assert sk.num_retained <= sk.capacity + block
            if i in (9, len(chunks) - 1):  # end of the first 20k rows, end of the stream
                sk.universal_set()
                peaks.append(tracemalloc.get_traced_memory()[1])
                tracemalloc.reset_peak()
    finally:
        tracemalloc.stop()
    assert sk.n == 3000 + 400_000
    peak_small, peak_large = peaks
    assert peak_large <= peak_small * (1.0 + MEMORY_GROWTH_RTOL) + 128 * 1024, (peak_small, peak_large)
    assert len(sk.universal_set()) <= d / eps


def test_capacity_is_twice_the_size_bound():
    sk = ls.KeySketch(64, eps=0.01)
    assert 2 * 64 / 0.01 <= sk.capacity <= 2 * 64 / 0.01 + 2


def test_flush_processes_the_buffer_without_changing_answers(keys, queries):
    buffered = ls.KeySketch(keys.shape[1], eps=EPS, block_rows=4096).update_many(keys[:2960])
    for x in keys[2960:]:  # single rows wait in the input buffer
        buffered.update(x)
    flushed = buffered.copy().flush()
    assert flushed.num_retained <= buffered.num_retained
    assert len(flushed.to_bytes()) < len(buffered.to_bytes())
    assert flushed.universal_set().ids.tolist() == buffered.universal_set().ids.tolist()
    assert flushed.heavy_entries(queries).as_set() == buffered.heavy_entries(queries).as_set()
