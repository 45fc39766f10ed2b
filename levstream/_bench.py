"""Quick in-package benchmark behind ``levstream bench`` and the query-time panel of ``levstream demo
--plot``.

Each point streams ``n`` synthetic attention-like keys (:mod:`levstream.synthetic`) and measures, in the
same process and on the same chunks, the sketch build against the Gram-only floor ``G += X.T @ X``, and
``heavy_entries`` against blocked dense NumPy (the oracle :class:`levstream.testing.DenseHeavyScan`:
``Q @ X.T`` per block of keys, power, threshold).  The dense answer is also the reference: every point
reports recall and precision.  BLAS, OpenMP and numba are limited to one thread
(:func:`levstream._threads.capped_threads`): one core against one core, and tall-skinny products are
erratic with more threads on small shared machines.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ._threads import capped_threads
from .results import HeavyEntries
from .testing import DenseHeavyScan


def compare(got: HeavyEntries, truth: HeavyEntries) -> tuple[float, float]:
    """``(recall, precision)`` of the entries ``got`` against ``truth`` (same queries)."""
    g, t = got.as_set(), truth.as_set()
    common = g & t
    return (len(common) / len(t) if t else 1.0), (len(common) / len(g) if g else 1.0)


def warm_up(dim: int, eps: float, p: float) -> None:
    """Compile (or load from cache) every numba kernel the build and query paths use."""
    from .sketch import KeySketch

    rng = np.random.default_rng(0)
    sketch = KeySketch(dim, eps=eps, p=p)
    for _ in range(
        2
    ):  # the second block runs the norm pre-filter, which needs the first block's Gram bound
        sketch.update_many(rng.standard_normal((4 * dim + 64, dim))).flush()
    sketch.heavy_entries(rng.standard_normal((3, dim)))
    sketch.universal_set()


@dataclass(frozen=True)
class BenchPoint:
    n: int
    universal: int
    build_s: float
    gram_s: float
    query_s: float
    dense_s: float
    recall: float
    precision: float


def measure(
    n: int,
    dim: int,
    eps: float,
    p: float,
    n_queries: int,
    seed: int,
    chunk_rows: int = 8192,
    repeat: int = 3,
) -> BenchPoint:
    """Build and query timings at one ``n`` (best of ``repeat``), checked against dense NumPy."""
    from .sketch import KeySketch
    from .synthetic import attention_like_keys, attention_like_queries

    chunks = list(attention_like_keys(n, dim, seed=seed, chunk_rows=chunk_rows))
    Q = attention_like_queries(n_queries, dim, seed=seed + 1, key_seed=seed)
    K = np.concatenate(chunks)
    with capped_threads(1, user_api=None):
        build_s = gram_s = query_s = dense_s = np.inf
        for _ in range(repeat):
            t0 = time.perf_counter()
            sketch = KeySketch(dim, eps=eps, p=p)
            for X in chunks:
                sketch.update_many(X)
            universal = len(sketch.universal_set())
            build_s = min(build_s, time.perf_counter() - t0)
            t0 = time.perf_counter()
            G = np.zeros((dim, dim))
            for X in chunks:
                G += X.T @ X
            gram_s = min(gram_s, time.perf_counter() - t0)
            t0 = time.perf_counter()
            hits = sketch.heavy_entries(Q)
            query_s = min(query_s, time.perf_counter() - t0)
            t0 = time.perf_counter()
            truth = DenseHeavyScan(Q, eps=eps, p=p).add(K).result()
            dense_s = min(dense_s, time.perf_counter() - t0)
    recall, precision = compare(hits, truth)
    return BenchPoint(n, universal, build_s, gram_s, query_s, dense_s, recall, precision)


def run_bench(
    sizes: list[int], dim: int, eps: float, p: float, n_queries: int, seed: int, repeat: int
) -> list[BenchPoint]:
    """Measure every size in ``sizes`` after one warm-up of the numba kernels."""
    with capped_threads(1, user_api=None):
        warm_up(dim, eps, p)
    return [measure(n, dim, eps, p, n_queries, seed, repeat=repeat) for n in sizes]


def format_bench(points: list[BenchPoint]) -> list[str]:
    """The table printed by ``levstream bench``."""
    head = (
        f"{'n':>10}  {'|U|':>6}  {'build s':>8}  {'Gram s':>8}  {'ratio':>6}  "
        f"{'query s':>8}  {'dense s':>8}  {'speed-up':>8}  {'recall':>6}  {'precision':>9}"
    )
    lines = [head, "-" * len(head)]
    for pt in points:
        lines.append(
            f"{pt.n:>10,}  {pt.universal:>6,}  {pt.build_s:>8.3f}  {pt.gram_s:>8.3f}  "
            f"{pt.build_s / pt.gram_s:>6.2f}  {pt.query_s:>8.4f}  {pt.dense_s:>8.3f}  "
            f"{pt.dense_s / pt.query_s:>7.0f}x  {pt.recall:>6.3f}  {pt.precision:>9.3f}"
        )
    return lines
