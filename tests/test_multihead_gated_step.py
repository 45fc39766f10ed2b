"""The step path of a MultiHeadKeySketch whose stream forgets (issue 13, item 1: gates per head; issue 11, item 4:
the work of all heads in one pass): gated and decaying tokens fed one or a few at a time, and gated decode steps,
go through the shared token buffer, weighed in every head's frame as they are copied in, instead of through a
Python loop over the heads' general chunk path.

Checked against brute force written in tests/naive.py (``DecayedStream``: every key and gate kept, attention
recomputed in log space) after every query: identical entries (tie band excepted), values to VALUE_RTOL, exact
outputs to OUTPUT_RTOL; and every head against an independent ``KeySketch`` fed the same rows one at a time with
the same gates: the same bytes.  Gates as small as 1e-3 make the frames rebase every few dozen tokens (the
general path takes those tokens), heads that start forgetting at different times, and tokens whose weighted rows
overflow are included.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_heavy_matches_dense
from naive import DecayedStream
from test_decay import assert_finite, assert_heavy_outputs, assert_outputs, ref_attention

import levstream as ls
from levstream.multihead import _STEP_BUFFER_ROWS, _STEP_CHUNK_ROWS

H, D, DV, EPS = 3, 5, 2, 0.04


def count_calls(monkeypatch, cls: type, name: str) -> dict:
    """Count the calls of method ``name`` of ``cls`` (in ``calls["n"]``) for the rest of the test."""
    calls = {"n": 0}
    original = getattr(cls, name)

    def counting(self, *args, **kwargs):
        calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, counting)
    return calls


def head_result(res: ls.AttentionResult, h: int) -> ls.AttentionResult:
    return ls.AttentionResult(
        res.entries[h],
        res.heavy_output[h],
        res.captured_mass[h],
        None if res.output is None else res.output[h],
    )


def token_gates(kind: str, rng: np.random.Generator, t: int, m: int) -> np.ndarray | None:
    """Gates of ``m`` tokens in every head, shape (H, m), or None (the constant decay alone)."""
    if kind == "decay":
        return None
    if kind == "random":
        return rng.uniform(0.6, 1.0, size=(H, m))
    if kind == "tiny":  # 1e-3 on most tokens: a frame rebases every ~15 tokens
        return np.where(rng.random((H, m)) < 0.5, 1e-3, rng.uniform(0.5, 1.0, size=(H, m)))
    if kind == "staggered":  # head h keeps gates of exactly 1 until token 40 h: heads start forgetting apart
        g = rng.uniform(0.7, 1.0, size=(H, m))
        for h in range(H):
            g[h, t + np.arange(m) < 40 * h] = 1.0
        return g
    raise AssertionError(kind)


def as_given(g: np.ndarray | None, rng: np.random.Generator, token: bool):
    """The gates in one of the shapes the calls take: per head, or one row for every head when they agree."""
    if g is None:
        return None
    if rng.random() < 0.3:  # the same gates in every head: (m,), or one number for a token
        g[:] = g[0]
        return float(g[0, 0]) if token and rng.random() < 0.5 else (g[0, 0] if token else g[0].copy())
    return g[:, 0].copy() if token else g


@pytest.mark.parametrize("kind", ["decay", "random", "tiny", "staggered"])
@pytest.mark.parametrize("seed", [0, 1])
def test_gated_steps_equal_brute_force_and_heads_fed_alone(kind, seed):
    """A program of gated tokens (``update``), gated small chunks (``update_many`` of up to 32 tokens), gated
    decode steps (``prefill`` of one token), larger gated chunks (the general path) and queries of every head,
    with a small block so that the heads fold and prune many times."""
    rng = np.random.default_rng(seed)
    decay = 0.97 if kind == "decay" else None
    options = dict(eps=EPS, block_rows=16, value_dim=DV, exact_output=True, decay=decay)
    mh = ls.MultiHeadKeySketch(H, D, **options)
    alone = [ls.KeySketch(D, **options) for _ in range(H)]
    refs = [DecayedStream(D, value_dim=DV, decay=decay) for _ in range(H)]
    t = 0
    queries = 0
    while t < 900:
        op = rng.choice(["token", "small", "decode", "chunk", "query"], p=[0.3, 0.2, 0.25, 0.05, 0.2])
        m = {"token": 1, "decode": 1, "small": int(rng.integers(1, _STEP_CHUNK_ROWS + 1))}.get(op, 0)
        if op == "chunk":
            m = int(rng.integers(_STEP_CHUNK_ROWS + 1, 90))
        if op == "query":
            Q = rng.standard_normal((H, int(rng.integers(1, 4)), D))
            res = mh.attend(Q)
            for h in range(H):
                A_rows = ref_attention(refs[h], Q[h])
                got = head_result(res, h)
                assert_finite(got.heavy_output, got.captured_mass, got.output)
                assert_heavy_matches_dense(got.entries, refs[h].heavy(Q[h], EPS), EPS)
                assert_heavy_outputs(got, A_rows, refs[h].V, EPS)
                assert_outputs(got.output, A_rows, refs[h].V, f"head {h} output")
            hits = mh.heavy_entries(Q)
            for h in range(H):
                assert_heavy_matches_dense(hits[h], refs[h].heavy(Q[h], EPS), EPS)
            queries += 1
            continue
        K = rng.standard_normal((H, m, D)) * rng.uniform(0.2, 3.0)
        V = rng.standard_normal((H, m, DV))
        g = token_gates(kind, rng, t, m)
        given = as_given(g, rng, token=op in ("token",))
        if op == "token":
            mh.update(K[:, 0], V[:, 0], gate=given)
        elif op == "decode":
            Q = rng.standard_normal((H, 1, D))
            res = mh.prefill(K, V, Q, gates=given)
        else:
            mh.update_many(K, V, gates=given)
        for h in range(H):
            gh = None if g is None else g[h]
            refs[h].update_many(K[h], V[h], gates=gh)
            for i in range(m):  # the independent heads: one row at a time
                alone[h].update(K[h, i], V[h, i], gate=None if gh is None else float(gh[i]))
        if op == "decode":
            for h in range(H):
                A_rows = ref_attention(refs[h], Q[h])
                got = head_result(res, h)
                assert_heavy_matches_dense(got.entries, refs[h].heavy(Q[h], EPS), EPS)
                assert_heavy_outputs(got, A_rows, refs[h].V, EPS)
                assert_outputs(got.output, A_rows, refs[h].V, f"head {h} decode output")
        t += m
    assert queries > 20
    assert mh.n == t == alone[0].n
    Q = rng.standard_normal((H, 2, D))
    z = mh.normalizer(Q)
    for h in range(H):  # (bytes: the next test; a chunk's exact-output sums are grouped as the chunk came)
        np.testing.assert_allclose(z[h], alone[h].normalizer(Q[h]), rtol=1e-12)
        assert mh.heads[h].log_total_gate == alone[h].log_total_gate


@pytest.mark.parametrize("kind", ["decay", "random", "tiny", "staggered"])
def test_gated_tokens_leave_every_head_as_fed_alone_row_by_row(kind):
    """Tokens and small chunks only (every call on the step path but those that meet a rebase): each head's bytes
    equal those of a KeySketch fed the same rows and gates one at a time, through every fold, prune and rebase,
    with and without exact outputs."""
    rng = np.random.default_rng(7)
    for exact in (False, True):
        decay = 0.97 if kind == "decay" else None
        options = dict(eps=EPS, block_rows=16, value_dim=DV, exact_output=exact, decay=decay)
        mh = ls.MultiHeadKeySketch(H, D, **options)
        alone = [ls.KeySketch(D, **options) for _ in range(H)]
        t = 0
        while t < 3 * _STEP_BUFFER_ROWS + 200:
            m = 1 if rng.random() < 0.5 else int(rng.integers(1, 9))
            K = rng.standard_normal((H, m, D))
            V = rng.standard_normal((H, m, DV))
            g = token_gates(kind, rng, t, m)
            if m == 1 and rng.random() < 0.5:
                mh.update(K[:, 0], V[:, 0], gate=None if g is None else g[:, 0])
            else:
                mh.update_many(K, V, gates=g)
            for h in range(H):
                for i in range(m):
                    alone[h].update(K[h, i], V[h, i], gate=None if g is None else float(g[h, i]))
            t += m
            if rng.random() < 0.1:  # a query in between changes nothing
                mh.heavy_entries(rng.standard_normal((H, 1, D)))
        for h in range(H):
            assert mh.heads[h].to_bytes() == alone[h].to_bytes(), f"head {h}, exact={exact}"
            assert mh.heads[h].log_total_gate == alone[h].log_total_gate


@pytest.mark.parametrize("decay", [None, 0.99])
def test_key_only_gated_tokens_reach_the_heads_by_the_live_append_as_fed_alone(decay, monkeypatch):
    """Key-only tokens that only wait in the heads' input buffers reach the heads by the live step's append, for heads
    that forget too (they were weighed in the frame the head then has): every head's bytes equal those of a
    KeySketch fed the same rows and gates one at a time (a head that never forgets, one that starts forgetting at
    token 100, one from the start)."""
    real = ls.KeySketch._append_next_rows
    framed = {"n": 0}

    def counted(self, X, m, frame=None):
        ok = real(self, X, m, frame)
        framed["n"] += bool(ok and frame is not None and m > 1)  # (m > 1: a hand-over, not a gated row)
        return ok

    monkeypatch.setattr(ls.KeySketch, "_append_next_rows", counted)
    rng = np.random.default_rng(11)
    n = 6 * _STEP_BUFFER_ROWS + 37
    T, G = rng.standard_normal((n, H, D)), rng.uniform(0.9, 1.0, (n, H))
    G[:, 0] = 1.0
    G[:100, 1] = 1.0
    mh = ls.MultiHeadKeySketch(H, D, eps=EPS, block_rows=128, decay=decay)
    alone = [ls.KeySketch(D, eps=EPS, block_rows=128, decay=decay) for _ in range(H)]
    for t in range(n):
        mh.update(T[t], gate=G[t])
        for h in range(H):
            alone[h].update(T[t, h], gate=float(G[t, h]))
        if t % 50 == 0:
            mh.heavy_entries(rng.standard_normal((H, 1, D)))
    for h in range(H):
        assert mh.heads[h].to_bytes() == alone[h].to_bytes(), f"head {h}"
    assert framed["n"] >= 5


def test_gated_steps_take_the_step_path(monkeypatch):
    """Gated tokens and decode steps of a stream that forgets do not go through the heads' general chunk path
    (which made a 12-head gated step 27-33x a single-head one): between rebases no head ingests a chunk of its
    own, and the queries read the stacked live state."""
    calls = count_calls(monkeypatch, ls.KeySketch, "_weigh_rows")
    rng = np.random.default_rng(3)
    mh = ls.MultiHeadKeySketch(H, D, eps=EPS, value_dim=DV, exact_output=True, decay=0.999)
    for _ in range(50):  # e^-(50 * 0.001): far from a rebase (E would have to pass 100)
        mh.prefill(
            rng.standard_normal((H, 1, D)),
            rng.standard_normal((H, 1, DV)),
            rng.standard_normal((H, 1, D)),
            gates=rng.uniform(0.99, 1.0, H)[:, None],
        )
        mh.update(rng.standard_normal((H, D)), rng.standard_normal((H, DV)), gate=0.995)
    assert calls["n"] == 0
    assert mh._live is not None and mh._nb > 0


def test_a_bad_gate_or_overflowing_token_on_the_step_path_changes_nothing():
    """Invalid gates are refused with the general path's messages; a token whose weighted squares overflow is
    refused by name; neither changes the sketch (bytes equal, the next token gets the same id)."""
    rng = np.random.default_rng(5)
    mh = ls.MultiHeadKeySketch(H, D, eps=EPS, value_dim=DV)
    for _ in range(5):
        mh.update(rng.standard_normal((H, D)), rng.standard_normal((H, DV)), gate=0.5)
    before, next_id = mh.to_bytes(), mh.next_id
    x, v = rng.standard_normal((H, D)), rng.standard_normal((H, DV))
    for gate, pattern in [
        (0.0, "0 < gate <= 1"),
        (np.array([0.5, 1.5, 0.5]), r"head 1: gates must satisfy 0 < gate <= 1; got 1\.5"),
        (np.array([0.5, 0.5]), r"shape \(3,\)"),
        (np.nan, "0 < gate <= 1"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            mh.update(x, v, gate=gate)
        assert mh.to_bytes() == before and mh.next_id == next_id
    with pytest.raises(ValueError, match="head 2: gates must satisfy"):
        mh.update_many(x[:, None], v[:, None], gates=np.array([[0.5], [0.5], [2.0]]))
    with pytest.raises(TypeError, match="dtype bool"):
        mh.update_many(x[:, None], v[:, None], gates=np.array([True]))
    with pytest.raises(ValueError, match=r"^x has values so large that their squares overflow"):
        mh.update(np.full((H, D), 1e155), v, gate=0.5)
    assert mh.to_bytes() == before and mh.next_id == next_id
    # a gate of e^-99 takes the frames to the edge of a rebase; a row of 1e140 is then weighed by ~e^49.5
    far = ls.MultiHeadKeySketch(H, D, eps=EPS)
    far.update(x, gate=np.exp(-99.0))
    edge, edge_id = far.to_bytes(), far.next_id
    with pytest.raises(ValueError, match=r"^x has values so large that their squares, weighted in the decaying"):
        far.update(np.full((H, D), 1e140), gate=1.0)
    assert far.to_bytes() == edge and far.next_id == edge_id
    nan = x.copy()
    nan[1, 2] = np.nan
    with pytest.raises(ValueError, match="finite"):
        mh.update(nan, v, gate=0.5)
    with pytest.raises(ValueError, match="finite"):
        mh.prefill(x[:, None], v[:, None] * np.nan, x[:, None], gates=0.5)
    assert mh.to_bytes() == before and mh.next_id == next_id


# ---------------------------------------------------------------------------------------------- review fixes
@pytest.mark.parametrize("start", [337, 339, 341, 343, 345, 433, 529])
def test_a_head_that_starts_forgetting_inside_a_chunk_prunes_as_row_by_row(start):
    """Head 1's first gate below 1 falls inside a chunk of 8 tokens, after a block boundary of that chunk (block
    of 16 rows): the rows before it must reach the head while it does not forget yet, since a head that forgets
    prunes its candidates sooner (at 1.5 rather than 2 times).  The first version wrote the forgetting frame back
    before the whole buffer: the prune fell elsewhere (465 rows held against 463, bytes different).  A small eps
    makes the candidates pass the prune minimum (256 rows)."""
    rng = np.random.default_rng(0)
    eps, block, d = 0.002, 16, 8
    mh = ls.MultiHeadKeySketch(2, d, eps=eps, block_rows=block)
    alone = [ls.KeySketch(d, eps=eps, block_rows=block) for _ in range(2)]
    t = 0
    while t < start + 40:
        m = 1 if t < 4 else 8
        K = rng.standard_normal((2, m, d)) * rng.uniform(0.5, 2.0, size=(2, m, 1))
        g = np.ones((2, m))
        g[1] = np.where(t + np.arange(m) >= start, 0.95, 1.0)  # head 0 never forgets
        mh.update_many(K, gates=g)
        for h in range(2):
            for i in range(m):
                alone[h].update(K[h, i], gate=float(g[h, i]))
        t += m
    for h in range(2):
        assert mh.heads[h].to_bytes() == alone[h].to_bytes(), f"head {h}"


@pytest.mark.parametrize(("before", "at"), [(120, 3), (120, 12), (248, 3), (96, 3)])
def test_a_small_chunk_a_frame_rebases_in_keeps_exact_outputs_as_row_by_row(before, at):
    """A chunk of 16 tokens whose token ``at`` has a gate of 1e-40 (its frame rebases there) straddles the moment
    state's 128-row buffer: taken token by token (the rebasing one through the general path), every head's bytes
    equal those of a KeySketch fed row by row.  The first version sent such a chunk whole through the general
    path, whose exact-output sums are grouped as a chunk (bytes as KeySketch.update_many of it)."""
    rng = np.random.default_rng(1)
    options = dict(eps=0.05, value_dim=DV, exact_output=True)
    mh = ls.MultiHeadKeySketch(2, 4, **options)
    alone = [ls.KeySketch(4, **options) for _ in range(2)]

    def feed(m, g):
        K, V = rng.standard_normal((2, m, 4)), rng.standard_normal((2, m, DV))
        mh.update_many(K, V, gates=g)
        for h in range(2):
            for i in range(m):
                alone[h].update(K[h, i], V[h, i], gate=float(g[h, i]))

    for _ in range(before // 8):
        feed(8, np.full((2, 8), 0.9))
    g = np.full((2, 16), 0.9)
    g[:, at] = 1e-40
    feed(16, g)
    for h in range(2):
        assert mh.heads[h].to_bytes() == alone[h].to_bytes(), f"head {h}"
    Q = rng.standard_normal((2, 1, 4))
    res = mh.attend(Q)
    for h in range(2):
        np.testing.assert_allclose(res.output[h], alone[h].attend(Q[h]).output, rtol=1e-10)


def test_token_gates_in_every_form_take_the_step_path_and_other_shapes_are_refused_at_once(monkeypatch):
    """``update``'s per-head gate as an array, a list or a tuple takes the step path (a list once went through every
    head's general path); a gate of shape (n_heads, 1) is refused at the first token, as before the step path took
    gates (it was taken until a rebase was due, then refused)."""
    general = count_calls(monkeypatch, ls.MultiHeadKeySketch, "_update_gated")
    rng = np.random.default_rng(2)
    mh = ls.MultiHeadKeySketch(H, D, eps=EPS)
    for form in (np.array, list, tuple, lambda g: np.asarray(g, np.float32)):
        for _ in range(5):
            mh.update(rng.standard_normal((H, D)), gate=form(rng.uniform(0.9, 1.0, H).tolist()))
    assert general["n"] == 0 and mh.n == 20
    before = mh.to_bytes()
    with pytest.raises(ValueError, match=r"gate must be one number, or one per head: shape \(3,\); got shape \(3, 1\)"):
        mh.update(rng.standard_normal((H, D)), gate=np.full((H, 1), 0.9))
    assert mh.to_bytes() == before


@pytest.mark.parametrize("bad", [0, 2])
def test_a_value_whose_squares_overflow_is_refused_in_a_chunk_a_frame_rebases_in(bad):
    """A chunk of 4 gated tokens whose token 2 rebases the frames and whose token ``bad`` has a value row of 1e160
    (its squares overflow) is refused whole, as KeySketch refuses such a value.  The first version retook such a
    chunk token by token without checking the values' own squares: it took it (bad = 0), or refused it after
    taking two tokens (bad = 2)."""
    rng = np.random.default_rng(0)
    mh = ls.MultiHeadKeySketch(H, D, eps=EPS, value_dim=DV)
    mh.update_many(rng.standard_normal((H, 3, D)), rng.standard_normal((H, 3, DV)), gates=np.full(3, 0.9))
    before, next_id = mh.to_bytes(), mh.next_id
    V = rng.standard_normal((H, 4, DV))
    V[1, bad] = 1e160
    g = np.full((H, 4), 0.9)
    g[:, 2] = 1e-44  # e^-101: the frames rebase at token 2
    with pytest.raises(ValueError, match="V has values so large that their squares overflow"):
        mh.update_many(rng.standard_normal((H, 4, D)), V, gates=g)
    assert mh.to_bytes() == before and mh.next_id == next_id


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("what", ["keys", "values"])
def test_rows_whose_squares_fit_but_whose_sum_overflows_are_taken(gated, what):
    """Two tokens whose rows each have squares summing to ~1e308 (each fits float64; their sum over the chunk does
    not) are taken, as KeySketch takes them (the summaries hold such rows).  The step path once checked only the
    sum, then found every row valid and raised AssertionError('unreachable')."""
    rng = np.random.default_rng(1)
    X = rng.standard_normal((H, 2, D))
    V = rng.standard_normal((H, 2, DV))
    big = np.sqrt(0.98e308 / D)
    if what == "keys":
        X[:] = big * np.sign(X)
    else:
        V[:] = np.sqrt(0.98e308 / DV)
    gates = np.full(2, 0.9) if gated else None
    alone = ls.KeySketch(D, eps=EPS, value_dim=DV).update_many(X[0], V[0], gates=gates)
    mh = ls.MultiHeadKeySketch(H, D, eps=EPS, value_dim=DV)
    mh.update_many(X, V, gates=gates)
    assert mh.n == alone.n == 2
    q = rng.standard_normal((1, D)) * 1e-150
    assert mh.heavy_entries(q[None].repeat(H, 0))[0].as_set() == alone.heavy_entries(q).as_set()
