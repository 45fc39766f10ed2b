"""A short stream's exact outputs come from its rows, not from ``S`` (levstream/moments.py; docs/theory.md,
"Values and exact outputs": short streams).

While a moment state holds fewer rows than the break-even ``D dv / (d + dv)`` it records them and a query sums
their terms ``<q, k_j>^2 v_j`` instead of reading ``S``.  These tests cross that limit in every way rows arrive
(single rows, chunks, decode steps, prefill, merges, gates, copies, bytes, several heads) and compare every
output with dense attention written here (plain NumPy over every key fed), and with ``math.fsum`` where the
state alone is checked.  Keys are 24 wide with 24-wide values: the limit is 150 rows, past the 128-row buffer.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import levstream as ls
from levstream.moments import BUFFER_ROWS, MomentState, direct_rows_limit

from naive import DecayedStream, NaiveStream

D, DV = 24, 24
LIMIT = 300 * 24 // 48  # D (d + 1) / 2 * dv / (d + dv) at d = dv = 24


def _numerator(K: np.ndarray, V: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``sum_j <q, k_j>^2 v_j``, every sum correctly rounded."""
    w = [math.fsum(float(a) * float(b) for a, b in zip(q, k)) ** 2 for k in K]
    return np.array([math.fsum(wj * float(v) for wj, v in zip(w, V[:, c])) for c in range(V.shape[1])])


def _close(got: np.ndarray, want: np.ndarray, K: np.ndarray, V: np.ndarray, Q: np.ndarray) -> None:
    """Within a few units of rounding of the terms' magnitudes (``sum_j <q, k_j>^2 |v_j|``)."""
    scale = ((Q @ K.T) ** 2) @ np.abs(V)
    assert np.all(np.abs(got - want) <= 1e-13 * scale + 1e-300), np.max(np.abs(got - want) / scale)


def test_limit_is_the_break_even() -> None:
    assert direct_rows_limit(D, DV) == LIMIT
    assert direct_rows_limit(64, 64) == 2080 * 64 // 128
    # no record when it would not pass the buffer (read directly anyway), nor for the lifted degree 4
    assert direct_rows_limit(8, 3) == 0
    assert direct_rows_limit(64, 1) == 0
    assert direct_rows_limit(D, DV, degree=4) == 0
    assert not MomentState(8, 3).direct


@pytest.mark.parametrize("chunks", [[1] * (LIMIT + 3), [100, 50, 1, 1], [LIMIT], [LIMIT + 1], [7, 140, 3, 1]])
def test_numerator_across_the_limit(chunks: list[int]) -> None:
    rng = np.random.default_rng(len(chunks) * 1000 + chunks[0])
    S = MomentState(D, DV)
    Q = rng.standard_normal((2, D))
    Ks, Vs = [np.zeros((0, D))], [np.zeros((0, DV))]
    for m in chunks:
        K, V = rng.standard_normal((m, D)), rng.standard_normal((m, DV))
        if m == 1:
            S.add_row(K[0], V[0])
        else:
            S.add(K, V)
        Ks.append(K)
        Vs.append(V)
        Kall, Vall = np.concatenate(Ks), np.concatenate(Vs)
        n = Kall.shape[0]
        assert S.direct == (n <= LIMIT)
        if S.direct:  # the query reads the rows: no rows of S, every row fed
            Sq, BK, BV = S.query_arrays()
            assert Sq.shape == (0, DV) and np.array_equal(BK, Kall) and np.array_equal(BV, Vall)
        if n % 37 == 0 or not S.direct or n >= LIMIT - 1:
            want = np.array([_numerator(Kall, Vall, q) for q in Q])
            _close(S.numerator(Q[:1]), want[:1], Kall, Vall, Q[:1])  # the compiled loop of a few queries
            _close(S.numerator(np.repeat(Q, 5, axis=0))[::5], want, Kall, Vall, Q)  # the BLAS form


def test_state_is_the_same_whether_rows_are_recorded_or_not() -> None:
    """The record changes what a query reads, never ``S``: the folds are those of a state without it."""
    rng = np.random.default_rng(5)
    K, V = rng.standard_normal((LIMIT + 200, D)), rng.standard_normal((LIMIT + 200, DV))
    a, b = MomentState(D, DV), MomentState(D, DV)
    b._drop_direct()
    b._direct_limit = 0
    for i in range(K.shape[0]):
        a.add_row(K[i], V[i])
        b.add_row(K[i], V[i])
        if i in (10, LIMIT - 1, LIMIT, LIMIT + 199):
            sa, sb = a.to_state(), b.to_state()
            for name in ("moments_hi", "moments_lo", "moments_buf_keys", "moments_buf_values"):
                assert np.array_equal(sa[name], sb[name])
            assert ("moments_direct_keys" in sa) == (i < LIMIT)


def test_merge_copy_scale() -> None:
    rng = np.random.default_rng(9)
    K, V = rng.standard_normal((LIMIT + 40, D)), rng.standard_normal((LIMIT + 40, DV))
    q = rng.standard_normal((1, D))
    parts = [(0, 60), (60, 130), (130, LIMIT + 40)]
    states = []
    for a, b in parts:
        s = MomentState(D, DV)
        for i in range(a, b):
            s.add_row(K[i], V[i])
        states.append(s)
    first = states[0].copy()
    first.merge(states[1])  # 130 rows: still recorded, in the order of the rows
    assert first.direct
    _close(first.numerator(q), _numerator(K[:130], V[:130], q[0])[None], K[:130], V[:130], q)
    copy = first.copy()
    first.merge(states[2])  # past the limit: S is read
    assert not first.direct and copy.direct
    _close(first.numerator(q), _numerator(K, V, q[0])[None], K, V, q)
    _close(copy.numerator(q), _numerator(K[:130], V[:130], q[0])[None], K[:130], V[:130], q)
    assert states[0].direct  # merged copies: the original untouched
    undecided = MomentState(D, DV)  # a state whose record was dropped makes the merge read S
    undecided._drop_direct()
    undecided.add_row(K[0], V[0])
    merged = states[1].copy()
    merged.merge(undecided)
    assert not merged.direct
    Km, Vm = np.concatenate([K[60:130], K[:1]]), np.concatenate([V[60:130], V[:1]])
    _close(merged.numerator(q), _numerator(Km, Vm, q[0])[None], Km, Vm, q)
    copy.scale(0.25)  # a decaying stream's rebase: the recorded keys are weighed by sqrt(1/4)
    _close(copy.numerator(q), 0.25 * _numerator(K[:130], V[:130], q[0])[None], K[:130], V[:130], q)


def _entries(he: ls.HeavyEntries) -> dict[tuple[int, int], float]:
    ids, values = he.row(0)
    return {(0, int(i)): float(v) for i, v in zip(ids, values)}


def _dense_outputs(K: np.ndarray, V: np.ndarray, Q: np.ndarray) -> np.ndarray:
    """Query ``i`` over keys ``0..i`` (dense causal p = 2 attention)."""
    W = np.tril(Q @ K.T) ** 2
    return (W @ V) / W.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_decode_steps_across_the_limit(dtype: type) -> None:
    rng = np.random.default_rng(11)
    n = LIMIT + BUFFER_ROWS + 40
    K = rng.standard_normal((n, D)).astype(dtype)
    V, Q = rng.standard_normal((n, DV)), rng.standard_normal((n, D))
    sk = ls.KeySketch(D, eps=0.05, value_dim=DV, exact_output=True)
    ref = NaiveStream(D, value_dim=DV)
    want = _dense_outputs(K.astype(np.float64), V, Q)
    for t in range(n):
        r = sk.prefill(K[t : t + 1], V[t : t + 1], Q[t : t + 1])
        ref.update(K[t], V[t])
        np.testing.assert_allclose(r.output[0], want[t], rtol=1e-10, atol=1e-12 * np.abs(want[t]).max())
        assert _entries(r.entries) == pytest.approx(ref.heavy_entries(Q[t : t + 1], 0.05), rel=1e-9)
        if t % 50 == 0:  # attend between steps: the same state read the same way
            a = sk.attend(Q[t : t + 1])
            np.testing.assert_allclose(a.output, r.output, rtol=1e-12)
    assert not sk._moments.direct


def test_checkpoint_mid_record_answers_bit_for_bit() -> None:
    """Bytes carry the record: a sketch saved while it holds few rows answers as the untouched one, to the bit,
    before and after the limit; bytes written before the record existed load and read ``S``."""
    rng = np.random.default_rng(13)
    n = LIMIT + 60
    K, V, Q = rng.standard_normal((n, D)), rng.standard_normal((n, DV)), rng.standard_normal((n, D))
    a = ls.KeySketch(D, eps=0.05, value_dim=DV, exact_output=True)
    a.update_many(K[:70], V[:70])
    b = ls.KeySketch.from_bytes(a.to_bytes())
    assert b._moments.direct and b._moments._direct_n == 70
    for t in range(70, n):
        ra = a.prefill(K[t : t + 1], V[t : t + 1], Q[t : t + 1])
        rb = b.prefill(K[t : t + 1], V[t : t + 1], Q[t : t + 1])
        assert np.array_equal(ra.output, rb.output)
    assert a.to_bytes() == b.to_bytes()
    # bytes without the record (as written before it existed): loaded, they read S
    c = ls.KeySketch(D, eps=0.05, value_dim=DV, exact_output=True).update_many(K[:70], V[:70])
    c._moments._drop_direct()
    d = ls.KeySketch.from_bytes(c.to_bytes())
    assert not d._moments.direct
    want = _dense_outputs(K, V, Q)[69]
    np.testing.assert_allclose(d.attend(Q[69:70]).output[0], want, rtol=1e-10)
    with pytest.raises(ValueError, match="direct rows"):  # more rows than a state records
        arrays = a._moments.to_state()
        arrays["moments_direct_keys"] = np.zeros((LIMIT + 1, D))
        arrays["moments_direct_values"] = np.zeros((LIMIT + 1, DV))
        MomentState.from_state(D, DV, arrays)


def test_gated_stream_across_the_limit() -> None:
    rng = np.random.default_rng(17)
    n = LIMIT + 80
    K, V, Q = rng.standard_normal((n, D)), rng.standard_normal((n, DV)), rng.standard_normal((n, D))
    gates = rng.uniform(0.2, 1.0, n)
    gates[::9] = 1e-3  # strong forgetting: the frame rebases, scaling the recorded rows
    sk = ls.KeySketch(D, eps=0.05, value_dim=DV, exact_output=True)
    ref = DecayedStream(D, value_dim=DV)
    for t in range(n):
        r = sk.prefill(K[t : t + 1], V[t : t + 1], Q[t : t + 1], gates=gates[t : t + 1])
        ref.update_many(K[t : t + 1], V[t : t + 1], gates=gates[t : t + 1])
        want = ref.outputs(Q[t : t + 1])[0]
        np.testing.assert_allclose(r.output[0], want, rtol=1e-9, atol=1e-12 * np.abs(want).max())


def test_heads_across_the_limit() -> None:
    rng = np.random.default_rng(19)
    H, n = 3, LIMIT + 50
    K, V, Q = rng.standard_normal((H, n, D)), rng.standard_normal((H, n, DV)), rng.standard_normal((H, n, D))
    mh = ls.MultiHeadKeySketch(H, D, eps=0.05, value_dim=DV, exact_output=True)
    r = mh.prefill(K[:, :40], V[:, :40], Q[:, :40])  # a prompt, then decode steps
    want = np.stack([_dense_outputs(K[h], V[h], Q[h]) for h in range(H)])
    np.testing.assert_allclose(r.output, want[:, :40], rtol=1e-10)
    for t in range(40, n):
        r = mh.prefill(K[:, t : t + 1], V[:, t : t + 1], Q[:, t : t + 1])
        np.testing.assert_allclose(r.output[:, 0], want[:, t], rtol=1e-10, atol=1e-12)
    assert not any(h._moments.direct for h in mh._heads)
