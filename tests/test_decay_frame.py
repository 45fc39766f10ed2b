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
    assert fa.merge_factor(fb) == pytest.approx(want, rel=1e-15)
    assert fa.then(fb).log_total == pytest.approx(fa.log_total + fb.log_total, rel=1e-15)
