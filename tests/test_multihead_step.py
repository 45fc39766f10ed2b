"""The step path of MultiHeadKeySketch (issue 11, item 4): tokens of every head fed one or a few at a time
(``update``, ``update_many`` of (H, m <= 32, d), decode steps of ``prefill``) and queries of every head answered
by one compiled call over heads.

Checked against brute force written here (dense NumPy over the prefix fed so far): identical entries (tie band
excepted), values to VALUE_RTOL, exact outputs to OUTPUT_RTOL; and against independent ``KeySketch`` heads fed
the same tokens one at a time: the same bytes (the shared token buffer hands its rows to the heads so that
their state is the one of row-at-a-time feeding).  The float32 pre-filter of the stacked scan is checked on its
own with rows placed just above and just below the threshold, and with tiny and huge rows.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TIE_RTOL, VALUE_RTOL, assert_heavy_matches_dense, heavy_tailed_keys
from naive import dense_heavy

import levstream as ls
from levstream._kernels.live import heavy_p2_stacked, int8_rows
from test_live_scan import rows_at_the_cut
from levstream.multihead import _STEP_BUFFER_ROWS

H, D, EPS = 3, 5, 0.04
OUTPUT_RTOL = 1e-10


def head_keys(n: int, seed: int) -> np.ndarray:
    return np.stack([heavy_tailed_keys(n, D, seed=100 * seed + h) for h in range(H)])


def dense_heavy_ids(Q: np.ndarray, K: np.ndarray, ids: np.ndarray, eps: float) -> dict:
    return dense_heavy(Q, K, eps, ids=ids)


def assert_outputs(got: np.ndarray, Q: np.ndarray, K: np.ndarray, V: np.ndarray) -> None:
    W = (Q @ K.T) ** 2
    want = W @ V / W.sum(axis=1, keepdims=True)
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= OUTPUT_RTOL * scale


# ------------------------------------------------------------------ random programs of steps
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_steps_equal_brute_force_over_every_prefix(seed):
    """A long program of tokens, small chunks, larger chunks (the general path), explicit ids and queries of
    1 to 8 rows per head, with a small block so that the heads fold and prune many times during it."""
    rng = np.random.default_rng(seed)
    K = head_keys(3000, seed)
    mh = ls.MultiHeadKeySketch(H, D, eps=EPS, block_rows=32)
    fed_ids: list[int] = []
    used = 0
    next_free = 0  # ids past every id fed (explicit ids are drawn above the running counter)
    checked = 0
    while used < K.shape[1] - 80:
        op = rng.choice(["token", "small", "chunk", "ids", "query", "query", "query"], p=[0.3, 0.15, 0.05, 0.05, 0.15, 0.15, 0.15])
        if op == "token":
            mh.update(K[:, used])
            fed_ids.append(mh.next_id - 1)
            used += 1
        elif op == "small":
            m = int(rng.integers(1, 33))
            start = mh.next_id
            mh.update_many(np.ascontiguousarray(K[:, used:used + m]))
            fed_ids += list(range(start, start + m))
            used += m
        elif op == "chunk":  # past _STEP_CHUNK_ROWS: the general path
            m = int(rng.integers(33, 80))
            start = mh.next_id
            mh.update_many(K[:, used:used + m])
            fed_ids += list(range(start, start + m))
            used += m
        elif op == "ids":  # explicit ids out of order, past the counter: the counter jumps past them
            m = int(rng.integers(1, 5))
            ids = rng.permutation(np.arange(next_free + 3, next_free + 3 + m))
            mh.update_many(K[:, used:used + m], ids=ids)
            fed_ids += ids.tolist()
            used += m
        else:
            m = int(rng.integers(1, 9))
            Q = rng.standard_normal((H, m, D))
            if rng.random() < 0.3:  # key-aligned queries: entries near their keys' scores
                Q[:, 0] = K[:, int(rng.integers(0, used))] if used else Q[:, 0]
            eps = EPS if rng.random() < 0.8 else 0.1
            hits = mh.heavy_entries(Q, eps=None if eps == EPS else eps)
            assert len(hits) == H
            ids = np.array(fed_ids)
            for h in range(H):
                assert hits[h].n_queries == m
                assert_heavy_matches_dense(hits[h], dense_heavy_ids(Q[h], K[h, :used], ids, eps), eps)
            checked += 1
        next_free = max(next_free, mh.next_id, max(fed_ids, default=-1) + 1)
        assert mh.n == used
    assert checked > 100


def test_step_state_is_that_of_independent_heads_fed_row_by_row():
    """Bytes of every head equal those of a KeySketch fed the same tokens with update() (values and moments
    included: the buffer's pieces end where the moment buffer fills), at many points of the stream."""
    rng = np.random.default_rng(5)
    n, dv = 700, 3
    K, V = head_keys(n, 5), rng.standard_normal((H, n, dv))
    mh = ls.MultiHeadKeySketch(H, D, eps=EPS, block_rows=48, value_dim=dv, exact_output=True)
    refs = [ls.KeySketch(D, eps=EPS, block_rows=48, value_dim=dv, exact_output=True) for _ in range(H)]
    mh.update_many(K[:, :37], V[:, :37])
    for h in range(H):
        refs[h].update_many(K[h, :37], V[h, :37])
    t = 37
    while t < n:
        m = int(rng.integers(1, 9))
        m = min(m, n - t)
        if m == 1:
            mh.update(K[:, t], V[:, t])
        else:
            mh.update_many(np.ascontiguousarray(K[:, t:t + m]), np.ascontiguousarray(V[:, t:t + m]))
        for h in range(H):
            for i in range(t, t + m):
                refs[h].update(K[h, i], V[h, i])
        t += m
        if rng.random() < 0.5:
            mh.attend(rng.standard_normal((H, 2, D)))
        if rng.random() < 0.1:
            heads = mh.heads  # hands the buffer to the heads
            for h in range(H):
                assert heads[h].to_bytes() == refs[h].to_bytes(), f"head {h} at n = {t}"
    for h, head in enumerate(mh.heads):
        assert head.to_bytes() == refs[h].to_bytes()
    assert mh.n == n


def test_a_query_with_buffered_tokens_changes_nothing():
    K = head_keys(300, 7)
    mh = ls.MultiHeadKeySketch(H, D, eps=EPS, block_rows=64).update_many(K[:, :200])
    for t in range(200, 205):
        mh.update(K[:, t])
    assert mh._nb == 5  # tokens waiting in the shared buffer
    before = mh.to_bytes()
    Q = np.random.default_rng(0).standard_normal((H, 3, D))
    for _ in range(3):
        mh.heavy_entries(Q)
        mh.normalizer(Q)
        mh.top_k(Q, 3)
        assert mh.to_bytes() == before
    again = ls.MultiHeadKeySketch.from_bytes(before)
    for h, (a, b) in enumerate(zip(mh.heavy_entries(Q), again.heavy_entries(Q))):
        assert a.as_set() == b.as_set()
        assert_heavy_matches_dense(a, dense_heavy(Q[h], K[h, :205], EPS), EPS)


def test_copy_merge_extend_and_bytes_see_the_buffered_tokens():
    K = head_keys(400, 8)
    Q = np.random.default_rng(1).standard_normal((H, 6, D))
    a = ls.MultiHeadKeySketch(H, D, eps=EPS, block_rows=16)
    for t in range(150):
        a.update(K[:, t])
    b = ls.MultiHeadKeySketch(H, D, eps=EPS, block_rows=16).update_many(K[:, 150:151], offset=150)
    for t in range(151, 170):
        b.update(K[:, t])
    c = a.copy()
    assert c.n == 150
    c.merge(b)
    assert c.n == 170 and b.n == 20
    restored = ls.MultiHeadKeySketch.from_bytes(c.to_bytes())
    restored.extend([K[:, t] for t in range(170, 180)])
    with pytest.raises(ValueError, match="item 2 rejected"):
        restored.extend([K[:, 180], K[:, 181], K[:, 182, :2]])
    assert restored.n == 180
    for sk, n in ((a, 150), (c, 170), (restored, 180)):
        for h, hits in enumerate(sk.heavy_entries(Q)):
            assert_heavy_matches_dense(hits, dense_heavy(Q[h], K[h, :n], EPS), EPS)


def test_token_ids_clash_with_ids_fed_ahead_of_the_counter():
    K = head_keys(100, 9)
    mh = ls.MultiHeadKeySketch(H, D, eps=EPS).update_many(K[:, :10])
    mh.update(K[:, 10])  # id 10, buffered
    mh.update_many(K[:, 11:13], ids=[12, 13])  # the counter jumps to 14
    mh.update(K[:, 13])  # id 14
    assert mh.next_id == 15
    mh2 = ls.MultiHeadKeySketch(H, D, eps=EPS).update_many(K[:, :10])
    mh2.update_many(K[:, 10:11], ids=[10])
    assert mh2.next_id == 11
    mh2.update(K[:, 11])  # id 11: no clash
    before = mh2.to_bytes()
    mh3 = ls.MultiHeadKeySketch.from_bytes(before)
    mh3.update_many(K[:, 12:14], ids=[3_000, 20])  # next id 3001; 20 lies below it but was fed
    mh3.update(K[:, 14])
    assert mh3.next_id == 3002
    Q = np.random.default_rng(2).standard_normal((H, 4, D))
    ids = np.array(list(range(12)) + [3_000, 20, 3_001])
    Ks = np.concatenate([K[:, :12], K[:, 12:15]], axis=1)
    for h, hits in enumerate(mh3.heavy_entries(Q)):
        assert_heavy_matches_dense(hits, dense_heavy(Q[h], Ks[h], EPS, ids=ids), EPS)
        assert (np.diff(hits.key_ids[hits.indptr[0]:hits.indptr[1]]) > 0).all()


@pytest.mark.parametrize("with_values", [False, True])
def test_a_token_that_is_not_finite_is_refused_on_the_step_path_and_changes_nothing(with_values):
    """The step path checks a token while it copies it into the buffer's free room: a nan, an inf or squares that
    overflow, in the key or in the value, through update_many, update (also of a non-contiguous view) and a decode
    step of prefill, with the buffer empty, partly filled and full, is refused with the general path's error and
    leaves the sketch as it was (token count, buffer, bytes); so is such a query (the live scan reports it, then
    it is validated in full)."""
    rng = np.random.default_rng(31)
    dv = 2 if with_values else None
    mh = ls.MultiHeadKeySketch(H, D, eps=EPS, block_rows=48, value_dim=dv, exact_output=with_values)
    mh.update_many(head_keys(60, 31), rng.standard_normal((H, 60, dv)) if dv else None)
    refused = 0
    for step in range(150):  # the 64-row buffer fills and is handed over twice
        X = rng.standard_normal((H, 1, D))
        V = rng.standard_normal((H, 1, dv)) if dv else None
        mh.update_many(X, V)
        snapshot = mh.to_bytes() if step % 10 == 0 else None  # (hands the buffer to the heads)
        before = (mh.n, mh._nb)
        bad = []
        for where, value in ((2, np.nan), (0, np.inf), (4, 1e300)):
            B = X.copy()
            B[step % H, 0, where] = value
            bad.append((B, V))
            if dv:
                W = V.copy()
                W[(step + 1) % H, 0, where % dv] = value
                bad.append((X, W))
        for B, W in bad:
            calls = [lambda: mh.update_many(B, W),
                     lambda: mh.update(B[:, 0], None if W is None else W[:, 0]),
                     lambda: mh.update(np.asfortranarray(B[:, 0]), None if W is None else W[:, 0])]
            if dv:
                calls.append(lambda: mh.prefill(B, W, X))
            for call in calls:
                with pytest.raises(ValueError, match="finite|overflow"):
                    call()
                refused += 1
                assert (mh.n, mh._nb) == before
        Qbad = rng.standard_normal((H, 2, D))
        Qbad[step % H, 1, 3] = (np.nan, np.inf, 1e300)[step % 3]
        for call in (lambda: mh.heavy_entries(Qbad), lambda: mh.attend(Qbad) if dv else mh.heavy_entries(Qbad)):
            with pytest.raises(ValueError, match="finite|overflow"):
                call()
            refused += 1
            assert (mh.n, mh._nb) == before
        if snapshot is not None:
            assert mh.to_bytes() == snapshot
    assert refused > 1000 and mh.n == 210


def test_a_chunk_whose_ids_clash_with_buffered_tokens_is_refused_and_changes_nothing():
    K = head_keys(50, 11)
    mh = ls.MultiHeadKeySketch(H, D, eps=EPS).update_many(K[:, :5])
    for t in range(5, 9):
        mh.update(K[:, t])  # ids 5..8, buffered
    before = mh.to_bytes()
    with pytest.raises(ValueError, match="ids clash"):
        mh.update_many(K[:, 9:11], offset=7)
    with pytest.raises(ValueError, match="ids clash"):
        mh.update_many(K[:, 9:10], ids=[8])
    assert mh.to_bytes() == before and mh.n == 9 and mh.next_id == 9
    mh.update(K[:, 9])
    Q = np.random.default_rng(3).standard_normal((H, 2, D))
    for h, hits in enumerate(mh.heavy_entries(Q)):
        assert_heavy_matches_dense(hits, dense_heavy(Q[h], K[h, :10], EPS), EPS)


def test_decode_steps_equal_brute_force_and_independent_heads():
    """prefill of one row per head (a decode step) on the step path: heavy entries, heavy outputs, captured
    mass and exact outputs against dense causal attention, and the same as per-head KeySketch decode steps."""
    rng = np.random.default_rng(12)
    n0, steps, dv = 200, 150, 4
    K = head_keys(n0 + steps, 12)
    V = rng.standard_normal((H, n0 + steps, dv))
    Qs = rng.standard_normal((H, n0 + steps, D))
    mh = ls.MultiHeadKeySketch(H, D, eps=EPS, block_rows=40, value_dim=dv, exact_output=True)
    mh.update_many(K[:, :n0], V[:, :n0])
    refs = [ls.KeySketch(D, eps=EPS, block_rows=40, value_dim=dv, exact_output=True).update_many(K[h, :n0], V[h, :n0])
            for h in range(H)]
    for t in range(n0, n0 + steps):
        k = np.ascontiguousarray(K[:, t:t + 1])
        v = np.ascontiguousarray(V[:, t:t + 1])
        q = np.ascontiguousarray(Qs[:, t:t + 1])
        r = mh.prefill(k, v, q)
        assert r.output.shape == (H, 1, dv) and r.heavy_output.shape == (H, 1, dv) and len(r.entries) == H
        for h in range(H):
            Kp, Vp = K[h, :t + 1], V[h, :t + 1]
            assert_outputs(r.output[h], q[h], Kp, Vp)
            assert_heavy_matches_dense(r.entries[h], dense_heavy(q[h], Kp, EPS), EPS)
            W = (q[h] @ Kp.T) ** 2
            A = W / W.sum()
            heavy = np.where(A >= EPS * (1 + TIE_RTOL), A, 0.0)
            np.testing.assert_allclose(r.captured_mass[h], heavy.sum(axis=1), rtol=1e-9)
            np.testing.assert_allclose(r.heavy_output[h], heavy @ Vp, rtol=1e-9, atol=1e-12 * np.abs(Vp).max())
            want = refs[h].prefill(K[h, t:t + 1], V[h, t:t + 1], Qs[h, t:t + 1])
            np.testing.assert_array_equal(r.entries[h].key_ids, want.entries.key_ids)
            np.testing.assert_allclose(r.entries[h].values, want.entries.values, rtol=VALUE_RTOL)
    assert mh.n == n0 + steps
    for h, head in enumerate(mh.heads):
        assert head.to_bytes() == refs[h].to_bytes()
    r = mh.attend(Qs[:, :5])
    for h in range(H):
        assert_outputs(r.output[h], Qs[h, :5], K[h], V[h])


def test_attend_with_buffered_tokens_without_exact_output():
    rng = np.random.default_rng(13)
    K, V = head_keys(260, 13), rng.standard_normal((H, 260, 2))
    mh = ls.MultiHeadKeySketch(H, D, eps=EPS, block_rows=50, value_dim=2)
    mh.update_many(K[:, :250], V[:, :250])
    for t in range(250, 260):
        mh.update(K[:, t], V[:, t])
    Q = rng.standard_normal((H, 4, D))
    r = mh.attend(Q)
    assert r.output is None
    for h in range(H):
        W = (Q[h] @ K[h].T) ** 2
        A = W / W.sum(axis=1, keepdims=True)
        heavy = np.where(A >= EPS, A, 0.0)
        assert_heavy_matches_dense(r.entries[h], dense_heavy(Q[h], K[h], EPS), EPS)
        np.testing.assert_allclose(r.heavy_output[h], heavy @ V[h], rtol=1e-9, atol=1e-12)


def test_the_step_path_with_ill_conditioned_and_rescaled_heads():
    """Heads of very different scales (1e-150, 1, 1e150) and a head whose keys span a subspace for a while
    (the R-factor summary, where the step path hands over to the general one)."""
    rng = np.random.default_rng(14)
    n = 400
    base = heavy_tailed_keys(n, D, seed=14)
    flat = heavy_tailed_keys(n, D, seed=15)
    flat[:250, -1] = 0.0  # rank-deficient for the first 250 keys
    K = np.stack([base * 1e-150, flat, base * 1e150])
    mh = ls.MultiHeadKeySketch(H, D, eps=EPS, block_rows=32)
    for t in range(n):
        mh.update(K[:, t])
        if t % 7 == 0 and t > 2:
            Q = rng.standard_normal((H, 2, D))
            Q[1, 1, :-1] = 0.0  # along the rare direction of head 1
            for h, hits in enumerate(mh.heavy_entries(Q)):
                assert_heavy_matches_dense(hits, dense_heavy(Q[h], K[h, :t + 1], EPS), EPS)


@pytest.mark.parametrize("decay", [None, 0.97])
def test_gates_per_head_leave_the_step_path_and_stay_exact(decay):
    """Gates (per head, one head never forgetting) and decay through update, update_many, prefill chunks and
    decode steps: every head equals the log-space brute force of its own decayed stream (tests/naive.py)."""
    from naive import DecayedStream

    rng = np.random.default_rng(4)
    H, d, dv, n = 3, 4, 2, 600
    K, V = rng.standard_normal((H, n, d)), rng.standard_normal((H, n, dv))
    G = np.exp(-rng.exponential(0.2, size=(H, n)))
    G[0] = 1.0  # head 0 never forgets
    mh = ls.MultiHeadKeySketch(H, d, eps=0.05, value_dim=dv, exact_output=True, decay=decay)
    refs = [DecayedStream(d, value_dim=dv, decay=decay) for _ in range(H)]
    pos = 0
    while pos < n:
        m = min(int(rng.integers(0, 12)), n - pos)
        kind, sl = rng.integers(4), slice(pos, pos + m)
        gated = rng.random() < 0.5
        gates = G[:, sl] if gated else None
        if kind == 0:
            for i in range(pos, pos + m):
                mh.update(K[:, i], V[:, i], gate=G[:, i] if gated else None)
        elif kind == 1:
            mh.update_many(K[:, sl], V[:, sl], gates=gates)
        elif kind == 2 and m:
            Q = rng.standard_normal((H, m, d))
            r = mh.prefill(K[:, sl], V[:, sl], Q, gates=gates)
            for h in range(H):
                ref = DecayedStream(d, value_dim=dv, decay=decay)
                ref.update_many(refs[h].K, refs[h].V, gates=np.exp(refs[h].log_gates - (0.0 if decay is None else np.log(decay))))
                ref.update_many(K[h, sl], V[h, sl], gates=None if gates is None else gates[h])
                np.testing.assert_allclose(r.output[h], ref.outputs(Q[h], np.arange(pos, pos + m)),
                                           rtol=1e-9, atol=1e-12)
                assert r.entries[h].as_set() == set(ref.heavy(Q[h], 0.05, np.arange(pos, pos + m)))
        else:
            for i in range(pos, pos + m):
                mh.prefill(K[:, i : i + 1], V[:, i : i + 1], rng.standard_normal((H, 1, d)),
                           gates=G[:, i : i + 1] if gated else None)
        for h in range(H):
            refs[h].update_many(K[h, sl], V[h, sl], gates=None if gates is None else gates[h])
        pos += m
        if pos == 0:
            continue
        Q = rng.standard_normal((H, 2, d))
        a = mh.attend(Q)
        for h in range(H):
            assert a.entries[h].as_set() == set(refs[h].heavy(Q[h], 0.05)), (pos, h)
            np.testing.assert_allclose(a.output[h], refs[h].outputs(Q[h]), rtol=1e-9, atol=1e-12)
    for h, head in enumerate(mh.heads):
        np.testing.assert_allclose(head.log_total_gate, refs[h].log_gates.sum(), rtol=1e-12, atol=1e-12)
    assert ls.MultiHeadKeySketch.from_bytes(mh.to_bytes()).heavy_entries(Q)[2].as_set() == a.entries[2].as_set()


# ------------------------------------------------------------------ the stacked scan and its pre-filter
def test_stacked_scan_prefilter_is_exact_at_the_threshold():
    """Rows placed at ``<q, k>^2 = cut (1 +- delta)`` for delta from 1e-12 to 1e-3 (inside and far beyond the
    float32 pre-filter's error), tiny and huge rows, rows whose unit components underflow float32: the stacked
    scan returns exactly the rows at or above the cut, as a float64 scan.  The candidates are passed by descending
    norm, as the live state holds them (the scan stops at the first one too short to reach the cut)."""
    rng = np.random.default_rng(21)
    d, Hs, thresh = 16, 3, 0.01
    Q = rng.standard_normal((Hs, 1, d))
    LG = np.empty((Hs, d, d))
    rows, want = [], []
    for h in range(Hs):
        A = rng.standard_normal((3 * d, d))
        LG[h] = A.T @ A
        q = Q[h, 0]
        z = q @ LG[h] @ q
        cut = thresh * z
        Kh, above = rows_at_the_cut(rng, q, cut)
        rows.append(Kh)
        want.append(above)
    n = rows[0].shape[0]
    ids = np.arange(Hs * n).reshape(Hs, n)
    # every row a candidate; half of them scanned as rows fed since the last fold; or a quarter of them recent
    # tokens the Gram matrices do not hold (then Z includes them, and the rows placed at the cut are off it)
    for c, o in ((n, 0), (n // 2, 0), (n // 2, n // 4)):
        e = n - c - o
        # the candidates of each head by descending norm; perm[h, j]: the row of rows[h] at scan position j
        perm = np.stack([np.concatenate([np.argsort(-int8_rows(r[:c])[2], kind="stable"),
                                         np.arange(c, n)]) for r in rows])  # by the norms the kernel reads
        K = np.stack([r[p] for r, p in zip(rows, perm)])
        Kc, Ke = np.ascontiguousarray(K[:, :c]), np.ascontiguousarray(K[:, c:c + e])
        R = np.concatenate([rng.standard_normal((Hs, 2, d)), K[:, c + e:]], axis=1)  # recent rows from row 2
        Kc8, wc, nk = int8_rows(Kc.reshape(-1, d))
        Ke8, we, nke = int8_rows(Ke.reshape(-1, d))
        for ids_rising in (True, False):  # ids rising or falling with the row (the kernel sorts them)
            I = ids if ids_rising else ids[:, ::-1].copy()
            rid0 = 10 * Hs * n  # the recent rows' ids: rid0 + 2 + r
            I_all = np.concatenate([I[:, :c + e], rid0 + 2 + np.tile(np.arange(o), (Hs, 1))], axis=1)
            starts, indptr, key_ids, values, positions, z = heavy_p2_stacked(
                Q, LG, Kc, Kc8.reshape(Hs, c, d), wc.reshape(Hs, c), nk.reshape(Hs, c),
                np.ascontiguousarray(I[:, :c]), np.full(Hs, c), Ke, Ke8.reshape(Hs, e, d), we.reshape(Hs, e),
                nke.reshape(Hs, e),
                np.ascontiguousarray(I[:, c:c + e]), np.full(Hs, e), R, 2, 2 + o, rid0, thresh)
            for h in range(Hs):
                q = Q[h, 0]
                dots = (K[h] @ q) ** 2
                zh = z[h, 0]
                np.testing.assert_allclose(zh, q @ LG[h] @ q + dots[c + e:].sum(), rtol=1e-12)
                exact = np.flatnonzero(dots >= thresh * zh)  # the float64 scan's answer
                assert exact.size  # the rows at and above the cut are there to be found
                got = positions[starts[h]:starts[h + 1]]
                assert sorted(got.tolist()) == exact.tolist()
                for j, a in enumerate(want[h]):
                    if a is not None and o == 0:
                        assert (int(np.flatnonzero(perm[h] == j)[0]) in exact) == a, (h, j)
                np.testing.assert_allclose(values[starts[h]:starts[h + 1]], dots[got] / zh, rtol=1e-12)
                assert (np.diff(key_ids[starts[h]:starts[h + 1]]) > 0).all()
                np.testing.assert_array_equal(key_ids[starts[h]:starts[h + 1]], np.sort(I_all[h, got]))
                assert indptr[h, -1] == starts[h + 1] - starts[h]


def test_int8_rows():
    K = np.array([[3.0, 4.0], [1e-200, 0.0], [0.0, 0.0], [1e150, 1e150], [-2.0, 1.0]])
    K8, w, norms = int8_rows(K)
    assert K8.dtype == np.int8
    assert K8[0].tolist() == [95, 127] and w[0] == 4.0 / 127 and norms[0] == 5.0
    # squares that underflow: never skipped (infinite scale and norm), a zero row
    assert np.isinf(w[1:3]).all() and np.isinf(norms[1:3]).all() and not K8[1:3].any()
    assert K8[3].tolist() == [127, 127] and w[3] == 1e150 / 127
    np.testing.assert_allclose(norms[3], np.sqrt(2) * 1e150)
    assert K8[4].tolist() == [-127, 64]  # round(63.5) = 64 (to even), |error| <= 1/2


def test_int8_prefilter_bound_holds():
    """The stacked scan's pre-filter bound ``|<q, k>| <= ||q|| w (|s| + slack)`` (heavy_p2_stacked), checked
    directly: ``s`` summed in float32 in two orders (the bound holds for any), rows with one dominant entry,
    entries of mixed magnitudes, subnormal components, against the exact product in long double."""
    rng = np.random.default_rng(8)
    for d in (2, 16, 64, 128):
        K = rng.standard_normal((400, d)) * np.exp(rng.uniform(-30, 30, (400, 1)))
        K[::7, 0] *= 1e6  # one entry dominates: the others round to few levels
        K[::11, 1:] *= 1e-35  # components far below the largest
        Q = rng.standard_normal((50, d))
        Q[::5, 1:] *= 1e-45  # unit queries whose components underflow float32
        K8, w, _ = int8_rows(K)
        for q in Q:
            nq = np.sqrt(np.sum(q * q))
            q32 = (q / nq).astype(np.float32)
            slack = np.sum(np.abs(q32.astype(np.float64))) * (0.5 + 127.0 * (d + 3) * 2.0**-24) * 1.001 + 1e-38
            prods = q32[None, :] * K8.astype(np.float32)
            for s in (prods.sum(axis=1, dtype=np.float32), prods[:, ::-1].cumsum(axis=1, dtype=np.float32)[:, -1]):
                bound = nq * w * (np.abs(s.astype(np.float64)) + slack)
                exact = np.abs((K.astype(np.longdouble) @ q.astype(np.longdouble)).astype(np.float64))
                assert (exact <= bound * (1 + 1e-12)).all(), d


def test_buffer_size_constant_is_used():
    K = head_keys(_STEP_BUFFER_ROWS * 3, 22)
    mh = ls.MultiHeadKeySketch(H, D, eps=EPS, block_rows=1000)
    for t in range(_STEP_BUFFER_ROWS + 1):
        mh.update(K[:, t])
    assert mh._nb == 1 and mh._heads[0].n == _STEP_BUFFER_ROWS  # handed over when full
    assert mh.n == _STEP_BUFFER_ROWS + 1
