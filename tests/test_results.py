"""Queries and their result objects: ``heavy_entries`` (CSR ``HeavyEntries``), ``top_k`` (``TopK``),
``normalizer`` and ``UniversalSet``, all against dense NumPy attention."""

from __future__ import annotations

import pickle

import naive
import numpy as np
import pytest
import scipy.sparse as sp
from conftest import NORMALIZER_RTOL, VALUE_RTOL, assert_heavy_matches_dense, heavy_tailed_keys

import levstream as ls

EPS = 0.02
DIM = 8


@pytest.fixture(scope="module")
def built(keys):
    return ls.KeySketch(DIM, eps=EPS, block_rows=512).update_many(keys)


@pytest.fixture(scope="module")
def many_queries():
    """More rows than one query block (QUERY_BLOCK_ROWS = 256), with zero and repeated rows mixed in."""
    rng = np.random.default_rng(31)
    Q = rng.standard_normal((600, DIM))
    Q[[0, 17, 599]] = 0.0
    Q[300] = Q[299]
    return Q


# ---------------------------------------------------------------------------------------------- heavy_entries
@pytest.mark.parametrize("eps", [EPS, 0.03, 0.1, 0.5, 1.0])
def test_heavy_entries_equal_dense_for_any_threshold_at_least_eps(built, keys, many_queries, eps):
    hits = built.heavy_entries(many_queries, eps=eps)
    assert hits.eps == eps
    assert_heavy_matches_dense(hits, naive.dense_heavy(many_queries, keys, eps), eps)


def test_heavy_entries_csr_structure(built, keys, many_queries):
    hits = built.heavy_entries(many_queries)
    m = many_queries.shape[0]
    assert hits.n_queries == m and hits.indptr.shape == (m + 1,)
    assert hits.indptr.dtype == np.int64 and hits.key_ids.dtype == np.int64 and hits.values.dtype == np.float64
    assert hits.indptr[0] == 0 and hits.indptr[-1] == len(hits) and np.all(np.diff(hits.indptr) >= 0)
    assert len(hits) > m, "fixture should give several entries per query"
    for i, (ids, vals) in enumerate(hits):
        assert np.all(np.diff(ids) > 0), f"key ids of row {i} not ascending"
        s, e = hits.indptr[i], hits.indptr[i + 1]
        np.testing.assert_array_equal(ids, hits.key_ids[s:e])
        np.testing.assert_array_equal(vals, hits.values[s:e])
    assert sum(1 for _ in hits) == m
    np.testing.assert_array_equal(hits.rows(), np.repeat(np.arange(m), np.diff(hits.indptr)))
    for i in (0, 17, 599):  # zero queries
        assert hits.row(i)[0].size == 0
    np.testing.assert_array_equal(hits.row(300)[0], hits.row(299)[0])
    np.testing.assert_array_equal(hits.row(-1)[0], hits.row(m - 1)[0])
    with pytest.raises(IndexError, match=f"query row must be in \\[0, {m}\\); got {m}"):
        hits.row(m)
    assert not hits.key_ids.flags.writeable and not hits.values.flags.writeable
    assert hits.lower is None and hits.upper is None
    assert f"queries={m}" in repr(hits)


def test_heavy_entries_to_scipy_equals_thresholded_dense(built, keys, many_queries):
    hits = built.heavy_entries(many_queries)
    M = hits.to_scipy(len(keys))
    assert sp.issparse(M) and M.shape == (many_queries.shape[0], len(keys))
    A = naive.dense_attention(many_queries, keys)
    dense = np.where(A >= EPS, A, 0.0)
    np.testing.assert_allclose(M.toarray(), dense, rtol=VALUE_RTOL, atol=0)
    with pytest.raises(ValueError, match="n_keys must exceed the largest key id"):
        hits.to_scipy(int(hits.key_ids.max()))


def test_heavy_entries_with_shard_ids_names_global_keys(keys, many_queries):
    """Keys fed with explicit ids are reported under those ids (not their position in the sketch)."""
    rng = np.random.default_rng(2)
    ids = rng.choice(10**12, size=len(keys), replace=False)
    sk = ls.KeySketch(DIM, eps=EPS).update_many(keys, ids=ids)
    assert_heavy_matches_dense(sk.heavy_entries(many_queries), naive.dense_heavy(many_queries, keys, EPS, ids=ids),
                               EPS)
    for row_ids, _ in sk.heavy_entries(many_queries):
        assert np.all(np.diff(row_ids) > 0)


def test_heavy_entries_below_sketch_eps_is_rejected(built, many_queries):
    with pytest.raises(ValueError, match=r"eps must be >= the sketch's eps \(0.02\); got 0.01"):
        built.heavy_entries(many_queries, eps=0.01)


def test_heavy_entries_of_no_queries_and_of_an_empty_sketch(built):
    hits = built.heavy_entries(np.zeros((0, DIM)))
    assert hits.n_queries == 0 and len(hits) == 0 and hits.indptr.tolist() == [0]
    empty = ls.KeySketch(DIM, eps=EPS)
    hits = empty.heavy_entries(np.ones((3, DIM)))
    assert hits.indptr.tolist() == [0, 0, 0, 0] and len(empty.universal_set()) == 0
    np.testing.assert_array_equal(empty.normalizer(np.ones((2, DIM))), 0.0)


def test_heavy_entries_query_list_input(built, keys):
    Q = [[1.0] * DIM, [0.0] * (DIM - 1) + [2.0]]
    assert built.heavy_entries(Q).as_set() == set(naive.dense_heavy(np.array(Q), keys, EPS))


# ---------------------------------------------------------------------------------------------- normalizer
def test_normalizer_equals_sum_of_squares(built, keys, many_queries):
    np.testing.assert_allclose(built.normalizer(many_queries), naive.dense_normalizer(many_queries, keys),
                               rtol=NORMALIZER_RTOL)
    assert built.normalizer(np.zeros((0, DIM))).shape == (0,)


def test_normalizer_counts_keys_that_are_no_longer_retained(keys):
    """Z(q) is over *all* keys, including the many light keys the sketch dropped."""
    sk = ls.KeySketch(DIM, eps=EPS).update_many(keys)
    sk.flush()  # folds the input buffer in and settles the candidates
    assert sk.num_retained < len(keys) / 10
    q = np.random.default_rng(1).standard_normal((1, DIM))
    assert sk.normalizer(q)[0] == pytest.approx(float(((keys @ q[0]) ** 2).sum()), rel=NORMALIZER_RTOL)


# ---------------------------------------------------------------------------------------------- top_k
@pytest.mark.parametrize("k", [1, 3, 10])
def test_top_k_certified_rows_are_the_dense_top_k(built, keys, many_queries, k):
    top = built.top_k(many_queries, k)
    m = many_queries.shape[0]
    assert top.key_ids.shape == (m, k) and top.values.shape == (m, k) and top.certified.shape == (m,)
    A = naive.dense_attention(many_queries, keys)
    _, vals = naive.dense_top_k(many_queries, keys, k)
    U = set(built.universal_set().ids.tolist())
    n_cert = 0
    for i in range(m):
        live = top.key_ids[i] >= 0
        ids = top.key_ids[i][live]
        # values are the exact dense values of the returned keys, in decreasing order
        np.testing.assert_allclose(top.values[i][live], A[i, ids], rtol=VALUE_RTOL)
        assert np.all(np.diff(top.values[i][live]) <= 0)
        assert set(ids.tolist()) <= set(range(keys.shape[0]))
        if top.certified[i]:
            n_cert += 1
            assert top.values[i, -1] >= EPS
            np.testing.assert_allclose(top.values[i], vals[i], rtol=VALUE_RTOL)
            kth = vals[i, -1]
            strictly_above = set(np.flatnonzero(A[i] > kth * (1 + 1e-12)).tolist())
            assert strictly_above <= set(ids.tolist())
        else:
            # the k-th largest dense value is below eps (or the query is zero): certification is impossible
            assert not (A[i].sum() > 0 and vals[i, -1] >= EPS * (1 + 1e-9))
            # whatever is returned is the top of a superset of the universal set (the keys the sketch holds):
            # position by position at least the top of the universal set itself
            cols = np.array(sorted(U))
            best = np.sort(A[i, cols])[::-1][: live.sum()]
            assert np.all(top.values[i][live][: best.size] >= best * (1 - VALUE_RTOL))
    if k == 1:
        assert n_cert > m / 4, "fixture should certify many rows at k = 1"
    for i in (0, 17, 599):
        assert not top.certified[i] and (top.key_ids[i] == -1).all() and np.isnan(top.values[i]).all()


def test_top_k_larger_than_the_universal_set_pads_and_does_not_certify(built, many_queries):
    u = built.num_retained  # top_k ranks the keys the sketch holds (every key of the universal set, maybe more)
    assert u >= len(built.universal_set())
    top = built.top_k(many_queries[:5], u + 3)
    assert (top.key_ids[:, u:] == -1).all() and np.isnan(top.values[:, u:]).all()
    assert not top.certified.any()
    assert len(top) == 5 and "k=" in repr(top)


def test_top_k_tight_construction():
    d, m = 4, 5
    K = np.tile(np.eye(d), (m, 1))
    sk = ls.KeySketch(d, eps=1 / m).update_many(K)
    top = sk.top_k(np.eye(d), m)
    assert top.certified.all()
    np.testing.assert_allclose(top.values, 1 / m, rtol=VALUE_RTOL)
    for i in range(d):
        assert sorted(top.key_ids[i].tolist()) == [i + d * r for r in range(m)]


# ---------------------------------------------------------------------------------------------- UniversalSet
def test_universal_set_result_object(built, keys):
    U = built.universal_set()
    assert len(U) == U.ids.size and U.keys.shape == (len(U), DIM) and U.scores.shape == (len(U),)
    assert U.eps == EPS and U.p == 2 and U.n == len(keys)
    assert U.size_bound == pytest.approx(DIM / EPS) and len(U) <= U.size_bound
    assert int(U.ids[0]) in U and np.int64(U.ids[-1]) in U and -1 not in U and "x" not in U
    assert all(j not in U for j in set(range(len(keys))) - set(U.ids.tolist()))
    with pytest.raises(ValueError):
        U.ids[0] = 5
    with pytest.raises(AttributeError):
        U.eps = 0.5
    assert "UniversalSet(size=" in repr(U)


def test_results_do_not_alias_sketch_state(keys):
    sk = ls.KeySketch(DIM, eps=EPS).update_many(keys[:1000])
    U = sk.universal_set()
    ids, rows = U.ids.copy(), U.keys.copy()
    sk.update_many(heavy_tailed_keys(2000, DIM, seed=9) * 50)
    sk.universal_set()
    np.testing.assert_array_equal(U.ids, ids)
    np.testing.assert_array_equal(U.keys, rows)


def test_results_pickle_copy_and_load_those_pickled_by_0_2_0():
    """HeavyEntries and AttentionResult hold slots: they pickle, copy and deep-copy with every field, and results
    pickled by levstream 0.2.0 (one dict per object, committed in tests/data/results_pickles/) load with their
    fields and answers; the entries are checked against brute force over the keys stored with them."""
    import copy
    import pickle
    from pathlib import Path

    path = Path(__file__).parent / "data" / "results_pickles" / "results_0.2.0.pkl"
    with path.open("rb") as f:
        old = pickle.load(f)
    h, r = old["heavy_entries"], old["attention"]
    assert isinstance(h, ls.HeavyEntries) and isinstance(r, ls.AttentionResult)
    Q, K, V = old["queries"], old["keys"], old["values"]
    A = (Q @ K.T) ** 2
    A /= A.sum(axis=1, keepdims=True)
    assert h.as_set() == {(int(i), int(j)) for i, j in zip(*np.nonzero(A >= h.eps))}
    np.testing.assert_allclose(h.values, A[h.rows(), h.key_ids], rtol=VALUE_RTOL)
    W = np.tril((K @ K.T) ** 2)  # causal self-attention of the chunk
    np.testing.assert_allclose(r.output, W @ V / W.sum(axis=1, keepdims=True), rtol=1e-10)
    assert isinstance(r.entries, ls.HeavyEntries) and r.entries.n_queries == K.shape[0]
    for obj in (h, r):
        for clone in (pickle.loads(pickle.dumps(obj)), copy.copy(obj), copy.deepcopy(obj)):
            assert type(clone) is type(obj) and repr(clone) == repr(obj)
    again = pickle.loads(pickle.dumps(h))
    np.testing.assert_array_equal(again.indptr, h.indptr)
    np.testing.assert_array_equal(again.key_ids, h.key_ids)
    np.testing.assert_array_equal(again.values, h.values)
    assert again.eps == h.eps and again.lower is None and again.upper is None


def test_results_stay_read_only_through_pickle_and_deepcopy():
    """Results are immutable, their arrays read-only; pickle and deepcopy once handed them back writeable."""
    import copy

    rng = np.random.default_rng(0)
    K, V = rng.standard_normal((300, 4)), rng.standard_normal((300, 2))
    sk = ls.KeySketch(4, eps=0.05, value_dim=2, exact_output=True).update_many(K, V)
    Q = rng.standard_normal((3, 4))
    for result in (sk.heavy_entries(Q), sk.attend(Q), sk.top_k(Q, 3), sk.universal_set()):
        for again in (pickle.loads(pickle.dumps(result)), copy.deepcopy(result)):
            arrays = [v for v in vars(again).values()] if hasattr(again, "__dict__") else [
                getattr(again, name) for name in again.__slots__
            ]
            if isinstance(again, ls.AttentionResult):
                arrays += [again.entries.indptr, again.entries.key_ids, again.entries.values]
            arrays = [a for a in arrays if isinstance(a, np.ndarray)]
            assert arrays and not any(a.flags.writeable for a in arrays), type(again).__name__


def test_to_scipy_is_an_ordinary_matrix():
    """``to_scipy`` copies: the matrix can be changed in place, and the result does not change with it."""
    hits = ls.testing.heavy_entries_dense(np.array([[1.0, 0.0]]), np.array([[1.0, 0.0], [1.0, 1.0]]), eps=0.1)
    S = hits.to_scipy(2)
    S *= 2
    S[0, 1] = 0.5
    np.testing.assert_allclose(hits.values, [0.5, 0.5])
    assert S[0, 1] == 0.5
