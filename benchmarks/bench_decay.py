"""Decaying streams (issue 13): the price of gates, per step and in bulk, and decayed attention against dense.

Figures (d = 64, eps = 0.01, dv = 64, p = 2; keys ``levstream.synthetic.attention_like_keys`` and queries
``attention_like_queries``, as in ``bench_live.py``; values standard normal):

* ``live``: a prefix of n = 10^5 keys fed by ``update_many``, then steps ``sk.update(k, gate=g)`` +
  ``sk.heavy_entries(q[None])``, against the same steps without gates on the same keys and queries (the
  target: gated / ungated <= 1.2).  Gate settings: ``gate=1.0`` passed explicitly (prefix and steps: the
  pure price of the gate argument), gates uniform in [0.999, 1] and in [0.99, 1] (data-dependent), and a
  constant ``KeySketch(decay=0.999)``.  Each gated stream also runs against dense *decayed* attention over
  the prefix (the target: >= 100x), and reports what a query scans (``num_retained``) and ``|U|``: with
  real decay the universal set is the recent past, ~1 / (1 - g) rows, much larger than without decay;
* ``decode``: a decode step with values, ``sk.prefill(k[None], v[None], q[None], gates=[g])`` (exact output
  and heavy entries, ``exact_output=True``, dv = 64) against dense decayed attention with values over the
  prefix (the target: >= 100x), and against the same step without gates;
* ``heads``: the gated steps of a ``MultiHeadKeySketch`` of 12 heads, one call per op with a gate per head
  (uniform in [0.999, 1], drawn per head): ``mh.update(x, gate=g)`` + ``mh.heavy_entries(q)`` with tokens
  ``(12, d)`` and queries ``(12, 1, d)``, and a decode step with values ``mh.prefill(k, v, q, gates=g[:, None])``
  (exact outputs), after a prefix of n = 5*10^4 tokens, against the same steps of a single-head ``KeySketch``
  fed head 0's keys and gates in the same run (the ungated twin: ``bench_live.py``'s ``heads``, <= 4 there);
  12 independent sketches would cost 12 single-head steps;
* ``bulk``: ``update_many`` of 8192-row chunks, n = 2*10^6, then ``universal_set()``, with gates (uniform in
  [0.9999, 1], and all 1.0) over without (the target: <= 1.2); the final universal sets are checked against
  the offline leverage scores of the weighted keys ``sqrt(c_j) k_j`` (a blocked QR);
* ``rss``: peak RSS (VmHWM) streaming 10^5 and 10^7 gated rows (Gaussian keys with heavy-tailed norms, gates
  uniform in [0.999, 1], generator chunks of 8192 rows fed by ``update_many(X, gates=g)``, never all held), a
  fresh process each (the target: ratio <= 1.05); ``--rss-fixed-mmap`` also measures it with glibc's mmap
  threshold fixed, as ``bench_live.py`` does.

The gate of row t multiplies everything before it: key j weighs ``c_j(t) = g_{j+1} ... g_t`` and
``A_j = c_j <q, k_j>^2 / sum_l c_l <q, k_l>^2`` (docs/streams-that-forget.md).

The dense decayed baseline is what a competent NumPy user would write: K, V and the weights ``c_j`` in
preallocated float64 arrays; each step multiplies the weights by the row's gate (the new row enters with
weight 1, so nothing grows; weights below 1e-290 are flushed to zero whenever the state is rebuilt, so no
subnormal arithmetic), then ``w * (K @ q)^2``, its sum, the threshold and ``(s @ V) / Z``.  It is timed with
the default BLAS threads and with one BLAS thread, and the faster of the two in each round is the baseline
(see ``bench_live.py``: a multithreaded OpenBLAS GEMV on a loaded 2-core machine waits for its threads).
The dense steps of a round run at the same step positions as the sketch's; the weights at the first
position are rebuilt (untimed) from the log-gates before each thread setting.

Every figure is measured side by side in one process: in each round every stream (gated and ungated) runs its
steps one after the other, in an order rotated from round to round so that each takes each position once, then
the dense baselines run; every timed block starts after a short pause (threads of the previous block, e.g.
OpenBLAS workers spinning after a dense step at default threads, would otherwise slow whichever stream comes
next).  The ratio gated / ungated is taken within each round, and every figure is reported as the median and
the range over the rounds, never the best round.

Every answer is checked against brute force written here (independent of levstream): every live and decode
step (at least 1000 per stream) against a blocked dense pass with the weights ``exp(L_t - L_j)`` formed from
cumulative log-gates summed in extended precision, and the dense baseline's own answers the same way;
entries must be identical (entries within 1e-9 relative of eps may go either way), values within rtol 1e-9,
exact outputs within 1e-10 of the row's largest output.  The bulk universal sets against a blocked QR of the
weighted keys (same tie rule); the RSS streams' heavy entries and normalisers of 8 queries against a pass
over the regenerated stream.  The script exits with status 1 on any difference.

    python benchmarks/bench_decay.py                     # full sizes (3-15 minutes here, with the load)
    python benchmarks/bench_decay.py --quick             # small sizes, seconds (the smoke test)
    python benchmarks/bench_decay.py --only live,decode --out decay.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_live import (
    CANDIDATE_SLACK,
    DENSE_THREADS,
    FIXED_MMAP_THRESHOLD,
    TIE_RTOL,
    VALUE_RTOL,
    Failures,
    Reference,
    compare_heavy_outputs,
    compare_outputs,
    compare_rows,
    entries_of,
    finish,
    run_sections,
    fmt,
    git_commit,
    keys,
    limited,
    load,
    merge_checks,
    section_env,
    spread,
    values,
    warm_up,
)

import levstream as ls
from levstream._threads import describe_threads
from levstream.synthetic import attention_like_keys, attention_like_queries

SECTIONS = ("live", "decode", "heads", "bulk", "rss")
#: Weights below this are set to zero by the dense baseline when it rebuilds its weights (no subnormals).
DENSE_FLUSH = 1e-290


@dataclass(frozen=True)
class Gates:
    """One gate setting: ``kind`` is "none" (no gate argument), "ones" (gate=1.0 passed explicitly),
    "uniform" (gates uniform in [lo, 1]) or "decay" (a constant ``KeySketch(decay=lo)``, no gate argument)."""

    name: str
    kind: str
    lo: float = 1.0

    def draw(self, n: int, seed: int) -> np.ndarray | None:
        """The gates of ``n`` rows passed to the sketch (None: no gate argument)."""
        if self.kind == "none" or self.kind == "decay":
            return None
        if self.kind == "ones":
            return np.ones(n)
        return np.random.default_rng([seed, 0x6A7E]).uniform(self.lo, 1.0, n)

    def effective(self, n: int, seed: int) -> np.ndarray | None:
        """Every row's effective gate (None: no decay at all)."""
        if self.kind == "none":
            return None
        if self.kind == "decay":
            return np.full(n, self.lo)
        return self.draw(n, seed)

    def sketch(self, d: int, eps: float, **kw: Any) -> ls.KeySketch:
        return ls.KeySketch(d, eps=eps, decay=self.lo if self.kind == "decay" else None, **kw)

    @property
    def window(self) -> float | None:
        """The effective window ``1 / (1 - mean gate)`` in rows (None: no decay)."""
        if self.kind in ("none", "ones"):
            return None
        mean = self.lo if self.kind == "decay" else (1.0 + self.lo) / 2
        return 1.0 / (1.0 - mean)


NONE = Gates("no gates", "none")
STEP_GATES = (NONE, Gates("gate=1.0", "ones"), Gates("U[0.999,1]", "uniform", 0.999),
              Gates("U[0.99,1]", "uniform", 0.99), Gates("decay=0.999", "decay", 0.999))
BULK_GATES = (NONE, Gates("gate=1.0", "ones"), Gates("U[0.9999,1]", "uniform", 0.9999))
RSS_GATES = Gates("U[0.999,1]", "uniform", 0.999)


@dataclass(frozen=True)
class Sizes:
    live_n: int
    decode_n: int
    bulk_n: int
    rss_n: tuple[int, int]
    warm_steps: int  # untimed (but checked) steps before the timed rounds
    rounds: int
    steps_per_round: int
    dense_budget_s: float  # dense steps of a round stop after this long (at least 10 steps)
    bulk_rounds: int
    rss_fixed_mmap: bool
    heads_n: int = 50_000
    n_heads: int = 12
    heads_steps_per_round: int = 200


FULL = Sizes(live_n=100_000, decode_n=100_000, bulk_n=2_000_000, rss_n=(100_000, 10_000_000),
             warm_steps=100, rounds=5, steps_per_round=400, dense_budget_s=0.4, bulk_rounds=5,
             rss_fixed_mmap=False)
QUICK = Sizes(live_n=5_000, decode_n=5_000, bulk_n=65_536, rss_n=(10_000, 20_000), warm_steps=40,
              rounds=3, steps_per_round=320, dense_budget_s=0.03, bulk_rounds=3, rss_fixed_mmap=False,
              heads_n=3_000, heads_steps_per_round=120)
#: The gates of every head in the ``heads`` section (drawn per head).
HEAD_GATES = Gates("U[0.999,1]", "uniform", 0.999)


# ---------------------------------------------------------------------- brute force (plain NumPy)
def log_cumulative(g: np.ndarray | None, n: int) -> np.ndarray:
    """``L_i = sum_{s <= i} log g_s`` in extended precision (zeros without decay): ``c_j(t) = exp(L_t - L_j)``."""
    if g is None:
        return np.zeros(n, dtype=np.longdouble)
    return np.cumsum(np.log(np.asarray(g[:n], dtype=np.float64)).astype(np.longdouble))


def decayed_brute_force(Q: np.ndarray, K: np.ndarray, ends: np.ndarray, L: np.ndarray, eps: float,
                        V: np.ndarray | None = None, key_block: int = 16384,
                        query_block: int = 512) -> Reference:
    """Query ``t`` sees the keys ``K[:ends[t]]`` weighed ``c_j = exp(L[ends[t]-1] - L[j])`` (``ends``
    non-decreasing): its entries near or above ``eps``, its decayed normaliser and (with ``V``) its output
    numerator.  ``Reference.weights`` holds ``c_j <q, k_j>^2``.

    One pass over the keys in blocks: a (query, key) pair is kept when its weight reaches ``eps`` times the
    normaliser summed so far, which only grows (every weight is >= 0), so every entry ``A >= eps`` is kept; the
    comparison applies the final threshold.  The log-weights are differences of extended-precision sums taken
    relative to the block's first key, so each weight is exact to a few ulps of its logarithm.
    """
    T = Q.shape[0]
    ends = np.asarray(ends, dtype=np.int64)
    n = int(ends.max()) if T else 0
    Z = np.zeros(T)
    num = None if V is None else np.zeros((T, V.shape[1]))
    L_end = L[ends - 1]
    rows, cols, ws = [], [], []
    for a in range(0, n, key_block):
        b = min(a + key_block, n)
        first = int(np.searchsorted(ends, a, side="right"))  # the first query that sees key a
        lk = (L[a:b] - L[a]).astype(np.float64)
        for qa in range(first, T, query_block):
            qb = min(qa + query_block, T)
            E = (L_end[qa:qb] - L[a]).astype(np.float64)[:, None] - lk[None, :]
            if ends[qa] < b:  # key j is visible to query t iff j < ends[t]
                E[np.arange(a, b)[None, :] >= ends[qa:qb, None]] = -np.inf
            W = Q[qa:qb] @ K[a:b].T
            W *= W
            W *= np.exp(E)
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


def weighted_leverage(chunks: list[np.ndarray], L: np.ndarray, block: int = 65536) -> np.ndarray:
    """Leverage scores of the weighted keys ``sqrt(c_j) k_j`` (``c_j = exp(L[-1] - L[j])``) of the
    concatenated chunks, by a blocked QR: ``R`` from the QRs of row blocks, then ``||R^-T x_j||^2``."""
    K = np.concatenate(chunks) if len(chunks) > 1 else chunks[0]
    n = K.shape[0]
    half = (0.5 * (L[-1] - L)).astype(np.float64)  # log sqrt(c_j) <= 0

    def weighted(a: int, b: int) -> np.ndarray:
        return K[a:b] * np.exp(half[a:b])[:, None]

    Rs = [np.linalg.qr(weighted(a, min(n, a + block)), mode="r") for a in range(0, n, block)]
    R = np.linalg.qr(np.vstack(Rs), mode="r")
    from scipy.linalg import solve_triangular

    tau = np.empty(n)
    for a in range(0, n, block):
        b = min(n, a + block)
        Y = solve_triangular(R, weighted(a, b).T, trans="T", lower=False)
        tau[a:b] = np.einsum("ij,ij->j", Y, Y)
    return tau


def compare_universal(U: Any, tau: np.ndarray, eps: float) -> dict:
    """A universal set against offline scores: every key with ``tau >= eps (1 + TIE_RTOL)`` in it, none with
    ``tau < eps (1 - TIE_RTOL)``, and its scores within ``VALUE_RTOL``."""
    must = set(np.flatnonzero(tau >= eps * (1.0 + TIE_RTOL)).tolist())
    allowed = set(np.flatnonzero(tau >= eps * (1.0 - TIE_RTOL)).tolist())
    got = set(U.ids.tolist())
    missed, spurious = len(must - got), len(got - allowed)
    common = U.ids[np.isin(U.ids, np.fromiter(allowed, np.int64, len(allowed)))]
    sel = np.isin(U.ids, common)
    err = np.abs(U.scores[sel] - tau[common]) / tau[common] if common.size else np.zeros(0)
    worst = float(err.max()) if err.size else 0.0
    ok = missed == 0 and spurious == 0 and worst <= VALUE_RTOL
    return {"ok": bool(ok), "rows": 1, "entries": len(must), "missed": missed, "spurious": spurious,
            "ties": len(got ^ must) - missed - spurious, "max_score_rel_err": worst}


# ---------------------------------------------------------------------- dense decayed steps
@dataclass
class Stream:
    """One prefilled sketch at size ``n`` with gate setting ``gates`` and its dense twin (every key, value and
    weight in a preallocated array)."""

    gates: Gates
    n: int
    K: np.ndarray  # the n prefilled keys, then the keys of the steps
    V: np.ndarray | None
    g: np.ndarray | None  # the gates passed to the sketch, one per row (None: no gate argument)
    geff: np.ndarray | None  # every row's effective gate (None: no decay)
    L: np.ndarray  # cumulative log-gates (extended precision)
    sketch: Any
    answers: list
    w: np.ndarray
    buf: np.ndarray
    mask: np.ndarray
    sketch_s: list = field(default_factory=list)
    dense_s: dict = field(default_factory=lambda: {name: [] for name, _ in DENSE_THREADS})
    dense: list = field(default_factory=list)  # (step, dense answer)
    retained: list = field(default_factory=list)  # num_retained after each round


def make_stream(gates: Gates, n: int, T: int, d: int, eps: float, dv: int | None, seed: int) -> Stream:
    K = keys(n + T, d, seed=0)
    V = None if dv is None else values(n + T, dv, seed=0)
    g, geff = gates.draw(n + T, seed), gates.effective(n + T, seed)
    kw = {} if dv is None else {"value_dim": dv, "exact_output": True}
    sk = gates.sketch(d, eps, **kw)
    for a in range(0, n, 65536):
        b = min(n, a + 65536)
        sk.update_many(K[a:b], None if V is None else V[a:b], gates=None if g is None else g[a:b])
    return Stream(gates, n, K, V, g, geff, log_cumulative(geff, n + T), sk, [None] * T, np.empty(n + T),
                  np.empty(n + T), np.empty(n + T, dtype=bool))


def dense_reset(st: Stream, m: int) -> None:
    """The dense twin's weights just before row ``m`` arrives: ``w_j = c_j(m - 1)`` (untimed)."""
    if st.geff is None:
        return
    w = st.w[:m]
    np.exp((st.L[m - 1] - st.L[:m]).astype(np.float64), out=w)
    w[w < DENSE_FLUSH] = 0.0


def dense_decayed_step(st: Stream, m: int, q: np.ndarray, eps: float) -> tuple:
    """Row ``m`` arrives (its gate multiplies every earlier weight, it enters with weight 1), then every
    ``A >= eps`` of ``q`` over ``K[:m+1]`` with the weights, and (with values) the exact output."""
    K, w = st.K, st.w
    K[m] = st.K[m]  # the key arrives (the array holds the stream; a real user writes it here)
    if st.V is not None:
        st.V[m] = st.V[m]
    s = st.buf[: m + 1]
    np.dot(K[: m + 1], q, out=s)
    np.multiply(s, s, out=s)
    if st.geff is not None:
        wm = w[:m]
        np.multiply(wm, st.geff[m], out=wm)
        w[m] = 1.0
        np.multiply(s, w[: m + 1], out=s)
    Z = s.sum()
    np.greater_equal(s, eps * Z, out=st.mask[: m + 1])
    idx = np.flatnonzero(st.mask[: m + 1])
    if st.V is None:
        return idx, s[idx] / Z
    return idx, s[idx] / Z, (s @ st.V[: m + 1]) / Z


#: Pause before every timed block: threads of the previous block (OpenBLAS and OpenMP workers spin for a
#: while after a call) must not steal the core of the next one.  Measured without it, the stream timed right
#: after a dense baseline at default BLAS threads ran ~1.5x slower, and the stream order decided the ratios.
SETTLE_S = 0.1


def rotation(items: list, r: int) -> list:
    """``items`` rotated by ``r``: over ``len(items)`` rounds every item takes every position once."""
    k = r % len(items)
    return items[k:] + items[:k]


def interleaved_steps(sz: Sizes, streams: list[Stream], sketch_step: Callable[[Stream, int], Any],
                      eps: float, Q: np.ndarray) -> None:
    """Warm steps, then ``sz.rounds`` rounds.  In each round every stream runs its ``sz.steps_per_round``
    sketch steps, one stream after the other in an order rotated each round (every stream takes every
    position once in ``len(streams)`` rounds); then, stream by stream, dense decayed steps at the same
    positions with each BLAS setting (alternating order; weights rebuilt untimed before each; each stops after
    ``sz.dense_budget_s``, at least 10 steps).  Every timed block starts after a pause of ``SETTLE_S``."""
    for st in streams:
        for t in range(sz.warm_steps):
            st.answers[t] = sketch_step(st, t)
    for r in range(sz.rounds):
        lo = sz.warm_steps + r * sz.steps_per_round
        hi = lo + sz.steps_per_round
        for st in rotation(streams, r):
            time.sleep(SETTLE_S)
            t0 = time.perf_counter()
            for t in range(lo, hi):
                st.answers[t] = sketch_step(st, t)
            st.sketch_s.append((time.perf_counter() - t0) / sz.steps_per_round)
            st.retained.append(int(st.sketch.num_retained))
        for st in rotation(streams, r):
            for name, setting in (DENSE_THREADS if r % 2 == 0 else DENSE_THREADS[::-1]):
                dense_reset(st, st.n + lo)
                time.sleep(SETTLE_S)
                with limited(setting):
                    done = []
                    t0 = time.perf_counter()
                    for t in range(lo, hi):
                        done.append((t, dense_decayed_step(st, st.n + t, Q[t], eps)))
                        if len(done) >= 10 and time.perf_counter() - t0 > sz.dense_budget_s:
                            break
                    st.dense_s[name].append((time.perf_counter() - t0) / len(done))
                st.dense.extend(done)


def step_figures(st: Stream, base: Stream) -> dict:
    """Per-step times, speed-ups over the dense decayed baseline (the faster dense setting of each round)
    and the ratio to the ungated stream's step in the same round."""
    best = [min(a, b) for a, b in zip(st.dense_s["default"], st.dense_s["1"])]
    return {"gates": st.gates.name, "sketch_step_s": spread(st.sketch_s),
            "dense_step_s": {name: spread(v) for name, v in st.dense_s.items()},
            "dense_steps_timed_per_round": len(st.dense) // (2 * len(st.sketch_s)),
            "speedup": spread([b / s for b, s in zip(best, st.sketch_s)]),
            "speedup_vs_dense_default_threads": spread(
                [b / s for b, s in zip(st.dense_s["default"], st.sketch_s)]),
            "ratio_to_ungated": spread([s / u for s, u in zip(st.sketch_s, base.sketch_s)]),
            "effective_window": st.gates.window,
            "retained_per_round": st.retained}


def universal_size(sk: Any) -> int:
    """``len(universal_set())`` of a copy (asking for it rescores; the timed sketch is left as it was)."""
    return len(sk.copy().universal_set())


def gate_kw(st: Stream, m: int, many: bool) -> dict:
    if st.g is None:
        return {}
    return {"gates": st.g[m:m + 1]} if many else {"gate": st.g[m]}


# ---------------------------------------------------------------------- live steps
@section_env
def bench_live(sz: Sizes, d: int, eps: float, failures: Failures) -> dict:
    """Interleaved ``update(k, gate=g)`` + ``heavy_entries`` steps of every gate setting at n."""
    T = sz.warm_steps + sz.rounds * sz.steps_per_round
    n = sz.live_n
    Q = attention_like_queries(T, d, seed=1, key_seed=0)
    streams = [make_stream(g, n, T, d, eps, None, seed=11) for g in STEP_GATES]

    def sketch_step(st: Stream, t: int) -> Any:
        m = st.n + t
        if st.g is None:
            st.sketch.update(st.K[m])
        else:
            st.sketch.update(st.K[m], gate=st.g[m])
        return st.sketch.heavy_entries(Q[t][None])

    interleaved_steps(sz, streams, sketch_step, eps, Q)
    out: dict[str, Any] = {"n": n, "steps_checked": T, "timed_steps": sz.rounds * sz.steps_per_round,
                           "per_gates": {}}
    for st in streams:
        ref = decayed_brute_force(Q, st.K, st.n + 1 + np.arange(T), st.L, eps)
        check = compare_rows([entries_of(a) for a in st.answers], ref, eps)
        failures.add(f"live {st.gates.name} sketch", check)
        steps = np.array([t for t, _ in st.dense])
        dcheck = compare_rows([a for _, a in st.dense], ref, eps, rows=steps)
        failures.add(f"live {st.gates.name} dense baseline", dcheck)
        out["per_gates"][st.gates.name] = {
            **step_figures(st, streams[0]), "retained": int(st.sketch.num_retained),
            "universal_set": universal_size(st.sketch), "check": check, "dense_check": dcheck}
    for st in streams:
        st.K = np.empty((0, d))
    return out


# ---------------------------------------------------------------------- decode steps with values
@section_env
def bench_decode(sz: Sizes, d: int, eps: float, dv: int, failures: Failures) -> dict:
    """``prefill`` of one row with its gate (exact output, heavy entries) of every gate setting at n."""
    T = sz.warm_steps + sz.rounds * sz.steps_per_round
    n = sz.decode_n
    Q = attention_like_queries(T, d, seed=2, key_seed=0)
    streams = [make_stream(g, n, T, d, eps, dv, seed=12) for g in STEP_GATES]

    def sketch_step(st: Stream, t: int) -> Any:
        m = st.n + t
        assert st.V is not None
        return st.sketch.prefill(st.K[m][None], st.V[m][None], Q[t][None], **gate_kw(st, m, True))

    interleaved_steps(sz, streams, sketch_step, eps, Q)
    out: dict[str, Any] = {"n": n, "dv": dv, "steps_checked": T,
                           "timed_steps": sz.rounds * sz.steps_per_round, "per_gates": {}}
    for st in streams:
        assert st.V is not None
        ref = decayed_brute_force(Q, st.K, st.n + 1 + np.arange(T), st.L, eps, V=st.V)
        check = merge_checks(
            compare_rows([entries_of(a.entries) for a in st.answers], ref, eps),
            compare_outputs(np.concatenate([a.output for a in st.answers]), ref),
            compare_heavy_outputs(st.answers, ref, st.V, eps))
        failures.add(f"decode {st.gates.name} sketch", check)
        steps = np.array([t for t, _ in st.dense])
        dcheck = merge_checks(
            compare_rows([(i, v) for _, (i, v, _) in st.dense], ref, eps, rows=steps),
            compare_outputs(np.array([o for _, (_, _, o) in st.dense]), ref, rows=steps))
        failures.add(f"decode {st.gates.name} dense baseline", dcheck)
        out["per_gates"][st.gates.name] = {
            **step_figures(st, streams[0]), "retained": int(st.sketch.num_retained),
            "universal_set": universal_size(st.sketch), "check": check, "dense_check": dcheck}
    for st in streams:
        st.K, st.V = np.empty((0, d)), None
    return out


# ---------------------------------------------------------------------- many heads
def head_results(res: Any, h: int) -> Any:
    """Head ``h``'s part of a multi-head ``AttentionResult`` (one query), as a one-head result."""
    return ls.AttentionResult(res.entries[h], res.heavy_output[h], res.captured_mass[h],
                              None if res.output is None else res.output[h])


@section_env
def bench_heads(sz: Sizes, d: int, eps: float, dv: int, failures: Failures) -> dict:
    """Gated steps of ``n_heads`` heads, one call per op, against the same steps of one head at the same n:
    live steps (``update`` of an (H, d) token with a gate per head, ``heavy_entries`` of (H, 1, d) queries) and
    decode steps with values (``prefill`` of (H, 1, d) with gates (H, 1), exact outputs).  A round runs
    ``heads_steps_per_round`` steps of the heads and then of the single head, for each kind (the order of the
    two alternates between rounds); every answer of every head is checked against brute force."""
    H, n, per_round = sz.n_heads, sz.heads_n, sz.heads_steps_per_round
    T = sz.warm_steps + sz.rounds * per_round
    K = np.stack([keys(n + T, d, seed=30 + h) for h in range(H)])  # (H, n + T, d)
    V = np.stack([values(n + T, dv, seed=30 + h) for h in range(H)])
    Q = np.stack([attention_like_queries(T, d, seed=40 + h, key_seed=30 + h) for h in range(H)])
    G = np.stack([HEAD_GATES.draw(n + T, seed=50 + h) for h in range(H)])  # (H, n + T)
    tokens = np.ascontiguousarray(K[:, n:].transpose(1, 0, 2))  # (T, H, d)
    token_values = np.ascontiguousarray(V[:, n:].transpose(1, 0, 2))
    queries = np.ascontiguousarray(Q.transpose(1, 0, 2))[:, :, None, :]  # (T, H, 1, d)
    token_gates = np.ascontiguousarray(G[:, n:].T)  # (T, H)
    live_mh = ls.MultiHeadKeySketch(H, d, eps=eps)
    live_one = ls.KeySketch(d, eps=eps)
    dec_mh = ls.MultiHeadKeySketch(H, d, eps=eps, value_dim=dv, exact_output=True)
    dec_one = ls.KeySketch(d, eps=eps, value_dim=dv, exact_output=True)
    for a in range(0, n, 16384):
        b = min(n, a + 16384)
        live_mh.update_many(K[:, a:b], gates=G[:, a:b])
        live_one.update_many(K[0, a:b], gates=G[0, a:b])
        dec_mh.update_many(K[:, a:b], V[:, a:b], gates=G[:, a:b])
        dec_one.update_many(K[0, a:b], V[0, a:b], gates=G[0, a:b])
    got: dict[str, list[Any]] = {k: [None] * T for k in ("live_mh", "live_one", "dec_mh", "dec_one")}

    def live_heads(lo: int, hi: int) -> float:
        t0 = time.perf_counter()
        for t in range(lo, hi):
            live_mh.update(tokens[t], gate=token_gates[t])
            got["live_mh"][t] = live_mh.heavy_entries(queries[t])
        return (time.perf_counter() - t0) / (hi - lo)

    def live_single(lo: int, hi: int) -> float:
        t0 = time.perf_counter()
        for t in range(lo, hi):
            live_one.update(tokens[t, 0], gate=token_gates[t, 0])
            got["live_one"][t] = live_one.heavy_entries(queries[t, 0])
        return (time.perf_counter() - t0) / (hi - lo)

    def decode_heads(lo: int, hi: int) -> float:
        t0 = time.perf_counter()
        for t in range(lo, hi):
            got["dec_mh"][t] = dec_mh.prefill(tokens[t][:, None], token_values[t][:, None], queries[t],
                                              gates=token_gates[t][:, None])
        return (time.perf_counter() - t0) / (hi - lo)

    def decode_single(lo: int, hi: int) -> float:
        t0 = time.perf_counter()
        for t in range(lo, hi):
            got["dec_one"][t] = dec_one.prefill(tokens[t, 0][None], token_values[t, 0][None],
                                                queries[t, 0], gates=token_gates[t, :1])
        return (time.perf_counter() - t0) / (hi - lo)

    pairs = {"live": (live_heads, live_single), "decode": (decode_heads, decode_single)}
    for heads_fn, single_fn in pairs.values():
        heads_fn(0, sz.warm_steps)
        single_fn(0, sz.warm_steps)
    times: dict[str, dict[str, list[float]]] = {k: {"heads": [], "single": []} for k in pairs}
    for r in range(sz.rounds):
        lo = sz.warm_steps + r * per_round
        for kind, (heads_fn, single_fn) in pairs.items():
            order = [("heads", heads_fn), ("single", single_fn)]
            for who, fn in order if r % 2 == 0 else order[::-1]:
                time.sleep(SETTLE_S)
                times[kind][who].append(fn(lo, lo + per_round))
    ends = n + 1 + np.arange(T)
    out: dict[str, Any] = {"n": n, "n_heads": H, "gates": HEAD_GATES.name, "steps_checked": T,
                           "timed_steps": sz.rounds * per_round}
    for kind in pairs:
        checks = []
        for h in range(H):
            L = log_cumulative(G[h], n + T)
            ref = decayed_brute_force(Q[h], K[h], ends, L, eps, V=V[h] if kind == "decode" else None)
            if kind == "live":
                rows = [entries_of(a[h]) for a in got["live_mh"]]
                checks.append(compare_rows(rows, ref, eps))
                if h == 0:
                    single = compare_rows([entries_of(a) for a in got["live_one"]], ref, eps)
            else:
                per_head = [head_results(a, h) for a in got["dec_mh"]]
                checks.append(merge_checks(
                    compare_rows([entries_of(a.entries) for a in per_head], ref, eps),
                    compare_outputs(np.concatenate([a.output for a in per_head]), ref),
                    compare_heavy_outputs(per_head, ref, V[h], eps)))
                if h == 0:
                    ones = got["dec_one"]
                    single = merge_checks(
                        compare_rows([entries_of(a.entries) for a in ones], ref, eps),
                        compare_outputs(np.concatenate([a.output for a in ones]), ref),
                        compare_heavy_outputs(ones, ref, V[h], eps))
        check = merge_checks(*checks, same_rows=False)
        failures.add(f"heads {kind} {H}-head", check)
        failures.add(f"heads {kind} single-head", single)
        t = times[kind]
        mh = live_mh if kind == "live" else dec_mh
        out[kind] = {"heads_step_s": spread(t["heads"]), "single_step_s": spread(t["single"]),
                     "ratio": spread([a / b for a, b in zip(t["heads"], t["single"])]),
                     "retained_per_head": [int(hd.num_retained) for hd in mh.heads],
                     "check": check, "single_check": single}
    return out


# ---------------------------------------------------------------------- bulk build
@section_env
def bench_bulk(sz: Sizes, d: int, eps: float, failures: Failures) -> dict:
    """``update_many`` of 8192-row chunks then ``universal_set()``, with gates over without, the order of the
    settings rotated each round; the universal sets against the blocked QR."""
    block, n = 8192, sz.bulk_n
    chunks = list(attention_like_keys(n, d, chunk_rows=block, seed=0))
    starts = np.cumsum([0] + [X.shape[0] for X in chunks])
    settings = []
    for gs in BULK_GATES:
        g = gs.draw(n, seed=13)
        settings.append((gs, None if g is None else [g[a:b] for a, b in itertools.pairwise(starts)]))

    def build(gs: Gates, gchunks: list | None) -> tuple[float, float, Any]:
        sk = gs.sketch(d, eps, block_rows=block)
        t0 = time.perf_counter()
        if gchunks is None:
            for X in chunks:
                sk.update_many(X)
        else:
            for X, g in zip(chunks, gchunks):
                sk.update_many(X, gates=g)
        t1 = time.perf_counter()
        U = sk.universal_set()
        return t1 - t0, time.perf_counter() - t0, U

    for gs, gc in settings:  # warm: first touch of the chunks, kernels
        build(gs, gc)
    times: dict[str, dict[str, list[float]]] = {gs.name: {"build": [], "update_many": []}
                                                  for gs, _ in settings}
    last: dict[str, list] = {gs.name: [] for gs, _ in settings}
    for r in range(sz.bulk_rounds):
        for gs, gc in rotation(settings, r):
            time.sleep(SETTLE_S)
            t_um, t_b, U = build(gs, gc)
            times[gs.name]["update_many"].append(t_um)
            times[gs.name]["build"].append(t_b)
            last[gs.name].append(U)
    out: dict[str, Any] = {"n": n, "block": block, "per_gates": {}}
    base = times[NONE.name]
    taus: dict[bytes, np.ndarray] = {}
    for gs, gc in settings:
        g = None if gc is None else np.concatenate(gc)
        L = log_cumulative(g, n)
        key = np.asarray(L, np.float64).tobytes()  # all-ones gates weigh the keys as no gates do
        if key not in taus:
            taus[key] = weighted_leverage(chunks, L)
        tau = taus[key]
        Us = last[gs.name]
        check = compare_universal(Us[-1], tau, eps)
        same = all(np.array_equal(U.ids, Us[0].ids) for U in Us)
        check = {**check, "ok": check["ok"] and same, "same_in_every_round": same}
        failures.add(f"bulk {gs.name} universal set", check)
        t = times[gs.name]
        out["per_gates"][gs.name] = {
            "build_s": spread(t["build"]), "update_many_s": spread(t["update_many"]),
            "ratio_to_ungated": spread([a / b for a, b in zip(t["build"], base["build"])]),
            "ratio_to_ungated_update_many": spread(
                [a / b for a, b in zip(t["update_many"], base["update_many"])]),
            "universal_set": len(Us[-1]), "oldest_age": int(n - 1 - Us[-1].ids.min()) if len(Us[-1]) else None,
            "effective_window": gs.window, "check": check}
    return out


# ---------------------------------------------------------------------- peak RSS
RSS_CHUNK = 8192


def chunk_gates(i: int, rows: int) -> np.ndarray:
    """The gates of chunk ``i`` of the RSS stream."""
    return np.random.default_rng([i, 0x55]).uniform(RSS_GATES.lo, 1.0, rows)


def chunk_keys(i: int, rows: int, d: int) -> np.ndarray:
    """The keys of chunk ``i`` of the RSS stream: Gaussian with heavy-tailed norms (1 + Pareto(2.5) per row),
    each chunk from its own seed, so the check regenerates only the chunks whose weights are not zero."""
    rng = np.random.default_rng([i, 0x4B])
    return rng.standard_normal((rows, d)) * (1.0 + rng.pareto(2.5, (rows, 1)))


def gated_chunks(n: int, d: int) -> Any:
    """``(X, gates)`` chunks of ``RSS_CHUNK`` rows of the gated RSS stream (a generator: never all held)."""
    for i, a in enumerate(range(0, n, RSS_CHUNK)):
        rows = min(RSS_CHUNK, n - a)
        yield chunk_keys(i, rows, d), chunk_gates(i, rows)


def rss_child(n: int, d: int, eps: float) -> None:
    """Stream ``n`` gated keys (8192-row chunks, never all held); print VmHWM and a check of 8 queries' heavy
    entries and decayed normalisers (the stream regenerated after VmHWM is read) as JSON."""
    def status(name: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(name + ":"))

    warm = ls.KeySketch(d, eps=eps)
    X0, g0 = next(gated_chunks(n, d))
    warm.update_many(X0, gates=g0)
    warm.heavy_entries(np.ones((2, d)))
    warm.normalizer(np.ones((2, d)))
    del warm
    rss_before = status("VmRSS")
    sk = ls.KeySketch(d, eps=eps)
    for X, g in gated_chunks(n, d):
        sk.update_many(X, gates=g)
    Qc = np.random.default_rng(9).standard_normal((8, d))
    he = sk.heavy_entries(Qc)
    Zs = sk.normalizer(Qc)
    # VmHWM, not ru_maxrss: ru_maxrss survives exec (a child would report a larger parent's peak)
    hwm = status("VmHWM")
    # brute force: the cumulative log-gates of the whole stream from the gates alone, then the weights of
    # every chunk whose newest key's weight c_j (at the end of the stream) is not zero in float64
    starts = list(range(0, n, RSS_CHUNK))
    logs = [np.cumsum(np.log(chunk_gates(i, min(RSS_CHUNK, n - a))).astype(np.longdouble))
            for i, a in enumerate(starts)]
    before = np.cumsum([np.longdouble(0.0)] + [lc[-1] for lc in logs])  # log-gate before each chunk
    total = before[-1]
    Z, per_row, blocks = np.zeros(8), [[] for _ in range(8)], []
    for i, a in enumerate(starts):
        w = np.exp((total - before[i] - logs[i]).astype(np.float64))  # c_j at the end of the stream
        if w[-1] > 0.0:
            X = chunk_keys(i, logs[i].size, d)
            W = (Qc @ X.T) ** 2 * w
            Z += W.sum(axis=1)
            blocks.append((a, W))
    skipped = len(starts) - len(blocks)
    for s0, W in blocks:
        r, c = np.nonzero(W >= eps * (1 - CANDIDATE_SLACK) * Z[:, None])
        for i, j in zip(r.tolist(), c.tolist()):
            per_row[i].append((s0 + j, float(W[i, j])))
    indptr = np.zeros(9, dtype=np.int64)
    np.cumsum([len(p) for p in per_row], out=indptr[1:])
    flat = [e for p in per_row for e in sorted(p)]
    ref = Reference(indptr, np.array([j for j, _ in flat], dtype=np.int64),
                    np.array([w for _, w in flat]), Z, None)
    zerr = float(np.max(np.abs(Zs - Z) / Z))
    check = merge_checks(compare_rows(list(he), ref, eps),
                         {"ok": zerr <= VALUE_RTOL, "max_normalizer_rel_err": zerr})
    print(json.dumps({"n": n, "hwm": hwm, "rss_before_stream": rss_before, "chunks_skipped": skipped,
                      "retained": int(sk.num_retained), "sketch_nbytes": int(sk.nbytes),
                      "log_total_gate": float(sk.log_total_gate), "check": check}))


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
        failures.add(f"rss n={n} heavy entries{' ' + str(env) if env else ''}", out[n]["check"])
    small, large = sz.rss_n
    mb = 2.0**20
    return {"n_small": small, "n_large": large, "gates": RSS_GATES.name,
            "hwm_small_MB": out[small]["hwm"] / mb, "hwm_large_MB": out[large]["hwm"] / mb,
            "ratio": out[large]["hwm"] / out[small]["hwm"],
            "rss_before_stream_MB": [out[n]["rss_before_stream"] / mb for n in sz.rss_n],
            "retained": [out[n]["retained"] for n in sz.rss_n],
            "sketch_MB": [out[n]["sketch_nbytes"] / mb for n in sz.rss_n],
            "log_total_gate": [out[n]["log_total_gate"] for n in sz.rss_n],
            "check": merge_checks(out[small]["check"], out[large]["check"], same_rows=False)}


@section_env
def bench_rss(sz: Sizes, d: int, eps: float, failures: Failures) -> dict:
    out = rss_runs(sz, failures)
    if sz.rss_fixed_mmap:
        out["fixed_mmap_threshold"] = rss_runs(sz, failures, FIXED_MMAP_THRESHOLD)
    return out


# ---------------------------------------------------------------------- report
def summary_rows(res: dict) -> list[tuple[str, str, str, bool | None]]:
    """``(figure, measured, target, met)`` of every figure that was run."""
    rows: list[tuple[str, str, str, bool | None]] = []
    us = 1e6

    def steps(name: str) -> None:
        sec = res[name]
        what = "live step" if name == "live" else "decode step with values"
        n = sec["n"]
        for gname, v in sec["per_gates"].items():
            if gname == NONE.name:
                continue
            r = v["ratio_to_ungated"]
            measured = (f"{fmt(r, digits=2)} ({fmt(v['sketch_step_s'], us)} us vs "
                        f"{fmt(sec['per_gates'][NONE.name]['sketch_step_s'], us)} us; scans "
                        f"{v['retained']} rows vs {sec['per_gates'][NONE.name]['retained']}, |U| "
                        f"{v['universal_set']} vs {sec['per_gates'][NONE.name]['universal_set']})")
            target = name == "live"
            rows.append((f"{what} {gname} / without gates, n = {n:.0e}", measured,
                         "<= 1.2" if target else "-", r["median"] <= 1.2 if target else None))
        for gname, v in sec["per_gates"].items():
            dense = v["dense_step_s"]
            sp = v["speedup"]
            digits = 1 if sp["median"] < 10 else 0
            measured = (f"{fmt(sp, digits=digits)}x ({fmt(v['sketch_step_s'], us)} us vs "
                        f"{fmt(dense['1'], us, 0)} us 1-thread / {fmt(dense['default'], us, 0)} us "
                        "default)")
            decayed = gname != NONE.name
            rows.append((f"{what} {gname} vs dense {'decayed ' if decayed else ''}attention, n = {n:.0e}",
                         measured, ">= 100x" if decayed else "-",
                         sp["median"] >= 100 if decayed else None))

    if "live" in res:
        steps("live")
    if "decode" in res:
        steps("decode")
    if "heads" in res:
        hd = res["heads"]
        for kind, what in (("live", "live step"), ("decode", "decode step with values")):
            v = hd[kind]
            measured = (f"{fmt(v['ratio'], digits=2)} ({fmt(v['heads_step_s'], us)} us vs "
                        f"{fmt(v['single_step_s'], us)} us; gates {hd['gates']} per head)")
            rows.append((f"{hd['n_heads']}-head gated {what} / single-head gated {what}, n = {hd['n']:.0e}",
                         measured, "-", None))
    if "bulk" in res:
        b = res["bulk"]
        for gname, v in b["per_gates"].items():
            if gname == NONE.name:
                continue
            measured = (f"{fmt(v['ratio_to_ungated'], digits=2)} ({fmt(v['build_s'], digits=2)} s vs "
                        f"{fmt(b['per_gates'][NONE.name]['build_s'], digits=2)} s; update_many alone "
                        f"{fmt(v['ratio_to_ungated_update_many'], digits=2)}; |U| {v['universal_set']} vs "
                        f"{b['per_gates'][NONE.name]['universal_set']})")
            rows.append((f"bulk build {gname} / without gates, n = {b['n']:.0e}", measured, "<= 1.2",
                         v["ratio_to_ungated"]["median"] <= 1.2))
    if "rss" in res:
        r = res["rss"]
        rows.append((f"peak RSS streaming gated rows ({r['gates']}), n = {r['n_large']:.0e} / {r['n_small']:.0e}",
                     f"{r['ratio']:.3f} ({r['hwm_large_MB']:.1f} MB / {r['hwm_small_MB']:.1f} MB)",
                     "<= 1.05", r["ratio"] <= 1.05))
        if "fixed_mmap_threshold" in r:
            f = r["fixed_mmap_threshold"]
            measured = f"{f['ratio']:.3f} ({f['hwm_large_MB']:.1f} MB / {f['hwm_small_MB']:.1f} MB)"
            rows.append(("same, glibc mmap threshold fixed (MALLOC_MMAP_THRESHOLD_=131072)",
                         measured, "-", None))
    return rows


def warm_gated(d: int, eps: float, dv: int) -> None:
    """Compile (or load) the gated paths: gated ingest, live steps, decode steps, constant decay."""
    rng = np.random.default_rng(0)
    m = 2 * 8192 + 7
    K, V, Q = rng.standard_normal((m, d)), rng.standard_normal((m, dv)), rng.standard_normal((8, d))
    g = rng.uniform(0.99, 1.0, m)
    sk = ls.KeySketch(d, eps=eps).update_many(K[: m // 2], gates=g[: m // 2])
    for i in range(m // 2, m):
        sk.update(K[i], gate=g[i])
        sk.heavy_entries(Q[i % 8][None])
    sk.copy().universal_set()
    sc = ls.KeySketch(d, eps=eps, decay=0.999).update_many(K[:4000])
    for i in range(4000, 4300):
        sc.update(K[i])
        sc.heavy_entries(Q[i % 8][None])
    sv = ls.KeySketch(d, eps=eps, value_dim=dv, exact_output=True)
    sv.update_many(K[:300], V[:300], gates=g[:300])
    for i in range(300, 600):
        sv.prefill(K[i][None], V[i][None], Q[i % 8][None], gates=g[i:i + 1])
    sv.attend(Q)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, seconds (the smoke test)")
    ap.add_argument("--only", default=",".join(SECTIONS),
                    help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--out", metavar="FILE", help="write every measurement as JSON")
    ap.add_argument("--rss-fixed-mmap", action="store_true",
                    help="also measure the peak RSS with glibc's mmap threshold fixed (two more processes)")
    ap.add_argument("--rss-child", type=int, metavar="N", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    d, eps, dv = 64, 0.01, 64
    if args.rss_child is not None:
        rss_child(args.rss_child, d, eps)
        return 0
    only = [s for s in args.only.split(",") if s]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        ap.error(f"--only must name sections among {', '.join(SECTIONS)}; got {', '.join(unknown)}")
    sz = QUICK if args.quick else FULL
    if args.rss_fixed_mmap:
        sz = replace(sz, rss_fixed_mmap=True)
    command = " ".join(["python benchmarks/bench_decay.py"] + (["--quick"] if args.quick else [])
                       + ([f"--only {args.only}"] if set(only) != set(SECTIONS) else [])
                       + (["--rss-fixed-mmap"] if args.rss_fixed_mmap else []))
    header = {"command": command, "commit": git_commit(),
              "levstream_source": str(Path(ls.__file__).resolve().parent),
              "levstream_commit": os.environ.get("BENCH_LEVSTREAM_COMMIT", "the working tree above"),
              "utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "python": platform.python_version(), "numpy": np.__version__,
              "levstream": ls.__version__, "threads": describe_threads(), "load_start": load(),
              "d": d, "eps": eps, "dv": dv}
    print(f"# {header['command']}  [{header['commit']}, {header['utc']}]")
    print(f"# levstream from {header['levstream_source']} ({header['levstream_commit']})")
    print(f"# {header['machine']}, python {header['python']}, numpy {header['numpy']}; "
          f"{header['threads']}")
    print(f"# load average {header['load_start']}", flush=True)
    failures = Failures()
    t0 = time.perf_counter()
    warm_up(d, eps, dv, 2)
    warm_gated(d, eps, dv)
    runners: dict[str, Callable[[], dict]] = {
        "live": lambda: bench_live(sz, d, eps, failures),
        "decode": lambda: bench_decode(sz, d, eps, dv, failures),
        "heads": lambda: bench_heads(sz, d, eps, dv, failures),
        "bulk": lambda: bench_bulk(sz, d, eps, failures),
        "rss": lambda: bench_rss(sz, d, eps, failures)}
    results, rows = run_sections(runners, SECTIONS, only, header, t0, summary_rows)
    checks: dict[str, dict] = {}
    for name in ("live", "decode", "bulk"):
        if name in results:
            checks[name] = merge_checks(*[v["check"] for v in results[name]["per_gates"].values()],
                                        same_rows=False)
    if "heads" in results:
        hd = results["heads"]
        checks["heads"] = merge_checks(*[hd[k][c] for k in ("live", "decode") for c in ("check", "single_check")],
                                       same_rows=False)
    if "rss" in results:
        checks["rss"] = results["rss"]["check"]
    return finish(checks, args.out, header, results, rows, failures)


if __name__ == "__main__":
    sys.exit(main())
