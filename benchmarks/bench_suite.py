"""levstream benchmark suite (issue 3): build, queries, memory and universal-set size, against baselines.

One command runs everything and writes a JSON record, a Markdown report and the plots used by the docs::

    python benchmarks/bench_suite.py --quick                      # a few minutes on 2 cores
    python benchmarks/bench_suite.py --full                       # the design's target sizes (n up to 10^7)
    python benchmarks/bench_suite.py --quick --update-results     # also rewrite our section of RESULTS.md

Sections (``--sections build,query,memory,usize`` to run a subset):

build
    ``KeySketch.update_many`` over the chunks of :func:`levstream.synthetic.attention_like_keys` versus the
    Gram-only floor ``G += X.T @ X`` over the *same* chunks, across n and d, the two taking turns chunk by
    chunk.  Only the update calls are timed (key generation is not), plus the final ``universal_set()``.  Every method (here and
    in the query section) runs with the default threads and with one BLAS/OpenMP/numba thread; the best of
    both and of the repeats is compared, so each baseline is as fast as this machine allows.
query
    ``KeySketch.heavy_entries`` versus blocked dense NumPy (the exact answer, used as ground truth), faiss
    ``IndexFlatIP.range_search`` and faiss top-k ``IndexFlatIP.search``.  ``A >= eps`` means
    ``<q,k>^2 >= eps * Z(q)``, i.e. ``|<q,k>| >= sqrt(eps Z(q))`` with ``Z`` computed exactly from the Gram
    matrix; ``range_search`` takes one threshold per call, so each query is scaled by ``1/sqrt(eps Z(q))``
    (threshold 1 for all) and searched with both signs, ``q`` and ``-q``.  Top-k searches ``q`` and ``-q``
    with ``k`` results each, keeps candidates with ``A >= eps``; since the entries ``>= eps`` of one query
    number at most ``1/eps``, ``k = floor(1/eps)`` is guaranteed to find all of them (up to float32 rounding).
    Every method reports time *and* recall/precision of the entries ``>= eps``.
memory
    Peak RSS (and tracemalloc peak) of a fresh process that streams n keys into a sketch, versus n.
usize
    ``|U|`` versus eps on attention-like keys next to the bound ``d / eps``, and the leverage-score histogram.

Timings on a shared machine are noisy; ratios are measured side by side in one process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Callable

import numpy as np
from threadpoolctl import threadpool_info

import levstream as ls
from levstream._threads import capped_threads
from levstream.testing import DenseHeavyScan
from levstream.synthetic import attention_like_keys, attention_like_queries

ROOT = Path(__file__).resolve().parents[1]
SECTION_TITLE = "## Benchmark suite (issue 3)"
MODE_TITLES = {"quick": "Quick suite", "full": "Full-size runs", "smoke": "Smoke run"}
LEGACY_MARKERS = ("<!-- bench_suite:begin -->", "<!-- bench_suite:end -->")


def markers(mode: str) -> tuple[str, str]:
    """The comments delimiting one mode's block inside our section of RESULTS.md."""
    return f"<!-- bench_suite:{mode}:begin -->", f"<!-- bench_suite:{mode}:end -->"
THREAD_SETTINGS: tuple[int | None, ...] = (None, 1)  # None = library default

CONFIGS: dict[str, dict[str, Any]] = {
    "smoke": {  # seconds; checks that the suite runs end to end (used by tests/test_docs.py)
        "build_n": [20_000], "build_d": [16], "build_repeats": 1,
        "query_n": [20_000], "query_m": 20, "query_repeats": 1, "topk_k": [1, 100],
        "memory_n": [10_000, 20_000], "usize_n": [20_000], "usize_eps": [0.01, 0.1],
    },
    "quick": {
        "build_n": [200_000, 1_000_000], "build_d": [32, 64, 128], "build_repeats": 2,
        "query_n": [100_000, 1_000_000], "query_m": 500, "query_repeats": 1, "topk_k": [1, 10, 100],
        "memory_n": [100_000, 1_000_000, 3_000_000],
        "usize_n": [100_000, 1_000_000], "usize_eps": [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1],
    },
    "full": {
        "build_n": [100_000, 1_000_000, 2_000_000], "build_d": [32, 64, 128], "build_repeats": 3,
        "query_n": [100_000, 1_000_000, 2_000_000], "query_m": 1000, "query_repeats": 2,
        "topk_k": [1, 10, 100],
        "memory_n": [100_000, 1_000_000, 10_000_000],
        "usize_n": [100_000, 1_000_000, 4_000_000],
        "usize_eps": [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1],
    },
}
EPS = 0.01
SEED = 0


# ---------------------------------------------------------------------------------------------- helpers
def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def thread_setting(limit: int | None) -> AbstractContextManager[Any]:
    """BLAS, OpenMP (numpy, scipy, faiss), numba and levstream threads limited to ``limit``; ``None``: the
    defaults.

    numba is included because on a loaded machine its parallel kernels, like multithreaded BLAS, can be
    orders of magnitude slower than one thread (measured here: 0.5 ms vs 100-500 ms for the same query).
    """
    return nullcontext() if limit is None else capped_threads(limit, user_api=None)


def thread_label(limit: int | None) -> str:
    return "default" if limit is None else f"{limit} thread"


def git_revision() -> str:
    """The checkout's commit (``-dirty`` when the working tree has uncommitted changes)."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                             text=True, timeout=30)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info() -> dict[str, Any]:
    import numba
    import scipy

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu, "logical_cpus": os.cpu_count(), "python": platform.python_version(),
        "platform": platform.platform(), "numpy": np.__version__, "scipy": scipy.__version__,
        "numba": numba.__version__, "levstream": ls.__version__,
        "numba_threads": numba.get_num_threads(),
        "threadpools": [f"{p['internal_api']} {p.get('version') or ''} ({p['prefix']}): {p['num_threads']} threads"
                        for p in threadpool_info()],
        "load_average_start": os.getloadavg(),
        "git": git_revision(),
    }
    try:
        import faiss

        info["faiss"] = faiss.__version__
        info["faiss_omp_threads"] = faiss.omp_get_max_threads()
    except ImportError:
        info["faiss"] = None
    return info


def warm_jit(dim: int) -> None:
    """Compile (or load from cache) every kernel the timed code paths use."""
    rng = np.random.default_rng(123)
    sk = ls.KeySketch(dim, eps=EPS).update_many(rng.standard_normal((3000, dim)))
    sk.universal_set()
    sk.heavy_entries(rng.standard_normal((5, dim)))


def pair_codes(rows: np.ndarray, keys: np.ndarray, n_keys: int) -> np.ndarray:
    """(query row, key id) pairs as sorted unique int64 codes for fast set comparisons."""
    return np.unique(rows.astype(np.int64) * np.int64(n_keys) + keys.astype(np.int64))


def recall_precision(found: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    hit = np.intersect1d(found, truth, assume_unique=True).size
    recall = hit / truth.size if truth.size else 1.0
    precision = hit / found.size if found.size else 1.0
    return recall, precision


def best_time(fn: Callable[[], Any], repeats: int) -> tuple[float, int | None, Any]:
    """Best wall time of ``fn`` over the thread settings and repeats; returns (seconds, setting, last output)."""
    best, best_setting, out = np.inf, None, None
    for limit in THREAD_SETTINGS:
        for _ in range(repeats):
            with thread_setting(limit):
                t0 = time.perf_counter()
                out = fn()
                dt = time.perf_counter() - t0
            if dt < best:
                best, best_setting = dt, limit
    return best, best_setting, out


# ---------------------------------------------------------------------------------------------- build
def interleaved_pass(n: int, dim: int) -> tuple[float, float, int]:
    """One pass over the key stream feeding every chunk to both the Gram-only baseline and a sketch.

    Returns (Gram-only seconds, sketch seconds including the final ``universal_set()``, ``|U|``).  Only the
    update calls are timed (not the key generation); the two methods take turns on each chunk, alternating
    which goes first, so both see the same machine load and the same cache state on average.
    """
    G = np.zeros((dim, dim))
    sk = ls.KeySketch(dim, eps=EPS)
    t_gram = t_sketch = 0.0
    for i, chunk in enumerate(attention_like_keys(n, dim, seed=SEED)):
        for method in ((0, 1) if i % 2 == 0 else (1, 0)):
            t0 = time.perf_counter()
            if method == 0:
                G += chunk.T @ chunk
                t_gram += time.perf_counter() - t0
            else:
                sk.update_many(chunk)
                t_sketch += time.perf_counter() - t0
    t0 = time.perf_counter()
    u_size = len(sk.universal_set())
    return t_gram, t_sketch + time.perf_counter() - t0, u_size


def bench_build(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for dim in cfg["build_d"]:
        warm_jit(dim)
        for n in cfg["build_n"]:
            times: dict[str, dict[str, float]] = {"gram": {}, "sketch": {}}
            u_size = None
            for limit in THREAD_SETTINGS:
                for _ in range(cfg["build_repeats"]):
                    with thread_setting(limit):
                        t_gram, t_sketch, u_size = interleaved_pass(n, dim)
                    key = thread_label(limit)
                    times["gram"][key] = min(times["gram"].get(key, np.inf), t_gram)
                    times["sketch"][key] = min(times["sketch"].get(key, np.inf), t_sketch)
            best_gram = min(times["gram"].values())
            best_sketch = min(times["sketch"].values())
            row = {"n": n, "d": dim, "eps": EPS, "u_size": u_size, "gram_s": times["gram"],
                   "sketch_s": times["sketch"], "best_gram_s": best_gram, "best_sketch_s": best_sketch,
                   "ratio": best_sketch / best_gram,
                   "gram_rows_per_s": n / best_gram, "sketch_rows_per_s": n / best_sketch}
            log(f"build n={n:,} d={dim}: sketch {best_sketch:.3f}s, Gram-only {best_gram:.3f}s, "
                f"ratio {row['ratio']:.2f} (|U|={u_size}) {times}")
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------- query
def faiss_range(index: Any, Q: np.ndarray, G: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """faiss ``range_search`` for ``|<q,k>| >= sqrt(eps Z(q))``: queries scaled to threshold 1, both signs."""
    Z = np.einsum("ij,jk,ik->i", Q, G, Q)
    live = np.flatnonzero(Z > 0)
    scaled = (Q[live] / np.sqrt(eps * Z[live])[:, None]).astype(np.float32)
    rows, keys = [], []
    for sign in (1.0, -1.0):
        lims, _, ids = index.range_search(sign * scaled, 1.0)
        rows.append(live[np.repeat(np.arange(live.size), np.diff(lims.astype(np.int64)))])
        keys.append(ids)
    return np.concatenate(rows), np.concatenate(keys)


def faiss_topk(index: Any, Q: np.ndarray, G: np.ndarray, eps: float, k: int) -> tuple[np.ndarray, np.ndarray]:
    """faiss top-k of ``q`` and of ``-q`` (k each), then keep the candidates with ``A >= eps``."""
    Z = np.einsum("ij,jk,ik->i", Q, G, Q)
    Q32 = Q.astype(np.float32)
    rows, keys = [], []
    for sign in (1.0, -1.0):
        D, ids = index.search(sign * Q32, k)
        A = D.astype(np.float64) ** 2 / np.where(Z > 0, Z, np.inf)[:, None]
        i, j = np.nonzero((A >= eps) & (ids >= 0))
        rows.append(i)
        keys.append(ids[i, j])
    return np.concatenate(rows), np.concatenate(keys)


def bench_query(cfg: dict[str, Any], dim: int = 64) -> list[dict[str, Any]]:
    try:
        import faiss
    except ImportError:
        faiss = None
        log("faiss not installed: faiss baselines skipped (pip install faiss-cpu)")
    warm_jit(dim)
    m = cfg["query_m"]
    reps = cfg["query_repeats"]
    Q = attention_like_queries(m, dim, seed=SEED + 7, key_seed=SEED)
    out = []
    for n in cfg["query_n"]:
        K = np.empty((n, dim))
        sk = ls.KeySketch(dim, eps=EPS)
        pos = 0
        for chunk in attention_like_keys(n, dim, seed=SEED):
            K[pos:pos + chunk.shape[0]] = chunk
            sk.update_many(chunk)
            pos += chunk.shape[0]
        U = sk.universal_set()
        G = sk.normalizer_summary.gram
        methods: dict[str, dict[str, Any]] = {}

        # the oracle, blocked dense NumPy in float64 (levstream.testing.DenseHeavyScan)
        t, setting, dense = best_time(lambda: DenseHeavyScan(Q, eps=EPS).add(K).result(), reps)
        truth = pair_codes(dense.rows(), dense.key_ids, n)
        methods["dense NumPy (blocked)"] = {"s": t, "threads": thread_label(setting), "recall": 1.0,
                                            "precision": 1.0}

        def sketch_query() -> Any:
            return sk.heavy_entries(Q)

        t, setting, hits = best_time(sketch_query, max(reps, 3))
        r, p = recall_precision(pair_codes(hits.rows(), hits.key_ids, n), truth)
        methods["levstream sketch"] = {"s": t, "threads": thread_label(setting), "recall": r, "precision": p}

        if faiss is not None:
            index = faiss.IndexFlatIP(dim)
            index.add(K.astype(np.float32))
            t, setting, (ri, kj) = best_time(lambda: faiss_range(index, Q, G, EPS), reps)
            r, p = recall_precision(pair_codes(ri, kj, n), truth)
            methods["faiss range_search (q and -q)"] = {"s": t, "threads": thread_label(setting),
                                                         "recall": r, "precision": p}
            for k in cfg["topk_k"]:
                t, setting, (ri, kj) = best_time(lambda: faiss_topk(index, Q, G, EPS, k), reps)
                r, p = recall_precision(pair_codes(ri, kj, n), truth)
                methods[f"faiss top-k search, k={k} (q and -q)"] = {"s": t, "threads": thread_label(setting),
                                                                     "recall": r, "precision": p}
            del index
        base = methods["levstream sketch"]["s"]
        for rec in methods.values():
            rec["per_query_ms"] = rec["s"] / m * 1e3
            rec["vs_sketch"] = rec["s"] / base
        row = {"n": n, "d": dim, "m": m, "eps": EPS, "u_size": len(U), "heavy_entries": int(truth.size),
               "physical_limit": n / (len(U) + dim), "methods": methods}
        log(f"query n={n:,}: |U|={len(U)}, entries={truth.size}, " + ", ".join(
            f"{name}: {rec['s'] * 1e3:.1f} ms r={rec['recall']:.3f}" for name, rec in methods.items()))
        out.append(row)
        K = np.empty((0, dim))  # free the keys before the next size is built
    return out


# ---------------------------------------------------------------------------------------------- memory
def peak_rss_bytes() -> int:
    """High-water RSS of this process image.

    ``VmHWM`` of ``/proc/self/status`` belongs to the address space, which ``exec`` replaces; ``ru_maxrss``
    does not reset on ``exec`` (a child started from a large parent inherits the parent's peak), so it is
    only the fallback off Linux.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def memory_child(n: int, dim: int) -> dict[str, Any]:
    """Run in a fresh process: stream n keys into a sketch; report RSS and tracemalloc peaks.

    The tracemalloc peak is taken over the sketch calls only (``update_many`` and the final
    ``universal_set``), reset before each call, so it counts the chunk being processed plus everything the
    sketch allocates, and not the temporaries of the key generator.
    """
    import tracemalloc

    import psutil

    warm_jit(dim)
    rss_before = psutil.Process().memory_info().rss
    peak_before = peak_rss_bytes()
    tracemalloc.start()
    traced_peak = 0
    t0 = time.perf_counter()
    sk = ls.KeySketch(dim, eps=EPS)
    for chunk in attention_like_keys(n, dim, seed=SEED):
        tracemalloc.reset_peak()
        sk.update_many(chunk)
        traced_peak = max(traced_peak, tracemalloc.get_traced_memory()[1])
        del chunk
    tracemalloc.reset_peak()
    U = sk.universal_set()
    traced_peak = max(traced_peak, tracemalloc.get_traced_memory()[1])
    seconds = time.perf_counter() - t0
    tracemalloc.stop()
    return {"n": n, "d": dim, "eps": EPS, "u_size": len(U), "sketch_nbytes": sk.nbytes,
            "rss_before": rss_before, "peak_rss_before": peak_before, "peak_rss": peak_rss_bytes(),
            "tracemalloc_peak": traced_peak, "seconds": seconds}


def bench_memory(cfg: dict[str, Any], dim: int = 64) -> list[dict[str, Any]]:
    out = []
    for n in cfg["memory_n"]:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", str(n), "--dim", str(dim)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=3600)
        rec = json.loads(res.stdout.strip().splitlines()[-1])
        log(f"memory n={n:,}: peak RSS {rec['peak_rss'] / 2**20:.1f} MiB, tracemalloc peak "
            f"{rec['tracemalloc_peak'] / 2**20:.1f} MiB, sketch {rec['sketch_nbytes'] / 2**20:.2f} MiB")
        out.append(rec)
    return out


# ---------------------------------------------------------------------------------------------- |U| vs eps
def bench_usize(cfg: dict[str, Any], dim: int = 64) -> dict[str, Any]:
    eps_grid = sorted(cfg["usize_eps"])
    counts = {}
    for n in cfg["usize_n"]:
        sk = ls.KeySketch(dim, eps=eps_grid[0])
        with thread_setting(1):  # not timed; one thread is fastest on a loaded machine
            for chunk in attention_like_keys(n, dim, seed=SEED):
                sk.update_many(chunk)
        scores = sk.universal_set().scores
        counts[n] = [int((scores >= e).sum()) for e in eps_grid]
        log(f"usize n={n:,}: " + ", ".join(f"eps={e:g}: {c}" for e, c in zip(eps_grid, counts[n])))
    n_hist = cfg["usize_n"][0]
    K = np.vstack(list(attention_like_keys(n_hist, dim, seed=SEED)))
    tau = ls.leverage_scores(K)
    hist, edges = np.histogram(np.log10(np.maximum(tau, 1e-12)), bins=60)
    return {"d": dim, "eps": eps_grid, "counts": {str(k): v for k, v in counts.items()},
            "bound": [dim / e for e in eps_grid], "hist_n": n_hist, "hist_counts": hist.tolist(),
            "hist_log10_edges": edges.tolist(), "tau_sum": float(tau.sum()), "tau_max": float(tau.max())}


# ---------------------------------------------------------------------------------------------- plots
def make_plots(res: dict[str, Any], img_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img_dir.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(img_dir / name, dpi=110)
        plt.close(fig)
        written.append(str((img_dir / name).relative_to(ROOT)) if img_dir.is_relative_to(ROOT) else name)

    if res.get("build"):
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for dim in sorted({r["d"] for r in res["build"]}):
            rs = [r for r in res["build"] if r["d"] == dim]
            ax.plot([r["n"] for r in rs], [r["ratio"] for r in rs], "o-", label=f"d = {dim}")
        ax.axhline(1.3, color="grey", ls="--", lw=1, label="target 1.3")
        ax.axhline(1.0, color="black", ls=":", lw=1, label="floor (Gram-only)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("keys streamed n")
        ax.set_ylabel("build time / Gram-only time")
        ax.set_title(f"Build cost vs the Gram update (p = 2, eps = {EPS:g})")
        ax.legend(fontsize=8)
        save(fig, "bench_build_ratio.png")

    if res.get("query"):
        fig, ax = plt.subplots(figsize=(6.4, 4))
        names = list(res["query"][0]["methods"])
        for name in names:
            xs = [r["n"] for r in res["query"] if name in r["methods"]]
            ys = [r["methods"][name]["per_query_ms"] for r in res["query"] if name in r["methods"]]
            ax.plot(xs, ys, "o-", label=name, lw=2.5 if name == "levstream sketch" else 1.2)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("keys n")
        ax.set_ylabel("time per query (ms)")
        ax.set_title(f"Heavy-entry queries, d = {res['query'][0]['d']}, eps = {EPS:g}")
        ax.legend(fontsize=7)
        save(fig, "bench_query_time.png")

    if res.get("memory"):
        fig, ax = plt.subplots(figsize=(6, 3.6))
        ns = [r["n"] for r in res["memory"]]
        ax.plot(ns, [r["peak_rss"] / 2**20 for r in res["memory"]], "o-", label="peak RSS of the process")
        ax.plot(ns, [r["tracemalloc_peak"] / 2**20 for r in res["memory"]], "s-",
                label="tracemalloc peak while streaming")
        ax.plot(ns, [r["sketch_nbytes"] / 2**20 for r in res["memory"]], "^-", label="sketch nbytes")
        ax.plot(ns, [r["n"] * r["d"] * 8 / 2**20 for r in res["memory"]], "k:", label="raw keys (float64)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("keys streamed n")
        ax.set_ylabel("MiB")
        ax.set_title("Memory while streaming (d = 64, eps = 0.01)")
        ax.legend(fontsize=8)
        save(fig, "bench_memory.png")

    if res.get("usize"):
        u = res["usize"]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
        for n, counts in u["counts"].items():
            ax1.plot(u["eps"], counts, "o-", label=f"|U|, n = {int(n):,}")
        ax1.plot(u["eps"], u["bound"], "k--", label="bound d / eps")
        ax1.set_xscale("log")
        ax1.set_yscale("log")
        ax1.set_xlabel("eps")
        ax1.set_ylabel("keys")
        ax1.set_title(f"Universal set size, attention-like keys, d = {u['d']}")
        ax1.legend(fontsize=8)
        edges = np.asarray(u["hist_log10_edges"])
        ax2.bar(edges[:-1], u["hist_counts"], width=np.diff(edges), align="edge", color="tab:blue")
        ax2.set_yscale("log")
        for e in (0.01, 0.001):
            ax2.axvline(np.log10(e), color="tab:red", ls="--", lw=1)
            ax2.text(np.log10(e), max(u["hist_counts"]), f" eps={e:g}", color="tab:red", fontsize=8, va="top")
        ax2.set_xlabel("log10 leverage score")
        ax2.set_ylabel("keys")
        ax2.set_title(f"Leverage scores, n = {u['hist_n']:,} (sum = {u['tau_sum']:.1f})")
        save(fig, "universal_set_size.png")
    return written


# ---------------------------------------------------------------------------------------------- report
def fmt_time(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def plot_link(res: dict[str, Any], alt: str, name: str) -> str:
    """Markdown image link (relative to benchmarks/) to a plot, or nothing when this run's plots did not go
    to docs/img.  The docs show RESULTS.md with these links rewritten (docs/_hooks/benchmark_results.py)."""
    return f"![{alt}](../docs/img/{name})" if res.get("plots_in_docs", True) else ""


def report(res: dict[str, Any]) -> str:
    """The Markdown report of one mode (a block of RESULTS.md, between this mode's markers)."""
    info = res["machine"]
    begin, end = markers(res["mode"])
    lines = [
        begin, f"### {MODE_TITLES.get(res['mode'], res['mode'])}", "",
        f"Command: `{res['command']}` ({res['mode']} mode, {res['date']}; last run {res['wall_s']:.0f} s wall; "
        f"levstream at commit {info.get('git', 'unknown')}).", "",
        f"Machine: {info['cpu']}, {info['logical_cpus']} logical CPUs, Python {info['python']}, NumPy "
        f"{info['numpy']}, SciPy {info['scipy']}, numba {info['numba']} ({info['numba_threads']} threads), "
        f"faiss {info.get('faiss')} ({info.get('faiss_omp_threads')} OpenMP threads). "
        f"BLAS/OpenMP pools: {'; '.join(info['threadpools'])}. Load average at start "
        f"{', '.join(f'{x:.1f}' for x in info['load_average_start'])}, at end "
        f"{', '.join(f'{x:.1f}' for x in info['load_average_end'])}.", "",
        "The machine is shared by several agents, so absolute timings are noisy; every ratio compares methods "
        "measured side by side in one process on the same data. Each method ran with the default BLAS/OpenMP/numba "
        "threads and with one thread (threadpoolctl, numba.set_num_threads); the best of both (and of the repeats) is reported, and "
        "the winning setting is noted. \"1 thread\" also sets numba to one thread. Keys: `levstream.synthetic.attention_like_keys` (seed 0), "
        "queries: `attention_like_queries`, p = 2.", "",
    ]
    if res.get("build"):
        lines += [
            "#### Build vs Gram-only", "",
            "Only the update calls are timed (plus the final `universal_set()` for the sketch), over the same "
            "65 536-row chunks, which the two methods take in turns (alternating which goes first) so that "
            "both see the same machine load. Gram-only is `G += X.T @ X`, the unavoidable floor. Design target: ratio "
            "<= 1.3 at n = 2e6, d = 64.", "",
            "| n | d | \\|U\\| | sketch (best) | Gram-only (best) | ratio | sketch default / 1 thread | "
            "Gram default / 1 thread |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in res["build"]:
            lines.append(
                f"| {r['n']:,} | {r['d']} | {r['u_size']} | {fmt_time(r['best_sketch_s'])} | "
                f"{fmt_time(r['best_gram_s'])} | **{r['ratio']:.2f}** | "
                f"{fmt_time(r['sketch_s']['default'])} / {fmt_time(r['sketch_s']['1 thread'])} | "
                f"{fmt_time(r['gram_s']['default'])} / {fmt_time(r['gram_s']['1 thread'])} |")
        lines += ["", plot_link(res, "build ratio", "bench_build_ratio.png"), ""]
    if res.get("query"):
        lines += [
            "#### Queries: every entry A >= eps", "",
            "Ground truth: blocked dense NumPy in float64. faiss uses float32 keys (`IndexFlatIP`, index "
            "build and the Gram matrix for Z(q) not timed); range_search runs on q and -q with queries "
            "scaled to threshold 1; top-k runs on q and -q and keeps candidates with A >= eps "
            "(k = 1/eps = 100 is enough by construction). Design target: sketch >= 500x faster than "
            "dense at n = 1e6, m = 1000.", "",
        ]
        for r in res["query"]:
            lines += [
                f"n = {r['n']:,}, d = {r['d']}, m = {r['m']} queries, eps = {r['eps']:g}: |U| = {r['u_size']}, "
                f"{r['heavy_entries']:,} heavy entries; flop ratio dense/sketch n/(|U|+d) = "
                f"{r['physical_limit']:.0f} (dense also streams an m x n score matrix through memory, so the "
                "measured ratio can exceed it).", "",
                "| method | time (m queries) | per query | time / sketch time | recall | precision | "
                "best threads |",
                "|---|---:|---:|---:|---:|---:|---|",
            ]
            for name, rec in r["methods"].items():
                lines.append(f"| {name} | {fmt_time(rec['s'])} | {rec['per_query_ms']:.3f} ms | "
                             f"{rec['vs_sketch']:.1f}x | {rec['recall']:.4f} | {rec['precision']:.4f} | "
                             f"{rec['threads']} |")
            lines.append("")
        lines += [plot_link(res, "query time", "bench_query_time.png"), ""]
    if res.get("memory"):
        mem = res["memory"]
        lines += [
            "#### Peak memory vs n", "",
            "Each n streams into a sketch in a fresh process (d = 64, eps = 0.01, 65 536-row chunks generated "
            "on the fly). Peak RSS (VmHWM) includes the interpreter, NumPy/SciPy/numba and the key "
            "generator's temporaries; the tracemalloc peak is taken over the sketch calls only and counts the "
            "32 MiB chunk being processed plus everything the sketch allocates. Design target: peak RSS "
            "at n = 1e7 within 1.05x of n = 1e5.", "",
            "| n | RSS before streaming | peak RSS | tracemalloc peak | sketch nbytes | \\|U\\| | "
            "raw keys (float64) | stream time |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in mem:
            lines.append(f"| {r['n']:,} | {r['rss_before'] / 2**20:.1f} MiB | {r['peak_rss'] / 2**20:.1f} MiB | {r['tracemalloc_peak'] / 2**20:.1f} MiB"
                         f" | {r['sketch_nbytes'] / 2**20:.2f} MiB | {r['u_size']} | "
                         f"{r['n'] * r['d'] * 8 / 2**20:,.0f} MiB | {r['seconds']:.1f} s |")
        lines += ["", f"Peak RSS ratio n = {mem[-1]['n']:,} vs n = {mem[0]['n']:,}: "
                  f"**{mem[-1]['peak_rss'] / mem[0]['peak_rss']:.3f}**; tracemalloc peak ratio "
                  f"{mem[-1]['tracemalloc_peak'] / mem[0]['tracemalloc_peak']:.3f}.", "",
                  plot_link(res, "memory", "bench_memory.png"), ""]
    if res.get("usize"):
        u = res["usize"]
        head = "| eps | d/eps | " + " | ".join(f"\\|U\\|, n = {int(n):,}" for n in u["counts"]) + " |"
        lines += [
            "#### Universal set size vs eps", "",
            f"Attention-like keys, d = {u['d']}. Sum of leverage scores at n = {u['hist_n']:,}: "
            f"{u['tau_sum']:.2f} (= rank <= d); largest score {u['tau_max']:.3f}.", "",
            head, "|---:|---:|" + "---:|" * len(u["counts"]),
        ]
        for i, e in enumerate(u["eps"]):
            lines.append(f"| {e:g} | {u['bound'][i]:,.0f} | " + " | ".join(
                str(c[i]) for c in u["counts"].values()) + " |")
        lines += ["", plot_link(res, "universal set size", "universal_set_size.png"), ""]
    lines += [end, ""]
    return "\n".join(lines)


def update_results(block: str, mode: str, path: Path) -> None:
    """Put one mode's block into our section of RESULTS.md (replacing its previous version); the sections
    of other benchmarks and the blocks of the other modes are left untouched."""
    text = path.read_text() if path.exists() else "# levstream benchmark results\n"
    if LEGACY_MARKERS[0] in text and LEGACY_MARKERS[1] in text:  # one block for everything, before modes
        i, j = text.index(LEGACY_MARKERS[0]), text.index(LEGACY_MARKERS[1]) + len(LEGACY_MARKERS[1])
        text = text[:i].rstrip("\n") + "\n\n" + text[j:].lstrip("\n")
    begin, end = markers(mode)
    block = block.strip("\n")
    if begin in text and end in text:
        i, j = text.index(begin), text.index(end) + len(end)
        text = text[:i] + block + text[j:]
    elif SECTION_TITLE in text:
        start = text.index(SECTION_TITLE)
        nxt = text.find("\n## ", start + len(SECTION_TITLE))
        stop = len(text) if nxt < 0 else nxt + 1
        text = text[:stop].rstrip("\n") + "\n\n" + block + "\n" + ("\n" + text[stop:] if nxt >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + SECTION_TITLE + "\n\n" + block + "\n"
    path.write_text(text)


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="small sizes, a few minutes (default)")
    mode.add_argument("--full", action="store_true", help="the design's target sizes (n up to 1e7); tens of minutes")
    mode.add_argument("--smoke", action="store_true", help="tiny sizes: checks that the suite runs")
    parser.add_argument("--sections", default="build,query,memory,usize",
                        help="comma-separated subset of build,query,memory,usize")
    parser.add_argument("--img-dir", type=Path, default=ROOT / "docs" / "img", help="where plots go")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results",
                        help="where the JSON record and the Markdown report go")
    parser.add_argument("--update-results", action="store_true",
                        help="rewrite the 'Benchmark suite (issue 3)' section of benchmarks/RESULTS.md")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="override one setting of the mode, e.g. --set build_n=[2000000] --set build_d=[64]")
    parser.add_argument("--report-only", action="store_true",
                        help="re-render plots and reports from the saved JSON of this mode, without running")
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dim", type=int, default=64, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.memory_child is not None:
        with thread_setting(1):  # memory does not depend on threads; one thread is fastest on a loaded box
            print(json.dumps(memory_child(args.memory_child, args.dim)))
        return 0

    mode_name = "full" if args.full else "smoke" if args.smoke else "quick"
    cfg = dict(CONFIGS[mode_name])
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in cfg:
            parser.error(f"--set {item}: unknown setting {key!r}; choose from {', '.join(sorted(cfg))}")
        try:
            cfg[key] = json.loads(value)
        except json.JSONDecodeError:
            parser.error(f"--set {item}: the value must be JSON, e.g. {key}=[100000]")
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - {"build", "query", "memory", "usize"}
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from build, query, memory, usize")
    if args.report_only:
        res = json.loads((args.out_dir / f"bench_suite_{mode_name}.json").read_text())
        return write_outputs(res, args, mode_name)
    t_start = time.perf_counter()
    command = "python benchmarks/bench_suite.py " + " ".join(argv if argv is not None else sys.argv[1:])
    res: dict[str, Any] = {"mode": mode_name, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                           "command": command, "machine": machine_info(), "config": cfg}
    saved = args.out_dir / f"bench_suite_{mode_name}.json"
    if set(sections) != {"build", "query", "memory", "usize"} and saved.exists():
        # a subset run refreshes those sections of the saved record and keeps the others
        previous = json.loads(saved.read_text())
        res = {**previous, "date": res["date"], "machine": res["machine"], "config": cfg,
               "command": f"{previous['command']}, then {command}"}
    log(f"levstream bench suite ({mode_name}): {res['machine']['cpu']}; {res['machine']['threadpools']}")
    if "build" in sections:
        res["build"] = bench_build(cfg)
    if "query" in sections:
        res["query"] = bench_query(cfg)
    if "memory" in sections:
        res["memory"] = bench_memory(cfg)
    if "usize" in sections:
        res["usize"] = bench_usize(cfg)
    res["machine"]["load_average_end"] = os.getloadavg()
    res["wall_s"] = time.perf_counter() - t_start
    return write_outputs(res, args, mode_name)


def write_outputs(res: dict[str, Any], args: argparse.Namespace, mode_name: str) -> int:
    """Plots, the JSON record, the Markdown report (and our block of RESULTS.md, which the docs show)."""
    res["plots"] = make_plots(res, args.img_dir)
    # reports link the plots only when they went to docs/img (other runs must not point at those files)
    res["plots_in_docs"] = args.img_dir.resolve() == (ROOT / "docs" / "img").resolve()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"bench_suite_{mode_name}.json").write_text(json.dumps(res, indent=1, default=float))
    block = report(res)
    (args.out_dir / f"bench_suite_{mode_name}.md").write_text(block)
    if args.update_results:
        update_results(block, mode_name, ROOT / "benchmarks" / "RESULTS.md")
    print(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
