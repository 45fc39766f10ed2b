"""Lewis weights, sensitivity bounds, the offline universal set for general p, sketched leverage scores."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SEEDS
from naive import leverage_svd

import levstream as ls
from levstream.lewis import LewisConvergenceError

#: The iteration stops at a log-residual of 1e-10; the weights are then within ~1e-9 (relative) of the root.
LEWIS_RTOL = 1e-8

#: Exponents named by issue #4 for the high-precision comparison.
LEWIS_PS = (0.5, 1.0, 1.5, 3.0, 4.0, 6.0)


def _tiny_keys(seed: int, n: int = 7, d: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)) * (1.0 + rng.pareto(2.0, size=(n, 1)))


def _lewis_reference(K: np.ndarray, p: float) -> np.ndarray:
    """Lewis weights as the root of their defining equations, by Newton's method in 40-digit arithmetic.

    Independent of the library's fixed-point iteration: unknowns ``u = log w``, equations
    ``u_j = (p/2) log(k_j^T (K^T W^(1-2/p) K)^-1 k_j)`` (the definition, docs/theory.md,
    "General p"), solved by mpmath's multidimensional Newton from the leverage scores.  The root is
    unique (Lewis), so a converged Newton iterate to 1e-30 is the answer.
    """
    mp = pytest.importorskip("mpmath", reason="mpmath provides the high-precision Lewis reference")
    mp.mp.dps = 40
    n, d = K.shape
    Km = mp.matrix(K.tolist())
    pp = mp.mpf(p)

    def equations(*u):
        M = mp.zeros(d, d)
        for j in range(n):
            c = mp.exp((1 - 2 / pp) * u[j])
            for a in range(d):
                for b in range(d):
                    M[a, b] += c * Km[j, a] * Km[j, b]
        Mi = M**-1
        return [u[j] - (pp / 2) * mp.log((Km[j, :] * Mi * Km[j, :].T)[0]) for j in range(n)]

    start = np.log(leverage_svd(K)).tolist()
    root = mp.findroot(equations, start, tol=mp.mpf(10) ** -30, maxsteps=200)
    return np.exp(np.array([float(v) for v in root]))


@pytest.mark.parametrize("p", LEWIS_PS)
@pytest.mark.parametrize("seed", SEEDS)
def test_lewis_weights_match_high_precision_reference(p: float, seed: int) -> None:
    K = _tiny_keys(seed)
    np.testing.assert_allclose(ls.lewis_weights(K, p), _lewis_reference(K, p), rtol=LEWIS_RTOL)


@pytest.mark.parametrize("p", (0.25, 0.5, 1.0, 3.0, 4.0, 6.0, 10.0, 20.0))
def test_lewis_weights_satisfy_definition_on_larger_matrix(p: float) -> None:
    rng = np.random.default_rng(7)
    K = rng.standard_normal((400, 5)) * (1.0 + rng.pareto(2.0, size=(400, 1)))
    info = ls.lewis_weights(K, p, return_info=True)
    w = info.weights
    # the defining fixed point, evaluated directly with a dense inverse
    M = (K * w[:, None] ** (1.0 - 2.0 / p)).T @ K
    direct = np.einsum("ij,jk,ik->i", K, np.linalg.inv(M), K) ** (p / 2.0)
    np.testing.assert_allclose(w, direct, rtol=1e-7)
    assert w.sum() == pytest.approx(5.0, rel=1e-8)
    assert info.rank == 5 and info.residual <= 1e-10 and info.iterations >= 1


def test_p2_gives_leverage_scores() -> None:
    K = _tiny_keys(0, n=30, d=4)
    np.testing.assert_allclose(ls.lewis_weights(K, 2.0), leverage_svd(K), rtol=1e-10)


@pytest.mark.parametrize("p", (0.5, 1.0, 3.0))
def test_invariances_duplicates_zero_rows_rank_deficiency(p: float) -> None:
    rng = np.random.default_rng(1)
    K = rng.standard_normal((40, 3))
    w = ls.lewis_weights(K, p)
    G = rng.standard_normal((3, 3))
    np.testing.assert_allclose(ls.lewis_weights(K @ G, p), w, rtol=1e-8)  # invariant under K -> K G
    # a zero row gets weight 0 and changes nothing else
    Kz = np.vstack([K[:10], np.zeros((1, 3)), K[10:]])
    wz = ls.lewis_weights(Kz, p)
    assert wz[10] == 0.0
    np.testing.assert_allclose(np.delete(wz, 10), w, rtol=1e-8)
    # rank deficiency: weights of K embedded in 5 columns through a rank-3 map sum to 3
    Kr = K @ rng.standard_normal((3, 5))
    np.testing.assert_allclose(ls.lewis_weights(Kr, p), w, rtol=1e-7)
    # an isolated direction has weight 1; m copies of a key split it equally
    Kd = np.vstack([np.eye(2)[:1], np.tile([[0.0, 1.0]], (4, 1))])
    np.testing.assert_allclose(ls.lewis_weights(Kd, p), [1.0, 0.25, 0.25, 0.25, 0.25], rtol=1e-9)


def test_non_convergence_raises_clear_error() -> None:
    K = _tiny_keys(2, n=50, d=4)
    with pytest.raises(LewisConvergenceError, match=r"did not converge.*max_iter"):
        ls.lewis_weights(K, 0.3, max_iter=2)


@pytest.mark.parametrize("bad, exc", [({"p": 0.0}, ValueError), ({"p": -1.0}, ValueError),
                                      ({"tol": 0.0}, ValueError), ({"max_iter": 0}, ValueError),
                                      ({"max_iter": 1.5}, TypeError)])
def test_bad_parameters(bad: dict, exc: type) -> None:
    kwargs = {"p": 1.0, **bad}
    with pytest.raises(exc):
        ls.lewis_weights(np.eye(3), **kwargs)


def test_bad_matrix() -> None:
    with pytest.raises(ValueError, match="finite"):
        ls.lewis_weights(np.array([[1.0, np.nan]]), 1.0)
    with pytest.raises(TypeError):
        ls.lewis_weights(np.array([[1 + 1j, 0]]), 1.0)


# ---------------------------------------------------------------------------------------- sensitivity bounds
@pytest.mark.parametrize("p", LEWIS_PS)
@pytest.mark.parametrize("seed", SEEDS)
def test_sensitivity_bounds_never_below_brute_force(p: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    K = rng.standard_normal((6, 2)) * (1.0 + rng.pareto(1.5, size=(6, 1)))
    exact = ls.testing.exact_sensitivities(K, p=p, n_starts=16, rng=seed)
    bounds = ls.sensitivity_bounds(K, p)
    assert (bounds >= exact * (1.0 - 1e-9)).all(), (bounds, exact)
    # and not vacuous: the total is at most d^max(1, p/2) (Lewis weights sum to d)
    assert bounds.sum() <= 2.0 ** max(1.0, p / 2.0) * (1.0 + 1e-8)


@pytest.mark.parametrize("p", (1.0, 3.0))
def test_offline_universal_set_contains_every_sensitive_key(p: float) -> None:
    rng = np.random.default_rng(5)
    K = rng.standard_normal((12, 2)) * (1.0 + rng.pareto(1.0, size=(12, 1)))
    eps = 0.15
    exact = ls.testing.exact_sensitivities(K, p=p, n_starts=16, rng=0)
    U = ls.universal_set(K, eps=eps, p=p)
    assert set(np.flatnonzero(exact >= eps).tolist()) <= set(U.ids.tolist())
    np.testing.assert_allclose(U.scores, ls.sensitivity_bounds(K, p)[U.ids])
    assert len(U) <= U.size_bound
    np.testing.assert_array_equal(U.keys, K[U.ids])


def test_universal_set_p2_unchanged() -> None:
    K = _tiny_keys(0, n=200, d=4)
    tau = leverage_svd(K)
    assert ls.universal_set(K, eps=0.05).ids.tolist() == np.flatnonzero(tau >= 0.05).tolist()


# ---------------------------------------------------------------------------------- approx leverage scores
@pytest.mark.parametrize("seed", SEEDS)
def test_approx_leverage_bounds_are_certified(seed: int) -> None:
    rng = np.random.default_rng(seed)
    K = rng.standard_normal((30_000, 6)) * (1.0 + rng.pareto(2.0, size=(30_000, 1)))
    tau = leverage_svd(K)
    est, lo, hi = ls.approx_leverage_scores(K, rng=seed, return_bounds=True)
    assert (lo <= tau * (1 + 1e-9)).all() and (tau <= hi * (1 + 1e-9)).all()
    assert (hi / lo).max() < 2.0  # the certificate is informative: the sketch embeds within a factor < 2
    # the no-false-negative rule: {upper >= eps} contains {tau >= eps}
    eps = 0.001
    assert set(np.flatnonzero(tau >= eps)) <= set(np.flatnonzero(hi >= eps))
    # default oversampling (20 d (d+1) rows) makes the estimate a fair approximation
    assert np.abs(est / tau - 1.0).max() < 0.5


def test_approx_leverage_reproducible_and_exact_when_small() -> None:
    K = _tiny_keys(4, n=20_000, d=3)
    a = ls.approx_leverage_scores(K, rng=np.random.default_rng(9))
    b = ls.approx_leverage_scores(K, rng=np.random.default_rng(9))
    np.testing.assert_array_equal(a, b)
    small = _tiny_keys(4, n=50, d=3)  # sketch would be larger than K: exact scores
    np.testing.assert_allclose(ls.approx_leverage_scores(small, rng=0), leverage_svd(small), rtol=1e-9)
    with pytest.raises(ValueError, match="oversampling"):
        ls.approx_leverage_scores(small, oversampling=0.0)


def test_warm_start_converges_to_the_same_weights() -> None:
    K = _tiny_keys(3, n=300, d=4)
    for p in (1.0, 3.0, 8.0):
        cold = ls.lewis_weights(K, p, return_info=True)
        warm = ls.lewis_weights(K, p, return_info=True, init=cold.weights * 1.1)
        np.testing.assert_allclose(warm.weights, cold.weights, rtol=1e-8)
        assert warm.iterations < cold.iterations
    bad = np.full(300, np.nan)  # unusable starting values fall back to d / n
    np.testing.assert_allclose(ls.lewis_weights(K, 1.0, init=bad), ls.lewis_weights(K, 1.0), rtol=1e-8)
    with pytest.raises(ValueError, match="one weight per row"):
        ls.lewis_weights(K, 1.0, init=np.ones(3))
