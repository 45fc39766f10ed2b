"""The moment state ``S = sum_j phi(k_j) v_j^T`` (levstream/moments.py) against brute force written here.

The fold cuts the rows into pieces, groups and passes and the lifted features into blocks run on the ingest
threads; these tests cross every one of those boundaries and check the numerator ``sum_j <q, k_j>^p v_j``
against exact rational-free brute force (``math.fsum`` of the products), that the state is the same bit for
bit whatever the thread budget, and that a fold allocates nothing of the size of the lifted rows.
"""

from __future__ import annotations

import math
import threading
import time
import tracemalloc

import numpy as np
import pytest

import levstream as ls
from levstream._kernels.lift import lift_degree2
from levstream.moments import MomentState
from levstream.summaries.lifted import lifted_dim


def _exact_numerator(K: np.ndarray, V: np.ndarray, q: np.ndarray, degree: int) -> np.ndarray:
    """``sum_j <q, k_j>^degree v_j`` with every sum correctly rounded (``math.fsum`` of exact-ish terms)."""
    out = np.empty(V.shape[1])
    dots = [math.fsum(float(a) * float(b) for a, b in zip(q, k)) for k in K]
    w = [x**degree for x in dots]
    for c in range(V.shape[1]):
        out[c] = math.fsum(wj * float(vj) for wj, vj in zip(w, V[:, c]))
    return out


def _scale_of(K: np.ndarray, V: np.ndarray, q: np.ndarray, degree: int) -> np.ndarray:
    """``sum_j |<q, k_j>|^degree |v_j|``: what the rounding error of a sum of these terms is relative to."""
    return (np.abs(K @ q) ** degree) @ np.abs(V)


# rows of one add: 1 row, around a piece (512), a group (1024) and a pass (4096 rows for d <= 64)
_ROWS = [1, 127, 511, 512, 513, 1025, 4097, 9000]


@pytest.mark.parametrize("dim, value_dim", [(1, 1), (3, 2), (64, 64), (17, 5)])
def test_fold_matches_brute_force(dim: int, value_dim: int) -> None:
    rng = np.random.default_rng(dim * 100 + value_dim)
    S = MomentState(dim, value_dim)
    Ks, Vs = [], []
    for m in _ROWS:
        K = rng.standard_normal((m, dim)) * rng.uniform(0.1, 10.0)
        V = rng.standard_normal((m, value_dim))
        S.add(K, V)
        Ks.append(K)
        Vs.append(V)
    for _ in range(5):  # buffered single rows on top
        k, v = rng.standard_normal(dim), rng.standard_normal(value_dim)
        S.add_row(k, v)
        Ks.append(k[None])
        Vs.append(v[None])
    K, V = np.concatenate(Ks), np.concatenate(Vs)
    Q = rng.standard_normal((3, dim))
    got = S.numerator(Q)
    for i, q in enumerate(Q):
        err = np.abs(got[i] - _exact_numerator(K, V, q, 2))
        assert np.all(err <= 1e-13 * _scale_of(K, V, q, 2)), (err / _scale_of(K, V, q, 2)).max()


def test_a_fold_leaves_hi_the_rounded_state() -> None:
    """After every fold ``hi`` is the rounded value of ``hi + lo`` (so queries read ``hi`` alone, with no copy),
    also when the fold follows a merge or a rescale, which leave the pair unnormalised; ``lo`` still carries
    the rounding error (the sums below lose digits to cancellation)."""
    rng = np.random.default_rng(7)
    S = MomentState(5, 3)
    K = rng.standard_normal((9000, 5))
    V = rng.standard_normal((9000, 3)) * 1e6 + 1e12 * (-1.0) ** np.arange(9000)[:, None]
    for a, b in [(0, 700), (700, 3000), (3000, 3001), (3001, 6000)]:
        S.add(K[a:b], V[a:b])
        np.testing.assert_array_equal(S._hi + S._lo, S._hi)
    assert np.any(S._lo != 0.0)
    other = MomentState(5, 3)
    other.add(K[6000:8000], V[6000:8000])
    S.merge(other)
    S.scale(0.25)
    S.add(K[8000:], V[8000:])
    np.testing.assert_array_equal(S._hi + S._lo, S._hi)
    q = rng.standard_normal(5)
    err = np.abs(
        S.numerator(q[None])[0]
        - 0.25 * _exact_numerator(K[:8000], V[:8000], q, 2)
        - _exact_numerator(K[8000:], V[8000:], q, 2)
    )
    assert np.all(err <= 1e-13 * _scale_of(K, V, q, 2)), (err / _scale_of(K, V, q, 2)).max()


def test_fold_degree4_matches_brute_force() -> None:
    rng = np.random.default_rng(4)
    S = MomentState(4, 3, degree=4)
    K, V = rng.standard_normal((2100, 4)), rng.standard_normal((2100, 3))
    S.add(K[:1500], V[:1500])
    S.add_row(K[1500], V[1500])
    S.add(K[1501:], V[1501:])
    for q in rng.standard_normal((3, 4)):
        got = S.numerator(q[None])[0]
        err = np.abs(got - _exact_numerator(K, V, q, 4))
        assert np.all(err <= 1e-13 * _scale_of(K, V, q, 4))


def test_state_is_the_same_whatever_the_threads() -> None:
    rng = np.random.default_rng(7)
    K, V = rng.standard_normal((9000, 64)), rng.standard_normal((9000, 64))
    before = ls.get_num_threads()
    states = []
    try:
        for n_threads in (1, 2, 3):
            ls.set_num_threads(n_threads)
            S = MomentState(64, 64)
            S.add(K[:5000], V[:5000])
            S.add(K[5000:], V[5000:])
            states.append(S.to_state())
    finally:
        ls.set_num_threads(before)
    for other in states[1:]:
        for name in ("moments_hi", "moments_lo"):
            assert np.array_equal(states[0][name], other[name])
    assert np.any(states[0]["moments_lo"] != 0)  # the compensation is in use


def test_fold_allocates_nothing_of_the_lifted_size() -> None:
    """The lifted rows of a chunk (``rows x D`` floats: 17 MB for 1024 rows at d = 64) are never formed."""
    rng = np.random.default_rng(8)
    K, V = rng.standard_normal((8192, 64)), rng.standard_normal((8192, 64))
    S = MomentState(64, 64)
    S.add(K[:1024], V[:1024])  # this thread's scratch buffers, made once
    before = ls.get_num_threads()
    ls.set_num_threads(
        1
    )  # the helper threads' scratch is theirs, made on first use: count this thread only
    try:
        tracemalloc.start()
        try:
            S.add(K, V)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    finally:
        ls.set_num_threads(before)
    assert peak < 1024 * lifted_dim(64) * 8 // 16, peak
    ref = MomentState(64, 64)
    ref.add(K[:1024], V[:1024])
    ref.add(K, V)
    assert np.array_equal(ref.to_state()["moments_hi"], S.to_state()["moments_hi"])


def test_scale_then_add_matches_brute_force() -> None:
    rng = np.random.default_rng(9)
    S = MomentState(6, 2)
    K1, V1 = rng.standard_normal((700, 6)), rng.standard_normal((700, 2))
    K2, V2 = rng.standard_normal((3, 6)), rng.standard_normal((3, 2))
    K3, V3 = rng.standard_normal((600, 6)), rng.standard_normal((600, 2))
    S.add(K1, V1)
    S.add(K2, V2)  # waits in the buffer
    S.scale(0.25)
    S.add(K3, V3)
    K = np.concatenate([K1 * 0.5, K2 * 0.5, K3])
    V = np.concatenate([V1, V2, V3])
    for q in rng.standard_normal((2, 6)):
        err = np.abs(S.numerator(q[None])[0] - _exact_numerator(K, V, q, 2))
        assert np.all(err <= 1e-13 * _scale_of(K, V, q, 2))


# ---------------------------------------------------------------------- rows fed one at a time
# A full buffer of rows fed one at a time is handed to the ingest helpers; its product is added to S once
# _SETTLE_ROWS more rows have arrived.  Meanwhile queries read those rows directly.


def _fed_one_at_a_time(K: np.ndarray, V: np.ndarray) -> MomentState:
    """A state fed ``K``, ``V`` row by row through its buffer (a short stream's record, which wide enough states
    keep first, is left at once: tests/test_short_streams.py checks that path)."""
    S = MomentState(K.shape[1], V.shape[1])
    S._leave_record()
    for k, v in zip(K, V):
        S.add_row(k, v)
    return S


def test_rows_fed_one_at_a_time_reach_the_state_of_folds_on_the_spot() -> None:
    """The state is the same bit for bit at thread budgets 1, 2 and 3, equals folds of every full buffer in
    stream order (the fold of ``add``) up to the rounding of the products (the pending product cuts its BLAS
    calls differently), and the serialized state does not depend on whether the last buffer's product was
    added yet (before and after the settle point)."""
    from levstream.moments import _SETTLE_ROWS, BUFFER_ROWS, _fold_moments

    rng = np.random.default_rng(11)
    n = 3 * BUFFER_ROWS + 50
    K, V = rng.standard_normal((n, 64)), rng.standard_normal((n, 64))
    before = ls.get_num_threads()
    for m in (
        3 * BUFFER_ROWS + _SETTLE_ROWS - 1,
        3 * BUFFER_ROWS + _SETTLE_ROWS + 1,
        2 * BUFFER_ROWS,
    ):
        states = []
        try:
            for n_threads in (1, 2, 3):
                ls.set_num_threads(n_threads)
                states.append(_fed_one_at_a_time(K[:m], V[:m]).to_state())
        finally:
            ls.set_num_threads(before)
        for other in states[1:]:
            assert all(np.array_equal(states[0][k], other[k]) for k in states[0])
        state = states[0]
        hi, lo = np.zeros((lifted_dim(64), 64)), np.zeros((lifted_dim(64), 64))
        full = m // BUFFER_ROWS * BUFFER_ROWS
        for a in range(0, full, BUFFER_ROWS):
            _fold_moments(hi, lo, K[a : a + BUFFER_ROWS], V[a : a + BUFFER_ROWS])
        got = state["moments_hi"] + state["moments_lo"]
        scale = lift_degree2(np.abs(K[:full])).T @ np.abs(V[:full])  # sum_j |phi(k_j)| |v_j|^T
        assert np.all(np.abs(got - (hi + lo)) <= 1e-14 * scale)
        assert np.array_equal(state["moments_buf_keys"], K[full:m])
        assert np.array_equal(state["moments_buf_values"], V[full:m])
        assert np.any(state["moments_lo"] != 0)


def test_the_numerator_is_exact_while_a_product_is_pending() -> None:
    from levstream.moments import _SETTLE_ROWS, BUFFER_ROWS

    rng = np.random.default_rng(12)
    n = 2 * BUFFER_ROWS + _SETTLE_ROWS + 3
    K, V = rng.standard_normal((n, 5)) * 3.0, rng.standard_normal((n, 3))
    Q = rng.standard_normal((10, 5))  # up to 8 queries take the compiled loop, more the BLAS path
    S = MomentState(5, 3)
    checked = {BUFFER_ROWS - 1, BUFFER_ROWS, BUFFER_ROWS + 1, BUFFER_ROWS + _SETTLE_ROWS - 1}
    checked |= {BUFFER_ROWS + _SETTLE_ROWS, 2 * BUFFER_ROWS, 2 * BUFFER_ROWS + 7, n}
    for m in range(1, n + 1):
        S.add_row(K[m - 1], V[m - 1])
        if m not in checked:
            continue
        for Qs in (Q[:1], Q[:8], Q):
            got = S.numerator(Qs)
            for q, row in zip(Qs, got):
                err = np.abs(row - _exact_numerator(K[:m], V[:m], q, 2))
                assert np.all(err <= 1e-13 * _scale_of(K[:m], V[:m], q, 2)), (m, Qs.shape)


def test_a_pending_product_survives_copy_merge_scale_and_serialization() -> None:
    from levstream.moments import BUFFER_ROWS

    rng = np.random.default_rng(13)
    K, V = (
        rng.standard_normal((2 * BUFFER_ROWS + 10, 6)),
        rng.standard_normal((2 * BUFFER_ROWS + 10, 2)),
    )
    a = BUFFER_ROWS + 5  # a product pending in each state below
    A = _fed_one_at_a_time(K[:a], V[:a])
    B = _fed_one_at_a_time(K[a:], V[a:])
    assert A._pending is not None and B._pending is not None
    bytes_before = {k: v.copy() for k, v in A.to_state().items()}
    C = A.copy()
    assert all(np.array_equal(bytes_before[k], v) for k, v in A.to_state().items())  # nothing moved
    R = MomentState.from_state(6, 2, A.to_state())
    M = A.copy()
    M.merge(B)
    assert all(np.array_equal(bytes_before[k], v) for k, v in A.to_state().items())  # A untouched
    C.add_row(K[a], V[a])  # the copy goes on by itself
    A.scale(0.25)
    Q = rng.standard_normal((3, 6))
    cases = [(A, K[:a] * 0.5, V[:a]), (C, K[: a + 1], V[: a + 1]), (R, K[:a], V[:a]), (M, K, V)]
    for state, Kr, Vr in cases:
        for q, row in zip(Q, state.numerator(Q)):
            assert np.all(
                np.abs(row - _exact_numerator(Kr, Vr, q, 2)) <= 1e-13 * _scale_of(Kr, Vr, q, 2)
            )


def test_a_failed_product_is_computed_again_by_the_state_that_needs_it(monkeypatch):
    """The helper's product fails (here: raises once, on the helper): the state computes it on its own thread
    when it settles, and stays exact."""
    from levstream import _offload

    # the product worker allocates nothing and cannot fail: the helpers' path, whose product can, is tested here
    monkeypatch.setattr(_offload, "submit", lambda *args: None)
    import threading

    from levstream import moments

    real, failed = moments.features_product, []

    def flaky(*args):
        if threading.current_thread() is not threading.main_thread() and not failed:
            failed.append(True)
            raise MemoryError("no memory for the product (simulated)")
        return real(*args)

    monkeypatch.setattr(moments, "features_product", flaky)
    before = ls.get_num_threads()
    ls.set_num_threads(2)
    try:
        rng = np.random.default_rng(14)
        K, V = rng.standard_normal((200, 4)), rng.standard_normal((200, 3))
        S = _fed_one_at_a_time(K[:128], V[:128])  # a full buffer: handed to the helper
        for _ in range(1000):  # until the helper has failed on it
            if failed:
                break
            time.sleep(0.01)
        for k, v in zip(K[128:], V[128:]):
            S.add_row(k, v)
    finally:
        ls.set_num_threads(before)
    assert failed and S._pending is None
    for q in rng.standard_normal((3, 4)):
        err = np.abs(S.numerator(q[None])[0] - _exact_numerator(K, V, q, 2))
        assert np.all(err <= 1e-13 * _scale_of(K, V, q, 2))


def test_a_merge_reads_a_state_the_same_before_and_after_its_product_lands():
    """Bit for bit: merging a state whose product is pending, its round trip through bytes, or a copy whose
    product has landed gives the same state (no rows buffered after the pending ones: no fold renormalises)."""
    from levstream.moments import BUFFER_ROWS

    rng = np.random.default_rng(15)
    K, V = rng.standard_normal((2 * BUFFER_ROWS, 5)), rng.standard_normal((2 * BUFFER_ROWS, 2))
    base_K, base_V = rng.standard_normal((300, 5)), rng.standard_normal((300, 2))
    other = _fed_one_at_a_time(K, V)
    assert other._pending is not None and other._buf_n == 0
    landed = other.copy()
    landed.settle()
    merged = []
    for src in (other, MomentState.from_state(5, 2, other.to_state()), landed):
        A = MomentState(5, 2)
        A.add(base_K, base_V)
        A.merge(src)
        merged.append(A.to_state())
    assert other._pending is not None  # the merge left the other state as it was
    for state in merged[1:]:
        assert all(np.array_equal(merged[0][k], state[k]) for k in merged[0])


def test_rows_of_a_lifted_state_fed_one_at_a_time_match_brute_force():
    rng = np.random.default_rng(16)
    K, V = rng.standard_normal((300, 3)), rng.standard_normal((300, 2))
    S = MomentState(3, 2, degree=4)
    for k, v in zip(K, V):
        S.add_row(k, v)
    for q in rng.standard_normal((3, 3)):
        err = np.abs(S.numerator(q[None])[0] - _exact_numerator(K, V, q, 4))
        assert np.all(err <= 1e-12 * _scale_of(K, V, q, 4))


def test_a_row_whose_settle_fails_is_refused_and_changes_nothing(monkeypatch):
    """Adding the product fails everywhere (here: computing it raises on every thread): the row that would
    have triggered the settle is refused before it joins the buffer, and the state answers as before; once the
    product can be computed, the stream goes on exactly."""
    from levstream import _offload

    # the product worker allocates nothing and cannot fail: the helpers' path, whose product can, is tested here
    monkeypatch.setattr(_offload, "submit", lambda *args: None)
    from levstream import moments
    from levstream.moments import _SETTLE_ROWS, BUFFER_ROWS

    real = moments.features_product

    def broken(*args):
        raise MemoryError("no memory for the product (simulated)")

    rng = np.random.default_rng(17)
    n = BUFFER_ROWS + _SETTLE_ROWS + 10
    K, V = rng.standard_normal((n, 4)), rng.standard_normal((n, 2))
    monkeypatch.setattr(moments, "features_product", broken)
    S = _fed_one_at_a_time(K[: BUFFER_ROWS + _SETTLE_ROWS - 1], V[: BUFFER_ROWS + _SETTLE_ROWS - 1])
    Q = rng.standard_normal((2, 4))
    num = S.numerator(Q)
    with pytest.raises(MemoryError):
        S.add_row(K[BUFFER_ROWS + _SETTLE_ROWS - 1], V[BUFFER_ROWS + _SETTLE_ROWS - 1])
    assert S._buf_n == _SETTLE_ROWS - 1 and S._pending is not None
    assert np.array_equal(S.numerator(Q), num)
    monkeypatch.setattr(moments, "features_product", real)
    for k, v in zip(K[BUFFER_ROWS + _SETTLE_ROWS - 1 :], V[BUFFER_ROWS + _SETTLE_ROWS - 1 :]):
        S.add_row(k, v)
    for q, row in zip(Q, S.numerator(Q)):
        assert np.all(np.abs(row - _exact_numerator(K, V, q, 2)) <= 1e-13 * _scale_of(K, V, q, 2))


def _attention_outputs(K: np.ndarray, V: np.ndarray, Q: np.ndarray) -> np.ndarray:
    W = (Q @ K.T) ** 2
    return W @ V / W.sum(axis=1, keepdims=True)


def test_a_token_refused_by_a_failed_settle_changes_no_sketch(monkeypatch):
    """At the sketch level too: the token is refused whole (store, ids, count, moment state), and fed again once
    the product can be computed, the sketch equals brute force over every token exactly once."""
    from levstream import _offload

    # the product worker allocates nothing and cannot fail: the helpers' path, whose product can, is tested here
    monkeypatch.setattr(_offload, "submit", lambda *args: None)
    from levstream import moments
    from levstream.moments import _SETTLE_ROWS, BUFFER_ROWS

    real = moments.features_product

    def broken(*args):
        raise MemoryError("no memory for the product (simulated)")

    rng = np.random.default_rng(18)
    n = BUFFER_ROWS + _SETTLE_ROWS + 20
    K, V, Q = rng.standard_normal((n, 4)), rng.standard_normal((n, 2)), rng.standard_normal((3, 4))
    sk = ls.KeySketch(4, eps=0.1, value_dim=2, exact_output=True)
    monkeypatch.setattr(moments, "features_product", broken)
    t = 0
    with pytest.raises(MemoryError):
        for t in range(n):
            sk.prefill(K[t][None], V[t][None], Q[:1])
    assert t == BUFFER_ROWS + _SETTLE_ROWS - 1
    before = (sk.n, sk._next_id, sk._store.n)
    with pytest.raises(MemoryError):
        sk.update(K[t], V[t])
    assert (sk.n, sk._next_id, sk._store.n) == before
    monkeypatch.setattr(moments, "features_product", real)
    for s in range(t, n):
        sk.update(K[s], V[s])
    assert sk.n == n and len(set(sk._store.ids_view().tolist())) == sk._store.n
    assert np.allclose(sk.attend(Q).output, _attention_outputs(K, V, Q), rtol=1e-10, atol=0)


def test_a_failed_settle_in_a_multihead_sync_drops_the_pieces_every_head_took(monkeypatch):
    """The token buffer is handed to the heads in pieces; a settle that fails in a later piece leaves the earlier
    pieces with every head and takes them out of the buffer, so no token is fed twice or lost."""
    from levstream import _offload

    # the product worker allocates nothing and cannot fail: the helpers' path, whose product can, is tested here
    monkeypatch.setattr(_offload, "submit", lambda *args: None)
    from levstream import moments
    from levstream.moments import BUFFER_ROWS

    real = moments.features_product

    def broken(*args):
        raise MemoryError("no memory for the product (simulated)")

    rng = np.random.default_rng(19)
    H, n = 2, 300
    K, V, Q = (
        rng.standard_normal((H, n, 4)),
        rng.standard_normal((H, n, 2)),
        rng.standard_normal((H, 3, 4)),
    )
    mh = ls.MultiHeadKeySketch(H, 4, eps=0.1, value_dim=2, exact_output=True)
    for t in range(100):
        mh.update(K[:, t], V[:, t])
    mh.top_k(Q, 1)  # hands the 100 tokens to the heads: their moment buffers hold 100 rows
    monkeypatch.setattr(moments, "features_product", broken)
    t = 100
    with pytest.raises(MemoryError):
        for t in range(100, n):
            mh.update(K[:, t], V[:, t])
    # the 64 buffered tokens went in two pieces: 28 (the heads' buffers filled: a product pending), then 36,
    # whose settle failed; the first piece is with every head, the rest still buffered, the new token refused
    assert t == 164 and mh._nb == 64 - (BUFFER_ROWS - 100)
    monkeypatch.setattr(moments, "features_product", real)
    for s in range(t, n):
        mh.update(K[:, s], V[:, s])
    res = mh.attend(Q)
    for h in range(H):
        assert mh._heads[h].n + mh._nb == n
        assert np.allclose(res.output[h], _attention_outputs(K[h], V[h], Q[h]), rtol=1e-10, atol=0)


def test_an_interrupted_product_is_computed_again_by_the_next_call(monkeypatch):
    """Ctrl-C while the calling thread computes the product (thread budget 1): the interruption propagates and
    the row that triggered it is refused; the next call computes the product and the stream goes on exactly."""
    from levstream import moments
    from levstream.moments import _SETTLE_ROWS, BUFFER_ROWS

    real, interrupted = moments.features_product, []

    def interrupt_once(*args):
        # on this thread only: a helper may still be computing a product of an earlier test's state
        if not interrupted and threading.current_thread() is threading.main_thread():
            interrupted.append(True)
            raise KeyboardInterrupt
        return real(*args)

    rng = np.random.default_rng(20)
    n = BUFFER_ROWS + _SETTLE_ROWS + 5
    K, V = rng.standard_normal((n, 3)), rng.standard_normal((n, 2))
    monkeypatch.setattr(moments, "features_product", interrupt_once)
    before = ls.get_num_threads()
    ls.set_num_threads(1)
    try:
        S = _fed_one_at_a_time(
            K[: BUFFER_ROWS + _SETTLE_ROWS - 1], V[: BUFFER_ROWS + _SETTLE_ROWS - 1]
        )
        with pytest.raises(KeyboardInterrupt):
            S.add_row(K[BUFFER_ROWS + _SETTLE_ROWS - 1], V[BUFFER_ROWS + _SETTLE_ROWS - 1])
        for k, v in zip(K[BUFFER_ROWS + _SETTLE_ROWS - 1 :], V[BUFFER_ROWS + _SETTLE_ROWS - 1 :]):
            S.add_row(k, v)
    finally:
        ls.set_num_threads(before)
    for q in rng.standard_normal((2, 3)):
        err = np.abs(S.numerator(q[None])[0] - _exact_numerator(K, V, q, 2))
        assert np.all(err <= 1e-13 * _scale_of(K, V, q, 2))


@pytest.mark.parametrize("how", ["deepcopy", "copy", "pickle"])
def test_a_state_copied_by_the_standard_protocols_goes_on_exactly(how):
    import copy as copy_module
    import pickle

    from levstream.moments import BUFFER_ROWS

    rng = np.random.default_rng(21)
    K, V = rng.standard_normal((BUFFER_ROWS + 40, 3)), rng.standard_normal((BUFFER_ROWS + 40, 2))
    S = _fed_one_at_a_time(
        K[: BUFFER_ROWS + 5], V[: BUFFER_ROWS + 5]
    )  # a product pending, 5 rows buffered
    T = {
        "deepcopy": copy_module.deepcopy,
        "copy": copy_module.copy,
        "pickle": lambda s: pickle.loads(pickle.dumps(s)),
    }[how](S)
    for k, v in zip(K[BUFFER_ROWS + 5 :], V[BUFFER_ROWS + 5 :]):
        T.add_row(k, v)
    for q in rng.standard_normal((2, 3)):
        err = np.abs(T.numerator(q[None])[0] - _exact_numerator(K, V, q, 2))
        assert np.all(err <= 1e-13 * _scale_of(K, V, q, 2))
