"""General-p benchmarks (issue #4): coreset build vs Gram-only, retained rows vs n, queries vs dense NumPy with
recall, and exact p = 4 (lifted Gram) build vs the Gram-only time of the lifted rows.

Every figure is a ratio against a baseline measured in the same process (the machine is shared and noisy).
BLAS, OpenMP and numba run single-threaded for both sides (``capped_threads(1)``): multithreaded OpenBLAS on
tall-skinny products is erratic on the 2-core reference machine.

    python benchmarks/bench_general_p.py            # sizes of the issue (n = 10^6, a few minutes)
    python benchmarks/bench_general_p.py --quick    # n = 10^5, a smoke run
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import numpy as np

import levstream as ls
from levstream._threads import capped_threads, describe_threads
from levstream.summaries.lifted import lift
from levstream.synthetic import attention_like_keys, attention_like_queries
from levstream.testing import DenseHeavyScan


def timed(fn) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def build_sketch(chunks: list[np.ndarray], d: int, eps: float, p: float, **kw) -> ls.KeySketch:
    sk = ls.KeySketch(d, eps=eps, p=p, **kw)
    for X in chunks:
        sk.update_many(X)
    sk.universal_set()
    return sk


def gram_only(chunks: list[np.ndarray]) -> np.ndarray:
    G = np.zeros((chunks[0].shape[1],) * 2)
    for X in chunks:
        G += X.T @ X
    return G


def retained(sk: ls.KeySketch) -> int:
    return int(sk.normalizer_summary.num_rows + sk.num_retained)


def dense_heavy(Q: np.ndarray, chunks: list[np.ndarray], eps: float,
                p: float) -> tuple[ls.HeavyEntries, np.ndarray]:
    """The oracle over the chunks (blocked dense NumPy, one pass): the entries and the normalisers."""
    scan = DenseHeavyScan(Q, eps=eps, p=p)
    for X in chunks:
        scan.add(X)
    return scan.result(), scan.normalizer


def true_values(Q: np.ndarray, chunks: list[np.ndarray], p: float, pairs: np.ndarray,
                Z: np.ndarray) -> np.ndarray:
    """``A[i, j]`` of the (query row, key id) ``pairs`` with the dense normalisers ``Z``."""
    K = np.vstack(chunks)
    return np.abs(np.einsum("ij,ij->i", Q[pairs[:, 0]], K[pairs[:, 1]])) ** p / Z[pairs[:, 0]]


def bench_coreset(p: float, d: int, n_small: int, n_large: int, eps: float, m: int) -> dict:
    chunks = list(attention_like_keys(n_large, d, chunk_rows=65536, seed=0))
    small = list(attention_like_keys(n_small, d, chunk_rows=65536, seed=0))
    build_sketch(small[:1], d, eps, p, rng=0).heavy_entries(np.ones((2, d)))  # JIT warm-up
    # best of 3 rounds for both sides, interleaved (the machine is shared: single runs vary by up to 2x)
    t_gram, t_build = np.inf, np.inf
    for _ in range(3):
        t_gram = min(t_gram, timed(lambda: gram_only(chunks))[0])
        t, sk = timed(lambda: build_sketch(chunks, d, eps, p, rng=0))
        t_build = min(t_build, t)
    sk_small = build_sketch(small, d, eps, p, rng=0)
    rng = np.random.default_rng(1)
    K_all = np.vstack(chunks)
    # adversarial half: queries aligned with single keys, half of them among the 1% largest keys
    top = np.argsort(-np.einsum("ij,ij->i", K_all, K_all))[: n_large // 100]
    K_idx = np.concatenate([rng.choice(top, m // 4, replace=False), rng.choice(n_large, m // 2 - m // 4, replace=False)])
    Q = np.vstack([attention_like_queries(m - m // 2, d, seed=1), K_all[K_idx]])
    del K_all
    sk.heavy_entries(Q[:2])
    t_query, hits = timed(lambda: sk.heavy_entries(Q))
    t_dense, (dense, Z) = timed(lambda: dense_heavy(Q, chunks, eps, p))
    truth = dense.as_set()
    got = hits.as_set()
    recall = len(truth & got) / max(len(truth), 1)
    pairs = np.column_stack([hits.rows(), hits.key_ids])
    vals = true_values(Q, chunks, p, pairs, Z) if len(pairs) else np.zeros(0)
    delta = sk.normalizer_summary.delta
    return {
        "p": p, "d": d, "n": n_large, "eps": eps, "m": m,
        "t_gram": t_gram, "t_build": t_build, "build_ratio": t_build / t_gram,
        "coreset_rows": sk.normalizer_summary.num_rows, "candidates": sk.num_retained,
        "retained_large": retained(sk), "retained_small": retained(sk_small),
        "retained_ratio": retained(sk) / retained(sk_small), "rounds": sk.normalizer_summary.rounds,
        "t_query": t_query, "t_dense": t_dense, "speedup": t_dense / t_query,
        "heavy_true": len(truth), "returned": len(got), "recall": recall,
        "min_returned_over_eps": float(vals.min() / eps) if vals.size else float("nan"),
        "precision_floor": (1 - delta) ** 2,
        "failure_bound": sk.normalizer_summary.failure_bound,
    }


def bench_lifted(d: int, n: int, eps: float) -> dict:
    chunks = list(attention_like_keys(n, d, chunk_rows=16384, seed=0))
    build_sketch(chunks[:1], d, eps, 4.0, exact=True)  # JIT warm-up

    def lifted_gram_only() -> float:
        D = d * (d + 1) // 2
        G = np.zeros((D, D))
        spent = 0.0
        for X in chunks:
            L = lift(X)  # lifting is not part of the baseline
            t = time.perf_counter()
            G += L.T @ L
            spent += time.perf_counter() - t
        return spent

    t_gram, t_build = np.inf, np.inf
    for _ in range(2):
        t_gram = min(t_gram, lifted_gram_only())
        t, sk = timed(lambda: build_sketch(chunks, d, eps, 4.0, exact=True))
        t_build = min(t_build, t)
    return {"d": d, "n": n, "eps": eps, "D": d * (d + 1) // 2, "t_gram_lifted": t_gram, "t_build": t_build,
            "build_ratio": t_build / t_gram, "universal_set": len(sk.universal_set())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="n = 10^5 instead of 10^6")
    args = ap.parse_args(argv)
    n_large = 100_000 if args.quick else 1_000_000
    n_small = 20_000 if args.quick else 100_000
    with capped_threads(1, user_api=None):
        print(f"# bench_general_p  python {platform.python_version()}  numpy {np.__version__}  "
              f"threads: {describe_threads()}  command: {' '.join(sys.argv)}")
        print("| p | d | n | eps | build / Gram-only | coreset rows | candidates | retained n / n_small "
              "| rounds | query speed-up vs dense | recall | min returned / eps (floor) |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        # eps per p: p = 1 attention is flat (A ~ 1/n): heavy entries exist only for small eps at these n
        for p, eps in ((1.0, 2e-4), (3.0, 1e-2)):
            r = bench_coreset(p, 32, n_small, n_large, eps, 200)
            print(f"| {p:g} | {r['d']} | {r['n']:.0e} | {r['eps']} | {r['build_ratio']:.1f} "
                  f"({r['t_build']:.2f} s / {r['t_gram']:.3f} s) | {r['coreset_rows']} | {r['candidates']} | "
                  f"{r['retained_ratio']:.2f} ({r['retained_large']} / {r['retained_small']}) | {r['rounds']} | "
                  f"{r['speedup']:.0f}x ({r['t_dense']:.2f} s / {r['t_query']:.3f} s) | {r['recall']:.3f} "
                  f"({r['heavy_true']} true, {r['returned']} returned) | {r['min_returned_over_eps']:.3f} "
                  f"({r['precision_floor']:.2f}) |", flush=True)
        r = bench_lifted(16, 200_000 if args.quick else 1_000_000, 0.01)
        print(f"\n| p = 4 exact | d | n | D | build / lifted Gram-only | |U| |\n|---|---|---|---|---|---|\n"
              f"| lifted Gram | {r['d']} | {r['n']:.0e} | {r['D']} | {r['build_ratio']:.2f} "
              f"({r['t_build']:.2f} s / {r['t_gram_lifted']:.2f} s) | {r['universal_set']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
