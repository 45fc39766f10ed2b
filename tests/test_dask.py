"""``levstream.dask.build_sketch``: one sketch per partition, tree of merges, identical answers (issue #5).

References: a single-process stream over the same keys and the brute-force twins in ``naive.py``.  Schedulers:
Dask's threaded, synchronous and process-pool schedulers, and (marked slow, still run in CI) a
``distributed.LocalCluster`` of two single-threaded worker processes, including a worker killed mid-build.
"""

from __future__ import annotations

import os
import signal
import sys
from itertools import pairwise

import numba
import numpy as np
import pytest

dask = pytest.importorskip("dask", reason="dask is not installed (pip install -e '.[dask]')")
da = pytest.importorskip("dask.array", reason="dask[array] is not installed (pip install -e '.[dask]')")
db = pytest.importorskip("dask.bag", reason="dask[bag] is not installed (pip install -e '.[dask]')")

from dask.delayed import Delayed  # noqa: E402

import levstream as ls  # noqa: E402
import levstream.dask as lsd  # noqa: E402
# the key/query fixtures K and Q and the comparison helpers are shared with the thread-pool tests
from conftest import BOUND_RTOL, CORESET_DELTA, TIE_RTOL, heavy_tailed_keys  # noqa: E402
from naive import leverage_svd  # noqa: E402
from test_build import (  # noqa: E402,F401
    DV,
    EPS,
    OUTPUT_RTOL,
    K,
    Q,
    V,
    assert_attend_matches_dense,
    assert_matches_brute_force,
    assert_same_answers,
    assert_sums_close,
    queries_hitting_every_heavy_key,
    single_stream,
)
from levstream._threads import blas_threads, capped_threads  # noqa: E402

CUTS = [0, 1500, 1501, 4000, 6500, 9000, 12_000]  # uneven partitions, one of a single row


@pytest.fixture(scope="module")
def reference(K) -> ls.KeySketch:
    return single_stream(K)


def dask_array(K: np.ndarray) -> "da.Array":
    """Uneven row chunks and split columns (the build rechunks the columns to the full width)."""
    sizes = tuple(np.diff(CUTS).tolist())
    return da.from_array(K, chunks=(sizes, (3, 5)))


def delayed_chunks(K: np.ndarray) -> list:
    return [dask.delayed(np.array)(K[a:b]) for a, b in zip(CUTS[:-1], CUTS[1:])]


# ------------------------------------------------------------------------------ local schedulers
@pytest.mark.parametrize("scheduler", ["threads", "sync", "processes"])
@pytest.mark.parametrize("split_every", [2, 8])
def test_dask_array_equals_single_stream(K, Q, reference, scheduler, split_every):
    with dask.config.set(num_workers=2):
        sk = lsd.build_sketch(dask_array(K), eps=EPS, split_every=split_every, scheduler=scheduler)
    assert_same_answers(sk, reference, Q)
    assert_matches_brute_force(sk, K, Q)


@pytest.mark.parametrize("with_offsets", [False, True])
def test_bag_of_chunks_equals_single_stream(K, Q, reference, with_offsets):
    chunks = [K[a:b] for a, b in zip(CUTS[:-1], CUTS[1:])]
    bag = db.from_sequence(chunks, npartitions=3)  # partitions of 2 chunks each
    offsets = [0, 1501, 6500] if with_offsets else None
    sk = lsd.build_sketch(bag, eps=EPS, offsets=offsets, scheduler="threads")
    assert_same_answers(sk, reference, Q)


@pytest.mark.parametrize("with_offsets", [False, True])
def test_delayed_chunks_equal_single_stream(K, Q, reference, with_offsets):
    offsets = CUTS[:-1] if with_offsets else None
    sk = lsd.build_sketch(delayed_chunks(K), eps=EPS, offsets=offsets, split_every=3, scheduler="threads")
    assert_same_answers(sk, reference, Q)


def test_offsets_place_partitions_in_the_global_numbering(K, Q):
    parts = delayed_chunks(K)
    offsets = [c + 10_000_000 for c in CUTS[:-1]]
    sk = lsd.build_sketch(parts, eps=EPS, offsets=offsets, scheduler="sync")
    assert_same_answers(sk, single_stream(K, offset=10_000_000), Q)


def test_unknown_chunk_sizes_are_counted_in_a_first_pass(K, Q, reference):
    x = dask_array(K)
    x = x[x[:, 0] > -np.inf]  # boolean mask: row chunk sizes become unknown
    assert any(np.isnan(x.chunks[0]))
    assert_same_answers(lsd.build_sketch(x, eps=EPS, scheduler="threads"), reference, Q)


def test_compute_false_returns_a_delayed_sketch(K, Q, reference):
    result = lsd.build_sketch(dask_array(K), eps=EPS, compute=False)
    assert isinstance(result, Delayed)
    assert_same_answers(result.compute(scheduler="threads"), reference, Q)


def test_empty_partitions_are_no_ops(K, Q, reference):
    """Partitions and chunks without rows (of the right width) change nothing (issue 11)."""
    empty = dask.delayed(np.zeros)((0, 8))
    parts = [empty, *delayed_chunks(K), empty]
    assert_same_answers(lsd.build_sketch(parts, eps=EPS, scheduler="sync"), reference, Q)
    sizes = (0, 1500, 0, 4500, 0, 6000, 0)  # empty blocks of a Dask array, first and last included
    keys = da.from_array(K, chunks=(sizes, 8))
    with dask.config.set(num_workers=2):
        sk = lsd.build_sketch(keys, eps=EPS, split_every=2, scheduler="threads")
    assert_same_answers(sk, reference, Q)
    assert_matches_brute_force(sk, K, Q)
    e = K[:0]
    bag = db.from_sequence([e, K[:4000], e, e, K[4000:], e], npartitions=3)  # one partition holds only e, e
    assert_same_answers(lsd.build_sketch(bag, eps=EPS, scheduler="sync"), reference, Q)


@pytest.mark.parametrize("keys", [
    lambda: [dask.delayed(np.zeros)((0, 8))] * 2,
    lambda: da.zeros((0, 8), chunks=(5, 8)),
    lambda: db.from_sequence([np.zeros((0, 8))] * 3, npartitions=2),
])
def test_keys_without_rows_give_an_empty_sketch(keys):
    sk = lsd.build_sketch(keys(), eps=EPS, scheduler="sync")
    assert sk.is_empty() and (sk.n, sk.dim) == (0, 8)


def test_an_empty_partition_of_the_wrong_width_is_an_error(K):
    parts = [*delayed_chunks(K)[:2], dask.delayed(np.zeros)((0, 7))]
    with pytest.raises(ValueError, match=r"merging partitions 0\.\.2 failed: .*different \(dim"):
        lsd.build_sketch(parts, eps=EPS, offsets=[0, 1500, 1501], scheduler="sync")
    bag = db.from_sequence([K[:100], np.zeros((0, 7))], npartitions=1)
    with pytest.raises(ValueError, match=r"partition 0 \(rows from 100\) rejected: .*8 columns"):
        lsd.build_sketch(bag, eps=EPS, scheduler="sync")


# ------------------------------------------------------------------------------ bad data and arguments
@pytest.mark.parametrize("scheduler", ["threads", "processes"])
def test_nan_partition_fails_naming_the_partition(K, scheduler):
    bad = K.copy()
    bad[5000, 2] = np.nan  # in partition 3: rows 4000..6499
    with dask.config.set(num_workers=2):
        with pytest.raises(ValueError, match=r"partition 3 \(rows 4000\.\.6499\) rejected: .*finite"):
            lsd.build_sketch(dask_array(bad), eps=EPS, scheduler=scheduler)
    lazy = lsd.build_sketch(dask_array(bad), eps=EPS, compute=False)
    with pytest.raises(ValueError, match=r"partition 3 \(rows 4000\.\.6499\)"):
        lazy.compute(scheduler="sync")


def test_bad_chunks_in_bags_and_delayed_lists_are_named(K):
    bag = db.from_sequence([K[:100], K[100:200], K[200:300], np.ones((5, 7))], npartitions=2)
    with pytest.raises(ValueError, match=r"partition 1 \(rows 300\.\.304\) rejected: .*8 columns"):
        lsd.build_sketch(bag, eps=EPS, scheduler="sync")
    narrow = [dask.delayed(np.array)(K[:100]), dask.delayed(np.ones)((5, 7))]  # widths differ by partition
    with pytest.raises(ValueError, match=r"merging partitions 0\.\.1 failed: .*different \(dim"):
        lsd.build_sketch(narrow, eps=EPS, scheduler="sync")
    parts = [dask.delayed(np.array)(K[:100]), dask.delayed(np.array)(K[100])]
    with pytest.raises(ValueError, match=r"partition 1 rejected: .*2-D"):
        lsd.build_sketch(parts, eps=EPS, scheduler="sync")  # caught by the first pass
    with pytest.raises(ValueError, match=r"partition 1 \(rows from 100\) rejected: .*2-D"):
        lsd.build_sketch(parts, eps=EPS, offsets=[0, 100], scheduler="sync")


def test_overlapping_offsets_fail_at_the_merge(K):
    with pytest.raises(ValueError, match=r"merging partitions 0\.\.1 failed: .*both sketches contain key id 50"):
        lsd.build_sketch(delayed_chunks(K)[:2], eps=EPS, offsets=[0, 50], scheduler="sync")


def test_bad_arguments(K):
    with pytest.raises(TypeError, match="levstream.build_sketch"):
        lsd.build_sketch(K, eps=EPS)
    with pytest.raises(ValueError, match="2-D"):
        lsd.build_sketch(da.zeros((10,), chunks=5), eps=EPS)
    with pytest.raises(ValueError, match="at least one partition"):
        lsd.build_sketch([], eps=EPS)
    with pytest.raises(ValueError, match="split_every must be >= 2"):
        lsd.build_sketch(dask_array(K), eps=EPS, split_every=1)
    with pytest.raises(ValueError, match=r"one start id per partition \(6\); got 2"):
        lsd.build_sketch(dask_array(K), eps=EPS, offsets=[0, 5])
    with pytest.raises(ValueError, match=r"offsets\[1\] must be >= 0"):
        lsd.build_sketch(delayed_chunks(K)[:2], eps=EPS, offsets=[0, -5])
    with pytest.raises(ValueError, match="eps must satisfy"):
        lsd.build_sketch(dask_array(K), eps=2.0)
    never = [dask.delayed(pytest.fail)("a partition was computed before the arguments were checked")]
    with pytest.raises(ValueError, match="eps must satisfy"):
        lsd.build_sketch(never, eps=0.0, scheduler="sync")  # no first pass with bad arguments
    with pytest.raises(ValueError, match="rng= or seed=, not both"):
        lsd.build_sketch(dask_array(K), eps=EPS, rng=1, seed=2)


# ------------------------------------------------------------------------------ values
def _pair(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A partition of a delayed list with values: its ``(K, V)`` pair."""
    return keys, values


def value_pairs(K: np.ndarray, V: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(K[a:b], V[a:b]) for a, b in pairwise(CUTS)]


def values_like(kind: str, V: np.ndarray):
    """Values for :func:`dask_array` keys: its row chunks, other row chunks (rechunked by the
    build), or a NumPy array (wrapped in the keys' chunks)."""
    if kind == "same chunks":
        return da.from_array(V, chunks=(tuple(np.diff(CUTS).tolist()), (1, 2)))
    if kind == "other chunks":
        return da.from_array(V, chunks=(5000, DV))
    return V


@pytest.mark.parametrize("scheduler, kind", [("threads", "same chunks"), ("sync", "other chunks"),
                                             ("threads", "numpy"), ("processes", "same chunks")])
def test_dask_array_with_values(K, V, Q, reference, scheduler, kind):
    """Values carried: heavy entries, their output and mass, and the exact output (moment states
    summed over the merge tree) equal dense attention over all keys; the keys' answers are a single
    stream's."""
    with dask.config.set(num_workers=2):
        sk = lsd.build_sketch(dask_array(K), eps=EPS, split_every=2, scheduler=scheduler,
                              values=values_like(kind, V), exact_output=True)
    assert (sk.n, sk.value_dim, sk.exact_output) == (K.shape[0], DV, True)
    assert_same_answers(sk, reference, Q)
    assert_attend_matches_dense(sk, K, V, queries_hitting_every_heavy_key(K, Q))


@pytest.mark.parametrize("with_offsets", [False, True])
def test_bag_of_pairs_carries_values(K, V, Q, with_offsets):
    """Bag items are (K, V) pairs; the first pair of each partition sets value_dim."""
    bag = db.from_sequence(value_pairs(K, V), npartitions=3)
    offsets = [0, 1501, 6500] if with_offsets else None
    sk = lsd.build_sketch(bag, eps=EPS, offsets=offsets, scheduler="threads", exact_output=True)
    assert sk.value_dim == DV
    assert_attend_matches_dense(sk, K, V, queries_hitting_every_heavy_key(K, Q))


@pytest.mark.parametrize("with_offsets", [False, True])
def test_delayed_pairs_carry_values(K, V, Q, with_offsets):
    parts = [dask.delayed(_pair)(k, v) for k, v in value_pairs(K, V)]
    offsets = CUTS[:-1] if with_offsets else None
    sk = lsd.build_sketch(parts, eps=EPS, offsets=offsets, split_every=3, scheduler="processes",
                          value_dim=DV)
    assert_attend_matches_dense(sk, K, V, queries_hitting_every_heavy_key(K, Q), exact_output=False)


def test_values_with_empty_partitions_and_compute_false(K, V, Q):
    sizes = (0, 1500, 0, 4500, 0, 6000, 0)
    lazy = lsd.build_sketch(da.from_array(K, chunks=(sizes, 8)), eps=EPS, compute=False,
                            values=da.from_array(V, chunks=(sizes, DV)), exact_output=True)
    assert isinstance(lazy, Delayed)
    assert_attend_matches_dense(lazy.compute(scheduler="sync"), K, V, Q)
    e, ev = K[:0], V[:0]
    bag = db.from_sequence([(e, ev), (K[:4000], V[:4000]), (e, ev), (K[4000:], V[4000:])],
                           npartitions=3)
    sk = lsd.build_sketch(bag, eps=EPS, scheduler="sync", exact_output=True)
    assert_attend_matches_dense(sk, K, V, Q)
    empty = lsd.build_sketch(da.zeros((0, 8), chunks=(5, 8)), eps=EPS, scheduler="sync",
                             values=da.zeros((0, 2), chunks=(5, 2)), exact_output=True)
    assert empty.is_empty() and empty.value_dim == 2


def test_exact_output_of_many_partitions(K, V):
    """24 partitions merged in a tree of depth 3: the exact output is dense attention's to
    OUTPUT_RTOL."""
    keys, values = da.from_array(K, chunks=(500, 8)), da.from_array(V, chunks=(500, DV))
    sk = lsd.build_sketch(keys, eps=EPS, split_every=3, values=values, exact_output=True,
                          scheduler="threads")
    Q = np.vstack([np.random.default_rng(15).standard_normal((20, 8)), K[:10]])
    W = (Q @ K.T) ** 2
    A = W / W.sum(axis=1, keepdims=True)
    assert_sums_close(sk.attend(Q).output, A, V, OUTPUT_RTOL, "output")


def test_bad_values_are_named(K, V):
    bad = V.copy()
    bad[5000, 1] = np.nan  # in partition 3: rows 4000..6499
    with pytest.raises(ValueError, match=r"partition 3 \(rows 4000\.\.6499\) rejected: .*V must "
                                         r"contain only finite values"):
        lsd.build_sketch(dask_array(K), eps=EPS, values=bad, scheduler="sync")
    pairs = value_pairs(K, V)
    pairs[3] = pairs[3][0]  # keys without their values: rows 4000..6499, in bag partition 1
    with pytest.raises(ValueError, match=r"partition 1 \(rows 4000\.\.6499\) rejected: every "
                                         r"chunk must come with its values"):
        lsd.build_sketch(db.from_sequence(pairs, npartitions=3), eps=EPS, scheduler="sync")
    short = [dask.delayed(_pair)(K[:100], V[:99])]
    with pytest.raises(ValueError, match=r"partition 0 \(rows 0\.\.99\) rejected: values must have "
                                         r"one row of width 3 per key"):
        lsd.build_sketch(short, eps=EPS, offsets=[0], scheduler="sync")


def test_bad_value_arguments(K, V):
    with pytest.raises(TypeError, match="values= goes with a Dask array of keys; a Bag carries"):
        lsd.build_sketch(db.from_sequence(value_pairs(K, V)), eps=EPS, values=V)
    with pytest.raises(TypeError, match="values= goes with a Dask array of keys; a list carries"):
        lsd.build_sketch(delayed_chunks(K), eps=EPS, values=V)
    with pytest.raises(ValueError, match=r"values must have one row per key \(12000 rows"):
        lsd.build_sketch(dask_array(K), eps=EPS, values=V[1:])
    with pytest.raises(ValueError, match=r"values must have one row per key \(12000 rows\)"):
        lsd.build_sketch(dask_array(K), eps=EPS, values=da.from_array(V[1:], chunks=(5000, DV)))
    with pytest.raises(ValueError, match=r"values must be 2-D"):
        lsd.build_sketch(dask_array(K), eps=EPS, values=V[:, 0])
    with pytest.raises(ValueError, match=r"values must be 2-D"):
        lsd.build_sketch(dask_array(K), eps=EPS, values=da.from_array(V[:, 0], chunks=500))
    with pytest.raises(TypeError, match="values must be a 2-D Dask or NumPy array; got list"):
        lsd.build_sketch(dask_array(K), eps=EPS, values=[[1.0]])
    with pytest.raises(ValueError, match=r"value_dim must equal the width of the values \(3\); got "
                                         r"value_dim=2"):
        lsd.build_sketch(dask_array(K), eps=EPS, values=V, value_dim=2)
    x = dask_array(K)
    x = x[x[:, 0] > -np.inf]  # unknown row chunk sizes: values cannot be cut to match
    with pytest.raises(ValueError, match="values must have the row chunks of the keys"):
        lsd.build_sketch(x, eps=EPS, values=da.from_array(V, chunks=(5000, DV)))
    with pytest.raises(ValueError, match="exact_output=True is available for p = 2"):
        lsd.build_sketch(dask_array(K), eps=EPS, p=3, values=V, exact_output=True)


# ------------------------------------------------------------------------------ seeds and threads
def test_partitions_get_spawned_seeds(K, monkeypatch):
    """The options each partition task receives: child i of SeedSequence(seed), identical across calls."""
    received = {}

    def spy(chunks, offset, index, *, dim, eps, p, options):
        received.setdefault(index, []).append(options["rng"].spawn_key)
        return single_stream(next(iter(chunks)), offset=offset)

    monkeypatch.setattr(lsd, "sketch_partition", spy)
    for _ in range(2):
        lsd.build_sketch(dask_array(K), eps=EPS, seed=123, scheduler="sync")
    want = [s.spawn_key for s in np.random.SeedSequence(123).spawn(len(CUTS) - 1)]
    assert [received[i] for i in range(len(want))] == [[w, w] for w in want]


def test_randomised_mode_is_reproducible_on_every_scheduler():
    """General p: a seed and a partitioning give the same sketch, byte for byte, on every scheduler and on
    the embedded thread pool when its shards are the same row ranges."""
    K = heavy_tailed_keys(8000, 6, seed=9)
    keys = da.from_array(K, chunks=(4000, 6))
    with dask.config.set(num_workers=2):
        got = [lsd.build_sketch(keys, eps=0.05, p=3, seed=42, scheduler=s).to_bytes()
               for s in ("threads", "sync", "processes")]
    embedded = ls.build_sketch(K, eps=0.05, p=3, n_jobs=2, chunk_rows=4000, seed=42).to_bytes()
    assert got == [embedded] * 3
    assert lsd.build_sketch(keys, eps=0.05, p=3, seed=43, scheduler="sync").to_bytes() != embedded
    # and the Dask-built sketch keeps the coreset guarantee against brute force, for random,
    # key-aligned (q = k_j) and adversarial (q = (K^T K)^-1 k_j) queries
    rng = np.random.default_rng(10)
    some = np.r_[rng.choice(len(K), 20, replace=False), np.argsort(-leverage_svd(K))[:10]]
    Q = np.vstack([rng.standard_normal((30, 6)), K[some], np.linalg.solve(K.T @ K, K[some].T).T])
    B = np.abs(Q @ K.T) ** 3
    A = B / B.sum(axis=1, keepdims=True)  # dense attention, p = 3
    heavy = set(zip(*(x.tolist() for x in np.nonzero(A >= 0.05 * (1 + TIE_RTOL)))))
    assert len(heavy) > 50, "fixture must have heavy entries"
    hits = ls.KeySketch.from_bytes(got[0]).heavy_entries(Q)
    missing = heavy - hits.as_set()
    assert not missing, f"dense entries >= eps missing: {sorted(missing)[:10]}"
    a = A[hits.rows(), hits.key_ids]
    assert (a >= 0.05 * (1 - CORESET_DELTA) ** 2).all(), "a true value below eps (1 - delta)^2"
    assert (hits.lower <= a * (1 + BOUND_RTOL)).all(), "a true value is below its lower bound"
    assert (a <= hits.upper * (1 + BOUND_RTOL)).all(), "a true value is above its upper bound"


def test_threads_are_capped_inside_tasks(K, monkeypatch):
    seen = []
    real = lsd.sketch_partition

    def spy(*args, **kwargs):
        seen.append((blas_threads(), numba.get_num_threads()))
        return real(*args, **kwargs)

    monkeypatch.setattr(lsd, "sketch_partition", spy)
    before = (blas_threads(), numba.get_num_threads())
    with dask.config.set(num_workers=2):
        lsd.build_sketch(dask_array(K), eps=EPS, scheduler="threads")
    share = max(1, min(ls.get_num_threads() // 2, before[0]))
    assert {blas for blas, _ in seen} == {share}
    assert {n for _, n in seen} == {min(share, numba.config.NUMBA_NUM_THREADS)}
    assert (blas_threads(), numba.get_num_threads()) == before


def test_tasks_take_turns_under_numbas_workqueue_layer(tmp_path):
    """numba's workqueue layer aborts the process on concurrent parallel launches from threaded tasks."""
    import subprocess

    script = tmp_path / "workqueue_dask.py"
    script.write_text(
        "import dask, dask.array as da, numba, numpy as np, levstream as ls, levstream.dask as lsd\n"
        "rng = np.random.default_rng(0)\n"
        "K = rng.standard_normal((20_000, 4)) * (1 + rng.pareto(2.0, size=(20_000, 1)))\n"
        "opts = dict(eps=0.02, p=4, exact=True, block_rows=500)  # the lifted Gram ingest runs a parallel kernel\n"
        "one = ls.KeySketch(4, **opts).update_many(K).universal_set().ids\n"
        "with dask.config.set(num_workers=2):\n"
        "    sk = lsd.build_sketch(da.from_array(K, chunks=(500, 4)), scheduler='threads', **opts)\n"
        "print(numba.threading_layer(), one.size > 0 and np.array_equal(sk.universal_set().ids, one))\n")
    env = dict(os.environ, NUMBA_THREADING_LAYER="workqueue")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["workqueue", "True"]


# ------------------------------------------------------------------------------ distributed
def _die_once(block: np.ndarray, marker: str) -> np.ndarray:
    """Kill the worker process computing this the first time (the marker file records that it happened)."""
    if not os.path.exists(marker):
        with open(marker, "w") as fh:
            fh.write(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    return block


def _threads_in_a_task() -> tuple[list[int], int]:
    with capped_threads(lsd._task_threads()):
        return blas_threads(), numba.get_num_threads()


@pytest.fixture(scope="module")
def cluster():
    distributed = pytest.importorskip("distributed", reason="distributed is not installed (pip install -e '.[dask]')")
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import the tests
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=40) as cl, distributed.Client(cl) as client:
        yield cl, client
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.mark.slow
def test_local_cluster_equals_single_stream(cluster, K, Q, reference):
    cl, client = cluster
    sk = lsd.build_sketch(dask_array(K), eps=EPS, split_every=2, scheduler=client)
    assert_same_answers(sk, reference, Q)
    assert_matches_brute_force(sk, K, Q)
    bag = db.from_sequence([K[a:b] for a, b in zip(CUTS[:-1], CUTS[1:])], npartitions=3)
    by_address = lsd.build_sketch(bag, eps=EPS, scheduler=cl.scheduler_address)  # connects its own client
    assert_same_answers(by_address, reference, Q)


@pytest.mark.slow
def test_killed_worker_costs_a_retry_not_a_wrong_sketch(cluster, K, Q, reference, tmp_path):
    cl, client = cluster
    marker = str(tmp_path / "killed")
    parts = [dask.delayed(_die_once)(K[a:b], marker) if i == 3 else dask.delayed(np.array)(K[a:b])
             for i, (a, b) in enumerate(zip(CUTS[:-1], CUTS[1:]))]
    pids = set(client.run(os.getpid).values())
    sk = lsd.build_sketch(parts, eps=EPS, offsets=CUTS[:-1], split_every=2, scheduler=client)
    with open(marker) as fh:
        assert int(fh.read()) in pids  # a worker process really died mid-build
    assert_same_answers(sk, reference, Q)
    client.wait_for_workers(2, timeout=60)


@pytest.mark.slow
def test_local_cluster_carries_values(cluster, K, V, Q):
    """Sketches with values (format version 2) travel between worker processes."""
    _, client = cluster
    sk = lsd.build_sketch(dask_array(K), eps=EPS, split_every=2, scheduler=client,
                          values=values_like("other chunks", V), exact_output=True)
    assert_attend_matches_dense(sk, K, V, queries_hitting_every_heavy_key(K, Q))


@pytest.mark.slow
def test_local_cluster_nan_partition_fails_naming_it(cluster, K):
    _, client = cluster
    bad = K.copy()
    bad[5000, 2] = np.nan
    with pytest.raises(ValueError, match=r"partition 3 \(rows 4000\.\.6499\) rejected: .*finite"):
        lsd.build_sketch(dask_array(bad), eps=EPS, scheduler=client)


@pytest.mark.slow
def test_local_cluster_tasks_run_single_threaded(cluster):
    """distributed's nanny starts each worker with one BLAS thread; tasks keep it and hold numba to it too."""
    _, client = cluster
    workers = list(client.scheduler_info()["workers"])
    futures = [client.submit(_threads_in_a_task, workers=[w], pure=False) for w in workers]
    assert [f.result() for f in futures] == [(1, 1)] * len(workers)
