"""MultiHeadKeySketch: equal to independent per-head KeySketch objects, and to brute force."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
from conftest import VALUE_RTOL, heavy_tailed_keys
from naive import dense_heavy, leverage_svd

import levstream as ls

H, D, EPS = 3, 6, 0.05


def keys(n=2500, seed=0):
    return np.stack([heavy_tailed_keys(n, D, seed=seed * 10 + h) for h in range(H)])


def queries(m=40, seed=99):
    return np.random.default_rng(seed).standard_normal((H, m, D))


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
    for h, U in enumerate(mh.universal_set()):
        np.testing.assert_array_equal(U.ids, np.flatnonzero(leverage_svd(K[h]) >= EPS))


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
    for x, y in zip(a.heavy_entries(Q), b.heavy_entries(Q)):
        assert x.as_set() == y.as_set()


def test_extend_mixes_tokens_and_chunks_all_or_nothing():
    K, Q = keys(500), queries(10)
    a = ls.MultiHeadKeySketch(H, D, eps=EPS).extend([K[:, 0], K[:, 1:200], *(K[:, t] for t in range(200, 500))])
    b = ls.MultiHeadKeySketch(H, D, eps=EPS).update_many(K)
    assert [x.as_set() for x in a.heavy_entries(Q)] == [y.as_set() for y in b.heavy_entries(Q)]
    c = ls.MultiHeadKeySketch(H, D, eps=EPS).update_many(K[:, :100])
    with pytest.raises(ValueError, match="item 1 rejected"):
        c.extend([K[:, 100:200], K[:, 200:300, :2]])
    assert c.n == 100


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
    K = keys(600)
    a = ls.MultiHeadKeySketch(H, D, eps=EPS).update_many(K[:, :300])
    b = a.copy()
    b.update_many(K[:, 300:])
    assert a.n == 300 and b.n == 600


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
