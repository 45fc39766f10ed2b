"""A short stream's exact outputs come from its rows, not from ``S`` (levstream/moments.py; docs/theory.md,
"Values and exact outputs": short streams).

While a moment state holds fewer rows than the break-even ``D dv / (d + dv)`` it records them and a query sums
their terms ``<q, k_j>^2 v_j`` instead of reading ``S``; the rows are folded into ``S`` a few hundred at a time
from the record, and the last ones when the record is full.  These tests cross that limit, and the hand-overs
before it (``_RECORD_FOLD_ROWS`` lowered), in every way rows arrive (single rows, chunks, decode steps, prefill,
merges, gates, copies, bytes, several heads) and compare every output with dense attention written here (plain
NumPy over every key fed), and with ``math.fsum`` where the state alone is checked.  Keys are 24 wide with
24-wide values: the limit is 150 rows, past the 128-row buffer.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import levstream as ls
import levstream.moments as moments
from levstream.moments import BUFFER_ROWS, MomentState, direct_rows_limit

from naive import DecayedStream, NaiveStream

D, DV = 24, 24
LIMIT = 300 * 24 // 48  # D (d + 1) / 2 * dv / (d + dv) at d = dv = 24


def _numerator(K: np.ndarray, V: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``sum_j <q, k_j>^2 v_j``, every sum correctly rounded."""
    w = [math.fsum(float(a) * float(b) for a, b in zip(q, k)) ** 2 for k in K]
    return np.array(
        [math.fsum(wj * float(v) for wj, v in zip(w, V[:, c])) for c in range(V.shape[1])]
    )


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


@pytest.fixture(params=[512, 64, 33], ids=lambda r: f"fold_rows={r}")
def fold_rows(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """The record's hand-over size: the default (no hand-over before the limit at this width) and smaller
    ones, so that rows are folded from the record while it is still recording."""
    monkeypatch.setattr(moments, "_RECORD_FOLD_ROWS", request.param)
    return int(request.param)


@pytest.mark.parametrize(
    "chunks",
    [
        [1] * (LIMIT + BUFFER_ROWS + 3),
        [100, 50, 1, 1],
        [LIMIT],
        [LIMIT + 1],
        [7, 140, 3, 1],
        [40] * 8,
    ],
)
def test_numerator_across_the_limit(chunks: list[int], fold_rows: int) -> None:
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
        assert S._recording == (n <= LIMIT)
        if n <= LIMIT:  # the query reads the rows: no rows of S, every row fed
            Sq, BK, BV = S.query_arrays()
            assert Sq.shape == (0, DV) and np.array_equal(BK, Kall) and np.array_equal(BV, Vall)
        if (
            n > LIMIT + BUFFER_ROWS
        ):  # the last product has landed (at the latest when the buffer filled)
            assert not S.direct
        if n % 37 == 0 or n >= LIMIT - 1:
            want = np.array([_numerator(Kall, Vall, q) for q in Q])
            _close(
                S.numerator(Q[:1]), want[:1], Kall, Vall, Q[:1]
            )  # the compiled loop of a few queries
            _close(S.numerator(np.repeat(Q, 5, axis=0))[::5], want, Kall, Vall, Q)  # the BLAS form


def test_hand_overs_fold_the_record_into_s(fold_rows: int) -> None:
    """Rows are handed over ``fold_rows`` at a time, each product added before the next hand-over, and the rest
    when the record is full; once its last product lands, ``S`` alone holds every row (checked through bytes,
    which write the settled state and the rows not in it)."""
    rng = np.random.default_rng(5)
    n = LIMIT + 40
    K, V = rng.standard_normal((n, D)), rng.standard_normal((n, DV))
    S = MomentState(D, DV)
    for i in range(n):
        S.add_row(K[i], V[i])
        state = S.to_state()
        folded = state.get("moments_folded_keys", np.zeros((0, D))).shape[0]
        if i < LIMIT:  # hand-overs every fold_rows rows, and once at half of that before the limit
            assert folded % fold_rows == 0 or folded == LIMIT - fold_rows // 2
            assert i + 1 - folded <= fold_rows
            assert np.array_equal(state["moments_buf_keys"], K[folded : i + 1])
        else:  # past the limit: the buffer holds the rows since
            assert "moments_folded_keys" not in state
            assert np.array_equal(state["moments_buf_keys"], K[LIMIT : i + 1])
        q = rng.standard_normal(D)
        m = state["moments_buf_keys"].shape[0]
        Sfull = state["moments_hi"] + state["moments_lo"]
        lifted = moments._lift(q[None])[0]
        got = lifted @ Sfull + ((state["moments_buf_keys"] @ q) ** 2) @ state["moments_buf_values"]
        Kin, Vin = K[: i + 1], V[: i + 1]
        _close(got[None], _numerator(Kin, Vin, q)[None], Kin, Vin, q[None])
        assert m + folded <= i + 1


def test_merge_copy_scale(fold_rows: int) -> None:
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
    assert states[0].direct and states[2].direct
    first = states[0].copy()
    copy = first.copy()
    first.merge(states[1])  # a merged state reads S: the records' rows folded
    assert not first.direct and states[1].direct
    _close(first.numerator(q), _numerator(K[:130], V[:130], q[0])[None], K[:130], V[:130], q)
    first.merge(states[2])  # a recording state merged in: its rows in S and those it records
    _close(first.numerator(q), _numerator(K, V, q[0])[None], K, V, q)
    assert copy.direct and copy._record.n == 60  # copies are independent
    _close(copy.numerator(q), _numerator(K[:60], V[:60], q[0])[None], K[:60], V[:60], q)
    for i in range(60, 130):
        copy.add_row(K[i], V[i])
    _close(copy.numerator(q), _numerator(K[:130], V[:130], q[0])[None], K[:130], V[:130], q)
    _close(states[0].numerator(q), _numerator(K[:60], V[:60], q[0])[None], K[:60], V[:60], q)
    copy.scale(0.25)  # a decaying stream's rebase: the recorded keys are weighed by sqrt(1/4)
    _close(copy.numerator(q), 0.25 * _numerator(K[:130], V[:130], q[0])[None], K[:130], V[:130], q)
    for i in range(130, LIMIT + 40):  # on past the limit after the rebase
        copy.add_row(K[i] * 0.5, V[i])
    _close(copy.numerator(q), 0.25 * _numerator(K, V, q[0])[None], K, V, q)


def _entries(he: ls.HeavyEntries) -> dict[tuple[int, int], float]:
    ids, values = he.row(0)
    return {(0, int(i)): float(v) for i, v in zip(ids, values)}


def _dense_outputs(K: np.ndarray, V: np.ndarray, Q: np.ndarray) -> np.ndarray:
    """Query ``i`` over keys ``0..i`` (dense causal p = 2 attention)."""
    W = np.tril(Q @ K.T) ** 2
    return (W @ V) / W.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_decode_steps_across_the_limit(dtype: type, fold_rows: int) -> None:
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
        np.testing.assert_allclose(
            r.output[0], want[t], rtol=1e-10, atol=1e-12 * np.abs(want[t]).max()
        )
        assert _entries(r.entries) == pytest.approx(ref.heavy_entries(Q[t : t + 1], 0.05), rel=1e-9)
        if t % 50 == 0:  # attend between steps: the same state read the same way
            a = sk.attend(Q[t : t + 1])
            np.testing.assert_allclose(a.output, r.output, rtol=1e-12)
    assert not sk._moments.direct


@pytest.mark.parametrize("saved_at", [70, 140, LIMIT + 5])
def test_checkpoint_mid_record(saved_at: int, fold_rows: int) -> None:
    """Bytes carry the record: a sketch saved while recording sums the same terms as the untouched one (its
    numerators the same to the bit; the normaliser comes from the Gram matrix, whose live form may round
    differently after a load); one saved while the full record's last product is pending is written as the state
    it becomes (it reads S at once: the same numerators to rounding).  Both end with the same bytes."""
    rng = np.random.default_rng(13)
    n = LIMIT + BUFFER_ROWS + 60
    K, V, Q = rng.standard_normal((n, D)), rng.standard_normal((n, DV)), rng.standard_normal((n, D))
    a = ls.KeySketch(D, eps=0.05, value_dim=DV, exact_output=True)
    a.update_many(K[:50], V[:50])
    for t in range(50, saved_at):
        a.prefill(K[t : t + 1], V[t : t + 1], Q[t : t + 1])
    b = ls.KeySketch.from_bytes(a.to_bytes())
    assert b._moments.direct == (saved_at <= LIMIT)
    for t in range(saved_at, n):
        ra = a.prefill(K[t : t + 1], V[t : t + 1], Q[t : t + 1])
        rb = b.prefill(K[t : t + 1], V[t : t + 1], Q[t : t + 1])
        scale = np.abs(ra.output).max()
        np.testing.assert_allclose(rb.output, ra.output, rtol=1e-12, atol=1e-12 * scale)
        na, nb = a._moments.numerator(Q[t : t + 1]), b._moments.numerator(Q[t : t + 1])
        if saved_at <= LIMIT:
            assert np.array_equal(na, nb)
        else:
            np.testing.assert_allclose(nb, na, rtol=1e-12, atol=1e-12 * np.abs(na).max())
    assert a.to_bytes() == b.to_bytes()


def test_bytes_of_states_reading_s_load_as_before() -> None:
    rng = np.random.default_rng(14)
    K, V, Q = (
        rng.standard_normal((70, D)),
        rng.standard_normal((70, DV)),
        rng.standard_normal((1, D)),
    )
    c = ls.KeySketch(D, eps=0.05, value_dim=DV, exact_output=True).update_many(K[:60], V[:60])
    c._moments._leave_record()  # as bytes written before records existed: S and a buffer of 10 rows
    c.update_many(K[60:], V[60:])
    state = c._moments.to_state()
    assert "moments_folded_keys" not in state and state["moments_buf_keys"].shape[0] == 10
    d = ls.KeySketch.from_bytes(c.to_bytes())
    assert not d._moments.direct
    W = (K @ Q[0]) ** 2
    np.testing.assert_allclose(d.attend(Q).output[0], W @ V / W.sum(), rtol=1e-10)
    arrays = (
        ls.KeySketch(D, eps=0.05, value_dim=DV, exact_output=True)
        .update_many(K, V)
        ._moments.to_state()
    )
    arrays["moments_buf_keys"] = np.zeros((LIMIT + 1, D))  # more rows than a state records
    arrays["moments_buf_values"] = np.zeros((LIMIT + 1, DV))
    with pytest.raises(ValueError, match="recorded rows"):
        MomentState.from_state(D, DV, arrays)
    del arrays["moments_folded_keys"], arrays["moments_folded_values"]
    with pytest.raises(ValueError, match="fewer than 128 rows"):
        MomentState.from_state(D, DV, arrays)


def test_gated_stream_across_the_limit(fold_rows: int) -> None:
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


def test_heads_across_the_limit(fold_rows: int) -> None:
    rng = np.random.default_rng(19)
    H, n = 3, LIMIT + BUFFER_ROWS + 20
    K, V, Q = (
        rng.standard_normal((H, n, D)),
        rng.standard_normal((H, n, DV)),
        rng.standard_normal((H, n, D)),
    )
    mh = ls.MultiHeadKeySketch(H, D, eps=0.05, value_dim=DV, exact_output=True)
    r = mh.prefill(K[:, :40], V[:, :40], Q[:, :40])  # a prompt, then decode steps
    want = np.stack([_dense_outputs(K[h], V[h], Q[h]) for h in range(H)])
    np.testing.assert_allclose(r.output, want[:, :40], rtol=1e-10)
    for t in range(40, n):
        r = mh.prefill(K[:, t : t + 1], V[:, t : t + 1], Q[:, t : t + 1])
        np.testing.assert_allclose(r.output[:, 0], want[:, t], rtol=1e-10, atol=1e-12)
    assert not any(h._moments.direct for h in mh._heads)


def test_record_memory_is_bounded(fold_rows: int) -> None:
    """The record never holds more than the limit plus a buffer's worth of rows, whatever the chunks; a chunk that
    passes the buffer while the last product is pending folds, and the record goes."""
    rng = np.random.default_rng(23)
    S = MomentState(D, DV)
    most = (LIMIT + BUFFER_ROWS) * (D + DV) * 8
    base = S.nbytes - S._record.nbytes
    for i in range(LIMIT + 5):
        S.add_row(rng.standard_normal(D), rng.standard_normal(DV))
        assert S._record.nbytes <= most
        pending = 0 if S._pending is None else S._pending.nbytes
        assert S.nbytes == base + S._record.nbytes + pending
    assert S.direct and not S._recording  # the last product pending
    X, V = rng.standard_normal((10_000, D)), rng.standard_normal((10_000, DV))
    S.prepare(10_000)  # as a sketch does before a chunk
    S.add(X, V)
    assert not S.direct and S.nbytes == base


def test_recording_state_is_the_same_whatever_the_threads(fold_rows: int) -> None:
    """Hand-overs are made at fixed rows of the stream and added in stream order: the bytes of a recording
    state, and of the state after the record, are the same bit for bit at thread budgets 1, 2 and 3."""
    rng = np.random.default_rng(29)
    n = LIMIT + BUFFER_ROWS + 30
    K, V = rng.standard_normal((n, D)), rng.standard_normal((n, DV))
    before = ls.get_num_threads()
    states: list[list[dict]] = []
    try:
        for n_threads in (1, 2, 3):
            ls.set_num_threads(n_threads)
            S, got = MomentState(D, DV), []
            for i in range(n):
                S.add_row(K[i], V[i])
                if i in (fold_rows - 1, fold_rows + 1, LIMIT - 1, LIMIT + 3, n - 1):
                    got.append(S.to_state())
            states.append(got)
    finally:
        ls.set_num_threads(before)
    for other in states[1:]:
        for a, b in zip(states[0], other):
            assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("gated", [False, True])
def test_heads_are_those_of_sketches_fed_row_by_row(gated: bool, fold_rows: int) -> None:
    """Bytes of every head of a multi-head sketch equal those of a KeySketch fed the same tokens one at a time,
    across the record's hand-overs and its limit: the heads take their tokens in pieces that end there
    (``MomentState.piece_rows``)."""
    rng = np.random.default_rng(31)
    H, n = 2, LIMIT + BUFFER_ROWS + 60
    K, V = rng.standard_normal((H, n, D)), rng.standard_normal((H, n, DV))
    G = rng.uniform(0.5, 1.0, n) if gated else None
    mh = ls.MultiHeadKeySketch(H, D, eps=0.05, value_dim=DV, exact_output=True)
    refs = [ls.KeySketch(D, eps=0.05, value_dim=DV, exact_output=True) for _ in range(H)]
    t = 0
    while t < n:
        m = min(int(rng.integers(1, 33)), n - t)  # the step path takes chunks of up to 32 tokens
        gates = None if G is None else G[t : t + m]
        if m == 1:
            mh.update(K[:, t], V[:, t], gate=None if gates is None else float(gates[0]))
        else:
            mh.update_many(np.ascontiguousarray(K[:, t : t + m]), np.ascontiguousarray(V[:, t : t + m]), gates=gates)
        for h in range(H):
            for i in range(t, t + m):
                refs[h].update(K[h, i], V[h, i], gate=None if G is None else float(G[i]))
        t += m
        if rng.random() < 0.3:
            heads = mh.heads  # hands the buffer to the heads
            for h in range(H):
                assert heads[h].to_bytes() == refs[h].to_bytes(), f"head {h} at n = {t}"
    for h, head in enumerate(mh.heads):
        assert head.to_bytes() == refs[h].to_bytes()


def test_a_failing_product_before_a_chunk_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """A chunk (folded on the spot, within the limit) that arrives while a hand-over's product is pending: the
    product is added before anything changes (in ``prepare``), so when it fails the chunk is refused and the
    sketch is as before."""
    monkeypatch.setattr(moments, "_RECORD_FOLD_ROWS", 16)
    before = ls.get_num_threads()
    ls.set_num_threads(1)  # the product is computed when it is needed, on this thread
    try:
        rng = np.random.default_rng(37)
        n = 17 + 130
        K, V, q = rng.standard_normal((n, D)), rng.standard_normal((n, DV)), rng.standard_normal((1, D))
        sk = ls.KeySketch(D, eps=0.05, value_dim=DV, exact_output=True, block_rows=96)
        for i in range(17):  # rows 0..15 handed over at row 16: their product pending
            sk.update(K[i], V[i])
        assert sk._moments._pending is not None
        real = moments.features_product

        def failing(*args: object) -> None:
            raise MemoryError("no memory for the product (simulated)")

        monkeypatch.setattr(moments, "features_product", failing)
        with pytest.raises(MemoryError):
            sk.update_many(K[17:], V[17:])
        assert sk.n == 17 and sk._store.n == 17 and sk._moments._record.n == 17
        monkeypatch.setattr(moments, "features_product", real)
        W = (K[:17] @ q[0]) ** 2
        np.testing.assert_allclose(sk.attend(q).output[0], W @ V[:17] / W.sum(), rtol=1e-10)
        sk.update_many(K[17:], V[17:])
        W = (K @ q[0]) ** 2
        np.testing.assert_allclose(sk.attend(q).output[0], W @ V / W.sum(), rtol=1e-10)
    finally:
        ls.set_num_threads(before)


def test_a_failed_hand_over_at_the_limit_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The row that fills the record: should both the hand-over and the fold on the spot fail, the row is
    refused and the state still records every row."""
    rng = np.random.default_rng(41)
    K, V, q = rng.standard_normal((600, D)), rng.standard_normal((600, DV)), rng.standard_normal((1, D))
    S = MomentState(D, DV)
    for i in range(LIMIT):
        S.add_row(K[i], V[i])

    def boom(*args: object, **kwargs: object) -> None:
        raise MemoryError("simulated")

    with monkeypatch.context() as patch:
        patch.setattr(moments._PendingFold, "__init__", boom)
        patch.setattr(moments, "_fold_moments", boom)
        with pytest.raises(MemoryError):
            S.add_row(K[LIMIT], V[LIMIT])
    assert S._recording and S._record.n == LIMIT
    S.add(K[LIMIT : LIMIT + 300], V[LIMIT : LIMIT + 300])
    n = LIMIT + 300
    _close(S.numerator(q), _numerator(K[:n], V[:n], q[0])[None], K[:n], V[:n], q)


def test_nbytes_counts_the_rows_a_pending_product_reads() -> None:
    """After a hand-over the record may grow into new arrays while the product still reads the old ones: they
    are counted until it lands."""
    before = ls.get_num_threads()
    ls.set_num_threads(1)
    try:
        S = MomentState(64, 64)
        rng = np.random.default_rng(43)
        for _ in range(514):  # rows 0..511 handed over at row 513, then the record grew past 512 rows
            S.add_row(rng.standard_normal(64), rng.standard_normal(64))
        X, V = S._pending.inputs
        assert not np.shares_memory(X, S._record.keys)
        held = S._hi.nbytes * 2 + S._rows_keys.nbytes + S._rows_values.nbytes + S._record.nbytes
        assert S.nbytes == held + S._pending.nbytes + X.base.nbytes + V.base.nbytes
        S.settle()
        assert S.nbytes == held
    finally:
        ls.set_num_threads(before)


def test_a_gated_chunk_refused_for_a_failing_product_leaves_the_frame(monkeypatch: pytest.MonkeyPatch) -> None:
    """A gated ``update_many`` adds a pending product before its gates move the decay frame: when that product
    fails, the chunk is refused and nothing changed (before, the frame had moved, and a retry weighed the chunk
    and every later row wrongly)."""
    before_threads = ls.get_num_threads()
    ls.set_num_threads(1)  # the product is computed when it is needed, on this thread
    try:
        rng = np.random.default_rng(47)
        K, V, q = rng.standard_normal((600, D)), rng.standard_normal((600, DV)), rng.standard_normal((1, D))
        gates = np.full(5, 0.9)
        n0 = LIMIT + BUFFER_ROWS + 31  # the buffer's product pending, 31 rows buffered: the next 5 settle it

        def fed() -> ls.KeySketch:
            sk = ls.KeySketch(D, eps=0.05, value_dim=DV, exact_output=True)
            for i in range(n0):
                sk.update(K[i], V[i])
            return sk

        twin, sk = fed(), fed()
        twin.update_many(K[n0 : n0 + 5], V[n0 : n0 + 5], gates=gates)
        before = fed().to_bytes()  # (not sk's: its bytes would compute the pending product)
        real = moments.features_product

        def failing(*args: object) -> None:
            raise MemoryError("no memory for the product (simulated)")

        monkeypatch.setattr(moments, "features_product", failing)
        with pytest.raises(MemoryError):
            sk.update_many(K[n0 : n0 + 5], V[n0 : n0 + 5], gates=gates)
        monkeypatch.setattr(moments, "features_product", real)
        assert sk.to_bytes() == before
        sk.update_many(K[n0 : n0 + 5], V[n0 : n0 + 5], gates=gates)  # the caller retries
        assert sk.to_bytes() == twin.to_bytes()
    finally:
        ls.set_num_threads(before_threads)


@pytest.mark.parametrize("n0", [1, 20])
def test_a_chunk_past_the_limit_with_a_failing_product(monkeypatch: pytest.MonkeyPatch, n0: int) -> None:
    """A chunk that takes a recording state past its limit, while every product fails: either it is refused and
    the state still records, its bytes as before (20 rows: the product of rows 0..15 is pending), or it is taken
    (1 row: no product is needed, the rows are folded on the spot) and the state equals one never failed."""
    monkeypatch.setattr(moments, "_RECORD_FOLD_ROWS", 16)
    before_threads = ls.get_num_threads()
    ls.set_num_threads(1)
    try:
        rng = np.random.default_rng(53)
        K, V = rng.standard_normal((400, D)), rng.standard_normal((400, DV))

        def fed() -> ls.KeySketch:
            sk = ls.KeySketch(D, eps=0.05, value_dim=DV, exact_output=True)
            for i in range(n0):
                sk.update(K[i], V[i])
            return sk

        sk, before = fed(), fed().to_bytes()
        twin = fed().update_many(K[n0:300], V[n0:300])
        real = moments.features_product

        def failing(*args: object) -> None:
            raise MemoryError("no memory for the product (simulated)")

        monkeypatch.setattr(moments, "features_product", failing)
        try:
            sk.update_many(K[n0:300], V[n0:300])
            raised = False
        except MemoryError:
            raised = True
        monkeypatch.setattr(moments, "features_product", real)
        assert raised == (n0 == 20)
        if raised:
            assert sk._moments._recording and sk.to_bytes() == before
            sk.update_many(K[n0:300], V[n0:300])
        assert sk.to_bytes() == twin.to_bytes()
    finally:
        ls.set_num_threads(before_threads)
