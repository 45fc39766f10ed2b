"""Live streams (issue 11) and values with decoding (issue 12): per-step cost against dense NumPy.

Figures (d = 64, eps = 0.01, dv = 64, p = 2):

* ``live``: one step = ``sk.update(k)`` + ``sk.heavy_entries(q[None])``, against dense NumPy over
  the prefix, at several n; the per-step cost at the largest n over the smallest (flat in n);
* ``filtered``: a filtered stream at the middle live size: each step is ``sk.update_many`` of a chunk
  of 0 to 3 rows (two steps in five empty, a filter that kept nothing) + ``sk.heavy_entries(q[None])``,
  against dense NumPy over the prefix;
* ``forms``: the live step at the middle live size with its inputs in the forms users have them (a
  (1, d) chunk, columns of a (d, T) array, float32 rows and queries; with values, ``update(k, v)`` +
  ``attend(q[None])`` and the decode step ``prefill``) over the canonical step;
* ``heads``: a 12-head step (``MultiHeadKeySketch.update_many`` of (12, 1, d) + ``heavy_entries`` of
  (12, 1, d); also with ``update`` of (12, d), and with tokens and queries as slices ``X[:, t:t+1]``
  of (12, T, d) arrays) over a single-head step at the same n;
* ``bulk``: ``update_many`` of 8192-row chunks with one query after each chunk, over Gram-only
  (``G += X.T @ X``) on the same chunks;
* ``decode``: a decode step with values (``sk.prefill`` of one row: exact output and heavy entries)
  against dense p = 2 attention with values over the prefix;
* ``short``: decode steps with values at short contexts (a prompt of 100 to 1000 tokens, then steps), one head
  and 32 heads (``MultiHeadKeySketch.prefill`` of (H, 1, d)), against dense NumPy over the prefix (the heads
  batched in one ``matmul``);
* ``prefill``: causal prefill in 4096-row chunks against dense causal attention (blocked);
* ``gemm``: bulk ``update_many`` with values and exact outputs over the GEMM ``phi(K)^T V`` of the
  same flop count;
* ``rss``: peak RSS (VmHWM) streaming many vs few keys with values, a fresh process each.

Every figure is measured side by side in one process: the rounds of a figure alternate between the
sketch and its baseline (and, for ``live`` and ``decode``, between the sizes), and a figure is
reported as the median and the range over the rounds, never the best round.  The sketch runs with
the default threads.  The dense baselines are timed with the default BLAS threads *and* with one
BLAS thread, and the faster of the two is the baseline of the ratio: on a loaded 2-core machine a
multithreaded OpenBLAS GEMV of 10^4 x 64 waits milliseconds for its threads (one thread: ~0.1 ms),
and a ratio against that would flatter the sketch.

Every answer is checked against brute force in plain NumPy written here (independent of levstream):
every live and decode step (at least 1000 per size in the full run), the query after each chunk of
the bulk build, every prefill row, the outputs after the bulk build with values and after the
streams of the RSS runs.  Entries must be identical (entries within 1e-9 relative of eps may go
either way: the documented tie rule), values within rtol 1e-9, exact outputs within rtol 1e-10 of
the row's largest dense output. The dense baselines' own answers are checked too.  The script exits
with status 1 on any difference.

    python benchmarks/bench_live.py                     # full sizes (several minutes)
    python benchmarks/bench_live.py --quick             # small sizes, seconds (the smoke test)
    python benchmarks/bench_live.py --only live,heads --out live.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

import levstream as ls
from levstream._threads import describe_threads
from levstream.summaries.lifted import lift
from levstream.synthetic import attention_like_keys, attention_like_queries

#: The documented tie rule: an entry whose dense value is within this relative distance of eps may
#: go either way (docs/theory.md, "The guarantee").
TIE_RTOL = 1e-9
#: Heavy-entry values (and heavy outputs, captured mass) against the dense ones.
VALUE_RTOL = 1e-9
#: Exact outputs against dense attention, relative to the largest |output| of the row (issue 12).
OUTPUT_RTOL = 1e-10
#: The brute force keeps every (query, key) whose weight reaches eps times the normaliser summed so
#: far, lowered by this factor for rounding: the final normaliser is larger, so this is a superset.
CANDIDATE_SLACK = 1e-6

SECTIONS = ("live", "filtered", "forms", "heads", "bulk", "decode", "short", "prefill", "gemm", "rss")


@dataclass(frozen=True)
class Sizes:
    live_n: tuple[int, ...]
    heads_n: int
    n_heads: int
    bulk_n: int
    decode_n: tuple[int, ...]
    short_n: tuple[int, ...]  # prompt lengths of the short-context decode steps
    short_heads: tuple[int, ...]
    short_steps_per_round: int
    prefill_n: int
    prefill_chunk: int
    gemm_n: int
    rss_n: tuple[int, int]
    warm_steps: int  # untimed (but checked) steps before the timed rounds
    rounds: int
    steps_per_round: int
    heads_steps_per_round: int
    dense_budget_s: float  # dense steps of a round stop after this long (at least 10 steps)
    prefill_rounds: int
    rss_fixed_mmap: bool  # also measure the RSS with glibc's mmap threshold fixed


FULL = Sizes(live_n=(10_000, 100_000, 1_000_000), heads_n=100_000, n_heads=12, bulk_n=2_000_000,
             decode_n=(10_000, 100_000, 1_000_000), short_n=(100, 500, 1000), short_heads=(1, 32),
             short_steps_per_round=40, prefill_n=100_000, prefill_chunk=4096,
             gemm_n=262_144, rss_n=(10_000, 1_000_000), warm_steps=100, rounds=5,
             steps_per_round=400, heads_steps_per_round=400, dense_budget_s=0.4, prefill_rounds=3,
             rss_fixed_mmap=True)
QUICK = Sizes(live_n=(1_000, 10_000), heads_n=5_000, n_heads=12, bulk_n=131_072,
              decode_n=(1_000, 10_000), short_n=(100, 300), short_heads=(1, 4), short_steps_per_round=10,
              prefill_n=2048, prefill_chunk=512, gemm_n=16_384,
              rss_n=(10_000, 20_000), warm_steps=40, rounds=3, steps_per_round=320,
              heads_steps_per_round=100, dense_budget_s=0.05, prefill_rounds=3,
              rss_fixed_mmap=False)

#: The settings every dense baseline is timed with: default BLAS threads, one BLAS thread.
DENSE_THREADS: tuple[tuple[str, int | None], ...] = (("default", None), ("1", 1))


# ---------------------------------------------------------------------- bookkeeping
def load() -> list[float]:
    """``uptime``'s load averages (1, 5, 15 min)."""
    return [round(x, 2) for x in os.getloadavg()]


def spread(xs: list[float]) -> dict:
    """Median and range over the rounds (what is reported), and every round."""
    a = np.asarray(xs, dtype=float)
    return {"median": float(np.median(a)), "min": float(a.min()), "max": float(a.max()),
            "rounds": [float(x) for x in a]}


def fmt(s: dict, scale: float = 1.0, digits: int = 1) -> str:
    """``median (min-max)``."""
    f = f"{{:.{digits}f}}"
    lo, hi = f.format(s["min"] * scale), f.format(s["max"] * scale)
    return f"{f.format(s['median'] * scale)} ({lo}-{hi})"


@dataclass
class Failures:
    messages: list[str] = field(default_factory=list)

    def add(self, what: str, check: dict) -> None:
        if not check["ok"]:
            self.messages.append(f"{what}: {check}")
            print(f"CHECK FAILED {what}: {check}", flush=True)


def section_env(fn: Callable[..., dict]) -> Callable[..., dict]:
    """Record the load and the thread settings around a section, and its wall time."""
    def run(*args: Any, **kwargs: Any) -> dict:
        before, t0 = load(), time.perf_counter()
        out = fn(*args, **kwargs)
        out["env"] = {"load_start": before, "load_end": load(), "threads": describe_threads(),
                      "wall_s": round(time.perf_counter() - t0, 1)}
        return out
    return run


def limited(setting: int | None) -> Any:
    """BLAS limited to ``setting`` threads (None: the default)."""
    return threadpool_limits(limits=setting, user_api="blas")


# ---------------------------------------------------------------------- brute force (plain NumPy)
@dataclass
class Reference:
    """Dense answers of T queries: heavy candidates (CSR by query), normalisers, numerators."""

    indptr: np.ndarray
    ids: np.ndarray
    weights: np.ndarray  # <q, k>^2 of every candidate
    Z: np.ndarray
    numerator: np.ndarray | None  # sum_j <q, k_j>^2 v_j

    def row(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """``(key ids, A)`` of the candidates of query ``t``."""
        s, e = self.indptr[t], self.indptr[t + 1]
        return self.ids[s:e], self.weights[s:e] / self.Z[t]


def brute_force(Q: np.ndarray, K: np.ndarray, ends: np.ndarray, eps: float,
                V: np.ndarray | None = None, key_block: int = 16384,
                query_block: int = 512) -> Reference:
    """Query ``t`` sees the keys ``K[:ends[t]]`` (``ends`` non-decreasing): its entries near or
    above ``eps``, its normaliser and (with ``V``) its output numerator.

    One pass over the keys in blocks: a (query, key) pair is kept when its weight reaches ``eps``
    times the normaliser summed so far, which only grows, so every entry ``A >= eps`` is kept; the
    comparison applies the final threshold.
    """
    T = Q.shape[0]
    ends = np.asarray(ends, dtype=np.int64)
    n = int(ends.max()) if T else 0
    Z = np.zeros(T)
    num = None if V is None else np.zeros((T, V.shape[1]))
    rows, cols, ws = [], [], []
    for a in range(0, n, key_block):
        b = min(a + key_block, n)
        first = int(np.searchsorted(ends, a, side="right"))  # the first query that sees key a
        for qa in range(first, T, query_block):
            qb = min(qa + query_block, T)
            W = Q[qa:qb] @ K[a:b].T
            W *= W
            if ends[qa] < b:  # key j is visible to query t iff j < ends[t]
                W[np.arange(a, b)[None, :] >= ends[qa:qb, None]] = 0.0
            Z[qa:qb] += W.sum(axis=1)
            if num is not None:
                num[qa:qb] += W @ V[a:b]
            r, c = np.nonzero(W >= (eps * (1.0 - CANDIDATE_SLACK)) * Z[qa:qb, None])
            rows.append(r + qa)
            cols.append(c + a)
            ws.append(W[r, c])
    r = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    c = np.concatenate(cols) if cols else np.zeros(0, np.int64)
    w = np.concatenate(ws) if ws else np.zeros(0)
    order = np.lexsort((c, r))
    indptr = np.zeros(T + 1, dtype=np.int64)
    np.cumsum(np.bincount(r, minlength=T), out=indptr[1:])
    return Reference(indptr, c[order], w[order], Z, num)


def compare_rows(got: list[tuple[np.ndarray, np.ndarray]], ref: Reference, eps: float,
                 rows: np.ndarray | None = None) -> dict:
    """Entries of answered rows against the dense reference.

    ``got[i]`` is ``(key_ids, values)`` of reference row ``rows[i]`` (default ``i``).  Every entry
    with a dense value ``>= eps (1 + TIE_RTOL)`` must be returned, every returned entry must have a
    dense value ``>= eps (1 - TIE_RTOL)`` ("ties" counts those returned below ``eps (1 + TIE_RTOL)``
    or not returned above ``eps (1 - TIE_RTOL)``), and the values must agree to ``VALUE_RTOL``.
    """
    rows = np.arange(len(got)) if rows is None else rows
    missed = spurious = ties = entries = 0
    worst = 0.0
    for (g_ids, g_vals), t in zip(got, rows):
        r_ids, r_vals = ref.row(int(t))
        must = set(r_ids[r_vals >= eps * (1.0 + TIE_RTOL)].tolist())
        near = r_vals >= eps * (1.0 - TIE_RTOL)
        allowed = dict(zip(r_ids[near].tolist(), r_vals[near].tolist()))
        g = g_ids.tolist()
        gs = set(g)
        entries += len(must)
        missed += len(must - gs)
        spurious += len(gs - allowed.keys())
        ties += len(gs ^ must) - len(must - gs) - len(gs - allowed.keys())
        for key, val in zip(g, g_vals.tolist()):
            if key in allowed:
                worst = max(worst, abs(val - allowed[key]) / allowed[key])
    ok = missed == 0 and spurious == 0 and worst <= VALUE_RTOL
    return {"ok": bool(ok), "rows": len(rows), "entries": entries, "missed": missed,
            "spurious": spurious, "ties": ties, "max_value_rel_err": float(worst)}


def compare_outputs(out: np.ndarray, ref: Reference, rows: np.ndarray | None = None) -> dict:
    """Exact outputs ``sum_j A_j v_j`` against the dense ones, relative to each row's largest
    |output|."""
    rows = np.arange(out.shape[0]) if rows is None else rows
    assert ref.numerator is not None
    want = ref.numerator[rows] / ref.Z[rows, None]
    err = np.abs(out - want).max(axis=1) / np.abs(want).max(axis=1)
    worst = float(err.max()) if err.size else 0.0
    return {"ok": bool(worst <= OUTPUT_RTOL), "rows": len(rows), "max_output_rel_err": worst}


def compare_heavy_outputs(results: list, ref: Reference, V: np.ndarray, eps: float) -> dict:
    """``heavy_output`` and ``captured_mass`` of one-query results against the dense heavy entries
    (rows whose entries differ by a tie are skipped: their sums differ legitimately)."""
    worst = 0.0
    for t, res in enumerate(results):
        ids, A = ref.row(t)
        keep = A >= eps
        if not np.array_equal(np.sort(res.entries.key_ids), ids[keep]):
            continue
        want_out, want_mass = A[keep] @ V[ids[keep]], A[keep].sum()
        scale = max(np.abs(want_out).max(initial=0.0), 1e-300)
        err_out = np.abs(res.heavy_output[0] - want_out).max(initial=0.0) / scale
        err_mass = abs(float(res.captured_mass[0]) - want_mass) / max(want_mass, 1e-300)
        worst = max(worst, float(err_out), err_mass)
    return {"ok": bool(worst <= VALUE_RTOL), "max_heavy_output_rel_err": worst}


def merge_checks(*checks: dict, same_rows: bool = True) -> dict:
    """One verdict from several checks: of the same rows (rounds; entries and outputs: counts are
    the largest of any check) or of different rows (heads, sizes: counts add up)."""
    out: dict[str, Any] = {"ok": all(c["ok"] for c in checks)}
    for c in checks:
        for key, val in c.items():
            if key == "ok":
                continue
            if key.startswith("max_") or same_rows:
                out[key] = max(out.get(key, 0), val)
            else:
                out[key] = out.get(key, 0) + val
    return out


def entries_of(he: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(key_ids, values)`` of a one-query ``HeavyEntries``."""
    return he.key_ids, he.values


# ---------------------------------------------------------------------- data, warm-up
def keys(n: int, d: int, seed: int) -> np.ndarray:
    return np.concatenate(list(attention_like_keys(n, d, chunk_rows=65536, seed=seed)))


def values(n: int, dv: int, seed: int) -> np.ndarray:
    return np.random.default_rng([seed, 0x7A1]).standard_normal((n, dv))


def warm_up(d: int, eps: float, dv: int, n_heads: int) -> None:
    """Compile (or load) every kernel the timed paths use: ingest, live queries, heads, values,
    prefill."""
    rng = np.random.default_rng(0)
    m = 2 * 8192 + 7  # flushes of the default block (8192 rows at d = 64)
    K, V, Q = rng.standard_normal((m, d)), rng.standard_normal((m, dv)), rng.standard_normal((8, d))
    sk = ls.KeySketch(d, eps=eps).update_many(K[: m // 2])
    for i in range(m // 2, m):
        sk.update(K[i])
        sk.heavy_entries(Q[i % 8][None])
    sk.heavy_entries(Q)
    sv = ls.KeySketch(d, eps=eps, value_dim=dv, exact_output=True).update_many(K[:300], V[:300])
    for i in range(300, 600):
        sv.prefill(K[i][None], V[i][None], Q[i % 8][None])
    sv.prefill(K[:300], V[:300], K[:300])
    sv.attend(Q)
    mh = ls.MultiHeadKeySketch(n_heads, d, eps=eps)
    mh.update_many(rng.standard_normal((n_heads, m // 2, d)))
    for _ in range(300):
        mh.update(rng.standard_normal((n_heads, d)))
        mh.heavy_entries(rng.standard_normal((n_heads, 1, d)))


# ---------------------------------------------------------------------- dense steps
def dense_step(K: np.ndarray, m: int, x: np.ndarray, q: np.ndarray, eps: float, buf: np.ndarray,
               mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Append key ``x`` as row ``m`` of the preallocated ``K``, then every ``A >= eps`` of ``q``
    over ``K[:m+1]`` (scores into the preallocated ``buf``: no per-step allocation of n floats)."""
    return dense_chunk_step(K, m, x[None], q, eps, buf, mask)


def dense_chunk_step(K: np.ndarray, m: int, X: np.ndarray, q: np.ndarray, eps: float,
                     buf: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`dense_step` of a chunk: the rows ``X`` (possibly none) arrive as rows ``m..`` of ``K``,
    then every ``A >= eps`` of ``q`` over every key so far."""
    end = m + X.shape[0]
    K[m:end] = X
    s = buf[:end]
    np.dot(K[:end], q, out=s)
    np.multiply(s, s, out=s)
    Z = s.sum()
    np.greater_equal(s, eps * Z, out=mask[:end])
    idx = np.flatnonzero(mask[:end])
    return idx, s[idx] / Z


def dense_step_values(K: np.ndarray, V: np.ndarray, m: int, x: np.ndarray, v: np.ndarray,
                      q: np.ndarray, eps: float, buf: np.ndarray,
                      mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`dense_step` with values: also the exact output ``sum_j A_j v_j`` over ``K[:m+1]``."""
    V[m] = v
    idx, vals = dense_step(K, m, x, q, eps, buf, mask)
    s = buf[: m + 1]
    return idx, vals, (s @ V[: m + 1]) / s.sum()


@dataclass
class Stream:
    """One prefilled sketch at size ``n`` and its dense twin (every key in a preallocated array)."""

    n: int
    K: np.ndarray  # the n prefilled keys, then the keys of the steps
    V: np.ndarray | None
    sketch: Any
    answers: list
    buf: np.ndarray
    mask: np.ndarray
    sketch_s: list = field(default_factory=list)
    dense_s: dict = field(default_factory=lambda: {name: [] for name, _ in DENSE_THREADS})
    dense: list = field(default_factory=list)  # (step, dense answer)


def interleaved_steps(sz: Sizes, streams: list[Stream], sketch_step: Callable[[Stream, int], Any],
                      dense_step_at: Callable[[Stream, int], Any]) -> None:
    """Warm steps, then ``sz.rounds`` rounds; in each round every stream (in alternating order)
    runs its ``sz.steps_per_round`` sketch steps, then dense steps at the same positions with each
    BLAS setting (alternating order; each stops after ``sz.dense_budget_s``, at least 10 steps)."""
    for st in streams:
        for t in range(sz.warm_steps):
            st.answers[t] = sketch_step(st, t)
    for r in range(sz.rounds):
        lo = sz.warm_steps + r * sz.steps_per_round
        hi = lo + sz.steps_per_round
        for st in (streams if r % 2 == 0 else streams[::-1]):
            t0 = time.perf_counter()
            for t in range(lo, hi):
                st.answers[t] = sketch_step(st, t)
            st.sketch_s.append((time.perf_counter() - t0) / sz.steps_per_round)
            for name, setting in (DENSE_THREADS if r % 2 == 0 else DENSE_THREADS[::-1]):
                with limited(setting):
                    done = []
                    t0 = time.perf_counter()
                    for t in range(lo, hi):
                        done.append((t, dense_step_at(st, t)))
                        if len(done) >= 10 and time.perf_counter() - t0 > sz.dense_budget_s:
                            break
                    st.dense_s[name].append((time.perf_counter() - t0) / len(done))
                st.dense.extend(done)


def step_figures(st: Stream) -> dict:
    """Per-step times and speed-ups of one stream (the baseline: the faster dense setting of each
    round)."""
    best = [min(a, b) for a, b in zip(st.dense_s["default"], st.dense_s["1"])]
    return {"sketch_step_s": spread(st.sketch_s),
            "dense_step_s": {name: spread(v) for name, v in st.dense_s.items()},
            "dense_steps_timed_per_round": len(st.dense) // (2 * len(st.sketch_s)),
            "speedup": spread([b / s for b, s in zip(best, st.sketch_s)]),
            "speedup_vs_dense_default_threads": spread(
                [b / s for b, s in zip(st.dense_s["default"], st.sketch_s)])}


# ---------------------------------------------------------------------- live steps
@section_env
def bench_live(sz: Sizes, d: int, eps: float, failures: Failures) -> dict:
    """Interleaved ``update`` + ``heavy_entries`` steps at every n of ``sz.live_n``."""
    T = sz.warm_steps + sz.rounds * sz.steps_per_round
    Q = attention_like_queries(T, d, seed=1, key_seed=0)
    streams = []
    for n in sz.live_n:
        K = keys(n + T, d, seed=0)
        sk = ls.KeySketch(d, eps=eps)
        for a in range(0, n, 65536):
            sk.update_many(K[a:min(n, a + 65536)])
        streams.append(Stream(n, K, None, sk, [None] * T, np.empty(n + T),
                              np.empty(n + T, dtype=bool)))

    def sketch_step(st: Stream, t: int) -> Any:
        st.sketch.update(st.K[st.n + t])
        return st.sketch.heavy_entries(Q[t][None])

    def dense_at(st: Stream, t: int) -> Any:
        return dense_step(st.K, st.n + t, st.K[st.n + t], Q[t], eps, st.buf, st.mask)

    interleaved_steps(sz, streams, sketch_step, dense_at)
    out: dict[str, Any] = {"n": list(sz.live_n), "steps_checked": T,
                           "timed_steps": sz.rounds * sz.steps_per_round, "per_n": {}}
    for st in streams:
        ref = brute_force(Q, st.K, st.n + 1 + np.arange(T), eps)
        check = compare_rows([entries_of(a) for a in st.answers], ref, eps)
        failures.add(f"live n={st.n} sketch", check)
        steps = np.array([t for t, _ in st.dense])
        dcheck = compare_rows([a for _, a in st.dense], ref, eps, rows=steps)
        failures.add(f"live n={st.n} dense baseline", dcheck)
        out["per_n"][str(st.n)] = {**step_figures(st), "retained": int(st.sketch.num_retained),
                                   "check": check, "dense_check": dcheck}
        st.K = np.empty((0, d))
    out["flat_ratio"] = spread([a / b for a, b in zip(streams[-1].sketch_s, streams[0].sketch_s)])
    out["flat_ratio_of"] = [streams[-1].n, streams[0].n]
    return out


@section_env
def bench_filtered(sz: Sizes, d: int, eps: float, failures: Failures) -> dict:
    """Steps of a filtered stream at the middle size of ``sz.live_n``: ``update_many`` of a chunk of 0 to 3
    rows (two steps in five empty), then ``heavy_entries`` of one query."""
    T = sz.warm_steps + sz.rounds * sz.steps_per_round
    rng = np.random.default_rng(7)
    sizes = np.where(rng.random(T) < 0.4, 0, rng.integers(1, 4, T))
    n = sz.live_n[len(sz.live_n) // 2]
    ends = n + np.cumsum(sizes)  # keys seen by the query of step t
    K = keys(int(ends[-1]), d, seed=0)
    Q = attention_like_queries(T, d, seed=3, key_seed=0)
    sk = ls.KeySketch(d, eps=eps)
    for a in range(0, n, 65536):
        sk.update_many(K[a:min(n, a + 65536)])
    st = Stream(n, K, None, sk, [None] * T, np.empty(K.shape[0]), np.empty(K.shape[0], dtype=bool))

    def sketch_step(st: Stream, t: int) -> Any:
        st.sketch.update_many(st.K[ends[t] - sizes[t]:ends[t]])  # (0, d) when the filter kept nothing
        return st.sketch.heavy_entries(Q[t][None])

    def dense_at(st: Stream, t: int) -> Any:
        start = ends[t] - sizes[t]
        return dense_chunk_step(st.K, start, st.K[start:ends[t]], Q[t], eps, st.buf, st.mask)

    interleaved_steps(sz, [st], sketch_step, dense_at)
    ref = brute_force(Q, K, ends, eps)
    check = compare_rows([entries_of(a) for a in st.answers], ref, eps)
    failures.add("filtered sketch", check)
    steps = np.array([t for t, _ in st.dense])
    dcheck = compare_rows([a for _, a in st.dense], ref, eps, rows=steps)
    failures.add("filtered dense baseline", dcheck)
    out = {"n": n, "steps_checked": T, "timed_steps": sz.rounds * sz.steps_per_round,
           "empty_steps": int((sizes == 0).sum()), "rows_fed": int(sizes.sum()), **step_figures(st),
           "retained": int(sk.num_retained), "check": check, "dense_check": dcheck}
    st.K = np.empty((0, d))
    return out


@section_env
def bench_forms(sz: Sizes, d: int, eps: float, dv: int, failures: Failures) -> dict:
    """The live step at the middle size of ``sz.live_n`` with its inputs in the forms users have them, each
    on its own copy of one sketch, fed the same keys in the same order: rounds rotate which form runs first,
    and each form's per-step time is divided by the canonical form's of the same round.  Every answer is
    checked against brute force (float32 forms against the float32 keys and queries, widened)."""
    n = sz.live_n[len(sz.live_n) // 2]
    T = sz.warm_steps + sz.rounds * sz.steps_per_round
    K, V = keys(n + T, d, seed=0), values(n + T, dv, seed=0)
    Q = attention_like_queries(T, d, seed=3, key_seed=0)
    K32, Q32 = K.astype(np.float32), Q.astype(np.float32)
    KT, QT = np.ascontiguousarray(K.T), np.ascontiguousarray(Q.T)  # a (d, T) layout: columns are rows
    base = ls.KeySketch(d, eps=eps)
    base32 = ls.KeySketch(d, eps=eps)
    values_base = ls.KeySketch(d, eps=eps, value_dim=dv, exact_output=True)
    for a in range(0, n, 65536):
        b = min(n, a + 65536)
        base.update_many(K[a:b])
        base32.update_many(K32[a:b])
        values_base.update_many(K[a:b], V[a:b])
    forms: dict[str, tuple[ls.KeySketch, Callable[[ls.KeySketch, int], Any], str]] = {
        "update(k) + heavy_entries(q[None])": (
            base.copy(), lambda sk, t: (sk.update(K[n + t]), sk.heavy_entries(Q[t][None]))[1], "f64"),
        "update_many(K[t:t+1]) + heavy_entries(Q[t:t+1])": (
            base.copy(), lambda sk, t: (sk.update_many(K[n + t : n + t + 1]),
                                        sk.heavy_entries(Q[t : t + 1]))[1], "f64"),
        "columns of (d, T) arrays: update(KT[:, t]) + heavy_entries(QT[:, t:t+1].T)": (
            base.copy(), lambda sk, t: (sk.update(KT[:, n + t]), sk.heavy_entries(QT[:, t : t + 1].T))[1],
            "f64"),
        "float32 rows and queries": (
            base32, lambda sk, t: (sk.update(K32[n + t]), sk.heavy_entries(Q32[t][None]))[1], "f32"),
        "values: update(k, v) + attend(q[None]) (exact output)": (
            values_base.copy(), lambda sk, t: (sk.update(K[n + t], V[n + t]), sk.attend(Q[t][None]))[1],
            "values"),
        "values: prefill(k[None], v[None], q[None]) (the decode step)": (
            values_base, lambda sk, t: sk.prefill(K[n + t][None], V[n + t][None], Q[t][None]), "values"),
    }
    names = list(forms)
    answers: dict[str, list[Any]] = {name: [None] * T for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    for name in names:
        sk, step, _ = forms[name]
        for t in range(sz.warm_steps):
            answers[name][t] = step(sk, t)
    for r in range(sz.rounds):
        lo = sz.warm_steps + r * sz.steps_per_round
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            sk, step, _ = forms[name]
            got = answers[name]
            t0 = time.perf_counter()
            for t in range(lo, lo + sz.steps_per_round):
                got[t] = step(sk, t)
            times[name].append((time.perf_counter() - t0) / sz.steps_per_round)
    ends = n + 1 + np.arange(T)
    refs = {"f64": brute_force(Q, K, ends, eps),
            "f32": brute_force(Q32.astype(np.float64), K32.astype(np.float64), ends, eps),
            "values": brute_force(Q, K, ends, eps, V=V)}
    canonical = times[names[0]]
    out: dict[str, Any] = {"n": n, "steps_checked": T, "forms": {}}
    checks = []
    for name in names:
        kind = forms[name][2]
        results = answers[name]
        entries = [entries_of(a.entries if kind == "values" else a) for a in results]
        check = compare_rows(entries, refs[kind], eps)
        if kind == "values":
            outputs = compare_outputs(np.vstack([a.output for a in results]), refs[kind])
            check = {**check, "ok": check["ok"] and outputs["ok"],
                     "max_output_rel_err": outputs["max_output_rel_err"]}
        failures.add(f"forms: {name}", check)
        checks.append(check)
        out["forms"][name] = {"step_s": spread(times[name]),
                              "ratio": spread([a / b for a, b in zip(times[name], canonical)]),
                              "check": check}
    out["check"] = merge_checks(*checks, same_rows=False)
    return out


def heads_workload(n: int, T: int, d: int, eps: float, H: int) -> tuple[Any, ...]:
    """The streams of the heads figure: keys ``Kh`` (H, n + T, d) and queries ``Qh`` (H, T, d) of every head,
    the step's tokens (T, H, d) and queries (T, H, 1, d), and a ``MultiHeadKeySketch`` of the H heads and a
    ``KeySketch`` of head 0, both fed the first n keys."""
    Kh = np.stack([keys(n + T, d, seed=10 + h) for h in range(H)])  # (H, n + T, d)
    Qh = np.stack([attention_like_queries(T, d, seed=20 + h, key_seed=10 + h) for h in range(H)])
    tokens = np.ascontiguousarray(Kh[:, n:].transpose(1, 0, 2))  # (T, H, d): one token per step
    queries = np.ascontiguousarray(Qh.transpose(1, 0, 2))[:, :, None, :]  # (T, H, 1, d)
    mh = ls.MultiHeadKeySketch(H, d, eps=eps)
    one = ls.KeySketch(d, eps=eps)
    for a in range(0, n, 16384):
        b = min(n, a + 16384)
        mh.update_many(Kh[:, a:b])
        one.update_many(Kh[0, a:b])
    return Kh, Qh, tokens, queries, mh, one


@section_env
def bench_heads(sz: Sizes, d: int, eps: float, failures: Failures) -> dict:
    """A step of ``n_heads`` heads, one call per op, against a single-head step at the same n.

    The step of issue 11: ``update_many`` of an (H, 1, d) chunk, then ``heavy_entries`` of (H, 1, d)
    queries; the same with ``update`` of an (H, d) token is timed too.  A round runs ``per_round``
    steps of each kind (the order alternates between rounds); the keys of a step are those of the
    step before it plus one, whichever kind ran it, so every answer is checked against brute force
    over its own prefix."""
    H, n, per_round = sz.n_heads, sz.heads_n, sz.heads_steps_per_round
    kinds = 3
    T = sz.warm_steps + sz.rounds * kinds * per_round
    Kh, Qh, tokens, queries, mh, one = heads_workload(n, T, d, eps, H)
    chunks = tokens[:, :, None, :]  # (T, H, 1, d): the same tokens as (H, 1, d) chunks
    got_mh: list[Any] = [None] * T
    got_one: list[Any] = [None] * T

    def run_many(lo: int, hi: int) -> float:
        t0 = time.perf_counter()
        for t in range(lo, hi):
            mh.update_many(chunks[t])
            got_mh[t] = mh.heavy_entries(queries[t])
        return (time.perf_counter() - t0) / (hi - lo)

    def run_update(lo: int, hi: int) -> float:
        t0 = time.perf_counter()
        for t in range(lo, hi):
            mh.update(tokens[t])
            got_mh[t] = mh.heavy_entries(queries[t])
        return (time.perf_counter() - t0) / (hi - lo)

    def run_sliced(lo: int, hi: int) -> float:  # a model's (H, T, d) arrays, sliced per step
        t0 = time.perf_counter()
        for t in range(lo, hi):
            mh.update_many(Kh[:, n + t : n + t + 1])
            got_mh[t] = mh.heavy_entries(Qh[:, t : t + 1])
        return (time.perf_counter() - t0) / (hi - lo)

    def run_one(lo: int, hi: int) -> float:
        t0 = time.perf_counter()
        for t in range(lo, hi):
            one.update(tokens[t, 0])
            got_one[t] = one.heavy_entries(queries[t, 0])
        return (time.perf_counter() - t0) / (hi - lo)

    run_many(0, sz.warm_steps)
    run_one(0, sz.warm_steps)
    t_many: list[float] = []
    t_update: list[float] = []
    t_sliced: list[float] = []
    t_one: list[float] = []
    for r in range(sz.rounds):
        lo = sz.warm_steps + r * kinds * per_round
        runs = [(t_many, run_many), (t_update, run_update), (t_sliced, run_sliced)]
        runs = runs[r % kinds :] + runs[: r % kinds]  # each kind leads in turn
        for k, (out, fn) in enumerate(runs):
            out.append(fn(lo + k * per_round, lo + (k + 1) * per_round))
        t_one.append(run_one(lo, lo + kinds * per_round))  # the same kinds * per_round tokens
    ends = n + 1 + np.arange(T)
    checks = []
    for h in range(H):
        ref = brute_force(Qh[h], Kh[h], ends, eps)
        checks.append(compare_rows([entries_of(a[h]) for a in got_mh], ref, eps))
        if h == 0:
            single = compare_rows([entries_of(a) for a in got_one], ref, eps)
            failures.add("heads single-head", single)
    check = merge_checks(*checks, same_rows=False)
    failures.add(f"heads {H}-head", check)
    return {"n": n, "n_heads": H, "steps_checked": T, "heads_step_s": spread(t_many),
            "heads_update_step_s": spread(t_update), "heads_sliced_step_s": spread(t_sliced),
            "single_step_s": spread(t_one),
            "ratio": spread([a / b for a, b in zip(t_many, t_one)]),
            "ratio_update": spread([a / b for a, b in zip(t_update, t_one)]),
            "ratio_sliced": spread([a / b for a, b in zip(t_sliced, t_one)]),
            "retained_per_head": [int(h.num_retained) for h in mh.heads],
            "retained_single": int(one.num_retained), "check": check, "single_check": single}


# ---------------------------------------------------------------------- bulk build with queries
@section_env
def bench_bulk(sz: Sizes, d: int, eps: float, failures: Failures) -> dict:
    """``update_many`` of 8192-row chunks + one query per chunk (and without the queries) over
    Gram-only (the faster of default and one BLAS thread in each round)."""
    block, n = 8192, sz.bulk_n
    chunks = list(attention_like_keys(n, d, chunk_rows=block, seed=0))
    Q = attention_like_queries(len(chunks), d, seed=3, key_seed=0)

    def with_queries() -> tuple[float, list]:
        sk = ls.KeySketch(d, eps=eps, block_rows=block)
        got = []
        t0 = time.perf_counter()
        for X, q in zip(chunks, Q):
            sk.update_many(X)
            got.append(sk.heavy_entries(q[None]))
        return time.perf_counter() - t0, got

    def without_queries() -> float:
        sk = ls.KeySketch(d, eps=eps, block_rows=block)
        t0 = time.perf_counter()
        for X in chunks:
            sk.update_many(X)
        sk.heavy_entries(Q[-1][None])  # the last answer only
        return time.perf_counter() - t0

    def gram(setting: int | None) -> float:
        G = np.zeros((d, d))
        with limited(setting):
            t0 = time.perf_counter()
            for X in chunks:
                G += X.T @ X
            return time.perf_counter() - t0

    with_queries()  # warm: first touch of the chunks
    rounds, answers = [], []
    for r in range(sz.rounds):
        if r % 2 == 0:
            tq, got = with_queries()
            tn = without_queries()
            g_def, g_one = gram(None), gram(1)
        else:
            g_one, g_def = gram(1), gram(None)
            tn = without_queries()
            tq, got = with_queries()
        rounds.append((tq, tn, g_def, g_one))
        answers.append(got)
    ends = np.minimum(block * (1 + np.arange(len(chunks))), n)
    ref = brute_force(Q, np.concatenate(chunks), ends, eps)
    check = merge_checks(*[compare_rows([entries_of(a) for a in got], ref, eps) for got in answers])
    failures.add("bulk build queries", check)
    gram_best = [min(g, o) for _, _, g, o in rounds]
    return {"n": n, "block": block, "queries": len(chunks),
            "build_with_queries_s": spread([r[0] for r in rounds]),
            "build_without_queries_s": spread([r[1] for r in rounds]),
            "gram_default_s": spread([r[2] for r in rounds]),
            "gram_1thread_s": spread([r[3] for r in rounds]),
            "ratio": spread([r[0] / g for r, g in zip(rounds, gram_best)]),
            "ratio_without_queries": spread([r[1] / g for r, g in zip(rounds, gram_best)]),
            "check": check}


# ---------------------------------------------------------------------- decode steps with values
@section_env
def bench_decode(sz: Sizes, d: int, eps: float, dv: int, failures: Failures) -> dict:
    """``prefill`` of one row (exact output, heavy entries) against dense attention with values."""
    T = sz.warm_steps + sz.rounds * sz.steps_per_round
    Q = attention_like_queries(T, d, seed=2, key_seed=0)
    streams = []
    for n in sz.decode_n:
        K, V = keys(n + T, d, seed=0), values(n + T, dv, seed=0)
        sk = ls.KeySketch(d, eps=eps, value_dim=dv, exact_output=True)
        for a in range(0, n, 65536):
            sk.update_many(K[a:min(n, a + 65536)], V[a:min(n, a + 65536)])
        streams.append(Stream(n, K, V, sk, [None] * T, np.empty(n + T),
                              np.empty(n + T, dtype=bool)))

    # every timed step on its own too: the tail (a fold of the moment state every 128 tokens) shows there
    latency: dict[int, list[float]] = {st.n: [] for st in streams}

    def sketch_step(st: Stream, t: int) -> Any:
        m = st.n + t
        t0 = time.perf_counter()
        out = st.sketch.prefill(st.K[m][None], st.V[m][None], Q[t][None])
        if t >= sz.warm_steps:
            latency[st.n].append(time.perf_counter() - t0)
        return out

    def dense_at(st: Stream, t: int) -> Any:
        m = st.n + t
        return dense_step_values(st.K, st.V, m, st.K[m], st.V[m], Q[t], eps, st.buf, st.mask)

    interleaved_steps(sz, streams, sketch_step, dense_at)
    out: dict[str, Any] = {"n": list(sz.decode_n), "dv": dv, "steps_checked": T,
                           "timed_steps": sz.rounds * sz.steps_per_round, "per_n": {}}
    for st in streams:
        assert st.V is not None
        ref = brute_force(Q, st.K, st.n + 1 + np.arange(T), eps, V=st.V)
        check = merge_checks(
            compare_rows([entries_of(a.entries) for a in st.answers], ref, eps),
            compare_outputs(np.concatenate([a.output for a in st.answers]), ref),
            compare_heavy_outputs(st.answers, ref, st.V, eps))
        failures.add(f"decode n={st.n} sketch", check)
        steps = np.array([t for t, _ in st.dense])
        dcheck = merge_checks(
            compare_rows([(i, v) for _, (i, v, _) in st.dense], ref, eps, rows=steps),
            compare_outputs(np.array([o for _, (_, _, o) in st.dense]), ref, rows=steps))
        failures.add(f"decode n={st.n} dense baseline", dcheck)
        lat = np.array(latency[st.n])
        out["per_n"][str(st.n)] = {**step_figures(st), "check": check, "dense_check": dcheck,
                                   "step_latency_s": {"p50": float(np.percentile(lat, 50)),
                                                      "p99": float(np.percentile(lat, 99)),
                                                      "p99.9": float(np.percentile(lat, 99.9)),
                                                      "max": float(lat.max()), "steps": int(lat.size),
                                                      "over_1ms": int((lat > 1e-3).sum())}}
        st.K, st.V = np.empty((0, d)), None
    out["flat_ratio"] = spread([a / b for a, b in zip(streams[-1].sketch_s, streams[0].sketch_s)])
    out["flat_ratio_of"] = [streams[-1].n, streams[0].n]
    return out


# ---------------------------------------------------------------------- decode steps at short contexts
@dataclass
class HeadResult:
    """One head of a multi-head one-query result, as the checks read a single head's."""

    entries: Any
    output: np.ndarray
    heavy_output: np.ndarray
    captured_mass: np.ndarray


def dense_heads_step(K: np.ndarray, V: np.ndarray, m: int, x: np.ndarray, v: np.ndarray, q: np.ndarray,
                     eps: float) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray]:
    """A decode step of every head at once over the preallocated ``K`` (H, N, d) and ``V`` (H, N, dv): the
    token ``x`` (H, d) with value ``v`` becomes position ``m``, then every ``A >= eps`` of the queries ``q``
    (H, d) over positions ``0..m`` (per head) and the outputs (H, dv)."""
    K[:, m] = x
    V[:, m] = v
    s = np.matmul(K[:, : m + 1], q[:, :, None])[:, :, 0]
    s *= s
    Z = s.sum(axis=1)
    hs, js = np.nonzero(s >= eps * Z[:, None])  # every head at once, by head then position
    vals = s[hs, js] / Z[hs]
    cuts = np.searchsorted(hs, np.arange(K.shape[0] + 1))
    entries = [(js[a:b], vals[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
    return entries, np.matmul(s[:, None, :], V[:, : m + 1])[:, 0] / Z[:, None]


@section_env
def bench_short(sz: Sizes, d: int, eps: float, dv: int, failures: Failures) -> dict:
    """Decode steps with values after a prompt of ``n0`` tokens, for one head and for several (see
    :func:`short_case`), at every prompt length of ``sz.short_n``."""
    out: dict[str, Any] = {"n": list(sz.short_n), "heads": list(sz.short_heads), "cases": {}}
    checks = []
    for H in sz.short_heads:
        for n0 in sz.short_n:
            case = short_case(sz, d, eps, dv, H, n0)
            failures.add(f"short H={H} n0={n0}", case["check"])
            checks.append(case["check"])
            out["cases"][f"{H}x{n0}"] = case
    out["check"] = merge_checks(*checks, same_rows=False)
    return out


def short_case(sz: Sizes, d: int, eps: float, dv: int, H: int, n0: int) -> dict:
    """``prefill`` of a prompt of ``n0`` tokens, then decode steps (one ``prefill`` of one token per head), with
    a ``KeySketch`` for one head and a ``MultiHeadKeySketch`` for ``H``, against :func:`dense_step_values` for
    one head and :func:`dense_heads_step` (the heads batched) for several; rounds alternate between the sketch and the dense steps at the same positions
    (default and one BLAS thread).  Every step of both is checked against brute force: entries and outputs, and
    the sketch's heavy outputs and captured mass."""
    per = sz.short_steps_per_round
    T = sz.warm_steps + sz.rounds * per
    N = n0 + T
    K = np.stack([keys(N, d, seed=40 + h) for h in range(H)])
    V = np.stack([values(N, dv, seed=40 + h) for h in range(H)])
    Q = np.stack([attention_like_queries(N, d, seed=50 + h, key_seed=40 + h) for h in range(H)])
    if H == 1:
        sk: Any = ls.KeySketch(d, eps=eps, value_dim=dv, exact_output=True)
        sk.prefill(K[0, :n0], V[0, :n0], Q[0, :n0])
    else:
        sk = ls.MultiHeadKeySketch(H, d, eps=eps, value_dim=dv, exact_output=True)
        sk.prefill(K[:, :n0], V[:, :n0], Q[:, :n0])
    got: list[Any] = [None] * T
    Kd, Vd = np.zeros_like(K), np.zeros_like(V)
    Kd[:, :n0], Vd[:, :n0] = K[:, :n0], V[:, :n0]
    dense_got: list[tuple[int, Any]] = []

    def sketch_steps(lo: int, hi: int) -> float:
        t0 = time.perf_counter()
        for t in range(lo, hi):
            m = n0 + t
            if H == 1:
                got[t] = sk.prefill(K[0, m : m + 1], V[0, m : m + 1], Q[0, m : m + 1])
            else:
                got[t] = sk.prefill(K[:, m : m + 1], V[:, m : m + 1], Q[:, m : m + 1])
        return (time.perf_counter() - t0) / (hi - lo)

    buf, mask = np.empty(N), np.empty(N, dtype=bool)

    def dense_steps(lo: int, hi: int) -> float:
        t0 = time.perf_counter()
        for t in range(lo, hi):
            m = n0 + t
            if H == 1:  # the single-head twin of the decode section (no head axis to batch)
                idx, vals, o = dense_step_values(Kd[0], Vd[0], m, K[0, m], V[0, m], Q[0, m], eps, buf, mask)
                dense_got.append((t, ([(idx, vals)], o[None])))
            else:
                dense_got.append((t, dense_heads_step(Kd, Vd, m, K[:, m], V[:, m], Q[:, m], eps)))
        return (time.perf_counter() - t0) / (hi - lo)

    sketch_steps(0, sz.warm_steps)
    dense_steps(0, sz.warm_steps)
    t_sk: list[float] = []
    t_dense: dict[str, list[float]] = {name: [] for name, _ in DENSE_THREADS}
    for r in range(sz.rounds):
        lo = sz.warm_steps + r * per
        t_sk.append(sketch_steps(lo, lo + per))
        for name, setting in (DENSE_THREADS if r % 2 == 0 else DENSE_THREADS[::-1]):
            with limited(setting):  # the second setting writes the round's rows again: part of a step
                t_dense[name].append(dense_steps(lo, lo + per))
    ends = n0 + 1 + np.arange(T)
    rows = np.array([t for t, _ in dense_got])
    checks = []
    for h in range(H):
        ref = brute_force(Q[h, n0:], K[h], ends, eps, V=V[h])
        heads = [g if H == 1 else HeadResult(g.entries[h], g.output[h], g.heavy_output[h], g.captured_mass[h])
                 for g in got]
        checks.append(merge_checks(
            compare_rows([entries_of(r.entries) for r in heads], ref, eps),
            compare_outputs(np.concatenate([r.output for r in heads]), ref),
            compare_heavy_outputs(heads, ref, V[h], eps)))
        checks.append(merge_checks(
            compare_rows([e[h] for _, (e, _) in dense_got], ref, eps, rows=rows),
            compare_outputs(np.array([o[h] for _, (_, o) in dense_got]), ref, rows=rows)))
    best = [min(a, b) for a, b in zip(t_dense["default"], t_dense["1"])]
    return {"heads": H, "n0": n0, "steps_checked": T, "sketch_step_s": spread(t_sk),
            "dense_step_s": {name: spread(v) for name, v in t_dense.items()},
            "ratio_to_dense": spread([a / b for a, b in zip(t_sk, best)]),
            "check": merge_checks(*checks, same_rows=False)}


# ---------------------------------------------------------------------- causal prefill
def dense_causal(K: np.ndarray, V: np.ndarray, Q: np.ndarray, eps: float,
                 block: int = 256) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """Dense p = 2 causal attention in blocks of query rows: the outputs and every entry
    ``A >= eps`` of each row (row ``i`` sees keys ``0..i``)."""
    n = K.shape[0]
    out = np.empty((n, V.shape[1]))
    entries = []
    above = np.triu(np.ones((block, block), dtype=bool), k=1)
    for a in range(0, n, block):
        b = min(n, a + block)
        W = Q[a:b] @ K[:b].T
        W *= W
        W[:, a:b][above[: b - a, : b - a]] = 0.0
        Z = W.sum(axis=1)
        out[a:b] = (W @ V[:b]) / Z[:, None]
        W /= Z[:, None]
        r, c = np.nonzero(W >= eps)
        split = np.searchsorted(r, np.arange(b - a + 1))
        entries.extend((c[split[i]:split[i + 1]], W[i, c[split[i]:split[i + 1]]])
                       for i in range(b - a))
    return out, entries


@section_env
def bench_prefill(sz: Sizes, d: int, eps: float, dv: int, failures: Failures) -> dict:
    """``prefill`` chunk by chunk into an empty sketch against dense causal attention, same rows.

    The sketch also runs with one BLAS thread (for information: the figure is default threads)."""
    n, c = sz.prefill_n, sz.prefill_chunk
    K, V = keys(n, d, seed=5), values(n, dv, seed=5)
    Q = attention_like_queries(n, d, seed=6, key_seed=5)

    def sketch(setting: int | None = None) -> tuple[float, np.ndarray, list]:
        sk = ls.KeySketch(d, eps=eps, value_dim=dv, exact_output=True)
        outs, got = [], []
        with limited(setting):
            t0 = time.perf_counter()
            for a in range(0, n, c):
                r = sk.prefill(K[a:a + c], V[a:a + c], Q[a:a + c])
                outs.append(r.output)
                got.append(r.entries)
            el = time.perf_counter() - t0
        return el, np.concatenate(outs), [row for he in got for row in he]

    def dense(setting: int | None) -> tuple[float, np.ndarray, list]:
        with limited(setting):
            t0 = time.perf_counter()
            out, entries = dense_causal(K, V, Q, eps)
            return time.perf_counter() - t0, out, entries

    sketch()  # warm
    t_sk, t_sk1, t_def, t_one = [], [], [], []
    checks, ref = [], None
    for r in range(sz.prefill_rounds):
        if r % 2 == 0:
            ts, out_s, rows_s = sketch()
            ts1, out_s1, rows_s1 = sketch(1)
            (td, out_d, rows_d), (to, _, _) = dense(None), dense(1)
        else:
            (to, _, _), (td, out_d, rows_d) = dense(1), dense(None)
            ts1, out_s1, rows_s1 = sketch(1)
            ts, out_s, rows_s = sketch()
        t_sk.append(ts)
        t_sk1.append(ts1)
        t_def.append(td)
        t_one.append(to)
        if ref is None:  # the dense rows as a Reference: here the dense baseline is the brute force
            indptr = np.zeros(n + 1, dtype=np.int64)
            np.cumsum([len(i) for i, _ in rows_d], out=indptr[1:])
            ref = Reference(indptr, np.concatenate([i for i, _ in rows_d]),
                            np.concatenate([a for _, a in rows_d]), np.ones(n), out_d)
        checks.append(merge_checks(compare_rows(rows_s, ref, eps), compare_outputs(out_s, ref),
                                   compare_rows(rows_s1, ref, eps), compare_outputs(out_s1, ref)))
    check = merge_checks(*checks)
    failures.add("prefill vs dense causal", check)
    best = [min(a, b) for a, b in zip(t_def, t_one)]
    return {"n": n, "chunk": c, "dv": dv, "sketch_s": spread(t_sk),
            "sketch_1thread_blas_s": spread(t_sk1), "dense_default_s": spread(t_def),
            "dense_1thread_s": spread(t_one),
            "speedup": spread([b / s for b, s in zip(best, t_sk)]),
            "check": check}


# ---------------------------------------------------------------------- values in bulk vs GEMM
@section_env
def bench_gemm(sz: Sizes, d: int, eps: float, dv: int, failures: Failures) -> dict:
    """Bulk ``update_many(K, V)`` with exact outputs against the GEMM ``phi(K)^T V`` on the same
    8192-row chunks (the lifting ``phi`` untimed; the faster of default and one BLAS thread in each
    round)."""
    block, n = 8192, sz.gemm_n
    chunks = list(attention_like_keys(n, d, chunk_rows=block, seed=7))
    vchunks = [values(X.shape[0], dv, seed=100 + i) for i, X in enumerate(chunks)]
    D = d * (d + 1) // 2

    def sketch() -> tuple[float, Any]:
        sk = ls.KeySketch(d, eps=eps, value_dim=dv, exact_output=True, block_rows=block)
        t0 = time.perf_counter()
        for X, V in zip(chunks, vchunks):
            sk.update_many(X, V)
        return time.perf_counter() - t0, sk

    def gemm(setting: int | None) -> tuple[float, float]:
        S = np.zeros((D, dv))
        t_gemm = t_lift = 0.0
        with limited(setting):
            for X, V in zip(chunks, vchunks):
                t0 = time.perf_counter()
                L = lift(X)
                t1 = time.perf_counter()
                S += L.T @ V
                t_lift += t1 - t0
                t_gemm += time.perf_counter() - t1
        return t_gemm, t_lift

    sketch()
    rounds = []
    for r in range(sz.rounds):
        if r % 2 == 0:
            ts, sk = sketch()
            (gd, ld), (go, lo) = gemm(None), gemm(1)
        else:
            (go, lo), (gd, ld) = gemm(1), gemm(None)
            ts, sk = sketch()
        rounds.append((ts, gd, go, min(ld, lo)))
    Qc = attention_like_queries(64, d, seed=8, key_seed=7)
    ref = brute_force(Qc, np.concatenate(chunks), np.full(64, n), eps, V=np.concatenate(vchunks))
    res = sk.attend(Qc)
    check = merge_checks(compare_rows(list(res.entries), ref, eps),
                         compare_outputs(res.output, ref))
    failures.add("update_many with values: attend", check)
    best = [min(r[1], r[2]) for r in rounds]
    return {"n": n, "block": block, "D": D, "dv": dv, "gemm_flops": 2 * n * D * dv,
            "sketch_s": spread([r[0] for r in rounds]),
            "gemm_default_s": spread([r[1] for r in rounds]),
            "gemm_1thread_s": spread([r[2] for r in rounds]),
            "lift_s": spread([r[3] for r in rounds]),
            "ratio": spread([r[0] / b for r, b in zip(rounds, best)]),
            "ratio_vs_lift_plus_gemm": spread([r[0] / (b + r[3]) for r, b in zip(rounds, best)]),
            "check": check}


# ---------------------------------------------------------------------- peak RSS
def rss_child(n: int, d: int, eps: float, dv: int) -> None:
    """Stream ``n`` keys with values (8192-row chunks, never all held); print VmHWM and a check of 8
    exact outputs and their heavy entries (keys regenerated after VmHWM is read) as JSON."""
    def status(name: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(name + ":"))

    def pairs() -> Any:
        for i, X in enumerate(attention_like_keys(n, d, chunk_rows=8192, seed=0)):
            yield X, values(X.shape[0], dv, seed=1000 + i)

    warm = ls.KeySketch(d, eps=eps, value_dim=dv, exact_output=True)
    warm.extend([next(pairs())])
    warm.attend(np.ones((2, d)))
    del warm
    rss_before = status("VmRSS")
    sk = ls.KeySketch(d, eps=eps, value_dim=dv, exact_output=True)
    sk.extend(pairs())
    Qc = attention_like_queries(8, d, seed=9, key_seed=0)
    res = sk.attend(Qc)
    # VmHWM, not ru_maxrss: ru_maxrss survives exec (a child would report a larger parent's peak)
    hwm = status("VmHWM")
    Z, num, blocks, start = np.zeros(8), np.zeros((8, dv)), [], 0
    for X, V in pairs():
        W = (Qc @ X.T) ** 2
        Z += W.sum(axis=1)
        num += W @ V
        blocks.append((start, W))
        start += X.shape[0]
    per_row: list[list[tuple[int, float]]] = [[] for _ in range(8)]
    for start, W in blocks:
        r, c = np.nonzero(W >= eps * (1 - CANDIDATE_SLACK) * Z[:, None])
        for i, j in zip(r.tolist(), c.tolist()):
            per_row[i].append((start + j, float(W[i, j])))
    indptr = np.zeros(9, dtype=np.int64)
    np.cumsum([len(p) for p in per_row], out=indptr[1:])
    flat = [e for p in per_row for e in sorted(p)]
    ref = Reference(indptr, np.array([j for j, _ in flat], dtype=np.int64),
                    np.array([w for _, w in flat]), Z, num)
    check = merge_checks(compare_rows(list(res.entries), ref, eps),
                         compare_outputs(res.output, ref))
    print(json.dumps({"n": n, "hwm": hwm, "rss_before_stream": rss_before,
                      "retained": int(sk.num_retained), "sketch_nbytes": int(sk.nbytes),
                      "check": check}))


#: glibc's malloc raises its mmap threshold each time a large block is freed, after which large
#: temporaries come from the heap and fragment it over a long stream; a fixed threshold turns that
#: off.  The RSS figure is also measured with it, to tell the allocator's growth from the sketch's.
FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def rss_runs(sz: Sizes, failures: Failures, env: dict[str, str] | None = None) -> dict:
    """Peak RSS of :func:`rss_child` at the two sizes of ``sz.rss_n``, a fresh process each."""
    out = {}
    for n in sz.rss_n:
        res = subprocess.run([sys.executable, __file__, "--rss-child", str(n)],
                             capture_output=True, text=True, check=False,
                             env={**os.environ, **(env or {})})
        if res.returncode != 0:
            raise RuntimeError(f"rss child n={n} failed:\n{res.stderr}")
        out[n] = json.loads(res.stdout.strip().splitlines()[-1])
        failures.add(f"rss n={n} attend{' ' + str(env) if env else ''}", out[n]["check"])
    small, large = sz.rss_n
    mb = 2.0**20
    return {"n_small": small, "n_large": large, "hwm_small_MB": out[small]["hwm"] / mb,
            "hwm_large_MB": out[large]["hwm"] / mb, "ratio": out[large]["hwm"] / out[small]["hwm"],
            "rss_before_stream_MB": [out[n]["rss_before_stream"] / mb for n in sz.rss_n],
            "retained": [out[n]["retained"] for n in sz.rss_n],
            "sketch_MB": [out[n]["sketch_nbytes"] / mb for n in sz.rss_n],
            "check": merge_checks(out[small]["check"], out[large]["check"], same_rows=False)}


@section_env
def bench_rss(sz: Sizes, d: int, eps: float, dv: int, failures: Failures) -> dict:
    """Peak RSS streaming ``sz.rss_n`` keys with values; in the full run also with a fixed mmap
    threshold (:data:`FIXED_MMAP_THRESHOLD`)."""
    out = rss_runs(sz, failures)
    if sz.rss_fixed_mmap:
        out["fixed_mmap_threshold"] = rss_runs(sz, failures, FIXED_MMAP_THRESHOLD)
    return out


# ---------------------------------------------------------------------- report
def summary_rows(res: dict) -> list[tuple[str, str, str, bool | None]]:
    """``(figure, measured, target, met)`` of every figure that was run."""
    rows: list[tuple[str, str, str, bool | None]] = []
    us = 1e6

    def steps(name: str, targets: dict[int, float]) -> None:
        sec = res[name]
        what = "live step" if name == "live" else "decode step with values"
        for n, v in sec["per_n"].items():
            target = targets.get(int(n))
            dense = v["dense_step_s"]
            digits = 1 if v["speedup"]["median"] < 10 else 0
            measured = (f"{fmt(v['speedup'], digits=digits)}x ({fmt(v['sketch_step_s'], us)} us vs "
                        f"{fmt(dense['1'], us, 0)} us 1-thread / {fmt(dense['default'], us, 0)} us "
                        "default)")
            rows.append((f"{what} vs dense, n = {int(n):.0e}", measured,
                         f">= {target:.0f}x" if target else "-",
                         None if target is None else v["speedup"]["median"] >= target))
        hi, lo = sec["flat_ratio_of"]
        rows.append((f"{what}: per-step cost n = {hi:.0e} / {lo:.0e}",
                     fmt(sec["flat_ratio"], digits=2), "<= 1.3",
                     sec["flat_ratio"]["median"] <= 1.3))

    if "live" in res:
        steps("live", {100_000: 100.0, 1_000_000: 1000.0})
    if "filtered" in res:
        f = res["filtered"]
        dense = f["dense_step_s"]
        measured = (f"{fmt(f['speedup'], digits=0)}x ({fmt(f['sketch_step_s'], us)} us vs "
                    f"{fmt(dense['1'], us, 0)} us 1-thread / {fmt(dense['default'], us, 0)} us default; "
                    f"{f['empty_steps']} of {f['steps_checked']} chunks empty)")
        rows.append((f"filtered stream step (update_many of 0-3 rows + 1 query) vs dense, n = {f['n']:.0e}",
                     measured, "-", None))
    if "forms" in res:
        f = res["forms"]
        for name, v in f["forms"].items():
            rows.append((f"live step, n = {f['n']:.0e}, {name} / the first form",
                         f"{fmt(v['ratio'], digits=2)} ({fmt(v['step_s'], us)} us)", "-", None))
    if "heads" in res:
        h = res["heads"]
        measured = (f"{fmt(h['ratio'], digits=2)} ({fmt(h['heads_step_s'], us)} us vs "
                    f"{fmt(h['single_step_s'], us)} us)")
        rows.append((f"{h['n_heads']}-head step (update_many (H, 1, d)) / single-head step, "
                     f"n = {h['n']:.0e}", measured, "<= 4", h["ratio"]["median"] <= 4))
        measured = (f"{fmt(h['ratio_update'], digits=2)} ({fmt(h['heads_update_step_s'], us)} us)")
        rows.append(("same, the token fed by update (H, d)", measured, "-", None))
        if "ratio_sliced" in h:
            measured = f"{fmt(h['ratio_sliced'], digits=2)} ({fmt(h['heads_sliced_step_s'], us)} us)"
            rows.append(("same, tokens and queries as slices X[:, t:t+1] of (H, T, d) arrays", measured,
                         "-", None))
    if "bulk" in res:
        b = res["bulk"]
        measured = (f"{fmt(b['ratio'], digits=2)} (without the queries "
                    f"{fmt(b['ratio_without_queries'], digits=2)})")
        rows.append((f"bulk build + 1 query per 8192-row chunk / Gram-only, n = {b['n']:.0e}",
                     measured, "<= 1.6", b["ratio"]["median"] <= 1.6))
    if "decode" in res:
        steps("decode", {100_000: 100.0})
        for n, v in res["decode"]["per_n"].items():
            lat = v.get("step_latency_s")
            if lat and int(n) == 100_000:
                rows.append((f"decode step latency, n = {int(n):.0e}, {lat['steps']} steps timed one by one",
                             f"p50 {lat['p50'] * us:.1f} us, p99 {lat['p99'] * us:.1f} us, "
                             f"p99.9 {lat['p99.9'] * us:.0f} us, max {lat['max'] * us:.0f} us; "
                             f"{lat['over_1ms']} steps over 1 ms", "-", None))
    if "short" in res:
        for case in res["short"]["cases"].values():
            dense = case["dense_step_s"]
            measured = (f"{fmt(case['ratio_to_dense'], digits=2)} ({fmt(case['sketch_step_s'], us, 0)} us vs "
                        f"{fmt(dense['1'], us, 0)} us 1-thread / {fmt(dense['default'], us, 0)} us default)")
            label = f"decode step with values after a {case['n0']}-token prompt, {case['heads']} head(s), sketch / dense"
            rows.append((label, measured, "-", None))
    if "prefill" in res:
        p = res["prefill"]
        measured = (f"{fmt(p['speedup'], digits=1)}x ({fmt(p['sketch_s'], digits=2)} s vs "
                    f"{fmt(p['dense_1thread_s'], digits=2)} s 1-thread / "
                    f"{fmt(p['dense_default_s'], digits=2)} s default)")
        rows.append((f"causal prefill ({p['chunk']}-row chunks) vs dense causal, n = {p['n']:.0e}",
                     measured, ">= 5x", p["speedup"]["median"] >= 5))
    if "gemm" in res:
        g = res["gemm"]
        measured = (f"{fmt(g['ratio'], digits=2)} ({fmt(g['sketch_s'], digits=2)} s vs "
                    f"{fmt(g['gemm_1thread_s'], digits=2)} s 1-thread / "
                    f"{fmt(g['gemm_default_s'], digits=2)} s default)")
        rows.append((f"update_many with values, exact outputs / GEMM phi(K)^T V, n = {g['n']:,}",
                     measured, "<= 1.3", g["ratio"]["median"] <= 1.3))
    if "rss" in res:
        r = res["rss"]
        rows.append((f"peak RSS with values, n = {r['n_large']:.0e} / {r['n_small']:.0e}",
                     f"{r['ratio']:.3f} ({r['hwm_large_MB']:.1f} MB / {r['hwm_small_MB']:.1f} MB)",
                     "<= 1.05", r["ratio"] <= 1.05))
        if "fixed_mmap_threshold" in r:
            f = r["fixed_mmap_threshold"]
            measured = f"{f['ratio']:.3f} ({f['hwm_large_MB']:.1f} MB / {f['hwm_small_MB']:.1f} MB)"
            rows.append(("same, glibc mmap threshold fixed (MALLOC_MMAP_THRESHOLD_=131072)",
                         measured, "-", None))
    return rows


def git_commit() -> str:
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).parent,
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, seconds (the smoke test)")
    ap.add_argument("--only", default=",".join(SECTIONS),
                    help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--out", metavar="FILE", help="write every measurement as JSON")
    ap.add_argument("--rss-child", type=int, metavar="N", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    d, eps, dv = 64, 0.01, 64
    if args.rss_child is not None:
        rss_child(args.rss_child, d, eps, dv)
        return 0
    only = [s for s in args.only.split(",") if s]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        ap.error(f"--only must name sections among {', '.join(SECTIONS)}; got {', '.join(unknown)}")
    sz = QUICK if args.quick else FULL
    command = " ".join(["python benchmarks/bench_live.py"] + (["--quick"] if args.quick else [])
                       + ([f"--only {args.only}"] if set(only) != set(SECTIONS) else []))
    header = {"command": command, "commit": git_commit(),
              "utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "python": platform.python_version(), "numpy": np.__version__,
              "levstream": ls.__version__, "threads": describe_threads(), "load_start": load(),
              "d": d, "eps": eps, "dv": dv}
    print(f"# {header['command']}  [{header['commit']}, {header['utc']}]")
    print(f"# {header['machine']}, python {header['python']}, numpy {header['numpy']}; "
          f"{header['threads']}")
    print(f"# load average {header['load_start']}", flush=True)
    failures = Failures()
    t0 = time.perf_counter()
    warm_up(d, eps, dv, sz.n_heads)
    runners: dict[str, Callable[[], dict]] = {
        "live": lambda: bench_live(sz, d, eps, failures),
        "filtered": lambda: bench_filtered(sz, d, eps, failures),
        "forms": lambda: bench_forms(sz, d, eps, dv, failures),
        "heads": lambda: bench_heads(sz, d, eps, failures),
        "bulk": lambda: bench_bulk(sz, d, eps, failures),
        "decode": lambda: bench_decode(sz, d, eps, dv, failures),
        "short": lambda: bench_short(sz, d, eps, dv, failures),
        "prefill": lambda: bench_prefill(sz, d, eps, dv, failures),
        "gemm": lambda: bench_gemm(sz, d, eps, dv, failures),
        "rss": lambda: bench_rss(sz, d, eps, dv, failures)}
    results, rows = run_sections(runners, SECTIONS, only, header, t0, summary_rows)
    checks = {name: r["check"] for name, r in results.items() if "check" in r}
    for name in ("live", "decode"):
        if name in results:
            checks[name] = merge_checks(*[v["check"] for v in results[name]["per_n"].values()],
                                        same_rows=False)
    return finish(checks, args.out, header, results, rows, failures)


def run_sections(runners: dict, sections: tuple[str, ...], only: list[str], header: dict, t0: float,
                 summary: Callable[[dict], list]) -> tuple[dict, list]:
    """Run the selected sections in order, print each one's time and load, then the figures' table;
    returns ``(results, table rows)``.  Shared by the benchmark scripts of this folder."""
    results: dict[str, Any] = {}
    for name in sections:
        if name in only:
            results[name] = runners[name]()
            env = results[name]["env"]
            print(f"# {name}: {env['wall_s']} s, load {env['load_start']} -> {env['load_end']}",
                  flush=True)
    header["load_end"] = load()
    header["wall_s"] = round(time.perf_counter() - t0, 1)
    rows = summary(results)
    print("\n| figure | measured: median (range) over the rounds | target | met |")
    print("|---|---|---|---|")
    for fig, measured, target, met in rows:
        verdict = "-" if met is None else ("yes" if met else "**no**")
        print(f"| {fig} | {measured} | {target} | {verdict} |")
    return results, rows


def finish(checks: dict, out: str | None, header: dict, results: dict, rows: list, failures: Failures) -> int:
    """Print the brute-force checks, write the JSON record (``out``), and return the exit status (1 on any
    difference); shared by the benchmark scripts of this folder."""
    print("\nchecks against brute force: " + "; ".join(
        f"{name} {'ok' if c['ok'] else 'FAILED'} ({c.get('rows', 0)} query rows, "
        f"{c.get('entries', 0)} entries, {c.get('ties', 0)} ties)" for name, c in checks.items()))
    if out:
        Path(out).write_text(json.dumps(
            {"header": header, "results": results, "summary": [list(r) for r in rows],
             "failures": failures.messages}, indent=2, default=float))
    if failures.messages:
        print(f"FAILED: {len(failures.messages)} check(s) differ from brute force")
        return 1
    print(f"ok: every checked answer equals brute force ({header['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
