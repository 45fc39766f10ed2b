"""CoresetSummary: normaliser accuracy against brute force, failure budget, merge-and-reduce, persistence."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import heavy_tailed_keys

from levstream.summaries import CoresetSummary
from levstream.summaries.coreset import oversampling_for


def true_normalizer(Q: np.ndarray, K: np.ndarray, p: float) -> np.ndarray:
    return (np.abs(Q @ K.T) ** p).sum(axis=1)


def build(K: np.ndarray, p: float, seed: int, block: int = 2000, **kw) -> CoresetSummary:
    s = CoresetSummary(K.shape[1], p, rng=seed, **kw)
    for start in range(0, K.shape[0], block):
        s.add(np.ascontiguousarray(K[start:start + block]))
    return s


@pytest.mark.parametrize("p", (0.5, 1.0, 3.0))
def test_failure_budget_consistent_with_failure_prob(p: float) -> None:
    # beta from failure_prob = 0.05: over 6 seeds x 50 queries (300 trials) the expected number of queries
    # with |Z~ - Z| > delta Z is at most 15; allow 3x that (a binomial tail below 1e-7) and expect far fewer.
    K = heavy_tailed_keys(10_000, 3, seed=11)
    Q = np.random.default_rng(12).standard_normal((50, 3))
    z = true_normalizer(Q, K, p)
    delta, fp = 0.3, 0.05
    failures = 0
    for seed in range(6):
        s = build(K, p, seed, delta=delta, failure_prob=fp)
        assert s.failure_bound <= fp or s.rounds > 12
        failures += int((np.abs(s.normalizer(Q) / z - 1) > delta).sum())
    assert failures <= 3 * fp * 300


@pytest.mark.parametrize("p", (1.0, 3.0))
def test_default_accuracy_and_size_independent_of_n(p: float) -> None:
    rng = np.random.default_rng(0)
    Q = rng.standard_normal((40, 6))
    sizes = []
    for n in (20_000, 80_000):
        K = heavy_tailed_keys(n, 6, seed=n)
        s = build(K, p, 3, block=4096)
        err = np.abs(s.normalizer(Q) / true_normalizer(Q, K, p) - 1).max()
        assert err < s.delta, err
        assert s.num_rows <= s.capacity
        sizes.append(s.num_rows)
    assert sizes[1] <= 2 * sizes[0] + 1000  # bounded by the capacity, not growing with n


def test_unbiased_over_seeds() -> None:
    K = heavy_tailed_keys(6000, 3, seed=5)
    q = np.array([[1.0, -0.5, 0.25]])
    z = true_normalizer(q, K, 1.0)[0]
    est = [build(K, 1.0, seed, oversampling=20.0).normalizer(q)[0] for seed in range(20)]
    # the mean of 20 independent estimates is within 4 standard errors of Z
    assert abs(np.mean(est) - z) <= 4 * np.std(est) / np.sqrt(20) + 1e-12 * z


def test_merge_equals_union_and_rank_deficient_keys() -> None:
    rng = np.random.default_rng(3)
    K = rng.standard_normal((12_000, 2)) @ rng.standard_normal((2, 4))  # rank 2 in 4 columns
    Q = rng.standard_normal((20, 4))
    a, b = build(K[:6000], 1.0, 1), build(K[6000:], 1.0, 2)
    a.merge(b)
    assert a.n_rows == 12_000
    err = np.abs(a.normalizer(Q) / true_normalizer(Q, K, 1.0) - 1).max()
    assert err < a.delta
    # a key outside the span of all keys has sensitivity 1: its bound must be 1
    outside = np.linalg.svd(K, full_matrices=False)[2][-1:]
    assert a.scores(outside)[0] == 1.0
    with pytest.raises(ValueError, match="different settings"):
        a.merge(CoresetSummary(4, 3.0))


def test_state_roundtrip_and_copy_continue_identically() -> None:
    K = heavy_tailed_keys(20_000, 3, seed=8)
    Q = np.random.default_rng(1).standard_normal((10, 3))
    a = build(K[:10_000], 1.5, 4)
    meta, arrays = a.to_state()
    b = CoresetSummary.from_state(meta, arrays)
    c = a.copy()
    for s in (a, b, c):
        s.add(np.ascontiguousarray(K[10_000:]))
    np.testing.assert_array_equal(a.normalizer(Q), b.normalizer(Q))
    np.testing.assert_array_equal(a.normalizer(Q), c.normalizer(Q))


def test_bad_parameters() -> None:
    with pytest.raises(ValueError, match="delta"):
        CoresetSummary(3, 1.0, delta=1.0)
    with pytest.raises(ValueError, match="not both"):
        CoresetSummary(3, 1.0, failure_prob=0.1, oversampling=5.0)
    with pytest.raises(ValueError, match="failure_prob"):
        CoresetSummary(3, 1.0, failure_prob=2.0)
    assert oversampling_for(0.1, 0.01) > oversampling_for(0.2, 0.01)
