"""``levstream demo``: stream synthetic keys into parallel shards, merge, query, check against brute force.

The run, in order:

1. warm up the numba kernels (so no timing includes a JIT compile);
2. ``shards`` worker threads pull chunks from one generator of attention-like keys
   (:func:`levstream.synthetic.attention_like_keys`) and feed each chunk, numbered by its position in the
   stream, to their own :class:`~levstream.KeySketch`; on the same chunk they also time the Gram-only floor
   ``G += X.T @ X``;
3. the shard sketches are merged, and ``queries`` new rows are answered by ``heavy_entries``;
4. the keys are generated again, chunk by chunk (never all held), to check the answer: the leverage score
   of every key against the Gram matrix of step 2 gives the offline universal set, and blocked dense NumPy
   over all keys (:class:`levstream._bench.DenseScan`) gives every heavy entry of the first ``check``
   queries, and the dense query time.

BLAS and numba run one thread per worker throughout: the shards are the parallelism, multithreaded BLAS on
tall-skinny products is erratic on small shared machines, and the query comparison is then one core
against one core.
"""

from __future__ import annotations

import argparse
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator

import numba
import numpy as np

from .results import HeavyEntries

#: Rows per generated chunk: one processing block of the sketch at d = 64.
CHUNK_ROWS = 8192

#: Keys whose offline leverage score is this close to eps (relative) may go either way (DESIGN.md §4).
TIE_RTOL = 1e-9


@dataclass
class ShardTimes:
    sketch_s: float = 0.0
    gram_s: float = 0.0


def _validate(args: argparse.Namespace) -> None:
    from .cli import EXIT_UNAVAILABLE, EXIT_USAGE, CliError, _checked_eps

    for flag, value, low in (("--n", args.n, 1), ("--dim", args.dim, 1), ("--shards", args.shards, 1),
                             ("--queries", args.queries, 1), ("--check", args.check, 1)):
        if value < low:
            raise CliError(f"{flag} must be >= {low}; got {value}.", EXIT_USAGE)
    _checked_eps(args.eps)
    if args.p != 2.0:
        raise CliError(f"--p {args.p:g}: the demo's exact check covers p = 2 only in this version.", EXIT_USAGE)
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise CliError("--plot needs matplotlib: pip install matplotlib (or 'levstream[plot]').",
                           EXIT_UNAVAILABLE) from None


def _stream(args: argparse.Namespace) -> Iterator[np.ndarray]:
    from .synthetic import attention_like_keys

    return attention_like_keys(args.n, args.dim, seed=args.seed, chunk_rows=CHUNK_ROWS)


def _build_shards(args: argparse.Namespace, bar: Any) -> tuple[list[Any], np.ndarray, list[ShardTimes]]:
    """Shard sketches built by worker threads pulling from one generator; also the independent Gram."""
    from .sketch import KeySketch

    source = enumerate(_stream(args))
    lock = threading.Lock()

    def work(_: int) -> tuple[Any, np.ndarray, ShardTimes]:
        numba.set_num_threads(1)  # per thread: the shards are the parallelism
        sketch = KeySketch(args.dim, eps=args.eps, p=args.p)
        G = np.zeros((args.dim, args.dim))
        times = ShardTimes()
        while True:
            with lock:
                item = next(source, None)
            if item is None:
                return sketch, G, times
            index, X = item
            t0 = time.perf_counter()
            sketch.update_many(X, offset=index * CHUNK_ROWS)
            t1 = time.perf_counter()
            G += X.T @ X
            t2 = time.perf_counter()
            times.sketch_s += t1 - t0
            times.gram_s += t2 - t1
            bar.update(X.shape[0])

    with ThreadPoolExecutor(max_workers=args.shards) as pool:
        results = list(pool.map(work, range(args.shards)))
    return [r[0] for r in results], sum(r[1] for r in results), [r[2] for r in results]


def _check_pass(args: argparse.Namespace, Q: np.ndarray, G: np.ndarray,
                bar: Any) -> tuple[np.ndarray, np.ndarray, HeavyEntries, float]:
    """One pass over the regenerated keys: leverage scores of every key, heavy entries of ``Q`` by brute force.

    Returns ``(offline universal-set ids, all leverage scores, dense heavy entries, dense seconds)``.
    """
    from ._bench import DenseScan

    w, V = np.linalg.eigh(G)  # pseudo-inverse semantics for rank-deficient keys
    keep = w > w.max() * G.shape[0] * np.finfo(float).eps
    W = V[:, keep] / np.sqrt(w[keep])
    scores = np.empty(args.n)
    scan = DenseScan(Q, args.eps, args.p)
    dense_s = 0.0
    pos = 0
    for X in _stream(args):
        Y = X @ W
        scores[pos:pos + X.shape[0]] = np.einsum("ij,ij->i", Y, Y)
        t0 = time.perf_counter()
        scan.add(X, pos)
        dense_s += time.perf_counter() - t0
        pos += X.shape[0]
        bar.update(X.shape[0])
    t0 = time.perf_counter()
    truth = scan.result()
    dense_s += time.perf_counter() - t0
    return np.flatnonzero(scores >= args.eps), scores, truth, dense_s


def _disagreements(got: HeavyEntries, truth: HeavyEntries, eps: float) -> int:
    """Entries in one answer but not the other, ignoring ties within ``TIE_RTOL`` of eps."""
    g = dict(zip(zip(got.rows().tolist(), got.key_ids.tolist()), got.values.tolist()))
    t = dict(zip(zip(truth.rows().tolist(), truth.key_ids.tolist()), truth.values.tolist()))
    odd = [v for e, v in g.items() if e not in t] + [v for e, v in t.items() if e not in g]
    return sum(abs(v - eps) > TIE_RTOL * eps for v in odd)


def run_demo(args: argparse.Namespace) -> bool:
    """Run the demo and print its table; returns whether the sketch agreed with brute force."""
    from tqdm.auto import tqdm

    from . import __version__
    from ._bench import compare, single_threaded, warm_up
    from .sketch import KeySketch
    from .synthetic import attention_like_queries

    _validate(args)
    print(f"levstream {__version__} demo: {args.n:,} attention-like keys, d={args.dim}, eps={args.eps:g}, "
          f"p={args.p:g}")
    print(f"  {args.shards} shards (threads) fed from one generator; BLAS and numba: 1 thread per shard")
    bar_args = dict(total=args.n, unit=" keys", unit_scale=True, disable=args.quiet, leave=False,
                    dynamic_ncols=True)
    with single_threaded():
        warm_up(args.dim, args.eps, args.p)
        t0 = time.perf_counter()
        with tqdm(desc="streaming keys into shards", **bar_args) as bar:
            shards, G, times = _build_shards(args, bar)
        t_stream = time.perf_counter() - t0
        t0 = time.perf_counter()
        sketch = KeySketch.merge_all(shards)
        U = sketch.universal_set()
        t_merge = time.perf_counter() - t0

        Q = attention_like_queries(args.queries, args.dim, seed=args.seed + 1, key_seed=args.seed)
        t_query = np.inf
        for _ in range(3):
            t0 = time.perf_counter()
            hits = sketch.heavy_entries(Q)
            t_query = min(t_query, time.perf_counter() - t0)

        m_check = min(args.check, args.queries)
        with tqdm(desc="brute-force check (regenerating keys)", **bar_args) as bar:
            offline_ids, scores, truth, dense_s = _check_pass(args, Q[:m_check], G, bar)
    got = HeavyEntries(hits.indptr[:m_check + 1], hits.key_ids[:hits.indptr[m_check]],
                       hits.values[:hits.indptr[m_check]], hits.eps)
    recall, precision, value_err = compare(got, truth)
    bad_entries = _disagreements(got, truth, args.eps)
    near = np.abs(scores - args.eps) <= TIE_RTOL * args.eps
    u_diff = np.setxor1d(U.ids, offline_ids)
    bad_universal = int((~near[u_diff]).sum())
    dense_all = dense_s * args.queries / m_check
    sketch_bytes = len(sketch.to_bytes())
    raw_bytes = args.n * args.dim * 8
    sketch_s = sum(t.sketch_s for t in times)
    gram_s = sum(t.gram_s for t in times)

    from .cli import print_table

    print()
    print_table([
        ("keys streamed n", f"{sketch.n:,}"),
        ("universal set |U|", f"{len(U):<8,} (bound d/eps = {U.size_bound:,.0f})"),
        ("sketch vs raw keys", f"{_size(sketch_bytes)} vs {_size(raw_bytes)}".ljust(22)
                               + f" ({raw_bytes / sketch_bytes:,.0f}x smaller)"),
        ("build vs Gram-only [1]", f"{sketch_s:.2f} s vs {gram_s:.2f} s".ljust(22)
                                   + f" ({sketch_s / gram_s:.2f}x)"),
        ("stream wall time, merge", f"{t_stream:.2f} s, {t_merge * 1e3:.0f} ms"),
        ("query vs dense [2]", f"{_seconds(t_query)} vs {_seconds(dense_all)}".ljust(22)
                               + f" ({dense_all / t_query:,.0f}x faster)"),
        ("recall / precision [3]", f"{recall:.3f} / {precision:.3f}".ljust(22)
                                   + f" ({len(truth):,} heavy entries, value error {value_err:.1e})"),
        ("U vs offline {tau >= eps}", "identical" if bad_universal == 0 else f"{bad_universal} keys differ"),
    ])
    scaled = f", x{args.queries / m_check:g}" if m_check < args.queries else ""
    print(f"\n  [1] time in update_many vs G += X.T @ X on the same chunks, summed over the {args.shards} shards")
    print(f"  [2] {args.queries:,} queries; dense = blocked NumPy over all keys, timed on the {m_check} "
          f"checked queries{scaled}")
    print(f"  [3] {m_check} queries against brute force over all {args.n:,} keys (regenerated, never all held)")
    ok = bad_entries == 0 and bad_universal == 0 and value_err <= 1e-9
    if args.plot is not None:
        from ._plots import demo_figure

        demo_figure(args, scores, len(U), sketch.n, t_query / args.queries, dense_all / args.queries)
        print(f"  wrote {args.plot}")
    if ok:
        print("ok: every heavy entry found, none spurious, the universal set is exact")
    else:
        print("FAILED: the sketch disagrees with brute force")
    return ok


def _seconds(t: float) -> str:
    return f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.2f} s"


def _size(nbytes: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:,.1f} {unit}"
    return f"{nbytes:,.0f} B"
