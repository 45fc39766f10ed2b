"""Scale-out benchmark (issue #5): a 2-worker build vs 1 worker, on Dask and on the embedded thread pool.

n = 4e6 keys, d = 64, p = 2, eps = 0.01, in P partitions of n / P rows; partition i holds
``attention_like_keys(n / P, d, seed=i)``.

* **Dask**: ``distributed.LocalCluster`` with 1 and with 2 single-threaded worker processes, the same graph on
  both; every partition's keys are generated inside the task that sketches them, chunk by chunk (a Dask bag
  of lazy partitions; nothing but seeds is shipped from the client) and the partition sketches are merged
  in a tree of fan-in ``split_every``.  Timed: the whole build (generation +
  sketch + merges), best of ``--reps`` interleaved rounds (order alternating), cluster start-up and worker
  warm-up excluded; median speed-ups are printed as well.  Every timed build starts after a 0.5 s pause
  (``PAUSE``), so that threads left spinning by the previous build's checks do not run during it.
* **Thread pool**: ``levstream.build_sketch(source, n_jobs=2)`` vs ``n_jobs=1`` (one BLAS thread, i.e. one
  worker) on the same keys, sketching only: the keys in memory (an array), and written to a ``.npy`` file
  (read chunk by chunk into one buffer per shard, from the page cache; the file is fsync'ed and the
  kernel's writeback awaited before any timing, so that flushing the benchmark's own 2 GB of dirty pages
  does not run during the builds).
  ``n_jobs=1`` with the default BLAS threads (a plain stream as users get it) is reported once.
* Correctness: the universal sets of all builds are compared with each other and with a single in-process
  stream over the same keys.
* Costs of the tree: bytes of every partition sketch (what travels between processes) and the time of one
  merge node (``split_every`` sketches) and per merged sketch.

    python benchmarks/bench_dask.py                  # the issue's sizes (several minutes)
    python benchmarks/bench_dask.py --n 400000       # a smoke run
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

import levstream as ls
from levstream._threads import blas_threads, capped_threads, describe_threads
from levstream._tree import merge_group, sketch_partition
from levstream.synthetic import attention_like_keys


#: Rows per generated chunk: a partition is generated and sketched chunk by chunk, in cache.
GEN_CHUNK_ROWS = 16384


class PartitionKeys:
    """Partition ``seed``'s keys as a lazy iterable of chunks: a Dask bag partition that is generated inside
    the task that sketches it (only the seed travels)."""

    def __init__(self, rows: int, dim: int, seed: int) -> None:
        self.rows, self.dim, self.seed = rows, dim, seed

    def __iter__(self):
        return attention_like_keys(self.rows, self.dim, seed=self.seed, chunk_rows=GEN_CHUNK_ROWS)


def generate_partition(rows: int, dim: int, seed: int) -> np.ndarray:
    """Partition ``seed``'s keys as one array (the same keys as ``PartitionKeys``)."""
    return np.vstack(list(PartitionKeys(rows, dim, seed)))


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, "
            f"load average {', '.join(f'{x:.1f}' for x in os.getloadavg())} at start; Python "
            f"{platform.python_version()}, NumPy {np.__version__}; threads in the client: "
            f"{describe_threads()}")


#: Pause before every timed build (s).  OpenBLAS worker threads keep spinning for a while (~0.1 s) after a
#: multithreaded BLAS call, e.g. the universal-set check after the previous build; without the pause they
#: take a core from the next build (measured: thread-pool speed-ups 1.54-1.63x without, 1.76-1.87x with).
PAUSE = 0.5


def timed(fn):
    """``(wall seconds, CPU seconds of this process, fn())``, after the :data:`PAUSE`."""
    time.sleep(PAUSE)
    cpu, start = time.process_time(), time.perf_counter()
    out = fn()
    return time.perf_counter() - start, time.process_time() - cpu, out


def settle_page_cache(path: str, timeout: float = 120.0) -> None:
    """Write the freshly generated key file to disk and wait until the kernel's writeback is done.

    Otherwise the 2 GB of dirty pages are flushed by kernel threads *during* the timed builds, taking CPU
    from them (measured: the ``.npy`` builds 0.72 s instead of 0.55 s with one thread, and less speed-up).
    The file stays in the page cache, so the builds still read it from memory.
    """
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    deadline = time.monotonic() + timeout
    while dirty_kib() > 64 * 1024:
        if time.monotonic() > deadline:
            print(f"# warning: {dirty_kib() / 1024:.0f} MiB of the page cache still dirty after {timeout:.0f} s; "
                  "timings may include kernel writeback", flush=True)
            break
        time.sleep(0.2)


def dirty_kib() -> int:
    """Dirty + under-writeback page-cache memory (KiB) from /proc/meminfo; 0 where it does not exist."""
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
    except OSError:
        return 0
    return sum(int(info.get(k, "0 kB").split()[0]) for k in ("Dirty", "Writeback"))


def cpu_seconds() -> float:
    """CPU time of this process (run in a Dask worker through ``client.run``)."""
    return time.process_time()


def utilisation(wall: list[float], cpu: list[float]) -> str:
    """CPU seconds per wall second of the best round: 2.0 means two cores were fully ours."""
    i = int(np.argmin(wall))
    return f"{cpu[i] / wall[i]:.2f}"


def dask_builds(n: int, dim: int, eps: float, parts: int, split_every: int, reps: int) -> dict:
    import logging

    import dask
    import dask.bag as db
    from distributed import Client, LocalCluster

    logging.getLogger("distributed").setLevel(logging.ERROR)

    import levstream.dask as lsd

    rows = n // parts
    offsets = [i * rows for i in range(parts)]

    def graph():
        return db.from_delayed([dask.delayed(PartitionKeys)(rows, dim, i) for i in range(parts)])

    clusters = {}
    out: dict = {"times": {1: [], 2: []}, "cpu": {1: [], 2: []}}
    try:
        for workers in (1, 2):
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                   dashboard_address=None, silence_logs=40)
            client = Client(cluster)
            warm = [dask.delayed(generate_partition)(2000, dim, 10_000 + i) for i in range(workers * 2)]
            lsd.build_sketch(warm, eps=eps, offsets=[i * 2000 for i in range(workers * 2)], scheduler=client)
            out[f"worker_blas_{workers}"] = sorted(set(client.run(blas_threads).values()))
            clusters[workers] = (cluster, client)
        sketches = {}
        for r in range(reps):  # interleaved, the order alternating between rounds
            for workers in ((1, 2) if r % 2 == 0 else (2, 1)):
                client = clusters[workers][1]
                before = []

                def build(client=client):
                    before.append(sum(client.run(cpu_seconds).values()))  # after the pause, as the wall clock
                    return lsd.build_sketch(graph(), eps=eps, offsets=offsets, split_every=split_every,
                                            scheduler=client)

                t, _, sk = timed(build)
                out["times"][workers].append(t)
                out["cpu"][workers].append(sum(client.run(cpu_seconds).values()) - before[0])
                sketches[workers] = sk
        out["U"] = {w: sk.universal_set().ids for w, sk in sketches.items()}
        out["n"] = {w: sk.n for w, sk in sketches.items()}
    finally:
        for cluster, client in clusters.values():
            client.close()
            cluster.close()
    return out


def thread_pool_builds(source, eps: float, reps: int, reference: bool) -> dict:
    """``build_sketch(source, n_jobs=2)`` vs ``n_jobs=1`` with one BLAS thread, interleaved rounds."""
    times: dict = {"1 (1 BLAS thread)": [], "2": [], "1 (default BLAS threads)": []}
    cpu: dict = {k: [] for k in times}
    ids = {}

    def run(key: str, n_jobs: int, blas: int | None) -> None:
        with capped_threads(blas):  # None: the default budget
            t, c, sk = timed(lambda: ls.build_sketch(source, eps=eps, n_jobs=n_jobs))
            cpu[key].append(c)
        times[key].append(t)
        ids[key] = sk.universal_set().ids

    for r in range(reps):  # interleaved, the order alternating between rounds
        pair = [("1 (1 BLAS thread)", 1, 1), ("2", 2, None)]
        for key, n_jobs, blas in pair if r % 2 == 0 else pair[::-1]:
            run(key, n_jobs, blas)
    if reference:  # once: multithreaded OpenBLAS can be very slow on a busy box
        run("1 (default BLAS threads)", 1, None)
    return {"times": times, "cpu": cpu, "U": ids}


def tree_costs(path: str, parts: int, eps: float, split_every: int) -> dict:
    """Partition sketches built in-process, then the merge nodes of the tree timed one by one."""
    K = np.load(path, mmap_mode="r")
    rows = K.shape[0] // parts
    with capped_threads(1):
        leaves = [sketch_partition((K[i * rows:(i + 1) * rows],), i * rows, i, dim=K.shape[1], eps=eps, p=2,
                                   options={}) for i in range(parts)]
        sizes = [len(sk.to_bytes()) for sk in leaves]
        node_times, per_sketch = [], []
        level = leaves
        while len(level) > 1:
            nxt = []
            for g in range(0, len(level), split_every):
                group = level[g:g + split_every]
                if len(group) == 1:
                    nxt.append(group[0])
                    continue
                t = min(timed(lambda: merge_group(*group))[0] for _ in range(3))
                node_times.append(t)
                per_sketch.append(t / (len(group) - 1))
                nxt.append(merge_group(*group))
            level = nxt
        single = ls.KeySketch(K.shape[1], eps=eps)
        for i in range(0, K.shape[0], 65536):
            single.update_many(K[i:i + 65536])
    return {"bytes": sizes, "node_times": node_times, "per_sketch": per_sketch, "rows": rows,
            "root_ids": level[0].universal_set().ids, "single_ids": single.universal_set().ids,
            "single_n": single.n, "candidates": [sk.num_retained for sk in leaves]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--eps", type=float, default=0.01)
    parser.add_argument("--partitions", type=int, default=16)
    parser.add_argument("--split-every", type=int, default=8)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    n = args.n - args.n % args.partitions
    rows = n // args.partitions
    print(f"# command: python benchmarks/bench_dask.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"# machine: {machine()}")
    print(f"# n={n:,} d={args.dim} p=2 eps={args.eps:g}, {args.partitions} partitions of {rows:,} rows, "
          f"split_every={args.split_every}, best of {args.reps}", flush=True)

    with tempfile.TemporaryDirectory(prefix="levstream-bench-") as tmp:
        path = os.path.join(tmp, "keys.npy")
        K = np.lib.format.open_memmap(path, mode="w+", dtype=np.float64, shape=(n, args.dim))
        for i in range(args.partitions):
            K[i * rows:(i + 1) * rows] = generate_partition(rows, args.dim, i)
        K.flush()
        del K
        settle_page_cache(path)

        ls.build_sketch(np.load(path, mmap_mode="r")[:20_000], eps=args.eps, n_jobs=2)  # warm the JIT
        tp = thread_pool_builds(path, args.eps, args.reps, reference=True)
        mem = thread_pool_builds(np.load(path), args.eps, args.reps, reference=False)
        tree = tree_costs(path, args.partitions, args.eps, args.split_every)
    dk = dask_builds(n, args.dim, args.eps, args.partitions, args.split_every, args.reps)

    ref = tree["single_ids"]
    same = {
        "Dask 1 worker": np.array_equal(dk["U"][1], ref) and dk["n"][1] == n,
        "Dask 2 workers": np.array_equal(dk["U"][2], ref) and dk["n"][2] == n,
        **{f"thread pool .npy n_jobs={k}": np.array_equal(v, ref) for k, v in tp["U"].items()},
        **{f"thread pool array n_jobs={k}": np.array_equal(v, ref) for k, v in mem["U"].items()},
        "tree of in-process partition sketches": np.array_equal(tree["root_ids"], ref),
    }
    d1, d2 = min(dk["times"][1]), min(dk["times"][2])
    t1, t2, t1d = (min(tp["times"][k]) for k in ("1 (1 BLAS thread)", "2", "1 (default BLAS threads)"))
    m1, m2 = (min(mem["times"][k]) for k in ("1 (1 BLAS thread)", "2"))
    raw = rows * args.dim * 8
    sizes = tree["bytes"]
    print()
    print("| build | 1 worker (s) | 2 workers (s) | speed-up | target |")
    print("|---|---|---|---|---|")
    print(f"| Dask LocalCluster, keys generated in the tasks | {d1:.2f} | {d2:.2f} | **{d1 / d2:.2f}x** | >= 1.7x |")
    print(f"| thread pool `build_sketch(array, n_jobs)`, keys in memory | {m1:.2f} | {m2:.2f} | "
          f"**{m1 / m2:.2f}x** | >= 1.7x |")
    print(f"| thread pool `build_sketch(path.npy, n_jobs)`, read in chunks | {t1:.2f} | {t2:.2f} | "
          f"**{t1 / t2:.2f}x** | >= 1.7x |")
    print(f"| (reference) `.npy`, `n_jobs=1` with the default BLAS threads | {t1d:.2f} | | {t1d / t2:.2f}x | |")
    print()
    print(f"- all rounds (s): Dask 1 worker {', '.join(f'{x:.2f}' for x in dk['times'][1])}; "
          f"2 workers {', '.join(f'{x:.2f}' for x in dk['times'][2])}; thread pool "
          + "; ".join(f"{src} n_jobs={k}: {', '.join(f'{x:.2f}' for x in v)}"
                      for src, res in (("array", mem), (".npy", tp)) for k, v in res["times"].items() if v))
    med = statistics.median
    print(f"- median speed-ups (median 1-worker time / median 2-worker time): Dask "
          f"{med(dk['times'][1]) / med(dk['times'][2]):.2f}x, thread pool array "
          f"{med(mem['times']['1 (1 BLAS thread)']) / med(mem['times']['2']):.2f}x, .npy "
          f"{med(tp['times']['1 (1 BLAS thread)']) / med(tp['times']['2']):.2f}x")
    print(f"- CPU seconds per wall second in the best 2-worker round (2.0 = both cores ours): Dask "
          f"{utilisation(dk['times'][2], dk['cpu'][2])} (1 worker: {utilisation(dk['times'][1], dk['cpu'][1])}), "
          f"thread pool array {utilisation(mem['times']['2'], mem['cpu']['2'])}, "
          f".npy {utilisation(tp['times']['2'], tp['cpu']['2'])} "
          f"(n_jobs=1: {utilisation(tp['times']['1 (1 BLAS thread)'], tp['cpu']['1 (1 BLAS thread)'])})")
    print(f"- BLAS threads in the Dask workers: 1 worker {dk['worker_blas_1']}, 2 workers {dk['worker_blas_2']}")
    print(f"- identical universal set (|U| = {ref.size}, single in-process stream as reference): "
          + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in same.items()))
    print(f"- bytes shipped per partition sketch (`to_bytes`): median {statistics.median(sizes) / 1024:.0f} KiB "
          f"(min {min(sizes) / 1024:.0f}, max {max(sizes) / 1024:.0f}) vs {raw / 2**20:.0f} MiB of keys per "
          f"partition ({raw / statistics.median(sizes):.0f}x less); candidates per partition: median "
          f"{statistics.median(tree['candidates']):.0f}")
    print(f"- merge cost: {len(tree['node_times'])} merge nodes, "
          + ", ".join(f"{t * 1e3:.1f} ms" for t in tree["node_times"])
          + f"; {statistics.median(tree['per_sketch']) * 1e3:.1f} ms per merged sketch (median), vs "
          f"{t1 / args.partitions * 1e3:.0f} ms to sketch one partition (1 thread)")
    return 0 if all(same.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
