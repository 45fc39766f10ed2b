"""Core p = 2 benchmarks (issues 2 and 14): build vs Gram-only (default threads, then one thread; other
chunk and head sizes), one large update_many on every core, footprint of float32 keys, queries vs blocked
dense NumPy, peak RSS vs n, row-at-a-time vs chunked ingest, import time and numba cache.

Every figure is a ratio against a baseline measured in the same process (the machine is shared and noisy);
build figures are medians and ranges over interleaved rounds, with the load average before and after.

    python benchmarks/bench_core.py            # full sizes of the issue (several minutes)
    python benchmarks/bench_core.py --quick    # smaller sizes, a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from contextlib import nullcontext

import numpy as np

import levstream as ls
from levstream._threads import capped_threads, describe_threads
from levstream.synthetic import attention_like_keys, attention_like_queries
from levstream.testing import DenseHeavyScan


def best(fn, reps: int) -> float:
    return min(fn() for _ in range(reps))


def _clocked(fn) -> tuple[float, float]:
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def _spread(values: list[float]) -> dict:
    """Median and range over the rounds (the machine is shared: report the spread, not the best)."""
    v = sorted(values)
    return {"median": float(np.median(v)), "min": v[0], "max": v[-1], "rounds": [round(x, 4) for x in values]}


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _one_thread():
    """Held to one thread: ``set_num_threads(1)`` plus ``threadpool_limits(1)`` (BLAS and OpenMP), i.e.
    levstream's own threads, numba's and BLAS's."""
    return capped_threads(1, user_api=None)


def _offline_ids(chunks: list[np.ndarray], eps: float) -> np.ndarray:
    return ls.universal_set(np.vstack(chunks), eps=eps).ids


def _feed(chunks: list[np.ndarray], d: int, eps: float) -> ls.KeySketch:
    sk = ls.KeySketch(d, eps=eps)
    for X in chunks:
        sk.update_many(X)
    return sk


def bench_build(n: int, d: int, eps: float, block: int, rounds: int, *, default_threads: bool = True,
                check: bool = True) -> dict:
    """Build (``update_many`` per chunk + ``universal_set()``) vs Gram-only (``G += X.T @ X``) over the same
    chunks, as a new user runs them: default settings (the library picks its threads), then both sides held
    to one thread.  Rounds alternate which side runs first (load changes hit both alike); the ratio is taken
    per round and reported as median and range.  CPU times at one thread are reported too (less sensitive to
    other processes than wall times).  The universal set is checked against brute force (``ls.universal_set``
    of all keys) once per configuration."""
    chunks = list(attention_like_keys(n, d, chunk_rows=block, seed=0))
    _feed(chunks[:4], d, eps).universal_set()  # JIT warm-up, helper threads started

    def gram_only() -> None:
        G = np.zeros((d, d))
        for X in chunks:
            G += X.T @ X

    def build() -> None:
        _feed(chunks, d, eps).universal_set()

    settings = ([("default", nullcontext)] if default_threads else []) + [("1 thread", _one_thread)]
    out: dict = {"n": n, "d": d, "eps": eps, "chunk_rows": block, "load_start": _load()}
    for name, ctx in settings:
        ratios, cpu_ratios, builds, grams = [], [], [], []
        with ctx():
            for r in range(rounds):
                if r % 2 == 0:
                    (gw, gc), (bw, bc) = _clocked(gram_only), _clocked(build)
                else:
                    (bw, bc), (gw, gc) = _clocked(build), _clocked(gram_only)
                ratios.append(bw / gw)
                cpu_ratios.append(bc / gc)
                builds.append(bw)
                grams.append(gw)
        out[name] = {"ratio_wall": _spread(ratios), "ratio_cpu": _spread(cpu_ratios),
                     "build_s": _spread(builds), "gram_s": _spread(grams)}
    out["load_end"] = _load()
    sk = _feed(chunks, d, eps)
    out["U"] = len(sk.universal_set())
    if check:
        out["equals_offline"] = bool(np.array_equal(_offline_ids(chunks, eps), sk.universal_set().ids))
    return out


def bench_one_call(n: int, d: int, eps: float, rounds: int) -> dict:
    """One ``KeySketch`` fed all ``n`` rows by a single ``update_many``: default settings vs held to one thread
    (speed-up per round, median and range; CPU/wall shows how many cores the default run got)."""
    K = np.vstack(list(attention_like_keys(n, d, chunk_rows=65536, seed=0)))
    ls.KeySketch(d, eps=eps).update_many(K[:100_000])

    def default() -> tuple[float, float]:
        return _clocked(lambda: ls.KeySketch(d, eps=eps).update_many(K))

    def one() -> tuple[float, float]:
        with _one_thread():
            return _clocked(lambda: ls.KeySketch(d, eps=eps).update_many(K))

    speedups, walls, cores = [], [], []
    load0 = _load()
    for r in range(rounds):
        (dw, dc), (ow, _) = (default(), one()) if r % 2 == 0 else tuple(reversed((one(), default())))
        speedups.append(ow / dw)
        walls.append((dw, ow))
        cores.append(dc / dw)
    sk = ls.KeySketch(d, eps=eps).update_many(K)
    with _one_thread():
        sk1 = ls.KeySketch(d, eps=eps).update_many(K)
    U = sk.universal_set()
    return {"n": n, "d": d, "eps": eps, "load_start": load0, "load_end": _load(),
            "speedup_default_vs_1thread": _spread(speedups), "cpu_per_wall_default": _spread(cores),
            "wall_s_default_and_1thread": walls, "U": len(U),
            "equals_offline": bool(np.array_equal(ls.universal_set(K, eps=eps).ids, U.ids)),
            "same_bytes_as_1thread": sk.to_bytes() == sk1.to_bytes()}


def bench_footprint(n: int, dims: tuple[int, ...], eps: float) -> dict:
    """float32 keys streamed in 8192-row chunks, then ``flush()``: ``nbytes`` against the rows the sketch
    retains at their input precision plus one Gram matrix (float64) plus the ids, and against
    ``len(to_bytes())``."""
    out = {}
    for d in dims:
        chunks = [X.astype(np.float32) for X in attention_like_keys(n, d, chunk_rows=8192, seed=0)]
        sk = ls.KeySketch(d, eps=eps)
        for X in chunks:
            sk.update_many(X)
        streaming = sk.nbytes
        sk.flush()
        held = sk.num_retained * (d * 4 + 8) + d * d * 8
        out[d] = {"retained": sk.num_retained, "nbytes": sk.nbytes, "nbytes_while_streaming": streaming,
                  "key_storage": str(sk._store.keys.dtype), "reference_bytes": held,
                  "nbytes_over_reference": sk.nbytes / held, "to_bytes": len(sk.to_bytes()),
                  "nbytes_over_to_bytes": sk.nbytes / len(sk.to_bytes()),
                  "equals_offline": bool(np.array_equal(
                      ls.universal_set(np.vstack(chunks).astype(np.float64), eps=eps).ids,
                      sk.universal_set().ids))}
    return out


def bench_query(n: int, m: int, d: int, eps: float, reps: int) -> dict:
    K = np.vstack(list(attention_like_keys(n, d, chunk_rows=65536, seed=0)))
    Q = attention_like_queries(m, d, seed=11, key_seed=0)
    sk = ls.KeySketch(d, eps=eps).update_many(K)
    sk.heavy_entries(Q[:2])  # warm-up (JIT, settle candidates)

    def dense() -> tuple[float, set]:  # the oracle, blocked dense NumPy; the set is built untimed
        t = time.perf_counter()
        truth = DenseHeavyScan(Q, eps=eps).add(K).result()
        return time.perf_counter() - t, truth.as_set()

    def sketch() -> tuple[float, set]:
        t = time.perf_counter()
        hits = sk.heavy_entries(Q)
        el = time.perf_counter() - t
        return el, hits.as_set()

    td, truth = min((dense() for _ in range(max(1, reps // 2))), key=lambda x: x[0])
    ts, got = min((sketch() for _ in range(reps * 3)), key=lambda x: x[0])
    with capped_threads(1, user_api=None):
        td1, truth1 = min((dense() for _ in range(max(1, reps // 2))), key=lambda x: x[0])
        ts1, got1 = min((sketch() for _ in range(reps * 3)), key=lambda x: x[0])
    return {"n": n, "m": m, "d": d, "eps": eps, "dense_s": td, "sketch_s": ts, "speedup": td / ts,
            "dense_1thread_s": td1, "sketch_1thread_s": ts1, "speedup_1thread": td1 / ts1,
            "U": len(sk.universal_set()), "entries": len(truth),
            "identical": got == truth and got1 == truth1 == truth}


_RSS_CHILD = r"""
import sys, numpy as np, levstream as ls
from levstream.synthetic import attention_like_keys
n, d, eps = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
sk = ls.KeySketch(d, eps=eps)
sk.extend(attention_like_keys(n, d, chunk_rows=8192, seed=0))
u = len(sk.universal_set())
# VmHWM, not ru_maxrss: ru_maxrss survives exec, so a child of a large parent would report the parent's peak
hwm = [int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
print(hwm, u, sk.nbytes)
"""


def bench_rss(n_small: int, n_large: int, d: int, eps: float) -> dict:
    out = {}
    for n in (n_small, n_large):
        res = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(n), str(d), str(eps)],
                             capture_output=True, text=True, check=True)
        rss, u, nbytes = res.stdout.split()
        out[n] = (int(rss), int(u), int(nbytes))
    return {"n_small": n_small, "n_large": n_large, "rss_small_MB": out[n_small][0] / 2**20,
            "rss_large_MB": out[n_large][0] / 2**20, "ratio": out[n_large][0] / out[n_small][0],
            "U_small": out[n_small][1], "U_large": out[n_large][1],
            "sketch_MB_small": out[n_small][2] / 2**20, "sketch_MB_large": out[n_large][2] / 2**20}


def bench_rows(n: int, d: int, eps: float) -> dict:
    X = np.vstack(list(attention_like_keys(n, d, chunk_rows=8192, seed=3)))
    ls.KeySketch(d, eps=eps).update_many(X[:100]).universal_set()
    t = time.perf_counter()
    sk = ls.KeySketch(d, eps=eps)
    for x in X:
        sk.update(x)
    sk.universal_set()
    t_rows = time.perf_counter() - t
    t = time.perf_counter()
    ls.KeySketch(d, eps=eps).update_many(X).universal_set()
    t_chunk = time.perf_counter() - t
    m = min(n, 20_000)  # unbuffered per-row Gram update (the 70x pitfall), measured on a prefix
    t = time.perf_counter()
    G = np.zeros((d, d))
    for x in X[:m]:
        G += np.outer(x, x)
    t_naive = (time.perf_counter() - t) * n / m
    return {"n": n, "rows_per_s_update": n / t_rows, "rows_per_s_update_many": n / t_chunk,
            "rows_per_s_unbuffered_gram": n / t_naive, "slowdown_update_vs_chunks": t_rows / t_chunk}


def bench_import() -> dict:
    code = "import time; t=time.perf_counter(); import levstream; print(time.perf_counter()-t)"
    imp = min(float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                   check=True).stdout) for _ in range(3))
    first = ("import time, numpy as np, levstream as ls; sk=ls.KeySketch(8, eps=0.1).update_many("
             "np.random.default_rng(0).standard_normal((5000, 8))); t=time.perf_counter(); "
             "sk.heavy_entries(np.ones((3, 8))); print(time.perf_counter()-t)")
    runs = [float(subprocess.run([sys.executable, "-c", first], capture_output=True, text=True,
                                 check=True).stdout) for _ in range(3)]
    return {"import_s": imp, "first_query_s_per_process": runs}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="build,sizes,onecall,footprint,query,rss,rows,import")
    ap.add_argument("--rounds", type=int, default=None, help="rounds per build figure (default 7, quick 2)")
    args = ap.parse_args()
    q = args.quick
    rounds = args.rounds or (2 if q else 7)
    print(f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}, numpy {np.__version__}; threads: {describe_threads()}")
    print(f"# command: python benchmarks/bench_core.py{' --quick' if q else ''} --only {args.only}"
          f"{f' --rounds {args.rounds}' if args.rounds else ''}")
    results: dict = {}
    only = args.only.split(",")
    n64 = 200_000 if q else 2_000_000
    if "build" in only:
        results["build"] = bench_build(n64, 64, 0.01, 8192, rounds)
    if "sizes" in only:  # one thread: other chunk sizes and head sizes
        for rows in (65536, 1024):
            results[f"build_chunks_{rows}"] = bench_build(n64, 64, 0.01, rows, rounds, default_threads=False,
                                                          check=False)
        results["build_d128"] = bench_build(50_000 if q else 500_000, 128, 0.01, 8192, rounds,
                                            default_threads=False)
        results["build_d384"] = bench_build(20_000 if q else 200_000, 384, 0.01, 8192, max(2, rounds // 2),
                                            default_threads=False)
    if "onecall" in only:
        results["one_update_many"] = bench_one_call(n64, 64, 0.01, rounds)
    if "footprint" in only:
        results["footprint"] = bench_footprint(30_000 if q else 300_000, (64, 128), 0.01)
    if "query" in only:
        results["query"] = bench_query(100_000 if q else 1_000_000, 200 if q else 1000, 64, 0.01, 3)
    if "rss" in only:
        results["rss"] = bench_rss(100_000, 1_000_000 if q else 10_000_000, 64, 0.01)
    if "rows" in only:
        results["rows"] = bench_rows(100_000 if q else 300_000, 64, 0.01)
    if "import" in only:
        results["import"] = bench_import()
    print(json.dumps(results, indent=2, default=float))


if __name__ == "__main__":
    main()
