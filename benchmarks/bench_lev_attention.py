"""Speed of ``lev_attention`` (top-k leverage keys per head) against dense NumPy softmax attention.

Both run in this process on the same inputs, one BLAS thread and one numba thread, best of ``--repeat``;
the figure that matters is the ratio.  Also reported: the share of the time spent selecting keys
(batched SVD for leverage scores), and a correctness check: the largest difference from dense NumPy softmax
attention over the same selected keys.  Quality on a real model is in docs/levattention-results.md.

Run::

    python benchmarks/bench_lev_attention.py              # heads=8, d=64, k=64, n in 1024 / 4096
    python benchmarks/bench_lev_attention.py --quick
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import levstream as ls
from levstream._threads import capped_threads, describe_threads
from levstream.attention import selection_scores


def dense_softmax(Q: np.ndarray, K: np.ndarray, V: np.ndarray) -> np.ndarray:
    S = Q @ np.swapaxes(K, -1, -2) / np.sqrt(Q.shape[-1])
    S -= S.max(axis=-1, keepdims=True)
    np.exp(S, out=S)
    S /= S.sum(axis=-1, keepdims=True)
    return S @ V


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--n", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.n, args.repeat = [512], 2
    rng = np.random.default_rng(0)
    with capped_threads(1, user_api=None):
        print(f"threads (limited to 1): {describe_threads()}")
    print("| n | heads x d | k | dense softmax (s) | lev_attention (s) | of which selection (s) | speed-up | "
          "max diff vs NumPy on the same keys |")
    print("|---|---|---|---|---|---|---|---|")
    with capped_threads(1, user_api=None):
        for n in args.n:
            Q, K, V = rng.standard_normal((3, args.heads, n, args.dim))
            ls.lev_attention(Q[:, :8], K[:, :8], V[:, :8], top_k=4)  # JIT warm-up
            t_dense = best(lambda Q=Q, K=K, V=V: dense_softmax(Q, K, V), args.repeat)
            t_lev = best(lambda Q=Q, K=K, V=V: ls.lev_attention(Q, K, V, top_k=args.k), args.repeat)
            t_sel = best(lambda Q=Q, K=K: selection_scores(Q, K), args.repeat)
            out, idx = ls.lev_attention(Q, K, V, top_k=args.k, return_indices=True)
            take = idx[..., None]
            ref = dense_softmax(Q, np.take_along_axis(K, take, axis=-2), np.take_along_axis(V, take, axis=-2))
            err = float(np.abs(out - ref).max())
            print(f"| {n} | {args.heads} x {args.dim} | {args.k} | {t_dense:.3f} | {t_lev:.3f} | {t_sel:.3f} | "
                  f"{t_dense / t_lev:.1f}x | {err:.1e} |")


if __name__ == "__main__":
    main()
