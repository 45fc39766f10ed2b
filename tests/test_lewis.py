"""Lewis weights, sensitivity bounds, the offline universal set for general p, sketched leverage scores."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.linalg
from conftest import SEEDS, SENSITIVITY_RTOL
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
def _ratios(K: np.ndarray, q: np.ndarray, p: float) -> np.ndarray:
    """``|<q, k_j>|^p / sum_l |<q, k_l>|^p`` for every j.  Inner products at rounding level are
    those of keys orthogonal to ``q`` (by construction, or parallel to such a key): set to 0, since
    their residue would count for p < 1."""
    dots = K @ q
    rounding = 16 * np.finfo(float).eps * np.linalg.norm(K, axis=1) * np.linalg.norm(q)
    dots[np.abs(dots) <= rounding] = 0.0
    w = np.abs(dots) ** p
    total = w.sum()
    return w / total if total > 0 else np.zeros(K.shape[0])


def exact_sensitivities_vertices(K: np.ndarray, p: float) -> np.ndarray:
    """Exact ``s_j = sup_q |<q, k_j>|^p / sum_l |<q, k_l>|^p`` for ``p <= 1``, full-column-rank K.

    Fix ``<q, k_j> = 1`` and a cell of q where every ``<q, k_l>`` keeps its sign.  There the
    denominator is a sum of concave functions (``t -> t^p``, p <= 1) of affine ones, hence concave,
    and it is at least 1 (its term l = j); so its minimum over the polyhedral cell is at a vertex: a
    direction orthogonal to ``d - 1`` linearly independent keys.  The largest ratio over these
    ``C(n, d - 1)`` directions is the supremum itself (every candidate is a real q, so none can
    exceed it).
    """
    n, d = K.shape
    best = np.zeros(n)
    for rows in itertools.combinations(range(n), d - 1):
        null = scipy.linalg.null_space(K[list(rows)]) if rows else np.eye(d)
        if null.shape[1] == 1:
            best = np.maximum(best, _ratios(K, null[:, 0], p))
    return best


def exact_sensitivities_2d(K: np.ndarray, p: float) -> np.ndarray:
    """Exact sensitivities of keys in 2-D, for ``p <= 1`` (vertices) or an integer ``p >= 2``.

    Write ``q = (1, t)`` (and ``q = (0, 1)``).  Between consecutive zeros of the
    ``<q, k_l> = a_l + b_l t`` every ``|<q, k_l>|^p`` is ``(+-1)^p (a_l + b_l t)^p``, a polynomial
    for integer p, so the ratio of key j is ``(a_j + b_j t)^p / D(t)`` there, and its stationary
    points are real roots of the degree-p polynomial ``p b_j D - (a_j + b_j t) D'`` (numpy roots,
    polished by Newton steps).  The supremum is the largest ratio over those roots, the zeros (q
    orthogonal to a key) and ``q = (0, 1)``; every candidate is evaluated with the true absolute
    values at a real q, so none can exceed the supremum.
    """
    n = K.shape[0]
    assert K.shape[1] == 2 and (p <= 1 or float(p).is_integer()), "exact only for 2-D and these p"
    if p <= 1:
        return exact_sensitivities_vertices(K, p)
    p = int(p)
    best = _ratios(K, np.array([0.0, 1.0]), p)
    for k in K:
        best = np.maximum(best, _ratios(K, np.array([-k[1], k[0]]), p))
    a, b = K[:, 0], K[:, 1]
    zeros = np.sort(-a[b != 0] / b[b != 0])
    inside = np.concatenate([[zeros[0] - 1], (zeros[:-1] + zeros[1:]) / 2, [zeros[-1] + 1]])
    poly = np.polynomial.Polynomial
    for t_mid in inside:  # one sign pattern per interval
        sign = np.sign(a + b * t_mid)
        D = sum(sign[l] ** p * poly([a[l], b[l]]) ** p for l in range(n))
        for j in range(n):
            S = p * b[j] * D - poly([a[j], b[j]]) * D.deriv()
            if S.degree() < 1:
                continue
            dS, roots = S.deriv(), S.roots()
            for t in np.real(roots[np.abs(np.imag(roots)) < 1e-6]):
                for _ in range(5):
                    t = t - S(t) / dS(t) if dS(t) != 0 else t
                if np.isfinite(t):
                    best[j] = max(best[j], _ratios(K, np.array([1.0, t]), p)[j])
    return best


def test_exact_sensitivity_twins_give_leverage_scores_at_p2() -> None:
    """The enumerating twins are checked themselves where the answer is known in closed form."""
    K = _tiny_keys(0, n=8, d=2)
    np.testing.assert_allclose(exact_sensitivities_2d(K, 2), leverage_svd(K), rtol=SENSITIVITY_RTOL)
    # the vertex enumeration on the tight construction (groups of parallel keys, see below)
    scale = np.array([2.0, -1.0, 0.5, 3.0, 1.0, -1.0, 1.0])
    group = np.array([0, 0, 0, 1, 2, 2, 2])
    K = (np.eye(3)[group] * scale[:, None]) @ np.random.default_rng(1).standard_normal((3, 3))
    for p in (0.5, 1.0):
        want = np.abs(scale) ** p / np.bincount(group, np.abs(scale) ** p)[group]
        np.testing.assert_allclose(exact_sensitivities_vertices(K, p), want, rtol=SENSITIVITY_RTOL)


@pytest.mark.parametrize("p", (0.5, 1.0, 2.0, 3.0, 4.0, 6.0))
@pytest.mark.parametrize("seed", SEEDS)
def test_sensitivity_bounds_never_below_exact_sensitivities(p: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    K = rng.standard_normal((6, 2)) * (1.0 + rng.pareto(1.5, size=(6, 1)))
    exact = exact_sensitivities_2d(K, p)
    bounds = ls.sensitivity_bounds(K, p)
    assert (bounds >= exact * (1.0 - SENSITIVITY_RTOL)).all(), (bounds, exact)
    # and not vacuous: the total is at most d^max(1, p/2) (Lewis weights sum to d)
    assert bounds.sum() <= 2.0 ** max(1.0, p / 2.0) * (1.0 + 1e-8)


@pytest.mark.parametrize("p", (0.5, 1.0))
@pytest.mark.parametrize("seed", SEEDS)
def test_sensitivity_bounds_never_below_exact_sensitivities_in_3d(p: float, seed: int) -> None:
    K = _tiny_keys(seed, n=9, d=3)
    exact = exact_sensitivities_vertices(K, p)
    bounds = ls.sensitivity_bounds(K, p)
    assert (bounds >= exact * (1.0 - SENSITIVITY_RTOL)).all(), (bounds, exact)


@pytest.mark.parametrize("p", LEWIS_PS)
def test_sensitivity_bounds_of_the_tight_construction(p: float) -> None:
    """d directions, direction g held by a group of parallel keys ``c_j e_g``, seen through a random
    invertible G.  Sensitivities are invariant under ``K -> K G`` (substitute ``q -> G q``) and,
    taking q along e_g, exactly ``s_j = |c_j|^p / sum_{l in g} |c_l|^p`` (m equal copies: 1/m).  The
    Lewis weights equal these values (they solve the defining equations), so the proven bounds are
    exactly ``min(1, d^max(0, p/2 - 1) s_j)``."""
    rng = np.random.default_rng(3)
    d, sizes = 3, (1, 4, 6)
    group = np.repeat(np.arange(d), sizes)
    scale = rng.choice([-1.0, 1.0], group.size) * np.exp(rng.uniform(-2.0, 2.0, group.size))
    scale[group == 1] = 1.5  # one group of m = 4 equal copies: s = 1/4
    K = (np.eye(d)[group] * scale[:, None]) @ rng.standard_normal((d, d))
    exact = np.abs(scale) ** p / np.bincount(group, np.abs(scale) ** p)[group]
    np.testing.assert_allclose(exact[group == 1], 0.25)
    bounds = ls.sensitivity_bounds(K, p)
    assert (bounds >= exact * (1.0 - SENSITIVITY_RTOL)).all(), (bounds, exact)
    tight = np.minimum(1.0, d ** max(0.0, p / 2.0 - 1.0) * exact)
    np.testing.assert_allclose(bounds, tight, rtol=LEWIS_RTOL)


@pytest.mark.parametrize("p", (1.0, 3.0))
def test_offline_universal_set_contains_every_sensitive_key(p: float) -> None:
    rng = np.random.default_rng(5)
    K = rng.standard_normal((12, 2)) * (1.0 + rng.pareto(1.0, size=(12, 1)))
    exact = exact_sensitivities_2d(K, p)
    # the scores are the proven bounds min(1, c_p w_j), c_p = d^max(0, p/2 - 1), w from the
    # independent high-precision Lewis reference; the set is {j : bound_j >= eps} (tie-free fixture)
    want = np.minimum(1.0, 2.0 ** max(0.0, p / 2.0 - 1.0) * _lewis_reference(K, p))
    for eps in (0.04, 0.05, 0.1, 0.15, 0.3):
        U = ls.universal_set(K, eps=eps, p=p)
        sensitive = set(np.flatnonzero(exact >= eps).tolist())
        assert sensitive and len(sensitive) < len(K), "fixture must have keys on both sides of eps"
        assert sensitive <= set(U.ids.tolist())
        assert np.abs(want / eps - 1.0).min() > 1e-6, "fixture has a bound at eps"
        np.testing.assert_array_equal(U.ids, np.flatnonzero(want >= eps))
        np.testing.assert_allclose(U.scores, want[U.ids], rtol=LEWIS_RTOL)
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


def test_approx_leverage_bounds_hold_when_the_sketch_loses_a_direction() -> None:
    """The bounds ``y^T C^-1 y`` hold only if the sketch's range holds every direction of ``K``.  Two keys
    ``[0, 1]`` beside 1000 along ``e1`` cancel when they share a CountSketch bucket with opposite signs (12
    seeds in 3000); a sketch of one row has rank 1 < d.  Either way ``C`` stayed well-conditioned and the upper
    bounds of keys along the lost direction were 0 (their score is 0.5).  A sketch short of rank now gives
    the exact scores as bounds.  And a column's scale does not matter (scores do not depend on it)."""
    K = np.vstack([np.c_[np.ones(1000), np.zeros(1000)], [[0.0, 1.0], [0.0, 1.0]]])
    tau = leverage_svd(K)
    assert tau[-1] == pytest.approx(0.5)
    lost = 0
    for seed in range(3000):
        est, lo, hi = ls.approx_leverage_scores(K, rng=seed, return_bounds=True, oversampling=2.0)
        lost += est[-1] < 0.25
        assert (lo <= tau * (1 + 1e-9)).all() and (tau <= hi * (1 + 1e-9)).all(), seed
    assert lost > 0  # some sketches did lose the direction
    rng = np.random.default_rng(1)
    K4 = rng.standard_normal((5000, 4)) * np.array([1.0, 1e-12, 1.0, 1e14])
    tau4 = leverage_svd(K4)
    for oversampling in (0.05, 20.0):
        _, lo, hi = ls.approx_leverage_scores(K4, rng=2, return_bounds=True, oversampling=oversampling)
        assert (lo <= tau4 * (1 + 1e-9)).all() and (tau4 <= hi * (1 + 1e-9)).all()


@pytest.mark.parametrize(("n", "oversampling"), [(100, 20.0), (1000, 200.0), (1000, 20.0)])
def test_approx_leverage_bounds_keep_a_key_along_a_tiny_direction(n: int, oversampling: float) -> None:
    """``n - 1`` keys (1, 1) and one (1, -1) * 1e-13: the rows are orthogonal, so the last key's score is 1.
    Its direction is ``1e-14`` of the largest: above the rank tolerance of ``leverage_scores``, below the
    worst-case one the sketch's rank and the range check used, so its bounds were ~1e-60 and the keep rule
    ``upper >= eps`` dropped it."""
    K = np.vstack([np.ones((n - 1, 2)), [[1e-13, -1e-13]]])
    assert ls.leverage_scores(K)[-1] == pytest.approx(1.0, rel=1e-5)
    for seed in range(5):
        _, lo, hi = ls.approx_leverage_scores(K, rng=seed, oversampling=oversampling, return_bounds=True)
        assert lo[-1] <= 1.0 + 1e-5 and hi[-1] >= 1.0 - 1e-5, (seed, lo[-1], hi[-1])


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
