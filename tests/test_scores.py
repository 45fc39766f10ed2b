"""Offline functions (``leverage_scores``, ``universal_set``) and the ``levstream.testing`` oracles against the naive twins."""

from __future__ import annotations

import naive
import numpy as np
import pytest
from conftest import SCORE_RTOL, SEEDS, VALUE_RTOL, assert_matches_offline, heavy_tailed_keys

import levstream as ls


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", [(500, 6), (40, 12), (7, 7), (3, 9)])
def test_leverage_scores_match_svd_qr_and_pinv(seed, shape):
    K = heavy_tailed_keys(*shape, seed=seed)
    tau = ls.leverage_scores(K)
    np.testing.assert_allclose(tau, naive.leverage_svd(K), rtol=SCORE_RTOL, atol=1e-14)
    if shape[0] >= shape[1]:
        np.testing.assert_allclose(tau, naive.leverage_qr(K), rtol=SCORE_RTOL, atol=1e-14)
        np.testing.assert_allclose(tau, naive.leverage_pinv(K), rtol=1e-7, atol=1e-12)


def test_leverage_scores_sum_to_rank_and_lie_in_unit_interval():
    rng = np.random.default_rng(3)
    K = rng.standard_normal((300, 3)) @ rng.standard_normal((3, 10))  # rank 3
    tau = ls.leverage_scores(K)
    assert tau.sum() == pytest.approx(3.0, rel=1e-12)
    assert (tau >= -1e-15).all() and (tau <= 1 + 1e-12).all()
    np.testing.assert_allclose(tau, naive.leverage_svd(K), rtol=SCORE_RTOL, atol=1e-14)


def test_leverage_scores_known_values():
    K = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 0.0]])
    np.testing.assert_allclose(ls.leverage_scores(K), [1.0, 0.5, 0.5, 0.0], atol=1e-15)
    np.testing.assert_array_equal(ls.leverage_scores(np.zeros((4, 3))), np.zeros(4))


def test_leverage_scores_invariant_under_invertible_column_transform():
    K = heavy_tailed_keys(400, 5, seed=4)
    G = np.random.default_rng(5).standard_normal((5, 5)) + 5 * np.eye(5)
    np.testing.assert_allclose(ls.leverage_scores(K @ G), ls.leverage_scores(K), rtol=1e-9)


def test_leverage_scores_invariant_under_extreme_column_scaling():
    """tau(K D) = tau(K) for any invertible diagonal D, even when D spans 1e-60 .. 1e60
    (docs/theory.md, "Proofs", 4)."""
    K = heavy_tailed_keys(300, 6, seed=10)
    D = np.array([1e-60, 1e-20, 1.0, 1e3, 1e30, 1e60])
    np.testing.assert_allclose(ls.leverage_scores(K * D), ls.leverage_scores(K), rtol=1e-9)
    np.testing.assert_allclose(naive.leverage_svd(K * D), naive.leverage_svd(K), rtol=1e-9)


@pytest.mark.parametrize("eps", [0.01, 0.05, 0.3])
def test_offline_universal_set_matches_naive(eps):
    K = heavy_tailed_keys(2000, 8, seed=7)
    tau = naive.leverage_svd(K)
    U = ls.universal_set(K, eps=eps)
    assert_matches_offline(U.ids, tau, eps)
    assert U.ids.dtype == np.int64 and np.all(np.diff(U.ids) > 0)
    np.testing.assert_array_equal(U.keys, K[U.ids])
    np.testing.assert_allclose(U.scores, tau[U.ids], rtol=SCORE_RTOL)
    assert len(U) <= 8 / eps and U.n == 2000 and U.eps == eps and U.p == 2


def test_offline_universal_set_rejects_bad_p_and_eps():
    K = np.eye(3)
    with pytest.raises(ValueError, match="p must satisfy 0.01 <= p <= 32; got -1.0"):
        ls.universal_set(K, eps=0.1, p=-1)
    with pytest.raises(ValueError, match="1e-300 <= eps <= 1; got 0.0"):
        ls.universal_set(K, eps=0.0)
    with pytest.raises(ValueError, match="must be 2-D"):
        ls.leverage_scores(np.ones(3))


@pytest.mark.parametrize("seed", SEEDS)
def test_heavy_entries_dense_oracle_matches_naive(seed):
    K = heavy_tailed_keys(700, 6, seed=seed)
    Q = np.random.default_rng(seed + 50).standard_normal((130, 6))  # more than one block of 64 queries
    hits = ls.testing.heavy_entries_dense(Q, K, eps=0.02)
    expected = naive.dense_heavy(Q, K, 0.02)
    got = dict(zip(zip(hits.rows().tolist(), hits.key_ids.tolist()), hits.values.tolist()))
    assert got.keys() == expected.keys()
    for e, v in expected.items():
        assert got[e] == pytest.approx(v, rel=VALUE_RTOL)


def test_dense_attention_oracle_matches_naive():
    K = heavy_tailed_keys(100, 4, seed=1)
    Q = np.vstack([np.random.default_rng(2).standard_normal((5, 4)), np.zeros((1, 4))])
    np.testing.assert_allclose(ls.testing.dense_attention(Q, K), naive.dense_attention(Q, K), rtol=1e-12)


def test_exact_sensitivities_p2_equal_leverage_scores():
    K = heavy_tailed_keys(30, 4, seed=2)
    np.testing.assert_allclose(ls.testing.exact_sensitivities(K, p=2), naive.leverage_svd(K), rtol=1e-8)


def test_attention_never_exceeds_leverage_score():
    """The fact the universal set rests on: A[i, j] <= tau_j for every query
    (docs/theory.md, "Proofs", 1)."""
    K = heavy_tailed_keys(300, 5, seed=8)
    Q = np.random.default_rng(9).standard_normal((200, 5))
    A = naive.dense_attention(Q, K)
    tau = naive.leverage_svd(K)
    assert (A <= tau[None, :] * (1 + 1e-9) + 1e-15).all()
