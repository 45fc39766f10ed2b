"""MultiHeadKeySketch: equal to independent per-head KeySketch objects, and to brute force."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
from conftest import (
    BOUND_RTOL,
    CORESET_DELTA,
    SCORE_RTOL,
    TIE_RTOL,
    VALUE_RTOL,
    assert_heavy_matches_dense,
    assert_matches_offline,
    heavy_tailed_keys,
)
from naive import dense_heavy, leverage_svd

import levstream as ls

H, D, EPS = 3, 6, 0.05


def keys(n=2500, seed=0):
    return np.stack([heavy_tailed_keys(n, D, seed=seed * 10 + h) for h in range(H)])


def queries(m=40, seed=99):
    return np.random.default_rng(seed).standard_normal((H, m, D))


def assert_matches_brute_force(mh: ls.MultiHeadKeySketch, K: np.ndarray, Q: np.ndarray,
                               eps=None) -> None:
    """Per head: the universal set is the offline set of SVD leverage scores (scores to SCORE_RTOL),
    and the heavy entries are exactly the dense entries >= eps (values to VALUE_RTOL)."""
    eps = mh.eps if eps is None else eps
    sets, hits = mh.universal_set(), mh.heavy_entries(Q, eps=eps)
    assert len(sets) == len(hits) == K.shape[0]
    for h in range(K.shape[0]):
        tau = leverage_svd(K[h])
        assert_matches_offline(sets[h].ids, tau, mh.eps)
        np.testing.assert_allclose(sets[h].scores, tau[sets[h].ids], rtol=SCORE_RTOL)
        np.testing.assert_array_equal(sets[h].keys, K[h][sets[h].ids])
        assert_heavy_matches_dense(hits[h], dense_heavy(Q[h], K[h], eps), eps)


def assert_same_as_independent(mh: ls.MultiHeadKeySketch, K: np.ndarray, Q: np.ndarray, eps=None) -> None:
    hits = mh.heavy_entries(Q, eps=eps)
    sets = mh.universal_set()
    assert len(hits) == len(sets) == H
    for h in range(H):
        ref = ls.KeySketch(D, eps=mh.eps).update_many(K[h])
        np.testing.assert_array_equal(sets[h].ids, ref.universal_set().ids)
        want = ref.heavy_entries(Q[h], eps=eps)
        np.testing.assert_array_equal(hits[h].indptr, want.indptr)
        np.testing.assert_array_equal(hits[h].key_ids, want.key_ids)
        np.testing.assert_allclose(hits[h].values, want.values, rtol=VALUE_RTOL)
        dense = dense_heavy(Q[h], K[h], eps if eps is not None else mh.eps)
        assert hits[h].as_set() == set(dense)


@pytest.mark.parametrize("seed", [0, 1])
def test_equals_independent_per_head_sketches_and_brute_force(seed):
    K, Q = keys(seed=seed), queries(seed=seed)
    mh = ls.MultiHeadKeySketch(H, D, eps=EPS, block_rows=512)
    for part in np.array_split(np.arange(K.shape[1]), 5):
        mh.update_many(K[:, part])
    assert mh.n == K.shape[1] and mh.n_heads == H and mh.dim == D
    assert_same_as_independent(mh, K, Q)
    assert_same_as_independent(mh, K, Q, eps=0.2)
    assert_matches_brute_force(mh, K, Q)
    assert_matches_brute_force(mh, K, Q, eps=0.2)


# ------------------------------------------------------------------------- every p, hard queries
def hard_queries(K: np.ndarray, rng: np.random.Generator, m: int = 50) -> np.ndarray:
    """Random rows, key-aligned rows ``q = k_j`` and adversarial rows ``q = (K^T K)^-1 k_j`` for one
    head (j: the keys of largest leverage score and random keys), stacked."""
    top = np.argsort(-leverage_svd(K))[: m // 2]
    j = np.r_[top, rng.choice(K.shape[0], m - m // 2, replace=False)]
    adversarial = np.linalg.solve(K.T @ K, K[j].T).T
    return np.vstack([rng.standard_normal((m, K.shape[1])), K[j], adversarial])


def assert_coreset_guarantee(hits: ls.HeavyEntries, Q: np.ndarray, K: np.ndarray, eps: float,
                             p: float) -> int:
    """One head's answer against dense attention ``|<q, k>|^p / sum_l |<q, k_l>|^p``: no entry
    >= eps missing; every returned entry's true value >= eps (1 - delta)^2; true values within
    [lower, upper], or equal to the values when no bounds are given (the values then claim to be
    exact).  Returns the number of dense entries >= eps (for the caller's fixture check)."""
    B = np.abs(Q @ K.T) ** p
    A = B / B.sum(axis=1, keepdims=True)
    heavy = set(zip(*(x.tolist() for x in np.nonzero(A >= eps * (1 + TIE_RTOL)))))
    missing = heavy - hits.as_set()
    assert not missing, (f"p = {p}: {len(missing)} of {len(heavy)} dense entries >= eps missing, "
                         f"e.g. {sorted(missing)[:5]}")
    a = A[hits.rows(), hits.key_ids]
    low = a < eps * (1 - CORESET_DELTA) ** 2
    assert not low.any(), (f"p = {p}: {int(low.sum())} of {len(a)} returned entries have a true "
                           f"value below eps (1 - delta)^2, e.g. {a[low][:5]}")
    if hits.lower is None or hits.upper is None:
        np.testing.assert_allclose(hits.values, a, rtol=VALUE_RTOL, err_msg=f"p = {p}: values "
                                   "without lower/upper bounds must be the exact dense values")
    else:
        assert (hits.lower <= a * (1 + BOUND_RTOL)).all(), f"p = {p}: a true value below its lower"
        assert (a <= hits.upper * (1 + BOUND_RTOL)).all(), f"p = {p}: a true value above its upper"
    return len(heavy)


@pytest.mark.parametrize("p", [1.0, 3.0, 4.0])
def test_coreset_p_keysketch_passes_the_hard_query_check(p):
    """Control for the multi-head test below: the same check, keys and queries on one KeySketch."""
    rng = np.random.default_rng(7)
    K = heavy_tailed_keys(4000, 6, seed=70)
    Q = hard_queries(K, rng)
    sk = ls.KeySketch(6, eps=0.02, p=p, rng=0).update_many(K)
    n_heavy = assert_coreset_guarantee(sk.heavy_entries(Q), Q, K, 0.02, p)
    assert n_heavy > 100, "fixture must have heavy entries"


@pytest.mark.parametrize("p", [1.0, 3.0, 4.0])
def test_every_p_multi_head_returns_every_heavy_entry_within_the_coreset_bounds(p):
    """Issue 10: MultiHeadKeySketch with p != 2, 4000 heavy-tailed keys per head, random,
    key-aligned and adversarial queries, against dense attention with the same p."""
    rng = np.random.default_rng(7)
    K = np.stack([heavy_tailed_keys(4000, 6, seed=70 + h) for h in range(2)])
    Q = np.stack([hard_queries(K[h], rng) for h in range(2)])
    mh = ls.MultiHeadKeySketch(2, 6, eps=0.02, p=p).update_many(K)
    hits = mh.heavy_entries(Q)
    assert len(hits) == 2
    # (for p = 1 head 1 has one dominant key: 6 dense entries >= eps, head 0 has 109)
    n_heavy = [assert_coreset_guarantee(hits[h], Q[h], K[h], 0.02, p) for h in range(2)]
    assert min(n_heavy) > 0 and sum(n_heavy) > 100, n_heavy


def test_p2_multi_head_hard_queries_equal_brute_force():
    rng = np.random.default_rng(8)
    K = np.stack([heavy_tailed_keys(4000, 6, seed=80 + h) for h in range(2)])
    Q = np.stack([hard_queries(K[h], rng) for h in range(2)])
    mh = ls.MultiHeadKeySketch(2, 6, eps=0.02).update_many(K)
    for h, hits in enumerate(mh.heavy_entries(Q)):
        assert hits.lower is None and hits.upper is None  # exact mode
        assert_heavy_matches_dense(hits, dense_heavy(Q[h], K[h], 0.02), 0.02)


def test_normalizer_per_head():
    K, Q = keys(500), queries(7)
    mh = ls.MultiHeadKeySketch(H, D, eps=EPS).update_many(K)
    want = np.stack([((Q[h] @ K[h].T) ** 2).sum(axis=1) for h in range(H)])
    np.testing.assert_allclose(mh.normalizer(Q), want, rtol=1e-9)


def test_update_one_token_equals_chunk():
    K, Q = keys(300), queries(10)
    a = ls.MultiHeadKeySketch(H, D, eps=EPS)
    for t in range(K.shape[1]):
        a.update(K[:, t])
    b = ls.MultiHeadKeySketch(H, D, eps=EPS).update_many(K)
    assert a.n == b.n == K.shape[1]
    for sk in (a, b):
        assert_matches_brute_force(sk, K, Q)


def test_extend_mixes_tokens_and_chunks_all_or_nothing():
    K, Q = keys(500), queries(10)
    a = ls.MultiHeadKeySketch(H, D, eps=EPS).extend([K[:, 0], K[:, 1:200], *(K[:, t] for t in range(200, 500))])
    assert a.n == K.shape[1]
    assert_matches_brute_force(a, K, Q)
    c = ls.MultiHeadKeySketch(H, D, eps=EPS).update_many(K[:, :100])
    before = c.to_bytes()
    with pytest.raises(ValueError, match="item 1 rejected"):
        c.extend([K[:, 100:200], K[:, 200:300, :2]])
    assert c.n == 100 and c.to_bytes() == before  # all or nothing: item 0 was not kept either
    assert_matches_brute_force(c, K[:, :100], Q)


def test_merge_shards_with_offset_and_ids():
    K, Q = keys(1200), queries()
    a = ls.MultiHeadKeySketch(H, D, eps=EPS).update_many(K[:, :500])
    b = ls.MultiHeadKeySketch(H, D, eps=EPS).update_many(K[:, 500:900], offset=500)
    c = ls.MultiHeadKeySketch(H, D, eps=EPS).update_many(K[:, 900:], ids=np.arange(900, 1200))
    merged = (c + b).merge(a)
    assert merged.n == 1200
    assert_same_as_independent(merged, K, Q)
    with pytest.raises(ValueError, match="both sketches contain key id"):
        a.copy().merge(ls.MultiHeadKeySketch(H, D, eps=EPS).update_many(K[:, :10]))


def test_bytes_round_trip_then_more_updates_and_pickle(tmp_path):
    K, Q = keys(1000), queries()
    part = ls.MultiHeadKeySketch(H, D, eps=EPS).update_many(K[:, :400])
    restored = ls.MultiHeadKeySketch.from_bytes(part.to_bytes())
    restored.update_many(K[:, 400:])
    assert_same_as_independent(restored, K, Q)
    again = pickle.loads(pickle.dumps(restored))
    assert [h.as_set() for h in again.heavy_entries(Q)] == [h.as_set() for h in restored.heavy_entries(Q)]
    path = os.fspath(tmp_path / "mh.bin")
    restored.save(path)
    with open(path, "rb") as fh:
        assert ls.MultiHeadKeySketch.from_bytes(fh.read()).n == 1000


def test_copy_is_independent():
    K, Q = keys(600), queries(10)
    a = ls.MultiHeadKeySketch(H, D, eps=EPS).update_many(K[:, :300])
    before = a.to_bytes()
    b = a.copy()
    b.update_many(K[:, 300:])
    assert a.n == 300 and b.n == 600
    assert a.to_bytes() == before
    assert_matches_brute_force(a, K[:, :300], Q)  # the original answers for its own keys only
    assert_matches_brute_force(b, K, Q)
    a.update_many(K[:, 300:350])  # and feeding the original leaves the copy alone
    assert b.n == 600
    assert_matches_brute_force(b, K, Q)


def test_bad_input_leaves_sketch_unchanged():
    K, Q = keys(400), queries(5)
    mh = ls.MultiHeadKeySketch(H, D, eps=EPS).update_many(K[:, :200])
    before = (mh.n, [h.as_set() for h in mh.heavy_entries(Q)], mh.to_bytes())
    bad = K[:, 200:].copy()
    bad[2, 5, 1] = np.inf
    with pytest.raises(ValueError, match="finite"):
        mh.update_many(bad)
    with pytest.raises(ValueError, match=r"shape \(n_heads, m, dim\)"):
        mh.update_many(K[:2, 200:])
    with pytest.raises(ValueError, match="ids clash"):
        mh.update_many(K[:, 200:210], ids=np.arange(190, 200))
    with pytest.raises(ValueError, match="one id per row"):
        mh.update_many(K[:, 200:210], ids=np.arange(3))
    with pytest.raises(TypeError, match="real"):
        mh.update_many(K[:, 200:].astype(complex))
    with pytest.raises(ValueError, match="different"):
        mh.merge(ls.MultiHeadKeySketch(H + 1, D, eps=EPS))
    with pytest.raises(TypeError, match="MultiHeadKeySketch"):
        mh.merge(ls.KeySketch(D, eps=EPS))
    with pytest.raises(ValueError, match=r"eps must be >="):
        mh.heavy_entries(Q, eps=0.01)
    with pytest.raises(ValueError, match="Q must have shape"):
        mh.heavy_entries(Q[0])
    assert (mh.n, [h.as_set() for h in mh.heavy_entries(Q)], mh.to_bytes()) == before


def test_corrupted_or_foreign_bytes_raise():
    mh = ls.MultiHeadKeySketch(H, D, eps=EPS).update_many(keys(100))
    data = bytearray(mh.to_bytes())
    data[-3] ^= 0xFF
    with pytest.raises(ValueError, match="corrupted"):
        ls.MultiHeadKeySketch.from_bytes(bytes(data))
    with pytest.raises(ValueError, match="not a MultiHeadKeySketch"):
        ls.MultiHeadKeySketch.from_bytes(ls.KeySketch(D, eps=EPS).to_bytes())


def test_real_transformer_heads():
    data = np.load(os.path.join(os.path.dirname(__file__), "data", "minilm_qkv.npz"))
    K = data["K"].astype(np.float64).reshape(-1, *data["K"].shape[2:])  # (layers*heads, n, d)
    Q = data["Q"].astype(np.float64).reshape(K.shape[0], -1, K.shape[2])
    mh = ls.MultiHeadKeySketch(K.shape[0], K.shape[2], eps=0.1).update_many(K)
    for h, hits in enumerate(mh.heavy_entries(Q)):
        assert hits.as_set() == set(dense_heavy(Q[h], K[h], 0.1))


# ---------------------------------------------------------------------------------------------- review fixes
@pytest.mark.parametrize("how", ["update_many", "update"])
def test_gated_rows_after_buffered_tokens_take_the_next_ids(how):
    """Tokens fed one at a time wait in the multi-head buffer; a gated call after them numbers its rows after
    theirs (it once numbered them from the heads' counter, which did not count the buffered tokens yet: every
    head held duplicate ids and answered with the wrong tokens).  Every head ends as an independent KeySketch
    fed the same calls, bit for bit."""
    rng = np.random.default_rng(3)
    K = rng.standard_normal((H, 6, D))
    g = np.array([0.9, 0.8])
    mh = ls.MultiHeadKeySketch(H, D, eps=EPS)
    singles = [ls.KeySketch(D, eps=EPS) for _ in range(H)]
    for t in range(3):
        mh.update(K[:, t])
        for h in range(H):
            singles[h].update(K[h, t])
    if how == "update_many":
        mh.update_many(K[:, 3:5], gates=g)
        for h in range(H):
            singles[h].update_many(K[h, 3:5], gates=g)
    else:
        mh.update(K[:, 3], gate=0.9)
        for h in range(H):
            singles[h].update(K[h, 3], gate=0.9)
    assert mh.next_id == singles[0].next_id
    for h in range(H):
        assert mh.heads[h].to_bytes() == singles[h].to_bytes()
    Q = queries(5)
    for h, hits in enumerate(mh.heavy_entries(Q)):
        want = singles[h].heavy_entries(Q[h])
        np.testing.assert_array_equal(hits.key_ids, want.key_ids)


@pytest.mark.parametrize("forget", ["decay", "gates"])
def test_normalizer_of_a_stream_that_forgets_is_the_decayed_one(forget):
    """``normalizer`` of every head is the decayed ``Z = sum_j c_j <q, k_j>^2`` (it once left out the frame's
    factor ``e^-E``: off by up to e^100)."""
    n = 300
    K = keys(n, seed=4)
    Q = queries(4)
    if forget == "decay":
        mh = ls.MultiHeadKeySketch(H, D, eps=EPS, decay=0.95).update_many(K)
        log_c = np.arange(n - 1, -1, -1) * np.log(0.95)
    else:
        gates = np.random.default_rng(4).uniform(0.5, 1.0, n)
        mh = ls.MultiHeadKeySketch(H, D, eps=EPS).update_many(K, gates=gates)
        log_c = np.concatenate([np.cumsum(np.log(gates[:0:-1]))[::-1], [0.0]])  # c_j = g_{j+1} ... g_n
    got = mh.normalizer(Q)
    for h in range(H):
        want = ((Q[h] @ K[h].T) ** 2 * np.exp(log_c)).sum(axis=1)
        np.testing.assert_allclose(got[h], want, rtol=VALUE_RTOL)


def test_a_token_refused_for_its_moment_terms_leaves_every_head_as_it_was():
    """Heads off the step path (p = 4, exact outputs): a token whose moment terms overflow in head 1 only is refused
    before any head takes it (head 0 once took it, leaving the heads out of step: their bytes then failed to
    load)."""
    rng = np.random.default_rng(0)
    mh = ls.MultiHeadKeySketch(2, 3, eps=0.1, p=4, exact=True, value_dim=1, exact_output=True)
    mh.update_many(rng.standard_normal((2, 5, 3)), rng.standard_normal((2, 5, 1)))
    before = mh.to_bytes()
    x, v = rng.standard_normal((2, 3)), rng.standard_normal((2, 1))
    x[1], v[1] = 1e80, 1e10
    with pytest.raises(ValueError, match="head 1"):
        mh.update(x, v)
    assert mh.to_bytes() == before
    mh.update(rng.standard_normal((2, 3)), rng.standard_normal((2, 1)))
    assert ls.MultiHeadKeySketch.from_bytes(mh.to_bytes()).n == 6


# ------------------------------------------------------------------ the result of many heads
def assert_stacked_as_heads(hits: ls.HeadEntries, n_heads: int, m: int) -> None:
    """The stacked arrays of ``hits`` hold exactly the entries of its per-head :class:`HeavyEntries`."""
    assert isinstance(hits, ls.HeadEntries) and len(hits) == n_heads and hits.n_queries == m
    assert hits.head_starts.tolist()[0] == 0 and hits.head_starts[-1] == hits.n_entries == len(hits.key_ids)
    assert hits.indptr.shape == (n_heads, m + 1)
    for h, head in enumerate(hits):
        s, e = hits.head_starts[h], hits.head_starts[h + 1]
        assert head.n_queries == m and head.indptr.tolist() == hits.indptr[h].tolist()
        assert head.key_ids.tolist() == hits.key_ids[s:e].tolist()
        assert head.values.tolist() == hits.values[s:e].tolist()
        for name in ("lower", "upper"):
            mine, stacked = getattr(head, name), getattr(hits, name)
            assert (mine is None) == (stacked is None)
            if mine is not None:
                assert mine.tolist() == stacked[s:e].tolist()
    for arr in (hits.head_starts, hits.indptr, hits.key_ids, hits.values):
        assert not arr.flags.writeable


@pytest.mark.parametrize("m", [1, 3, 20])  # the live step (one compiled call over heads) and the general path
def test_head_entries_hold_every_head_as_brute_force(m):
    K, Q = keys(2000, seed=3), queries(m, seed=5)
    mh = ls.MultiHeadKeySketch(H, D, eps=EPS)
    for a in range(0, 2000, 400):
        mh.update_many(K[:, a : a + 400])
    mh.update(K[:, 0] * 0.5)  # a token waiting in the step buffer
    Kall = np.concatenate([K, 0.5 * K[:, :1]], axis=1)
    hits = mh.heavy_entries(Q)
    assert_stacked_as_heads(hits, H, m)
    for h in range(H):
        assert_heavy_matches_dense(hits[h], dense_heavy(Q[h], Kall[h], EPS), EPS)
        assert hits[h] is hits[h] is hits[h - H]  # built once
    result = ls.MultiHeadKeySketch(H, D, eps=EPS, value_dim=2).update_many(K, np.ones((H, 2000, 2))).attend(Q)
    assert_stacked_as_heads(result.entries, H, m)


def test_head_entries_of_a_coreset_p_keep_their_bounds():
    K = np.stack([heavy_tailed_keys(3000, 6, seed=80 + h) for h in range(2)])
    Q = np.random.default_rng(3).standard_normal((2, 5, 6))
    hits = ls.MultiHeadKeySketch(2, 6, eps=0.02, p=1.0).update_many(K).heavy_entries(Q)
    assert hits.lower is not None and hits.upper is not None and hits.n_entries > 0
    assert_stacked_as_heads(hits, 2, 5)


def test_head_entries_index_like_a_read_only_sequence():
    K, Q = keys(600, seed=4), queries(2, seed=6)
    mh = ls.MultiHeadKeySketch(H, D, eps=EPS).update_many(K)
    hits = mh.heavy_entries(Q)
    heads = list(hits)
    assert [x is y for x, y in zip(hits[::-1], heads[::-1])] == [True] * H
    # indexed as a list is: anything with __index__ (a NumPy integer, a 0-d integer array, a bool)
    assert hits[1:] == heads[1:] and hits[np.int64(2)] is heads[2] and hits[np.array(1)] is heads[1]
    assert hits[True] is heads[1] and hits[-1] is heads[H - 1]
    for bad, error in ((H, IndexError), (-H - 1, IndexError), (1.0, TypeError), ("0", TypeError)):
        with pytest.raises(error, match="head index"):
            hits[bad]  # type: ignore[index]
    with pytest.raises(AttributeError, match="read-only: cannot set"):
        hits.eps = 0.5  # type: ignore[misc]
    with pytest.raises(AttributeError, match="read-only: cannot delete"):
        del hits.eps
    with pytest.raises(ValueError, match="read-only"):
        hits.key_ids[:1] = 0
    assert repr(hits) == f"HeadEntries(heads={H}, queries=2, entries={hits.n_entries}, eps={EPS:g})"
    again = pickle.loads(pickle.dumps(hits))
    assert_stacked_as_heads(again, H, 2)
    assert [h.as_set() for h in again] == [h.as_set() for h in hits]
    assert again.values.tolist() == hits.values.tolist()


def test_head_entries_read_by_many_threads_give_one_object_per_head():
    """The per-head objects are made when first read; threads reading a fresh result at once all get the one object
    published first (the switch interval forced down so that they interleave inside the first read)."""
    import sys
    import threading

    K, Q = keys(600, seed=4), queries(1, seed=6)
    mh = ls.MultiHeadKeySketch(H, D, eps=EPS).update_many(K)
    results = [mh.heavy_entries(Q) for _ in range(300)]
    seen: list[list[list[int]]] = [[] for _ in range(4)]
    start = threading.Barrier(4)

    def read(t: int) -> None:
        start.wait()
        seen[t] = [[id(hits[h]) for h in range(H)] for hits in results]

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=read, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        sys.setswitchinterval(interval)
    assert seen[0] == seen[1] == seen[2] == seen[3]
    assert seen[0] == [[id(hits[h]) for h in range(H)] for hits in results]


def test_head_entries_stack_per_head_results_and_refuse_what_cannot_be_stacked():
    one = ls.testing.heavy_entries_dense(np.ones((1, 2)), np.eye(2), eps=0.1, p=2)
    two = ls.testing.heavy_entries_dense(np.ones((2, 2)), np.eye(2), eps=0.1, p=2)
    other_eps = ls.testing.heavy_entries_dense(np.ones((1, 2)), np.eye(2), eps=0.2, p=2)
    with pytest.raises(ValueError, match="at least one head"):
        ls.HeadEntries([])
    with pytest.raises(ValueError, match=r"same query rows; got \[1, 2\]"):
        ls.HeadEntries([one, two])
    with pytest.raises(ValueError, match=r"same threshold eps; got \[0.1, 0.2\]"):
        ls.HeadEntries([one, other_eps])
    both = ls.HeadEntries([one, one])
    assert both.head_starts.tolist() == [0, 2, 4] and both[1] is one and both.lower is None
    # bounds of some heads only: exact values are their own bounds
    bounded = ls.HeavyEntries.of(one.indptr, one.key_ids, one.values, 0.1, one.values * 0.9, one.values * 1.1)
    mixed = ls.HeadEntries([bounded, one])
    assert mixed.lower.tolist() == (one.values * 0.9).tolist() + one.values.tolist()
    assert mixed.upper.tolist() == (one.values * 1.1).tolist() + one.values.tolist()


def test_multi_head_attend_of_a_coreset_p_keeps_the_bounds_of_every_head():
    """Found in review: the general path stacked the heads' outputs but dropped their bounds."""
    K = np.stack([heavy_tailed_keys(3000, 6, seed=90 + h) for h in range(2)])
    V = np.random.default_rng(4).standard_normal((2, 3000, 3))
    Q = np.random.default_rng(5).standard_normal((2, 4, 6))
    mh = ls.MultiHeadKeySketch(2, 6, eps=0.02, p=1.0, value_dim=3).update_many(K, V)
    got = mh.attend(Q)
    assert got.captured_mass_bounds is not None and got.heavy_output_bounds is not None
    for h in range(2):
        want = ls.MultiHeadKeySketch(2, 6, eps=0.02, p=1.0, value_dim=3).update_many(K, V)._heads[h].attend(Q[h])
        assert want.captured_mass_bounds is not None and want.heavy_output_bounds is not None
        for mine, theirs in zip(got.captured_mass_bounds, want.captured_mass_bounds):
            assert np.allclose(mine[h], theirs, rtol=1e-12, atol=0)
        for mine, theirs in zip(got.heavy_output_bounds, want.heavy_output_bounds):
            assert np.allclose(mine[h], theirs, rtol=1e-12, atol=1e-300)
        lo, hi = got.captured_mass_bounds
        assert (lo[h] <= got.captured_mass[h]).all() and (got.captured_mass[h] <= hi[h]).all()


def test_load_reads_a_multi_head_save(tmp_path):
    """Found in review: ``ls.load`` read only single-head files (a multi-head save had no loader but from_bytes)."""
    K, Q = keys(800, seed=8), queries(3, seed=9)
    mh = ls.MultiHeadKeySketch(H, D, eps=EPS).update_many(K)
    mh.save(tmp_path / "heads.lvs")
    again = ls.load(tmp_path / "heads.lvs")
    assert isinstance(again, ls.MultiHeadKeySketch) and again.to_bytes() == mh.to_bytes()
    assert [h.as_set() for h in again.heavy_entries(Q)] == [h.as_set() for h in mh.heavy_entries(Q)]
    one = ls.KeySketch(D, eps=EPS).update_many(K[0])
    one.save(tmp_path / "one.lvs")
    assert isinstance(ls.load(tmp_path / "one.lvs"), ls.KeySketch)
    (tmp_path / "bad.lvs").write_bytes(b"not a sketch at all" * 10)
    with pytest.raises(ValueError, match="not a levstream sketch"):
        ls.load(tmp_path / "bad.lvs")
