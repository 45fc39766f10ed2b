"""``levstream demo``: stream synthetic keys into parallel shards, merge, query, check against brute force.

The run, in order:

1. warm up the numba kernels (so no timing includes a JIT compile);
2. one generator of attention-like keys (:func:`levstream.synthetic.attention_like_keys`) deals its
   chunks round-robin to ``shards`` worker threads; each feeds its chunks, numbered by their position in
   the stream, to its own :class:`~levstream.KeySketch` and also times the Gram-only floor
   ``G += X.T @ X`` on the same chunk;
3. the shard sketches are merged, and ``queries`` new rows are answered by ``heavy_entries``;
4. the keys are generated again, chunk by chunk (never all held), to check the answer: the leverage score
   of every key against the Gram matrix of step 2 gives the offline universal set, and blocked dense
   NumPy over all keys (:class:`levstream.testing.DenseHeavyScan`) gives every heavy entry of the first
   ``check`` queries, and the dense query time.

BLAS and numba run one thread per worker throughout: the shards are the parallelism, multithreaded BLAS on
tall-skinny products is erratic on small shared machines, and the query comparison is then one core
against one core.
"""

from __future__ import annotations

import argparse
import queue
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._config import TIE_RTOL
from ._format import format_bytes, print_table
from ._threads import capped_threads, numba_turn
from .results import HeavyEntries

#: Rows per generated chunk (16 MiB at d = 64): measured here, 8192 rows gave a build / Gram-only ratio of
#: 2.0-2.1, 32768 rows 1.75 with the shortest wall time, 65536 rows 1.7 with 90 MB more peak memory.
CHUNK_ROWS = 32768

#: Normaliser accuracy of the coreset used for p != 2: every returned entry has A >= eps (1 - DELTA)^2.
DELTA = 0.1

#: Live steps (update a key, query a query) timed on a copy of the merged sketch, after warm ones.
LIVE_STEPS, LIVE_WARM_STEPS = 200, 20


@dataclass
class ShardTimes:
    sketch_s: float = 0.0
    gram_s: float = 0.0


def _times(ratio: float, better: str, worse: str) -> str:
    """``"1,319x faster"``; a ratio below 1 as its inverse the other way (``"2.5x slower"``), not ``"0x faster"``.

    >>> _times(1319.4, "faster", "slower"), _times(2.46, "faster", "slower"), _times(0.4, "faster", "slower")
    ('1,319x faster', '2.5x faster', '2.5x slower')
    """
    word = better if ratio >= 1 else worse
    r = ratio if ratio >= 1 else 1.0 / ratio
    return f"{r:,.0f}x {word}" if r >= 10 else f"{r:.1f}x {word}"


def _shard_sketch(args: argparse.Namespace, rng: Any) -> Any:
    """A shard sketch; p = 2 is exact, other p use a coreset seeded by ``rng`` with ``delta = DELTA``."""
    from .sketch import KeySketch

    options = {} if args.p == 2.0 else {"delta": DELTA, "rng": rng}
    return KeySketch(args.dim, eps=args.eps, p=args.p, **options)


def _stream(args: argparse.Namespace) -> Iterator[np.ndarray]:
    from .synthetic import attention_like_keys

    return attention_like_keys(args.n, args.dim, seed=args.seed, chunk_rows=CHUNK_ROWS)


def _build_shards(
    args: argparse.Namespace, bar: Any
) -> tuple[list[Any], np.ndarray, list[ShardTimes]]:
    """Shard sketches fed by worker threads (chunk ``k`` of one generator goes to shard ``k % shards``).

    Each worker also accumulates the Gram matrix of its chunks (the Gram-only baseline, and an independent
    Gram matrix for the check); their sum is returned with the sketches and the per-shard CPU times.
    """

    seeds = np.random.SeedSequence(args.seed).spawn(
        args.shards
    )  # per-shard sampling seeds (p != 2)
    queues: list[queue.Queue] = [queue.Queue(maxsize=2) for _ in range(args.shards)]

    def work(shard: int) -> tuple[Any, np.ndarray, ShardTimes]:
        sketch = _shard_sketch(args, np.random.default_rng(seeds[shard]))
        G = np.zeros((args.dim, args.dim))
        times = ShardTimes()
        with capped_threads(1):  # numba's limit is per thread: the shards are the parallelism
            while (item := queues[shard].get()) is not None:
                index, X = item
                # threads take turns only under numba's non-thread-safe workqueue layer; CPU time of
                # this thread: waits for the GIL or a core are not counted
                with numba_turn():
                    t0 = time.thread_time()
                    sketch.update_many(X, offset=index * CHUNK_ROWS)
                    t1 = time.thread_time()
                G += X.T @ X
                t2 = time.thread_time()
                times.sketch_s += t1 - t0
                times.gram_s += t2 - t1
                bar.update(X.shape[0])
        return sketch, G, times

    with ThreadPoolExecutor(max_workers=args.shards) as pool:
        workers = [pool.submit(work, shard) for shard in range(args.shards)]
        for index, X in enumerate(_stream(args)):
            _put(queues[index % args.shards], (index, X), workers[index % args.shards])
        for shard in range(args.shards):
            _put(queues[shard], None, workers[shard])
        results = [w.result() for w in workers]
    G_total = np.sum([r[1] for r in results], axis=0)  # the Gram matrix of all shards
    return [r[0] for r in results], G_total, [r[2] for r in results]


def _put(q: queue.Queue, item: Any, worker: Future) -> None:
    """``q.put(item)``, re-raising the worker's error instead of waiting forever if it has died."""
    while True:
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            if worker.done():
                worker.result()


class _LiveDense:
    """The dense side of a live step: the last live query's weights ``|<q, k>|^p`` over every key.

    Fed each regenerated chunk by the check pass (the demo never holds all keys), then the live
    keys; the timed per-chunk products plus the final sum and threshold are one dense step over all
    keys.
    """

    def __init__(self, q: np.ndarray, n_keys: int, p: float) -> None:
        self.q, self.p = q, p
        self.weights = np.empty(n_keys)
        self.pos, self.seconds = 0, 0.0

    def add(self, X: np.ndarray) -> None:
        t0 = time.perf_counter()
        w = self.weights[self.pos : self.pos + X.shape[0]]
        np.dot(X, self.q, out=w)
        if self.p == 2.0:
            np.multiply(w, w, out=w)
        else:
            np.power(np.abs(w, out=w), self.p, out=w)
        self.seconds += time.perf_counter() - t0
        self.pos += X.shape[0]

    def check(self, live_keys: np.ndarray, got: HeavyEntries, eps: float) -> bool:
        """Finish the dense step (live keys, sum, threshold); whether ``got`` agrees with it."""
        self.add(live_keys)
        t0 = time.perf_counter()
        Z = self.weights.sum()
        heavy = np.flatnonzero(self.weights >= eps * Z)
        self.seconds += time.perf_counter() - t0
        A = self.weights / Z
        must = set(heavy[A[heavy] >= eps * (1.0 + TIE_RTOL)].tolist())
        floor = eps * (1.0 - TIE_RTOL) * (1.0 if self.p == 2.0 else (1.0 - DELTA) ** 2)
        returned = got.key_ids
        if not must <= set(returned.tolist()) or bool((A[returned] < floor).any()):
            return False
        values_ok = np.all(np.abs(got.values - A[returned]) <= 1e-9 * A[returned])
        return self.p != 2.0 or bool(values_ok)


def _live_steps(
    args: argparse.Namespace, sketch: Any
) -> tuple[float, np.ndarray, HeavyEntries, _LiveDense]:
    """Live steps on a copy of ``sketch``: ``update(k)`` of a new key, ``heavy_entries`` of a query.

    Returns the mean seconds per timed step, the new keys, the last answer and its dense side.
    """
    from .synthetic import attention_like_keys, attention_like_queries

    steps = LIVE_WARM_STEPS + LIVE_STEPS
    keys = next(attention_like_keys(steps, args.dim, seed=args.seed + 2, chunk_rows=steps))
    queries = attention_like_queries(steps, args.dim, seed=args.seed + 3, key_seed=args.seed)
    live = sketch.copy()
    for t in range(LIVE_WARM_STEPS):
        live.update(keys[t])
        live.heavy_entries(queries[t][None])
    t0 = time.perf_counter()
    for t in range(LIVE_WARM_STEPS, steps):
        live.update(keys[t])
        last = live.heavy_entries(queries[t][None])
    seconds = (time.perf_counter() - t0) / LIVE_STEPS
    return seconds, keys, last, _LiveDense(queries[-1], sketch.n + steps, args.p)


def _check_pass(
    args: argparse.Namespace, Q: np.ndarray, G: np.ndarray, bar: Any, live: _LiveDense | None = None
) -> tuple[np.ndarray | None, HeavyEntries, np.ndarray, float]:
    """One pass over the regenerated keys: leverage scores of every key (p = 2), brute-force heavy entries.

    Returns ``(leverage scores of all keys or None, dense heavy entries of Q, dense normalisers Z of Q,
    dense seconds)``.  The scores use the Gram matrix accumulated independently while streaming.
    """
    from ._linalg import rank_tolerance
    from .testing import DenseHeavyScan

    scores = None
    if args.p == 2.0:
        w, V = np.linalg.eigh(G)  # pseudo-inverse semantics for rank-deficient keys
        keep = w > rank_tolerance(w.max(), *G.shape)
        W = V[:, keep] / np.sqrt(w[keep])
        scores = np.empty(args.n)
    scan = DenseHeavyScan(Q, eps=args.eps, p=args.p)
    dense_s = 0.0
    pos = 0
    for X in _stream(args):
        if scores is not None:
            Y = X @ W
            scores[pos : pos + X.shape[0]] = np.einsum("ij,ij->i", Y, Y)
        if live is not None:
            live.add(X)
        t0 = time.perf_counter()
        scan.add(X)
        dense_s += time.perf_counter() - t0
        pos += X.shape[0]
        bar.update(X.shape[0])
    t0 = time.perf_counter()
    truth = scan.result()
    dense_s += time.perf_counter() - t0
    return scores, truth, scan.normalizer, dense_s


@dataclass
class Verdict:
    recall: float
    precision: float
    missed: int
    spurious: int
    value_error: float


def _verify(
    got: HeavyEntries,
    truth: HeavyEntries,
    Z: np.ndarray,
    Q: np.ndarray,
    U: Any,
    eps: float,
    p: float,
) -> Verdict:
    """Compare the sketch's entries with brute force.

    The true value of every returned entry is recomputed from its key row (held in ``U``) and the exact
    dense normaliser ``Z``.  p = 2 is exact: entries within ``TIE_RTOL`` of eps may go either way.  Other p
    (coreset normaliser): a returned entry is spurious only below ``eps (1 - DELTA)^2``, as guaranteed.
    """
    got_rows = got.rows()
    keys = U.keys[np.searchsorted(U.ids, got.key_ids)]
    true = np.abs(np.einsum("ij,ij->i", Q[got_rows], keys)) ** p / Z[got_rows]
    floor = eps * (1.0 - TIE_RTOL) if p == 2.0 else eps * (1.0 - DELTA) ** 2
    found = set(zip(got_rows.tolist(), got.key_ids.tolist()))
    t_rows = truth.rows()
    in_got = np.array(
        [e in found for e in zip(t_rows.tolist(), truth.key_ids.tolist())], dtype=bool
    )
    missed = int((~in_got & (truth.values >= eps * (1.0 + TIE_RTOL))).sum())
    return Verdict(
        recall=float(in_got.mean()) if len(truth) else 1.0,
        precision=float((true >= eps).mean()) if len(got) else 1.0,
        missed=missed,
        spurious=int((true < floor).sum()),
        value_error=float(np.max(np.abs(got.values - true) / true)) if len(got) else 0.0,
    )


def run_demo(args: argparse.Namespace) -> bool:
    """Run the demo and print its table; returns whether the sketch agreed with brute force.

    ``args`` are the parsed ``levstream demo`` flags, already validated by the command line.
    """
    from tqdm.auto import tqdm

    from . import __version__
    from ._bench import warm_up
    from .sketch import KeySketch
    from .synthetic import attention_like_queries

    print(
        f"levstream {__version__} demo: {args.n:,} attention-like keys, d={args.dim}, eps={args.eps:g}, "
        f"p={args.p:g}"
    )
    print(
        f"  {args.shards} shards (threads) fed from one generator; BLAS and numba: 1 thread per shard"
    )
    bar_args = {
        "total": args.n,
        "unit": " keys",
        "unit_scale": True,
        "disable": args.quiet,
        "leave": False,
        "dynamic_ncols": True,
    }
    with capped_threads(1, user_api=None):
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
        t_live, live_keys, live_hits, live_dense = _live_steps(args, sketch)

        m_check = min(args.check, args.queries)
        with tqdm(desc="brute-force check (regenerating keys)", **bar_args) as bar:
            scores, truth, Z, dense_s = _check_pass(args, Q[:m_check], G, bar, live_dense)
        live_ok = live_dense.check(live_keys, live_hits, args.eps)
    end = hits.indptr[m_check]
    got = HeavyEntries(hits.indptr[: m_check + 1], hits.key_ids[:end], hits.values[:end], hits.eps)
    verdict = _verify(got, truth, Z, Q[:m_check], U, args.eps, args.p)
    if scores is not None:  # p = 2: the universal set must be the offline {tau >= eps}, up to ties
        differ = np.setxor1d(U.ids, np.flatnonzero(scores >= args.eps))
        bad_universal = int((np.abs(scores[differ] - args.eps) > TIE_RTOL * args.eps).sum())
        universal_line = "identical" if bad_universal == 0 else f"{bad_universal} keys differ"
    else:
        bad_universal, universal_line = 0, "n/a (exact for p = 2; here checked through the entries)"
    dense_all = dense_s * args.queries / m_check
    sketch_bytes = len(sketch.to_bytes())
    raw_bytes = args.n * args.dim * 8
    sketch_s = sum(t.sketch_s for t in times)
    gram_s = sum(t.gram_s for t in times)
    bound = "d/eps" if args.p <= 2 else "d^(p/2)/eps"

    print()
    print_table(
        [
            ("keys streamed n", f"{sketch.n:,}"),
            ("universal set |U|", f"{len(U):<8,} (bound {bound} = {U.size_bound:,.0f})"),
            (
                "sketch vs raw keys",
                f"{format_bytes(sketch_bytes)} vs {format_bytes(raw_bytes)}".ljust(22)
                + f" ({_times(raw_bytes / sketch_bytes, 'smaller', 'larger')})",
            ),
            (
                "build vs Gram-only [1]",
                f"{_seconds(sketch_s)} vs {_seconds(gram_s)}".ljust(22)
                + f" ({sketch_s / gram_s:.2f}x)",
            ),
            ("stream wall time, merge", f"{t_stream:.2f} s, {t_merge * 1e3:.0f} ms"),
            (
                "query vs dense [2]",
                f"{_seconds(t_query)} vs {_seconds(dense_all)}".ljust(22)
                + f" ({_times(dense_all / t_query, 'faster', 'slower')})",
            ),
            (
                "live step vs dense",
                f"{t_live * 1e6:.1f} us vs {_seconds(live_dense.seconds)}".ljust(22)
                + f" ({_times(live_dense.seconds / t_live, 'faster', 'slower')}; update+query)",
            ),
            (
                "recall / precision [3]",
                f"{verdict.recall:.3f} / {verdict.precision:.3f}".ljust(22)
                + f" ({len(truth):,} heavy entries, value error {verdict.value_error:.1e})",
            ),
            ("U vs offline {tau >= eps}", universal_line),
        ]
    )
    scaled = f", x{args.queries / m_check:g}" if m_check < args.queries else ""
    print(
        f"\n  [1] CPU time in update_many vs in G += X.T @ X on the same chunks, summed over the "
        f"{args.shards} shards"
    )
    print(
        f"  [2] {args.queries:,} queries; dense = blocked NumPy over all keys, timed on the {m_check} "
        f"checked queries{scaled}"
    )
    print(
        f"  [3] {m_check} queries against brute force over all {args.n:,} keys (regenerated, never all held)"
    )
    if args.p == 2.0:
        ok = (
            verdict.missed == 0
            and verdict.spurious == 0
            and bad_universal == 0
            and verdict.value_error <= 1e-9
        )
    else:
        print(
            f"  p = {args.p:g} uses a coreset normaliser (delta = {DELTA}): every entry >= eps is returned "
            f"with high probability, every returned entry is >= eps (1 - delta)^2"
        )
        ok = verdict.missed == 0 and verdict.spurious == 0
    if args.plot is not None:
        from ._plots import demo_figure

        if scores is not None:
            shown, what = scores, f"Leverage scores of all {sketch.n:,} keys"
        else:
            shown, what = U.scores, f"Sensitivity bounds of the {len(U):,} keys of U"
        demo_figure(
            args, shown, what, len(U), sketch.n, t_query / args.queries, dense_all / args.queries
        )
        print(f"  wrote {args.plot}")
    if not ok:
        print(
            f"FAILED: the sketch disagrees with brute force ({verdict.missed} heavy entries missed, "
            f"{verdict.spurious} spurious, {bad_universal} universal-set keys differ)"
        )
    elif not live_ok:
        print("FAILED: the live step's heavy entries differ from brute force over every key fed")
    elif args.p == 2.0:
        print("ok: every heavy entry found, none spurious, the universal set is exact")
    else:
        print("ok: every heavy entry found, every returned entry within the guarantee")
    return ok and live_ok


def _seconds(t: float) -> str:
    return f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.2f} s"
