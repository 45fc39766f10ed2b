"""The decaying stream's frame (docs/theory.md, "Decay and gates", Numerics): weights, rebases, flushing.

Complements tests/test_decay.py (answers against the log-space brute force) with the frame's own arithmetic:
chunked and row-by-row weights agree bit for bit, a rebase is exact, a state flushed to zero recovers, and
keys whose weighted squares would overflow are refused without a change.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from naive import DecayedStream

import levstream as ls
from levstream._decay import Frame
from levstream._kernels.decay import FRAME_LIMIT


def test_chunked_and_row_by_row_frames_give_identical_weights():
    rng = np.random.default_rng(0)
    neg = -np.log(rng.uniform(1e-3, 1.0, size=5000))
    scales, shifts, end = Frame().rows(neg)
    frame, by_row, total = Frame(), [], 0
    for x in neg:
        s, m, frame = frame.step(float(x))
        total += m
        by_row.append((s, total))
    assert end == frame
    assert np.array_equal(scales, [s for s, _ in by_row])
    assert np.array_equal(shifts, [m for _, m in by_row])
    assert total > 100  # the stream was rebased many times
    assert -math.log(4.0) - 1e-12 <= end.exponent <= FRAME_LIMIT
    # the total log-gate is exact to double-double rounding (compare with math.fsum)
    assert end.log_total == pytest.approx(-math.fsum(neg), rel=1e-15)
    # exponent = -(total log gate) - shifts * ln 4, to far better than float64 rounding of the total
    assert end.exponent == pytest.approx(math.fsum(neg) - total * math.log(4.0), abs=1e-9)


def test_rebase_is_exact_for_the_stored_state():
    """Right before and after a rebase, every stored number changes by an exact power of 4 (or 2)."""
    rng = np.random.default_rng(1)
    K = rng.standard_normal((300, 4))
    sk = ls.KeySketch(4, eps=0.2, block_rows=64)
    sk.update_many(K[:200], gates=np.full(200, 0.7))  # E grows by 0.357 per row: a rebase every ~280 rows
    before = sk.copy()
    shift = 3
    sk._rebase(shift)
    assert np.array_equal(sk._summary._hi, before._summary._hi * 4.0**-shift)
    assert np.array_equal(sk._store.keys_view(), before._store.keys_view() * 2.0**-shift)
    Q = rng.standard_normal((5, 4))
    assert sk.heavy_entries(Q).as_set() == before.heavy_entries(Q).as_set()


@pytest.mark.filterwarnings("error::RuntimeWarning")  # no overflow, no NaN on the way
@pytest.mark.parametrize("chunk", [1, 64, 8192])
def test_strong_gates_in_large_chunks_flush_and_recover(chunk):
    """Gate 0.7 over 8192-row chunks decays the state by e^-2900 within a chunk: it is flushed to zero (the
    summary falls back to a zero R factor) and the answers are still those of the log-space brute force."""
    rng = np.random.default_rng(2)
    n, d, eps = 12_000, 5, 0.05
    K = rng.standard_normal((n, d))
    sk = ls.KeySketch(d, eps=eps, decay=0.7, block_rows=256)
    for a in range(0, n, chunk):
        if chunk == 1:
            sk.update(K[a])
        else:
            sk.update_many(K[a : a + chunk])
    ref = DecayedStream(d, decay=0.7).update_many(K)
    Q = rng.standard_normal((20, d))
    got = sk.heavy_entries(Q)
    want = ref.heavy(Q, eps)
    assert got.as_set() == set(want)
    for (i, j), v in zip(zip(got.rows().tolist(), got.key_ids.tolist()), got.values.tolist()):
        assert v == pytest.approx(want[(i, j)], rel=1e-9)
    assert np.isfinite(sk.normalizer(Q)).all()
    assert sk.log_total_gate == pytest.approx(n * math.log(0.7), rel=1e-13)
    U = sk.universal_set()
    tau = ref.universal_scores()
    assert set(U.ids.tolist()) == set(np.flatnonzero(tau >= eps).tolist())
    assert int(U.ids.min()) > n - 100  # only recent keys can be heavy


def test_keys_whose_weighted_squares_overflow_are_refused_and_change_nothing():
    sk = ls.KeySketch(3, eps=0.5, decay=0.5)
    sk.update_many(np.ones((10, 3)))
    before = sk.to_bytes()
    big = np.full((2, 3), 1e140)  # squares 1e280 are finite; times a frame weight of up to e^100 they are not
    with pytest.raises(ValueError, match="weighted in the decaying stream's frame"):
        for _ in range(400):  # the frame exponent grows by ln 2 per row until the weight is large enough
            sk.update(big[0])
    after = sk.to_bytes()
    assert sk.n > 10 and after != before  # the rows accepted before the refusal are in
    copy = ls.KeySketch.from_bytes(after)
    with pytest.raises(ValueError, match="overflow"):
        copy.update_many(big * 1e10)
    assert copy.to_bytes() == after


def test_merge_factor_is_the_later_parts_total_gate_in_the_later_frame():
    neg_a = np.full(50, 0.1)
    neg_b = np.full(30, 0.2)
    _, _, fa = Frame().rows(neg_a)
    _, _, fb = Frame().rows(neg_b)
    # A's stored weights are e^E_A c_j^A; in B's frame they must be e^E_B c_B c_j^A
    want = math.exp(fb.exponent + fb.log_total - fa.exponent)
    assert fa.merge_scaling(fb) == (0, pytest.approx(want, rel=1e-15))
    assert fa.then(fb).log_total == pytest.approx(fa.log_total + fb.log_total, rel=1e-15)
    # beyond e^-600: a factor near 4^-8 and the rest as a power of 4, log of the product exact
    _, _, fc = Frame().rows(np.full(100, 7.0))  # a later part decayed by e^-700
    shift, factor = fa.merge_scaling(fc)
    want_log = fc.exponent + fc.log_total - fa.exponent
    assert shift > 0 and 4.0**-9 < factor <= 4.0**-7
    assert math.log(factor) - shift * math.log(4.0) == pytest.approx(want_log, rel=1e-14)


def _strong_gate_case(ref_kind: str):
    """Keys along e2, then four keys along e1 whose gates total e^-645: the e2 keys weigh ~1e-280 of the
    newest, far above the frame's 2^-1800 limit (a rebase of ~470 factors of 4 at once)."""
    e1, e2 = np.eye(2)
    rng = np.random.default_rng(5)
    A = np.vstack([e1, e2 * (1.0 + rng.random((20, 1)))])
    gates_a = np.ones(21)
    gates_a[1] = math.exp(-99.9)  # the frame exponent near its limit before the strong gates
    B = np.tile(e1, (4, 1))
    gates_b = np.full(4, math.exp(-645.0 / 4))
    return A, gates_a, B, gates_b


@pytest.mark.parametrize("how", ["rows", "chunk", "merge", "prefill"])
def test_a_large_rebase_keeps_weights_the_frame_holds(how):
    """A rebase by more than 4^-511 (whose factor alone underflows float64) kept nothing: one chunk (or a
    merge) of rows with gates totalling e^-645 zeroed the state, where row by row kept it.  Every way of
    feeding now gives the log-space brute force."""
    A, ga, B, gb = _strong_gate_case(how)
    ref = DecayedStream(2).update_many(np.vstack([A, B]), gates=np.concatenate([ga, gb]))
    q = np.array([[0.0, 1.0]])
    if how == "merge":
        a = ls.KeySketch(2, eps=0.01).update_many(A, gates=ga)
        b = ls.KeySketch(2, eps=0.01).update_many(B, gates=gb, offset=21)
        sk = a.merge(b)
    else:
        sk = ls.KeySketch(2, eps=0.01, value_dim=1, exact_output=True)
        sk.update_many(A, np.ones((21, 1)), gates=ga)
        if how == "rows":
            for x, g in zip(B, gb):
                sk.update(x, [0.0], gate=g)
        elif how == "chunk":
            sk.update_many(B, np.zeros((4, 1)), gates=gb)
        else:
            sk.prefill(B, np.zeros((4, 1)), B, gates=gb)
    got = sk.heavy_entries(q)
    want = ref.heavy(q, 0.01)
    assert got.as_set() == set(want) and len(want) == 20  # the e2 keys, ids 1..20
    for (i, j), v in zip(zip(got.rows().tolist(), got.key_ids.tolist()), got.values.tolist()):
        assert v == pytest.approx(want[(i, j)], rel=1e-9)
    assert set(sk.universal_set().ids.tolist()) == set(np.flatnonzero(ref.universal_scores() >= 0.01))


@pytest.mark.parametrize("total", [620.0, 635.0, 640.0])
def test_merge_across_a_subnormal_factor_is_exact(total):
    """Merging parts whose decay factor exp(E_B + T_B - E_A) is subnormal scaled by a factor of a few bits
    (relative errors up to 4e-3); the factor is now split into a power of 4 and a normal number."""
    e1, e2 = np.eye(2)
    rng = np.random.default_rng(6)
    A = np.vstack([e1, e2 * (1.0 + rng.random((20, 1)))])
    ga = np.ones(21)
    ga[1] = math.exp(-99.9)  # A's frame exponent near its limit: the merge factor is ~e^-(total + 99)
    B = np.vstack([e1 * 3.0, e2 * 2.0])
    gb = np.array([math.exp(-total), 1.0])
    a = ls.KeySketch(2, eps=0.01).update_many(A, gates=ga)
    b = ls.KeySketch(2, eps=0.01).update_many(B, gates=gb, offset=21)
    assert a._frame.merge_scaling(b._frame)[0] > 0  # a factor below e^-600 (subnormal before)
    merged = a.merge(b)
    ref = DecayedStream(2).update_many(np.vstack([A, B]), gates=np.concatenate([ga, gb]))
    q = np.array([[0.3, 1.0]])
    got = merged.heavy_entries(q)
    want = ref.heavy(q, 0.01)
    assert got.as_set() == set(want)
    for (i, j), v in zip(zip(got.rows().tolist(), got.key_ids.tolist()), got.values.tolist()):
        assert v == pytest.approx(want[(i, j)], rel=1e-9)


def test_a_normaliser_of_a_few_subnormal_units_reports_no_key_of_attention_zero():
    """A query along directions only keys decayed by ~e^-744 carry has Z a few subnormal units in the frame:
    eps Z rounded to 0 and every key of attention exactly 0 passed ``v >= eps Z``.  The cut is now never 0 for
    a positive Z (CUT_MIN): the entries are the brute force's, single and multi-head, in every query call; their
    values hold the few bits such a Z has (docs/theory.md, Numerics), checked here to 5%."""
    e1, e2 = np.eye(2)
    q = e2[None, :]
    K = np.array([e2, 2.0 * e2, e1, e1, e1, e1])
    g = np.array([1.0, 1.0] + [math.exp(-744.0 / 4)] * 4)
    V = np.array([[1.0], [3.0], [5.0], [5.0], [5.0], [5.0]])
    ref = DecayedStream(2, value_dim=1).update_many(K, V, gates=g)
    want = ref.heavy(q, 0.1)
    assert set(want) == {(0, 0), (0, 1)}  # 0.2 and 0.8

    def check(hits):
        assert hits.as_set() == set(want)
        for (i, j), v in zip(zip(hits.rows().tolist(), hits.key_ids.tolist()), hits.values.tolist()):
            assert v == pytest.approx(want[(i, j)], rel=0.05)

    sk = ls.KeySketch(2, eps=0.1, value_dim=1, exact_output=True)
    for x, v, gate in zip(K, V, g):
        sk.update(x, v, gate=gate)
    check(sk.heavy_entries(q))
    check(sk.attend(q).entries)
    two = sk.attend(np.vstack([q, q])).entries  # the multi-query live path
    assert two.row(1)[0].tolist() == [0, 1] and two.row(0)[0].tolist() == [0, 1]
    step = ls.KeySketch(2, eps=0.1, value_dim=1)
    for x, v, gate in zip(K[:-1], V[:-1], g[:-1]):
        step.update(x, v, gate=gate)
    check(step.prefill(K[-1:], V[-1:], q, gates=g[-1:]).entries)  # the decode step
    chunk = ls.KeySketch(2, eps=0.1, value_dim=1)
    rows = chunk.prefill(K, V, np.tile(e2, (6, 1)), gates=g).entries
    assert rows.row(5)[0].tolist() == [0, 1]
    mh = ls.MultiHeadKeySketch(2, 2, eps=0.1, value_dim=1, exact_output=True)
    mh.update_many(np.stack([K, K]), np.stack([V, V]), gates=g)
    for hits in mh.heavy_entries(np.stack([q, q])):
        check(hits)
    batch = ls.KeySketch(2, eps=0.1).update_many(K, gates=g).heavy_entries(np.vstack([q] * 12))
    assert batch.key_ids.tolist() == [0, 1] * 12  # 12 queries: the batch path
    # keys whose own squares are subnormal (|k| ~ 1e-161): the same rule
    tiny = ls.KeySketch(2, eps=0.1).update_many(np.array([e2 * 1e-161, e2 * 2e-161, e1, e1]))
    hits = tiny.heavy_entries(q)
    assert hits.key_ids.tolist() == [0, 1] and (hits.values >= 0.1).all()


def test_multihead_merge_of_interleaved_parts_changes_nothing():
    """A multi-head merge refused because one head forgets (parts that interleave) left the heads that do not
    forget merged: every head is now checked before any changes."""
    rng = np.random.default_rng(7)
    K = rng.standard_normal((2, 30, 3))
    gates = np.stack([np.ones(30), np.full(30, 0.5)])  # head 0 forgets nothing, head 1 does
    a = ls.MultiHeadKeySketch(2, 3, eps=0.1)
    a.update_many(K[:, :10], gates=gates[:, :10])
    a.update_many(K[:, 20:], gates=gates[:, 20:], offset=20)
    b = ls.MultiHeadKeySketch(2, 3, eps=0.1).update_many(K[:, 10:20], gates=gates[:, 10:20], offset=10)
    before = a.to_bytes()
    with pytest.raises(ValueError, match="consecutive parts"):
        a.merge(b)
    assert a.to_bytes() == before and [h.n for h in a.heads] == [20, 20]
