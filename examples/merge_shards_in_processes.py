"""Build one sketch per shard in separate processes, ship them as bytes, merge them in the parent.

Each worker numbers its keys with global ids (``offset=``), so the merged sketch names keys exactly as a
single stream over all shards would; for p = 2 the merged universal set and every query answer are *equal*
to the single stream's (merging is exact, in any order).  A sketch travels as ``to_bytes()``, settled first
(``flush()``): tens of kB, whatever the shard size.

    python examples/merge_shards_in_processes.py             # 4 shards x 100,000 keys
    python examples/merge_shards_in_processes.py 4 20000     # shards, keys per shard
"""

import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np

import levstream as ls

DIM, EPS = 32, 0.01


def shard_keys(shard: int, rows: int) -> np.ndarray:
    """Keys of one shard: a shared low-rank structure, heavy-tailed norms, noise (deterministic per shard)."""
    mixing = np.random.default_rng(12345).standard_normal((DIM, DIM)) / np.sqrt(DIM)
    rng = np.random.default_rng([2024, shard])
    X = rng.standard_normal((rows, DIM)) @ mixing
    return X * (1.0 + rng.pareto(2.5, size=(rows, 1)))


def build_shard(shard: int, rows: int) -> bytes:
    """Runs in a worker process: sketch one shard with global ids, return the serialized sketch."""
    sketch = ls.KeySketch(DIM, eps=EPS)
    X = shard_keys(shard, rows)
    for start in range(0, rows, 10_000):
        sketch.update_many(X[start:start + 10_000], offset=shard * rows + start)
    sketch.flush()  # settles the sketch (folds in buffered rows, prunes the candidates), so the bytes stay small
    return sketch.to_bytes()


def main() -> None:
    shards = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    rows = int(sys.argv[2]) if len(sys.argv) > 2 else 100_000
    # "spawn" starts clean interpreters (portable, and safe with numba's thread pools)
    with ProcessPoolExecutor(max_workers=2, mp_context=get_context("spawn")) as pool:
        blobs = list(pool.map(build_shard, range(shards), [rows] * shards))
    print(f"{shards} shards of {rows:,} keys sketched in worker processes; bytes shipped per shard: "
          f"{', '.join(f'{len(b) / 1e3:,.0f} kB' for b in blobs)}")

    merged = ls.KeySketch.merge_all(ls.KeySketch.from_bytes(b) for b in blobs)
    U = merged.universal_set()
    print(f"merged: n = {merged.n:,} keys, |U| = {len(U)} (bound d/eps = {U.size_bound:,.0f})")

    # The same keys as one stream in this process, and offline on the whole matrix: all three agree.
    K = np.concatenate([shard_keys(s, rows) for s in range(shards)])
    single = ls.KeySketch(DIM, eps=EPS).update_many(K)
    offline = ls.universal_set(K, eps=EPS)
    assert np.array_equal(U.ids, single.universal_set().ids)
    assert np.array_equal(U.ids, offline.ids)
    Q = np.random.default_rng(5).standard_normal((50, DIM))
    assert merged.heavy_entries(Q).as_set() == ls.testing.heavy_entries_dense(Q, K, eps=EPS).as_set()
    print("check: merged universal set == single stream == offline leverage scores; "
          "heavy entries of 50 queries == brute force")


if __name__ == "__main__":
    main()
