"""OnlineLeverageSampler: spectral approximation of K^T K + ridge I on fixed seeds (Cohen–Musco–Pachocki)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SEEDS, heavy_tailed_keys

import levstream as ls


def spectral_range(K: np.ndarray, G: np.ndarray, ridge: float) -> tuple[float, float]:
    """Extreme eigenvalues of (K^T K + ridge I)^-1/2 (G + ridge I) (K^T K + ridge I)^-1/2 (direct, dense)."""
    A = K.T @ K + ridge * np.eye(K.shape[1])
    w, V = np.linalg.eigh(A)
    iroot = V @ np.diag(w**-0.5) @ V.T
    ev = np.linalg.eigvalsh(iroot @ (G + ridge * np.eye(K.shape[1])) @ iroot)
    return float(ev[0]), float(ev[-1])


@pytest.mark.parametrize("delta", (0.25, 0.5))
@pytest.mark.parametrize("seed", SEEDS)
def test_spectral_approximation_on_fixed_seeds(delta: float, seed: int) -> None:
    K = heavy_tailed_keys(40_000, 6, seed=seed)
    s = ls.OnlineLeverageSampler(6, delta=delta, ridge=1.0, rng=seed)
    for part in np.array_split(K, 7):
        s.update_many(part)
    lo, hi = spectral_range(K, s.gram, 1.0)
    assert 1 - delta <= lo and hi <= 1 + delta, (lo, hi)
    assert s.num_kept < K.shape[0] // 4 and s.n == K.shape[0]
    np.testing.assert_allclose(s.sample.T @ s.sample, s.gram)


def test_chunking_does_not_change_the_sample() -> None:
    K = heavy_tailed_keys(5000, 3, seed=1)
    a = ls.OnlineLeverageSampler(3, delta=0.5, ridge=1.0, rng=4).update_many(K)
    b = ls.OnlineLeverageSampler(3, delta=0.5, ridge=1.0, rng=4)
    for part in np.array_split(K, 13):
        b.update_many(part)
    np.testing.assert_array_equal(a.sample, b.sample)


def test_merge_of_shards_approximates_with_summed_ridge() -> None:
    K = heavy_tailed_keys(30_000, 5, seed=2)
    seeds = np.random.SeedSequence(2).spawn(3)
    parts = [ls.OnlineLeverageSampler(5, delta=0.5, ridge=1.0, rng=s).update_many(X)
             for s, X in zip(seeds, np.array_split(K, 3))]
    merged = parts[0].copy().merge(parts[1]).merge(parts[2])
    assert merged.ridge == 3.0 and merged.n == K.shape[0]
    assert merged.num_kept == sum(p.num_kept for p in parts)
    lo, hi = spectral_range(K, merged.gram, merged.ridge)
    assert 0.5 <= lo and hi <= 1.5
    # merged sampler keeps streaming with the merged ridge
    merged.update_many(K[:100])
    assert merged.n == K.shape[0] + 100


def test_bad_parameters() -> None:
    with pytest.raises(ValueError, match="delta"):
        ls.OnlineLeverageSampler(3, delta=1.5, ridge=1.0)
    with pytest.raises(ValueError, match="ridge"):
        ls.OnlineLeverageSampler(3, delta=0.5, ridge=0.0)
    s = ls.OnlineLeverageSampler(3, delta=0.5, ridge=1.0)
    with pytest.raises(ValueError, match="3 columns"):
        s.update_many(np.ones((2, 4)))
    assert s.n == 0
    with pytest.raises(ValueError, match="different"):
        s.merge(ls.OnlineLeverageSampler(4, delta=0.5, ridge=1.0))
