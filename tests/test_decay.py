"""Decaying streams (issue #13, points 2 and 3): ``KeySketch(decay=)`` and per-row gates, p = 2.

Convention: the gate of row ``t`` multiplies everything before it, so key ``j`` weighs ``c_j(t) = g_{j+1} ... g_t``
at time ``t`` and the attention is ``A_j = c_j <q, k_j>^2 / sum_l c_l <q, k_l>^2``.

Reference: ``naive.DecayedStream``, a brute-force twin that keeps every key and gate and recomputes the decayed
attention in log space (nothing under- or overflows before weights are compared), and the offline leverage
scores of the weighted keys ``sqrt(c_j(t)) k_j`` (SVD).  Covered:

1. exactness of heavy entries, values, ``attend`` outputs, ``normalizer`` and ``prefill`` rows against the
   reference, for constant decay and random data-dependent gates down to 1e-3, over random interleavings of
   ``update`` / ``update_many`` / ``prefill`` / queries with small blocks (folding, pruning, rebases of the frame);
2. streams whose total log-gate is far below float64's range (-3e4): nothing NaN, answers still exact,
   ``log_total_gate`` equal to the sum of the log gates;
3. the universal set equals the offline set of the weighted keys (ids, scores, ``.keys``); candidates within
   ``capacity``; strong decay keeps only recent keys;
4. chunking invariance, merges of consecutive parts in every order and tree, refusal of interleaved parts and
   of different ``decay``, bytes / pickle / copy round trips mid-stream, thread-pool and Dask builds;
5. bad gates and decay values change nothing and say what was expected and what was received;
6. queries change nothing.

The last tests are regressions for bugs found while writing this module (their docstrings say which).
"""

from __future__ import annotations

import copy
import math
import pickle
import re
from itertools import pairwise

import numpy as np
import pytest
from conftest import (
    TIE_RTOL,
    VALUE_RTOL,
    answer,
    assert_heavy_matches_dense,
    assert_matches_offline,
    heavy_tailed_keys,
)
from naive import DecayedStream

import levstream as ls
import levstream.sketch as sketch_module
from levstream import _serialize
from levstream._threads import capped_threads

#: "Nothing becomes NaN": an overflow or invalid operation inside the library is a failure here.
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

D = 6
DV = 3
EPS = 0.05
BLOCK = 16

#: outputs against the log-space reference, relative to each row's scale ``max_c sum_j A_j |v_jc|``.
OUTPUT_RTOL = 1e-9

#: ``log_total_gate`` against the sum of the log gates (both double precision or better over 1e4 terms).
LOG_TOTAL_RTOL = 1e-12


# ---------------------------------------------------------------------------------------------------- helpers
def make_gates(kind: str | None, n: int, rng: np.random.Generator) -> np.ndarray | None:
    """Per-row gates: None (constant decay only), "random" (data-dependent, some 1e-3 and some exactly 1),
    "tiny" (1e-3 on 90% of the rows: the total log-gate falls by about 6.2 per row)."""
    if kind is None:
        return None
    if kind == "random":
        g = np.exp(-rng.exponential(0.3, size=n))
        g[rng.random(n) < 0.05] = 1e-3
        g[rng.random(n) < 0.1] = 1.0
        return np.clip(g, 1e-3, 1.0)
    if kind == "tiny":
        return np.where(rng.random(n) < 0.9, 1e-3, rng.uniform(0.3, 1.0, size=n))
    raise AssertionError(kind)


def sketch(decay=None, values=None, block_rows=BLOCK, eps=EPS, dim=D) -> ls.KeySketch:
    """``values``: None (keys only), "heavy" (value rows, no moment state) or "exact" (exact outputs)."""
    return ls.KeySketch(
        dim,
        eps=eps,
        block_rows=block_rows,
        decay=decay,
        value_dim=None if values is None else DV,
        exact_output=values == "exact",
    )


def ref_attention(ref: DecayedStream, Q: np.ndarray, upto=None) -> list[np.ndarray]:
    """Dense decayed attention rows (query ``i`` at time ``upto[i]``, default the newest row)."""
    return [
        ref.attention(q, None if upto is None else int(upto[i]))
        for i, q in enumerate(np.atleast_2d(Q))
    ]


def ref_normalizer(ref: DecayedStream, Q: np.ndarray) -> np.ndarray:
    """``sum_j c_j(t) <q, k_j>^2`` summed directly (weights below float64's range count as 0)."""
    w = np.exp(ref.log_weights())
    return np.array([np.sum(w * (ref.K @ q) ** 2) for q in np.atleast_2d(Q)])


def assert_finite(*arrays) -> None:
    for a in arrays:
        if a is not None:
            assert np.all(np.isfinite(np.asarray(a))), "NaN or inf in an answer"


def assert_outputs(got: np.ndarray, A_rows: list[np.ndarray], V: np.ndarray, what: str) -> None:
    """``got[i]`` equals ``A_i @ V`` to OUTPUT_RTOL of the row's scale."""
    for i, A in enumerate(A_rows):
        want = A @ V[: A.size]
        scale = max(float(np.max(A @ np.abs(V[: A.size]))), 1e-300)
        err = float(np.max(np.abs(got[i] - want)))
        assert err <= OUTPUT_RTOL * scale, f"{what} row {i}: |diff| {err:.3g} vs scale {scale:.3g}"


def assert_heavy_outputs(res, A_rows: list[np.ndarray], V: np.ndarray, eps: float) -> None:
    """``heavy_output`` and ``captured_mass`` of an AttentionResult against the reference's entries >= eps."""
    for i, A in enumerate(A_rows):
        sel = A >= eps * (1.0 + TIE_RTOL)
        if np.any((A >= eps * (1.0 - TIE_RTOL)) & ~sel):  # a tie: either answer is right
            continue
        mass = float(A[sel].sum())
        assert res.captured_mass[i] == pytest.approx(mass, rel=VALUE_RTOL, abs=1e-300), (
            f"captured_mass row {i}"
        )
        want = A[sel] @ V[: A.size][sel]
        scale = max(float(np.max(A[sel] @ np.abs(V[: A.size][sel]))) if sel.any() else 0.0, 1e-300)
        assert np.max(np.abs(res.heavy_output[i] - want)) <= OUTPUT_RTOL * scale, (
            f"heavy_output row {i}"
        )


def check_queries(sk: ls.KeySketch, ref: DecayedStream, Q: np.ndarray, eps: float = EPS) -> None:
    """Heavy entries, normaliser and (with values) attend against the reference at the newest row."""
    hits = sk.heavy_entries(Q)
    assert_finite(hits.values)
    assert_heavy_matches_dense(hits, ref.heavy(Q, eps), eps)
    z = sk.normalizer(Q)
    assert_finite(z)
    np.testing.assert_allclose(
        z, ref_normalizer(ref, Q), rtol=VALUE_RTOL, atol=0.0, err_msg="normalizer"
    )
    if sk.value_dim is not None:
        res = sk.attend(Q)
        assert_finite(res.heavy_output, res.captured_mass, res.output)
        assert_heavy_matches_dense(res.entries, ref.heavy(Q, eps), eps)
        A_rows = ref_attention(ref, Q)
        assert_heavy_outputs(res, A_rows, ref.V, eps)
        if sk.exact_output:
            assert_outputs(res.output, A_rows, ref.V, "attend().output")
        else:
            assert res.output is None


def check_prefill(
    res, ref: DecayedStream, Q: np.ndarray, upto: np.ndarray, exact: bool, eps: float = EPS
) -> None:
    """A prefill result against the causal decayed attention at each row's own time (``ref`` already holds
    the chunk)."""
    assert_finite(res.heavy_output, res.captured_mass, res.output)
    assert_heavy_matches_dense(res.entries, ref.heavy(Q, eps, upto), eps)
    A_rows = ref_attention(ref, Q, upto)
    assert_heavy_outputs(res, A_rows, ref.V, eps)
    if exact:
        assert_outputs(res.output, A_rows, ref.V, "prefill output")


def check_universal(sk: ls.KeySketch, ref: DecayedStream, eps: float = EPS) -> None:
    """U equals the offline set of the weighted keys; scores and ``.keys`` to 1e-9; candidates within
    capacity once settled (ids of ``ref`` are its row positions)."""
    np.testing.assert_array_equal(ref.ids, np.arange(ref.n))
    U = sk.universal_set()
    tau = ref.universal_scores()
    assert_matches_offline(U.ids, tau, eps)
    assert np.all(np.diff(U.ids) > 0)
    assert U.n == ref.n
    np.testing.assert_allclose(
        U.scores, tau[U.ids], rtol=VALUE_RTOL, atol=0.0, err_msg="universal scores"
    )
    lw = ref.log_weights()
    weighted = ref.K[U.ids] * np.exp(0.5 * lw[U.ids])[:, None]
    np.testing.assert_allclose(
        U.keys, weighted, rtol=VALUE_RTOL, atol=0.0, err_msg="universal keys"
    )
    settled = sk.copy().flush()
    assert settled.num_retained <= settled.capacity


def queries(rng: np.random.Generator, ref: DecayedStream, m: int = 3) -> np.ndarray:
    """Random queries, one along a recent key and one orthogonal to the newest key (older keys then carry the
    attention: their tiny weights must not be lost)."""
    Q = rng.standard_normal((m + 2, ref.dim))
    if ref.n:
        Q[m] = ref.K[-min(ref.n, int(rng.integers(1, 5)))] + 0.1 * Q[m]
    if ref.n >= 2:  # (with the newest key alone, Z of this query is rounding noise)
        k = ref.K[-1]
        Q[m + 1] -= (Q[m + 1] @ k) / (k @ k) * k
    return Q


def feed_reference(ref: DecayedStream, K, V, G, a: int, b: int) -> None:
    ref.update_many(K[a:b], None if V is None else V[a:b], gates=None if G is None else G[a:b])


# ---------------------------------------------------------------------------------------------------- 1. exact
CONFIGS = {
    "decay=0.99": (0.99, None),
    "decay=0.9": (0.9, None),
    "gates": (None, "random"),
    "decay=0.95*gates": (0.95, "random"),
}


@pytest.mark.parametrize("values", [None, "heavy", "exact"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_interleaved_stream_is_exact(config, values):
    """Random interleavings of update / update_many (0..3 blocks) / prefill / queries against the reference."""
    decay, kind = CONFIGS[config]
    seed = list(CONFIGS).index(config) * 10 + [None, "heavy", "exact"].index(values)
    rng = np.random.default_rng(seed)
    n = 1200
    K = heavy_tailed_keys(n, D, seed=100 + seed)
    V = rng.standard_normal((n, DV)) if values else None
    G = make_gates(kind, n, rng)
    sk = sketch(decay, values)
    ref = DecayedStream(D, value_dim=DV if values else None, decay=decay)
    pos, step, ops = 0, 0, set()
    while pos < n:
        m = min(int(rng.integers(0, 3 * BLOCK + 1)), n - pos)
        op = rng.choice(
            ["update", "update_many", "prefill"] if values else ["update", "update_many"]
        )
        if op == "prefill" and rng.random() < 0.3:
            m = min(1, n - pos)  # a decode step
        g = None if G is None else G[pos : pos + m]
        if op == "update":
            for i in range(pos, pos + m):
                sk.update(K[i], None if V is None else V[i], gate=None if G is None else G[i])
        elif op == "update_many":
            sk.update_many(K[pos : pos + m], None if V is None else V[pos : pos + m], gates=g)
        else:
            Qc = rng.standard_normal((m, D))
            if m == 1 and g is not None and rng.random() < 0.5:
                g = float(g[0])  # a decode step may pass its gate as a number
            res = sk.prefill(K[pos : pos + m], V[pos : pos + m], Qc, gates=g)
        feed_reference(ref, K, V, G, pos, pos + m)
        if op == "prefill" and m:
            check_prefill(res, ref, Qc, np.arange(pos, pos + m), values == "exact")
        ops.add(str(op))
        pos += m
        step += 1
        assert sk.n == pos
        if pos:
            check_queries(sk, ref, queries(rng, ref))
        if pos and step % 8 == 0:
            check_universal(sk, ref)
    check_universal(sk, ref)
    assert sk.forgets
    np.testing.assert_allclose(sk.log_total_gate, ref.log_gates.sum(), rtol=LOG_TOTAL_RTOL)
    assert len(ops) == (3 if values else 2)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("seed", range(8))
def test_random_configurations_are_exact(seed, dtype):
    """Random dimension, eps, block size and mixture of strong (1e-3..1e-1) and mild gates, some chunks without
    gates, keys fed as float64 or float32 (the reference takes their exact float64 values; float32 rows fed before
    the first gate are held as float32, then rescaled by the frame); every op checked.  (Regression: up to f2d7942
    rows fed without a gate to a sketch without ``decay`` that had already forgotten were stored unweighted.)"""
    rng = np.random.default_rng(1000 + seed)
    d = int(rng.integers(2, 8))
    eps = float(rng.choice([0.02, 0.05, 0.2]))
    block = int(rng.choice([4, 8, 32, 64]))
    decay = [None, 0.999, 0.9][seed % 3]
    n = 1000
    K = heavy_tailed_keys(n, d, seed=1000 + seed).astype(dtype)
    V = rng.standard_normal((n, DV))
    strong = rng.random()
    G = np.where(
        rng.random(n) < strong, 10 ** rng.uniform(-3, -1, n), np.exp(-rng.exponential(0.1, n))
    )
    sk = ls.KeySketch(d, eps=eps, block_rows=block, value_dim=DV, exact_output=True, decay=decay)
    ref = DecayedStream(d, value_dim=DV, decay=decay)
    pos = 0
    while pos < n:
        m = min(int(rng.integers(0, 3 * block + 1)), n - pos)
        # rows fed without a gate (gate 1): first to a stream that has forgotten nothing (float32 rows are then
        # held as float32 until a gate rescales them), later to a stream that has forgotten
        ungated = pos == 0 or rng.random() < 0.2
        if ungated:
            G[pos : pos + m] = 1.0
        if rng.random() < 0.3:
            for i in range(pos, pos + m):
                sk.update(K[i], V[i], gate=None if ungated else G[i])
        else:
            sk.update_many(
                K[pos : pos + m], V[pos : pos + m], gates=None if ungated else G[pos : pos + m]
            )
        feed_reference(ref, K, V, G, pos, pos + m)
        pos += m
        if pos:
            check_queries(sk, ref, queries(rng, ref), eps)
        if pos and rng.random() < 0.15:
            check_universal(sk, ref, eps)
    check_universal(sk, ref, eps)


def test_normalizer_summary_is_the_decayed_gram():
    rng = np.random.default_rng(7)
    K = heavy_tailed_keys(700, D, seed=7)
    G = make_gates("random", 700, rng)
    sk = sketch(0.97).update_many(K, gates=G)
    ref = DecayedStream(D, decay=0.97).update_many(K, gates=G)
    w = np.exp(ref.log_weights())
    np.testing.assert_allclose(
        sk.normalizer_summary.gram, (K * w[:, None]).T @ K, rtol=VALUE_RTOL, atol=1e-12
    )


# ---------------------------------------------------------------------------------------------------- 2. long
def run_tiny_gates() -> None:
    """1e-3 on 90% of 5000 rows: the total log-gate is about -3e4 (e^-745 is float64's smallest)."""
    rng = np.random.default_rng(21)
    n = 5000
    K = heavy_tailed_keys(n, D, seed=21)
    V = rng.standard_normal((n, DV))
    G = make_gates("tiny", n, rng)
    assert np.log(G).sum() < -30_000
    sk = sketch(None, "exact", block_rows=32)
    ref = DecayedStream(D, value_dim=DV)
    pos = 0
    while pos < n:
        m = min(int(rng.integers(1, 400)), n - pos)
        if rng.random() < 0.25:
            for i in range(pos, pos + m):
                sk.update(K[i], V[i], gate=G[i])
        else:
            sk.update_many(K[pos : pos + m], V[pos : pos + m], gates=G[pos : pos + m])
        feed_reference(ref, K, V, G, pos, pos + m)
        pos += m
        check_queries(sk, ref, queries(rng, ref))
        np.testing.assert_allclose(sk.log_total_gate, np.log(G[:pos]).sum(), rtol=LOG_TOTAL_RTOL)
    assert math.isfinite(sk.log_total_gate)
    check_universal(sk, ref)


def test_long_stream_of_tiny_gates_underflows_many_times_and_stays_exact():
    """Answers exact and nothing infinite inside (RuntimeWarnings are errors here).  Regression: up to 087036b
    R-factor mode divided by column maxima of R that had decayed to subnormal numbers ('overflow encountered in
    divide' in GramSummary._get_factor, then 'invalid value encountered in matmul': NaN scores)."""
    run_tiny_gates()


def test_long_stream_of_constant_decay_underflows_many_times_and_stays_exact():
    """decay 0.9 over 40 000 rows (total log-gate -4214), chunks small enough that no fold is skipped past the
    frame's range (test_a_stream_that_forgets_everything_keeps_working covers those that are)."""
    rng = np.random.default_rng(22)
    n = 40_000
    K = heavy_tailed_keys(n, D, seed=22)
    V = rng.standard_normal((n, DV))
    sk = sketch(0.9, "exact", block_rows=256)
    ref = DecayedStream(D, value_dim=DV, decay=0.9).update_many(K, V)
    pos = 0
    checkpoints = set(np.linspace(0, n, 6).astype(int)[1:].tolist())
    while pos < n:
        m = min(int(rng.integers(1, 3000)), n - pos)
        sk.update_many(K[pos : pos + m], V[pos : pos + m])
        pos += m
        if pos in checkpoints or rng.random() < 0.1:
            sub = DecayedStream(D, value_dim=DV, decay=0.9).update_many(K[:pos], V[:pos])
            check_queries(sk, sub, queries(rng, sub))
    np.testing.assert_allclose(sk.log_total_gate, n * math.log(0.9), rtol=LOG_TOTAL_RTOL)
    check_queries(sk, ref, queries(rng, ref, 6))
    check_universal(sk, ref)


@pytest.mark.slow
def test_constant_decay_past_minus_30000_with_default_blocks():
    """decay 0.9 over 300 000 rows with the default block size (total log-gate -31 600).  Regression: up to
    087036b the folded state decayed by 0.9^65536 between two folds, below the frame's range, and the next fold's
    plan took a Cholesky factor of G = 0 (LinAlgError, after 'overflow encountered in divide' in
    GramSummary.scale)."""
    rng = np.random.default_rng(23)
    n = 300_000
    K = heavy_tailed_keys(n, D, seed=23)
    sk = ls.KeySketch(D, eps=EPS, decay=0.9)
    for a in range(0, n, 5000):
        sk.update_many(K[a : a + 5000])
    ref = DecayedStream(D, decay=0.9).update_many(K)
    np.testing.assert_allclose(sk.log_total_gate, n * math.log(0.9), rtol=LOG_TOTAL_RTOL)
    check_queries(sk, ref, queries(rng, ref, 6))
    check_universal(sk, ref)


# ---------------------------------------------------------------------------------------------------- 3. universal set
def test_each_block_of_a_decaying_stream_keeps_only_rows_whose_score_reaches_eps(monkeypatch):
    """A block is tested under the plan made from the Gram matrix that holds it (docs/theory.md, "When a block is
    tested"): the rows a block keeps are those whose exact score at the block's end reaches eps, up to the
    pruning margin, not every row a plan from before the block lets through (decay 0.97 over a block of 64 rows
    grows ``G~`` sevenfold).  Pruning is switched off to see what the blocks themselves keep."""
    monkeypatch.setattr(sketch_module, "_maybe_prune", lambda sk, room: None)
    block, n = 64, 64 * 24
    K = heavy_tailed_keys(n, D, seed=5)
    for gates in (None, np.random.default_rng(5).uniform(0.9, 1.0, n)):
        sk = sketch(None if gates is not None else 0.97, block_rows=block)
        ref = DecayedStream(D, decay=None if gates is not None else 0.97)
        for a in range(0, n, block):
            g = None if gates is None else gates[a : a + block]
            sk.update_many(K[a : a + block], gates=g)
            ref.update_many(K[a : a + block], gates=g)
            tau = ref.universal_scores()[a:]
            ids = sk._store.ids_view()  # the candidates (pruning is off: every row a block kept)
            kept = np.isin(np.arange(a, a + block), ids)
            assert kept[tau >= EPS].all(), f"block at {a}: a row with score >= eps was dropped"
            low = tau[kept] < EPS * (1 - 1e-4)
            assert not low.any(), f"block at {a} kept rows with scores {tau[kept][low]} < eps = {EPS}"
        check_universal(sk, ref)


def test_strong_decay_keeps_only_recent_keys():
    n = 3000
    K = heavy_tailed_keys(n, D, seed=31)
    sk = sketch(0.5, block_rows=64)
    plain = sketch(None, block_rows=64)
    for a in range(0, n, 100):
        sk.update_many(K[a : a + 100])
        plain.update_many(K[a : a + 100])
        assert sk.copy().flush().num_retained <= sk.capacity
    ref = DecayedStream(D, decay=0.5).update_many(K)
    check_universal(sk, ref)
    U = sk.universal_set()
    assert 0 < U.ids.size <= D / EPS
    assert U.ids.min() >= n - 60, f"keys older than 60 rows kept under decay 0.5: {U.ids[:5]}"
    assert plain.universal_set().ids.min() < n - 1000  # without decay old keys stay heavy
    assert sk.flush().num_retained <= 2 * D / EPS


# ---------------------------------------------------------------------------------------------------- 4. chunking, merge, persistence, builds
def stream_data(n: int, seed: int, kind="random"):
    rng = np.random.default_rng(seed)
    K = heavy_tailed_keys(n, D, seed=seed)
    V = rng.standard_normal((n, DV))
    return K, V, make_gates(kind, n, rng)


def assert_same(got: ls.KeySketch, want: ls.KeySketch, Q: np.ndarray) -> None:
    assert answer(got, Q) == answer(want, Q)
    if want.exact_output:
        a, b = got.attend(Q), want.attend(Q)
        np.testing.assert_allclose(a.output, b.output, rtol=VALUE_RTOL, atol=1e-12)
    np.testing.assert_allclose(got.log_total_gate, want.log_total_gate, rtol=LOG_TOTAL_RTOL)


def feed_as(how: str, sk: ls.KeySketch, K, V, G, a: int, b: int, rng) -> None:
    """Rows ``a..b-1`` (keys, values, gates) fed row by row, as one chunk, in ragged chunks, or as decode steps."""
    if how == "rows":
        for i in range(a, b):
            sk.update(K[i], V[i], gate=G[i])
    elif how == "whole":
        sk.update_many(K[a:b], V[a:b], gates=G[a:b])
    elif how == "chunks":
        cuts = np.unique(np.concatenate([[a, b], rng.integers(a, b, 20)]))
        for c0, c1 in pairwise(cuts):
            sk.update_many(K[c0:c1], V[c0:c1], gates=G[c0:c1])
    else:
        for i in range(a, b):
            sk.prefill(K[i : i + 1], V[i : i + 1], rng.standard_normal((1, D)), gates=G[i : i + 1])


@pytest.mark.parametrize("decay", [None, 0.98])
def test_chunking_does_not_change_the_state(decay):
    """The bytes, not only the answers, whatever the chunking: every block keeps the same rows under the same
    plans, also when the first gate below 1 arrives in the middle of a chunk and of a block (row 300)."""
    n = 900
    K, V, G = stream_data(n, 43)
    G[:300] = 1.0
    G[300] = 0.5
    got = {}
    for how in ("rows", "whole", "chunks", "steps"):
        sk = sketch(decay, "heavy")
        feed_as(how, sk, K, V, G, 0, n, np.random.default_rng(43))
        got[how] = sk.to_bytes()
    assert set(got.values()) == {got["rows"]}, {how: b == got["rows"] for how, b in got.items()}
    check_universal(sk, DecayedStream(D, decay=decay).update_many(K, gates=G))


@pytest.mark.parametrize("decay", [None, 0.98])
def test_the_fast_step_of_a_gated_key_equals_the_general_path(decay, monkeypatch):
    """A key-only row with a gate (the live step) is stored by a fast path when no rebase is due and it does not
    complete a block (a gate of 1 on a stream that has forgotten nothing: as an ungated row): the same bytes, after
    every row with a query in between, as the general path, through the first gate below 1, strong gates that
    rebase the state (rows 400-420), blocks and prunes."""
    n = 700
    K, _, G = stream_data(n, 44)
    G[:200] = 1.0
    G[200] = 0.5
    G[400:420] = 1e-3
    Q = np.random.default_rng(45).standard_normal((n, D))
    fast, general = sketch(decay), sketch(decay)
    real = sketch_module.KeySketch._append_next_rows
    taken = {"weighed": 0, "ones": 0}

    def counted(self, X, m, frame=None):
        ok = real(self, X, m, frame)
        taken["weighed" if frame is not None else "ones"] += ok
        return ok

    def refused(self, X, m, frame=None):  # every row of this stream has a gate: all take the general path
        return False

    for t in range(n):
        monkeypatch.setattr(sketch_module.KeySketch, "_append_next_rows", counted)
        fast.update(K[t], gate=G[t])
        monkeypatch.setattr(sketch_module.KeySketch, "_append_next_rows", refused)
        general.update(K[t], gate=G[t])
        assert fast.to_bytes() == general.to_bytes(), t
        assert answer(fast, Q[t : t + 1]) == answer(general, Q[t : t + 1]), t
    assert taken["weighed"] > n // 3  # most rows after the first gate below 1 took the fast path
    assert taken["ones"] > (150 if decay is None else -1)  # the gates of 1 before it, as ungated rows
    check_universal(fast, DecayedStream(D, decay=decay).update_many(K, gates=G))


@pytest.mark.parametrize("threads", [1, 2])
def test_a_chunk_weighed_in_pieces_is_the_chunk_weighed_whole(threads, monkeypatch):
    """A large gated chunk is weighed in pieces on the library's threads (``_weigh_in_pieces``): the same bytes as
    the chunk fed in small chunks, on one thread or two; and a nan or a weighted overflow in a later piece refuses
    the chunk and changes nothing."""
    monkeypatch.setattr(sketch_module, "_WEIGH_PIECE_ROWS", 64)  # 14 pieces of a 900-row chunk
    n = 900
    K, V, G = stream_data(n, 44)
    small = sketch(None, "heavy")
    for a in range(0, n, 50):
        small.update_many(K[a : a + 50], V[a : a + 50], gates=G[a : a + 50])
    with capped_threads(threads):
        whole = sketch(None, "heavy").update_many(K, V, gates=G)
        assert whole.to_bytes() == small.to_bytes()
        before = whole.to_bytes()
        for bad in (np.nan, 1e200):
            X = K.copy()
            X[n - 3, 1] = bad  # in the last piece
            with pytest.raises(ValueError):
                whole.update_many(X, V, gates=G)
            assert whole.to_bytes() == before


@pytest.mark.parametrize("seed", [3, 7, 10, 13])
@pytest.mark.parametrize("settle", ["flush", "merge"])
def test_a_settled_or_merged_stream_continues_alike_however_fed(seed, settle):
    """Settling (``flush``) and merging drop the candidate-test plan; the next plan is made once the next block
    is added, whatever the path, so the stream continues to the same bytes fed row by row, in chunks or by
    decode steps (a chunk made its plan before the block, a row-fed block after it: 6 of 40 such streams ended
    with different candidates)."""
    n1, n2 = 160, 320
    K = heavy_tailed_keys(n1 + n2, D, seed=seed)
    V = np.random.default_rng(seed).standard_normal((n1 + n2, DV))
    for decay, G in ((0.97, np.ones(n1 + n2)), (None, np.random.default_rng(seed).uniform(0.9, 1.0, n1 + n2))):
        got = {}
        for how in ("rows", "whole", "chunks", "steps"):
            sk = sketch(decay, "heavy")
            if settle == "flush":
                sk.update_many(K[:n1], V[:n1], gates=G[:n1]).flush()
            else:
                sk.update_many(K[: n1 // 2], V[: n1 // 2], gates=G[: n1 // 2])
                later = sketch(decay, "heavy")
                sk.merge(later.update_many(K[n1 // 2 : n1], V[n1 // 2 : n1], gates=G[n1 // 2 : n1], offset=n1 // 2))
            feed_as(how, sk, K, V, G, n1, n1 + n2, np.random.default_rng(seed))
            got[how] = sk.to_bytes()
        assert set(got.values()) == {got["rows"]}, (decay, {how: b == got["rows"] for how, b in got.items()})


@pytest.mark.parametrize("decay", [None, 0.98])
def test_chunking_does_not_change_the_answers(decay):
    n = 900
    K, V, G = stream_data(n, 41)
    rng = np.random.default_rng(41)
    ref = DecayedStream(D, value_dim=DV, decay=decay).update_many(K, V, gates=G)
    Q = queries(rng, ref, 5)

    rows = sketch(decay, "exact")
    for i in range(n):
        rows.update(K[i], V[i], gate=G[i])
    whole = sketch(decay, "exact").update_many(K, V, gates=G)
    chunks = sketch(decay, "exact")
    cuts = np.unique(np.concatenate([[0, n], rng.integers(0, n, 40)]))
    for a, b in pairwise(cuts):
        chunks.update_many(K[a:b], V[a:b], gates=G[a:b])
    pre = sketch(decay, "exact")
    for a, b in pairwise(cuts):
        pre.prefill(K[a:b], V[a:b], rng.standard_normal((b - a, D)), gates=G[a:b])
    steps = sketch(decay, "exact")
    for i in range(n):
        steps.prefill(K[i : i + 1], V[i : i + 1], rng.standard_normal((1, D)), gates=G[i : i + 1])
    big_blocks = sketch(decay, "exact", block_rows=10_000).update_many(K, V, gates=G)

    for other in (whole, chunks, pre, steps, big_blocks):
        assert_same(other, rows, Q)
        assert (
            other.log_total_gate == rows.log_total_gate
        )  # the same arithmetic per row, bit for bit
    check_queries(rows, ref, Q)
    check_universal(rows, ref)


def neighbour_tree(parts: list[ls.KeySketch], rng: np.random.Generator) -> ls.KeySketch:
    """Merge neighbouring parts in random order, on a random side (self earlier or self later)."""
    parts = [p.copy() for p in parts]
    while len(parts) > 1:
        i = int(rng.integers(0, len(parts) - 1))
        a, b = parts[i], parts[i + 1]
        merged = a.merge(b) if rng.random() < 0.5 else b.merge(a)
        parts[i : i + 2] = [merged]
    return parts[0]


@pytest.mark.parametrize(
    "decay,kind",
    [(0.95, None), (None, "random"), (0.99, "random")],
    ids=["decay", "gates", "decay*gates"],
)
def test_merge_of_consecutive_parts_in_any_order_and_tree(decay, kind):
    n = 1500
    K, V, G = stream_data(n, 51, kind)
    rng = np.random.default_rng(52)
    ref = DecayedStream(D, value_dim=DV, decay=decay).update_many(K, V, gates=G)
    single = sketch(decay, "exact").update_many(K, V, gates=G)
    Q = queries(rng, ref, 5)
    cuts = [
        0,
        0,
        313,
        700,
        701,
        701,
        1200,
        n,
    ]  # an empty part first, one in the middle, a single row
    parts = []
    for a, b in pairwise(cuts):
        s = sketch(decay, "exact")
        s.update_many(K[a:b], V[a:b], offset=a, gates=None if G is None else G[a:b])
        parts.append(s)
    before = [p.to_bytes() for p in parts]

    forward = parts[0].copy()
    for p in parts[1:]:
        forward.merge(p)  # self is the earlier part
    backward = parts[-1].copy()
    for p in parts[-2::-1]:
        backward.merge(p)  # self is the later part
    plus = parts[0]
    for p in parts[1:]:
        plus = plus + p
    trees = [
        ls.KeySketch.merge_all(parts),
        ls.KeySketch.merge_all(parts[::-1]),
        forward,
        backward,
        plus,
    ]
    trees += [neighbour_tree(parts, rng) for _ in range(4)]
    empty_last = single.copy().merge(sketch(decay, "exact"))
    empty_first = sketch(decay, "exact").merge(single)
    trees += [empty_last, empty_first]
    for t in trees:
        assert t.n == n
        assert_same(t, single, Q)
    check_queries(forward, ref, Q)
    check_universal(backward, ref)
    assert [p.to_bytes() for p in parts] == before  # merge leaves its argument alone


def test_merged_sketch_keeps_streaming_like_one_stream():
    n = 1000
    K, V, G = stream_data(n, 53)
    a = sketch(None, "exact").update_many(K[:400], V[:400], gates=G[:400])
    b = sketch(None, "exact").update_many(K[400:700], V[400:700], offset=400, gates=G[400:700])
    merged = b.merge(a)
    merged.update_many(K[700:], V[700:], gates=G[700:])
    single = sketch(None, "exact").update_many(K, V, gates=G)
    ref = DecayedStream(D, value_dim=DV).update_many(K, V, gates=G)
    Q = queries(np.random.default_rng(53), ref, 5)
    assert_same(merged, single, Q)
    check_queries(merged, ref, Q)


def test_merge_refuses_interleaved_parts_and_changes_nothing():
    K, _, G = stream_data(300, 54)
    early_late = sketch(0.9).update_many(K[:100], gates=G[:100])
    early_late.update_many(K[200:], offset=200, gates=G[200:])
    middle = sketch(0.9).update_many(K[100:200], offset=100, gates=G[100:200])
    # a stream that forgets through gates alone, against one that does not forget at all
    gated = sketch(None).update_many(K[:100], gates=G[:100])
    gated.update_many(K[200:], offset=200, gates=G[200:])
    plain = sketch(None).update_many(K[100:200], offset=100)
    assert gated.forgets and not plain.forgets
    for x, y in [(early_late, middle), (middle, early_late), (gated, plain), (plain, gated)]:
        bx, by = x.to_bytes(), y.to_bytes()
        with pytest.raises(ValueError, match=r"consecutive parts.*interleave") as info:
            x.merge(y)
        assert re.search(r"0\.\.299", str(info.value)) and re.search(
            r"100\.\.199", str(info.value)
        ), info.value
        with pytest.raises(ValueError, match="interleave"):
            x + y
        assert x.to_bytes() == bx and y.to_bytes() == by


@pytest.mark.parametrize("other_decay", [0.95, None, 1.0])
def test_merge_refuses_different_decay_and_changes_nothing(other_decay):
    K, _, G = stream_data(200, 55)
    a = sketch(0.9).update_many(K[:100])
    b = sketch(other_decay).update_many(K[100:], offset=100, gates=G[100:])
    for x, y in [(a, b), (b, a)]:
        bx, by = x.to_bytes(), y.to_bytes()
        with pytest.raises(ValueError, match="decay") as info:
            x.merge(y)
        msg = str(info.value)
        assert "0.9" in msg and str(other_decay) in msg, msg
        assert x.to_bytes() == bx and y.to_bytes() == by


@pytest.mark.parametrize(
    "how",
    ["bytes", "pickle", "copy.copy", "copy.deepcopy", "copy()"],
)
def test_round_trip_mid_stream_then_continue(how):
    n = 800
    K, V, G = stream_data(n, 61)
    Q = np.random.default_rng(61).standard_normal((6, D))
    sk = sketch(0.97, "exact")
    sk.update_many(K[:333], V[:333], gates=G[:333])
    for i in range(333, 350):  # rows still waiting in the input buffer
        sk.update(K[i], V[i], gate=G[i])
    data = sk.to_bytes()
    assert _serialize.unpack(data)[2] == 3
    restore = {
        "bytes": lambda s: ls.KeySketch.from_bytes(s.to_bytes()),
        "pickle": lambda s: pickle.loads(pickle.dumps(s)),
        "copy.copy": copy.copy,
        "copy.deepcopy": copy.deepcopy,
        "copy()": lambda s: s.copy(),
    }[how]
    back = restore(sk)
    assert back.to_bytes() == data
    assert (back.decay, back.forgets, back.log_total_gate, back.n) == (
        0.97,
        True,
        sk.log_total_gate,
        sk.n,
    )
    for s in (sk, back):
        s.prefill(K[350:500], V[350:500], Q[:1].repeat(150, axis=0), gates=G[350:500])
        s.update_many(K[500:], V[500:], gates=G[500:])
    assert back.to_bytes() == sk.to_bytes()
    assert_same(back, sk, Q)
    ref = DecayedStream(D, value_dim=DV, decay=0.97).update_many(K, V, gates=G)
    check_queries(back, ref, Q)


def test_format_version_follows_forgetting():
    K = heavy_tailed_keys(50, D, seed=62)
    ones = sketch(None).update_many(K, gates=np.ones(50))
    assert not ones.forgets and ones.log_total_gate == 0.0
    assert (
        _serialize.unpack(ones.to_bytes())[2] == 1
    )  # gates of 1 forget nothing: readable by levstream 0.1
    assert (
        _serialize.unpack(sketch(0.9).to_bytes())[2] == 3
    )  # a constant decay forgets from the start
    gated = sketch(None, "exact").update_many(K, np.ones((50, DV)), gates=np.full(50, 0.5))
    assert gated.forgets and gated.decay is None
    assert _serialize.unpack(gated.to_bytes())[2] == 3
    assert ls.KeySketch.from_bytes(gated.to_bytes()).log_total_gate == gated.log_total_gate


@pytest.mark.parametrize("values", [False, True])
def test_thread_build_equals_one_stream(values):
    n = 6000
    K, V, _ = stream_data(n, 71)
    kw = {"values": V, "exact_output": True} if values else {}
    one = ls.KeySketch(
        D, eps=EPS, decay=0.995, **({"value_dim": DV, "exact_output": True} if values else {})
    )
    one.update_many(K, V if values else None)
    Q = np.random.default_rng(71).standard_normal((6, D))
    for n_jobs in (1, 3):
        built = ls.build_sketch(K, eps=EPS, decay=0.995, n_jobs=n_jobs, chunk_rows=700, **kw)
        assert built.decay == 0.995
        assert_same(built, one, Q)
    ref = DecayedStream(D, value_dim=DV if values else None, decay=0.995).update_many(
        K, V if values else None
    )
    check_queries(built, ref, Q)
    check_universal(built, ref)


@pytest.mark.parametrize("scheduler", ["sync", "threads"])
def test_dask_build_equals_one_stream(scheduler):
    da = pytest.importorskip("dask.array", reason="dask[array] is not installed")
    import levstream.dask as lsd

    n = 6000
    K = stream_data(n, 72)[0]
    one = ls.KeySketch(D, eps=EPS, decay=0.995).update_many(K)
    x = da.from_array(K, chunks=((1500, 1, 2499, 2000), (D,)))
    built = lsd.build_sketch(x, eps=EPS, decay=0.995, split_every=2, scheduler=scheduler)
    Q = np.random.default_rng(72).standard_normal((6, D))
    assert built.decay == 0.995
    assert_same(built, one, Q)
    ref = DecayedStream(D, decay=0.995).update_many(K)
    check_universal(built, ref)


# ---------------------------------------------------------------------------------------------------- 5. bad input
BAD_GATES = [
    (0.0, ValueError, r"0 < gate <= 1.*got 0\.0"),
    (1.5, ValueError, r"0 < gate <= 1.*got 1\.5"),
    (-0.5, ValueError, r"0 < gate <= 1.*got -0\.5"),
    (float("nan"), ValueError, r"got nan"),
    (float("inf"), ValueError, r"got inf"),
    ("0.5", TypeError, r"real number.*'0\.5'"),
    (True, TypeError, r"real number.*True"),
]

BAD_GATE_ARRAYS = [
    (np.array([0.5, 0.0, 0.5]), ValueError, r"0 < gate <= 1.*0\.0.*row 1"),
    (np.array([0.5, 0.5, 2.0]), ValueError, r"0 < gate <= 1.*2\.0.*row 2"),
    (np.array([-1.0, 0.5, 0.5]), ValueError, r"0 < gate <= 1.*-1\.0.*row 0"),
    (np.array([0.5, np.nan, 0.5]), ValueError, r"nan.*row 1"),
    (np.ones(4) * 0.5, ValueError, r"shape \(3,\).*shape \(4,\)"),
    (np.ones((3, 1)) * 0.5, ValueError, r"shape \(3,\).*shape \(3, 1\)"),
    (0.5, ValueError, r"shape \(3,\).*shape \(\)"),
    (np.array(["a", "b", "c"]), TypeError, r"real numbers.*dtype <U1"),
    (np.array([True, True, True]), TypeError, r"real numbers.*dtype bool"),
    (np.array([0.5, None, 0.5], dtype=object), TypeError, r"real numbers.*dtype object"),
]


@pytest.fixture
def live_sketch():
    """A decaying sketch mid-stream, with folded rows, candidates and rows waiting in the buffer."""
    K, V, G = stream_data(120, 81)
    sk = sketch(0.9, "exact")
    sk.update_many(K[:100], V[:100], gates=G[:100])
    for i in range(100, 110):
        sk.update(K[i], V[i], gate=G[i])
    return sk


@pytest.mark.parametrize("gate", [0.5, "a", 2.0])
def test_an_exhausted_id_counter_is_reported_before_the_gate(gate):
    """A key-only gated row when the running counter's next id would leave int64: that is the error, whatever the
    gate (the live step's fast path checks the id first, as the general path does), and nothing changes."""
    K, _, _ = stream_data(5, 82)
    sk = sketch(None)
    sk.update_many(K[:3], gates=[0.9, 0.9, 0.9])
    sk.update_many(K[3:4], ids=[2**63 - 2], gates=[0.9])
    before = sk.to_bytes()
    with pytest.raises(ValueError, match="ids would overflow int64"):
        sk.update(K[4], gate=gate)
    assert sk.to_bytes() == before


@pytest.mark.parametrize("gate,exc,pattern", BAD_GATES)
def test_bad_gate_on_update_and_decode_step_changes_nothing(live_sketch, gate, exc, pattern):
    sk = live_sketch
    before = sk.to_bytes()
    x, v, q = np.ones(D), np.ones(DV), np.ones((1, D))
    with pytest.raises(exc, match=pattern):
        sk.update(x, v, gate=gate)
    assert sk.to_bytes() == before
    if not isinstance(gate, str):
        with pytest.raises(exc, match=pattern):
            sk.prefill(x[None, :], v[None, :], q, gates=gate)  # a decode step, its gate as a number
        assert sk.to_bytes() == before


@pytest.mark.parametrize("gates,exc,pattern", BAD_GATE_ARRAYS)
def test_bad_gates_on_chunks_change_nothing(live_sketch, gates, exc, pattern):
    sk = live_sketch
    before = sk.to_bytes()
    X, Vc, Q = np.ones((3, D)), np.ones((3, DV)), np.ones((3, D))
    with pytest.raises(exc, match=pattern):
        sk.update_many(X, Vc, gates=gates)
    assert sk.to_bytes() == before
    with pytest.raises(exc, match=pattern):
        sk.prefill(X, Vc, Q, gates=gates)
    assert sk.to_bytes() == before


def test_bad_rows_with_good_gates_change_nothing(live_sketch):
    sk = live_sketch
    before = sk.to_bytes()
    X, Vc = np.ones((3, D)), np.ones((3, DV))
    g = np.full(3, 0.5)
    bad_x = X.copy()
    bad_x[1, 2] = np.nan
    with pytest.raises(ValueError):
        sk.update_many(bad_x, Vc, gates=g)
    with pytest.raises(ValueError):
        sk.update(bad_x[1], Vc[0], gate=0.5)
    with pytest.raises(ValueError):
        sk.prefill(bad_x, Vc, X, gates=g)
    with pytest.raises(ValueError):  # ids already fed
        sk.update_many(X, Vc, ids=[5, 200, 201], gates=g)
    with pytest.raises(ValueError):  # weighted in the frame (up to e^100) the squares overflow
        sk.update_many(X * 1e150, Vc, gates=g)
    with pytest.raises(ValueError):
        sk.prefill(X * 1e150, Vc, X, gates=g)
    assert sk.to_bytes() == before


@pytest.mark.parametrize(
    "decay,exc,pattern",
    [
        (0, ValueError, r"0 < decay <= 1.*got 0\.0"),
        (1.5, ValueError, r"0 < decay <= 1.*got 1\.5"),
        (-0.1, ValueError, r"0 < decay <= 1.*got -0\.1"),
        (float("nan"), ValueError, r"decay.*finite.*nan"),
        ("0.9", TypeError, r"decay.*real number.*'0\.9'"),
    ],
)
def test_decay_out_of_range_is_refused(decay, exc, pattern):
    with pytest.raises(exc, match=pattern):
        ls.KeySketch(D, eps=EPS, decay=decay)


@pytest.mark.parametrize(
    "options,pattern",
    [
        ({"p": 3}, r"p = 2.*got p = 3"),
        ({"p": 1}, r"p = 2.*got p = 1"),
        ({"exact": False}, r"exact=False"),
    ],
)
def test_decay_needs_the_exact_p2_summary(options, pattern):
    with pytest.raises(ValueError, match=pattern):
        ls.KeySketch(D, eps=EPS, decay=0.9, **options)


@pytest.mark.parametrize("options", [{"p": 3}, {"p": 1.5}, {"exact": False}])
def test_gates_on_a_coreset_sketch_are_refused_and_change_nothing(options):
    K = heavy_tailed_keys(60, D, seed=83)
    sk = ls.KeySketch(D, eps=0.2, value_dim=DV, **options).update_many(K, np.ones((60, DV)))
    before = sk.to_bytes()
    pattern = r"gates need p = 2.*coreset"
    with pytest.raises(ValueError, match=pattern):
        sk.update(K[0], np.ones(DV), gate=0.5)
    with pytest.raises(ValueError, match=pattern):
        sk.update_many(K[:3], np.ones((3, DV)), gates=np.full(3, 0.5))
    with pytest.raises(ValueError, match=pattern):
        sk.prefill(K[:3], np.ones((3, DV)), K[:3], gates=np.full(3, 0.5))
    with pytest.raises(ValueError, match=pattern):
        sk.prefill(K[:1], np.ones((1, DV)), K[:1], gates=0.5)
    assert sk.to_bytes() == before
    assert not sk.forgets


# ---------------------------------------------------------------------------------------------------- 6. queries
def test_queries_change_nothing(live_sketch):
    sk = live_sketch
    Q = np.random.default_rng(91).standard_normal((7, D))
    before = sk.to_bytes()
    sk.heavy_entries(Q)
    sk.heavy_entries(Q, eps=0.2)
    sk.normalizer(Q)
    sk.attend(Q)
    sk.top_k(Q, 3)
    sk.universal_set()
    _ = sk.normalizer_summary
    _ = (sk.n, sk.num_retained, sk.nbytes, sk.forgets, sk.log_total_gate, sk.decay, repr(sk))
    assert sk.to_bytes() == before


# ---------------------------------------------------------------------------------------------------- regressions
@pytest.mark.parametrize(
    "how", ["one tiny gate", "decay over a long chunk", "decay over a big block"]
)
def test_a_stream_that_forgets_everything_keeps_working(how):
    """Regression: up to 087036b, once the folded state decayed below the frame's range between two folds (a
    gate <= 1e-305, or block_rows x -log(decay) > ~700), the next fold's plan took a Cholesky factor of G = 0
    (LinAlgError)."""
    n = 20_000
    K = heavy_tailed_keys(n, 4, seed=95)
    if how == "one tiny gate":
        sk = ls.KeySketch(4, eps=0.1, block_rows=64).update_many(K[:1000])
        sk.update(K[1000], gate=1e-306)
        sk.update_many(K[1001:1200])
        ref = DecayedStream(4).update_many(
            K[:1200], gates=np.r_[np.ones(1000), 1e-306, np.ones(199)]
        )
    elif how == "decay over a long chunk":
        sk = ls.KeySketch(4, eps=0.1, decay=0.9, block_rows=64)
        sk.update_many(K[:1000])
        sk.update_many(
            K[1000:8000]
        )  # 0.9^7000 = e^-737: everything before is below the frame's range
        sk.update_many(K[8000:8100])
        ref = DecayedStream(4, decay=0.9).update_many(K[:8100])
    else:
        sk = ls.KeySketch(4, eps=0.1, decay=0.9, block_rows=10_000)
        for a in range(0, n, 100):
            sk.update_many(K[a : a + 100])
        ref = DecayedStream(4, decay=0.9).update_many(K)
    check_queries(sk, ref, queries(np.random.default_rng(95), ref), eps=0.1)
    check_universal(sk, ref, eps=0.1)


def test_strong_gates_row_by_row_keep_every_heavy_key():
    """Regression: at e373c40 the stale factor, divided by sqrt(factor) at every rebase, overflowed and a key of
    leverage 0.99 was pruned (from the universal set and the heavy entries)."""
    n, g = 900, 0.01
    K = np.random.default_rng(0).standard_normal((n, 2))
    sk = ls.KeySketch(2, eps=0.2, block_rows=8)
    ref = DecayedStream(2)
    for k in K:
        sk.update(k, gate=g)
    ref.update_many(K, gates=np.full(n, g))
    q = np.array([[-K[-1, 1], K[-1, 0]]])  # orthogonal to the newest key: key n-2 carries ~0.99
    assert_heavy_matches_dense(sk.heavy_entries(q), ref.heavy(q, 0.2), 0.2)
    assert_matches_offline(sk.universal_set().ids, ref.universal_scores(), 0.2)


def test_a_direction_that_decays_away_loses_no_recent_key():
    """Regression (78c2f48): a direction only old keys carry (weights 0.5^1400, far below float64's range in
    G) flushed the whole state; now G is kept as its R factor and the old keys along it stay exact."""
    rng = np.random.default_rng(0)
    n, d = 1500, 3
    K = rng.standard_normal((n, d))
    K[100:, 0] = (
        0.0  # after the first 100 keys coordinate 0 is never used again: G[0, 0] decays like 0.5^t
    )
    sk = ls.KeySketch(d, eps=0.1, block_rows=16, decay=0.5)
    ref = DecayedStream(d, decay=0.5)
    for a in range(0, n, 10):
        sk.update_many(K[a : a + 10])
        ref.update_many(K[a : a + 10])
        Q = rng.standard_normal((3, d))
        Q[0, 0] = 0.0
        check_queries(sk, ref, Q, eps=0.1)
    check_universal(sk, ref, eps=0.1)


def test_a_direction_that_decays_away_row_by_row_under_queries():
    """The same stream fed one row at a time with a query after each: when ``G`` leaves float64's range (kept as
    its R factor, here with the live queries' cache current) the cache goes, and queries read the summary and
    every pending row until the next fold."""
    rng = np.random.default_rng(1)
    n, d = 1500, 3
    K = rng.standard_normal((n, d))
    K[100:, 0] = 0.0
    sk = ls.KeySketch(d, eps=0.1, block_rows=16, decay=0.5)
    ref = DecayedStream(d, decay=0.5)
    for t in range(n):
        sk.update(K[t])
        ref.update_many(K[t : t + 1])
        Q = rng.standard_normal((2, d))
        Q[0, 0] = 0.0
        if t % 7 == 0 or t > n - 30:
            check_queries(sk, ref, Q, eps=0.1)
        else:
            sk.heavy_entries(Q)  # keeps the live cache current
    check_universal(sk, ref, eps=0.1)


def test_build_from_an_iterable_with_decay_is_one_stream():
    """Round-robin shards of an iterable are not consecutive parts: build_sketch feeds them as one stream."""
    rng = np.random.default_rng(97)
    K = rng.standard_normal((30_000, 6))
    one = ls.KeySketch(6, eps=0.05, decay=0.99).update_many(K)
    built = ls.build_sketch((K[i : i + 3000] for i in range(0, 30_000, 3000)), eps=0.05, decay=0.99, n_jobs=3)
    U = one.universal_set()
    assert len(U) > 10
    assert np.array_equal(built.universal_set().ids, U.ids)
    Q = rng.standard_normal((4, 6))
    np.testing.assert_allclose(built.normalizer(Q), one.normalizer(Q), rtol=1e-12)


def test_multihead_step_path_that_merges_a_gated_later_part_weighs_what_follows():
    """An ungated multi-head sketch (on its token-buffer step path) takes a gated later part by merge: the rows
    fed after it, without gates, are weighed in the merged frame (the heads forget now), exactly as brute force."""
    n, heads = 900, 2
    data = [stream_data(n, 61 + h) for h in range(heads)]
    K = np.stack([k for k, _, _ in data])
    V = np.stack([v for _, v, _ in data])
    G = np.ones((heads, n))
    G[:, 400:700] = np.stack([g[400:700] for _, _, g in data])
    first = ls.MultiHeadKeySketch(heads, D, eps=EPS, value_dim=DV, exact_output=True, block_rows=BLOCK)
    for t in range(400):  # one token at a time: the step path
        first.update(K[:, t], V[:, t])
    later = ls.MultiHeadKeySketch(heads, D, eps=EPS, value_dim=DV, exact_output=True, block_rows=BLOCK)
    later.update_many(K[:, 400:700], V[:, 400:700], offset=400, gates=G[:, 400:700])
    first.merge(later)
    for t in range(700, n):
        first.update(K[:, t], V[:, t])
    for h in range(heads):
        ref = DecayedStream(D, value_dim=DV).update_many(K[h], V[h], gates=G[h])
        Q = queries(np.random.default_rng(70 + h), ref, 4)
        Qs = np.zeros((heads, *Q.shape))
        Qs[h] = Q
        got = first.heavy_entries(Qs)[h]
        want = ref_attention(ref, Q)
        assert sum(int((w >= EPS).sum()) for w in want)  # something heavy to find
        for i in range(Q.shape[0]):
            hits = want[i] >= EPS
            np.testing.assert_array_equal(got.key_ids[got.indptr[i]:got.indptr[i + 1]], np.flatnonzero(hits))
            np.testing.assert_allclose(got.values[got.indptr[i]:got.indptr[i + 1]], want[i][hits],
                                       rtol=VALUE_RTOL)


def test_live_cache_refactors_only_when_its_diagonal_doubles(monkeypatch):
    """The live queries' cache refactors ``G`` (``d^3``) when its largest diagonal entry has doubled, not at every
    check: 600 steps at gate 0.999 grow the weights of new rows e^0.6 = 1.8 times, so at most one refresh (a
    cache that forgot its mark refreshed every 16 rows)."""
    import levstream.sketch as sketch_module

    n = 3000
    K = heavy_tailed_keys(n + 600, D, seed=83)
    sk = sketch(None, block_rows=4096).update_many(K[:n], gates=np.full(n, 0.999))
    rng = np.random.default_rng(83)
    sk.heavy_entries(rng.standard_normal((1, D)))  # the cache, with its first factor
    refreshes = []
    real = sketch_module._LiveRows.refresh
    monkeypatch.setattr(sketch_module._LiveRows, "refresh",
                        lambda self, store: (refreshes.append(1), real(self, store)))
    for t in range(n, n + 600):
        sk.update(K[t], gate=0.999)
        sk.heavy_entries(rng.standard_normal((1, D)))
    assert len(refreshes) <= 1


def test_live_cache_of_a_fast_forgetting_stream_refactors_once_its_rows_have_doubled(monkeypatch):
    """At gate 0.99 the weights of new rows double in the frame every ~69 rows, and so does the diagonal of the
    cache's ``G``; a refactor pays by the rows it drops, so the cache refactors only once the rows it scans have
    also grown past twice (plus 64) the rows its last refactor kept.  Answers stay exact throughout."""
    import levstream.sketch as sketch_module

    n, steps = 2000, 1500
    K = heavy_tailed_keys(n + steps, D, seed=84)
    gates = np.full(n + steps, 0.99)
    sk = sketch(None, block_rows=8192).update_many(K[:n], gates=gates[:n])
    ref = DecayedStream(D)
    ref.update_many(K[:n], gates=gates[:n])
    rng = np.random.default_rng(84)
    sk.heavy_entries(rng.standard_normal((1, D)))  # the cache
    seen = []  # (scanned rows when a refactor starts, rows the cache's last refactor kept)
    real = sketch_module._LiveRows._refactor
    monkeypatch.setattr(
        sketch_module._LiveRows,
        "_refactor",
        lambda self, store: (seen.append((self.rows.n, self.rows_mark)), real(self, store)),
    )
    for t in range(n, n + steps):
        sk.update(K[t], gate=gates[t])
        ref.update_many(K[t : t + 1], gates=gates[t : t + 1])
        Q = queries(rng, ref, m=1)
        if t % 50 == 0:
            check_queries(sk, ref, Q)
        else:
            sk.heavy_entries(Q)
    assert len(seen) >= 2  # the stream did refactor
    assert all(rows >= 2 * mark + 64 for rows, mark in seen), seen
    # the diagonal alone (every ~69 rows) would have refactored far more often
    assert len(seen) < steps // 69 // 2


def test_tiny_gates_never_leave_an_overflowing_factor_that_drops_a_heavy_key():
    """Gates of 1e-300 rebase the frame by a huge power of 4; the cached factors divided by its tiny root left
    float64's range, and the bound of the next pending row became nan and dropped it -- a key that held all of
    a query's attention (found in review; reproduced at 4c706e5).  Factors that overflow are now dropped and a nan
    bound keeps the row: every step's entries are the brute force's."""
    rng = np.random.default_rng(0)
    d, eps = 4, 0.05
    sk = ls.KeySketch(d, eps=eps, block_rows=64)
    ref = DecayedStream(d)
    for t in range(120):
        x = rng.standard_normal(d) * 10.0 ** rng.uniform(-2, 2)
        if rng.random() < 0.3 and t > 3:
            x[-2:] = 0.0
        g = 1e-300 if (t % 37) in (5, 6, 7, 8, 9, 10, 11) else (
            None if rng.random() < 0.5 else float(rng.uniform(0.2, 1)))
        sk.update(x, gate=g)
        ref.update_many(x[None], gates=None if g is None else np.array([g]))
        q = (x + 1e-3 * rng.standard_normal(d))[None]
        got = sk.heavy_entries(q)  # a query per step keeps the live cache (and its factor) alive
        want = ref.attention(q[0])
        np.testing.assert_array_equal(got.key_ids, np.flatnonzero(want >= eps), err_msg=f"step {t}")
        np.testing.assert_allclose(got.values, want[want >= eps], rtol=VALUE_RTOL)
