"""The ``levstream`` command line.  ``levstream demo`` is the main job: stream, shard, merge, query, verify."""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np

EXIT_OK, EXIT_USAGE, EXIT_FAILED_CHECK = 0, 2, 3


def _shard_stream(n: int, dim: int, shards: int, seed: int) -> list[tuple[int, int, int]]:
    """(offset, rows, seed) of each shard of one global stream."""
    bounds = np.linspace(0, n, shards + 1).astype(np.int64)
    return [(int(bounds[i]), int(bounds[i + 1] - bounds[i]), seed * 1000 + i) for i in range(shards)]


def cmd_demo(args: argparse.Namespace) -> int:
    import levstream as ls
    from levstream.synthetic import attention_like_keys, attention_like_queries

    n, dim, eps, seed, shards = args.n, args.dim, args.eps, args.seed, args.shards
    print(f"levstream {ls.__version__} demo: n={n:,} keys, dim={dim}, eps={eps:g}, p=2, {shards} shards")

    def build(spec: tuple[int, int, int]) -> ls.KeySketch:
        offset, rows, shard_seed = spec
        sk = ls.KeySketch(dim, eps=eps)
        pos = offset
        for chunk in attention_like_keys(rows, dim, seed=shard_seed, chunk_rows=32768):
            sk.update_many(chunk, offset=pos)
            pos += chunk.shape[0]
        return sk

    specs = _shard_stream(n, dim, shards, seed)
    ls.KeySketch(dim, eps=eps).update_many(np.ones((2, dim))).universal_set()  # warm the JIT
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=shards) as pool:
        parts = list(pool.map(build, specs))
    sketch = ls.KeySketch.merge_all(parts)
    t_build = time.perf_counter() - t0
    U = sketch.universal_set()

    Q = attention_like_queries(args.queries, dim, seed=seed + 7, key_seed=seed * 1000)
    t0 = time.perf_counter()
    hits = sketch.heavy_entries(Q)
    t_query = time.perf_counter() - t0

    # brute force over all keys (regenerated, never held by the sketch) for a sample of queries
    sample = Q[: args.check]
    K = np.vstack([np.vstack(list(attention_like_keys(rows, dim, seed=s, chunk_rows=32768)))
                   for _, rows, s in specs])
    t0 = time.perf_counter()
    dense = ls.testing.heavy_entries_dense(sample, K, eps=eps, p=2)
    t_dense = (time.perf_counter() - t0) * Q.shape[0] / max(sample.shape[0], 1)
    got = {(i, k) for i, k in hits.as_set() if i < sample.shape[0]}
    truth = dense.as_set()
    recall = len(got & truth) / len(truth) if truth else 1.0
    precision = len(got & truth) / len(got) if got else 1.0

    rows = [
        ("keys streamed (n)", f"{sketch.n:,}"),
        ("universal set |U|", f"{len(U):,}"),
        ("bound d/eps", f"{dim / eps:,.0f}"),
        ("sketch bytes / raw key bytes", f"{sketch.nbytes / 1e6:.1f} MB / {n * dim * 8 / 1e6:,.0f} MB"),
        ("build (4 shards + merge)", f"{t_build:.2f} s"),
        ("query time, sketch", f"{t_query * 1e3:.1f} ms for {Q.shape[0]} queries"),
        ("query time, dense (extrapolated)", f"{t_dense:.2f} s ({t_dense / max(t_query, 1e-9):.0f}x slower)"),
        (f"recall / precision on {sample.shape[0]} queries", f"{recall:.3f} / {precision:.3f}"),
        ("heavy entries found", f"{len(hits):,}"),
    ]
    width = max(len(r[0]) for r in rows)
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")
    if recall < 1.0 or precision < 1.0:
        print("error: the sketch disagrees with brute force", file=sys.stderr)
        return EXIT_FAILED_CHECK
    print("ok: every heavy entry found, none spurious")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="levstream", description="Streaming LevAttention sketches.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="stream synthetic keys into shards, merge, query, verify against brute force")
    demo.add_argument("--n", type=int, default=1_000_000, help="number of keys (default 1e6)")
    demo.add_argument("--dim", type=int, default=64)
    demo.add_argument("--eps", type=float, default=0.01)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--shards", type=int, default=4)
    demo.add_argument("--queries", type=int, default=1000)
    demo.add_argument("--check", type=int, default=50, help="queries verified by brute force")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, TypeError, OSError) as exc:
        print(f"levstream: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
