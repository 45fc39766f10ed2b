"""Offline, whole-matrix scores: leverage scores (exact and sketched) and the universal set of a matrix held in memory."""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.linalg as sla

from ._config import REPORT_RTOL, UNIT_ROUNDOFF
from ._linalg import (
    factor_rank_tolerance,
    pseudo_inverse_factor,
    score_outside_as_one,
)
from ._validation import as_matrix, check_eps, check_p, check_real
from .lewis import sensitivity_bounds
from .results import UniversalSet

__all__ = ["approx_leverage_scores", "leverage_scores", "universal_set"]


def leverage_scores(K: Any) -> np.ndarray:
    """Leverage scores ``tau_j = k_j^T (K^T K)^+ k_j`` of the rows of ``K``.

    Computed from the thin SVD of the R factor of ``K`` (so the condition number is not squared), with the
    pseudo-inverse rank tolerance ``(sqrt(m) + 1/4) * eps_machine * sigma_max`` (``m = max(n, d)``, at most
    ``m``: the rounding one QR factor meets, :func:`~levstream._linalg.factor_rank_tolerance`) applied after
    scaling every non-zero column to max-abs 1 (scores are invariant under column scaling): rank-deficient
    ``K`` gives scores summing to its numerical rank.  A row with a component of its own along a direction
    that tolerance cuts (beyond what rounding can put there) is scored 1, the bound of every leverage score:
    float64 cannot tell its score, and a heavy key must not be missed (docs/theory.md, "Numerics").

    Parameters
    ----------
    K : array_like, shape (n, d)

    Returns
    -------
    ndarray of float64, shape (n,)

    Examples
    --------
    >>> import numpy as np, levstream as ls
    >>> ls.leverage_scores(np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])).round(3).tolist()
    [1.0, 0.5, 0.5]
    """
    K = as_matrix(K, "K")
    n, d = K.shape
    # tau is invariant under column scaling (docs/theory.md, "Proofs", 4): decide the rank on the
    # column-equilibrated matrix, so that a direction carried only by tiny entries is not mistaken
    # for rounding noise.
    col_max = np.abs(K).max(axis=0)
    live = col_max > 0
    if not live.any():
        return np.zeros(n)
    K = K[:, live] / col_max[live]
    d = K.shape[1]
    if n > d:
        R = sla.qr(K, mode="r", check_finite=False)[0][:d]
    else:
        R = K
    _, s, vt = sla.svd(R, full_matrices=False, check_finite=False, lapack_driver="gesdd")
    W, _, outside = pseudo_inverse_factor(s, vt, n, d, 1)
    Y = K @ W
    return score_outside_as_one(K, np.einsum("ij,ij->i", Y, Y), outside)


def approx_leverage_scores(
    K: Any, *, rng: Any = None, oversampling: float = 20.0, return_bounds: bool = False
) -> np.ndarray | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Leverage scores of a tall ``K`` from a CountSketch, with certified lower and upper bounds.

    Drineas–Magdon-Ismail–Mahoney–Woodruff (JMLR 2012): a CountSketch ``S`` with
    ``r = ceil(oversampling * d * (d + 1))`` rows (one nonzero ``±1`` per column, cost ``O(nnz(K))``) gives
    ``R`` from ``qr(S K)``; then ``Y = K R^-1`` is nearly orthonormal and ``tau~_j = ||y_j||^2``.  The sketch
    is a ``(1 ± eta)`` subspace embedding with probability at least ``1 - 1/(oversampling eta^2)``
    (Nelson–Nguyen: ``r >= (d^2 + d) / (eta^2 delta)``), so ``tau~`` is within ``(1 ± eta)^2`` of ``tau``.
    For small ``d`` the second (JL) sketch of DMMW is not needed and is skipped.

    Whatever the sketch's luck, the bounds are *certified*: with ``C = Y^T Y`` (eigenvalues in
    ``[lam_min, lam_max]``), ``tau_j = y_j^T C^-1 y_j`` lies in ``[tau~_j / lam_max, tau~_j / lam_min]``
    when the sketch has the rank of ``K``'s columns; when its rank falls short (it lost a direction: keys
    cancelling in a bucket, fewer sketch rows than ``d``; or ``K`` is rank-deficient) the bounds are the exact
    scores (:func:`leverage_scores`, ``O(n d^2)``).  The columns are equilibrated first (scores do not depend
    on their scale).
    **No-false-negative threshold rule:** keep key ``j`` when ``upper_j >= eps``; every key with
    ``tau_j >= eps`` is kept.  Computing the bounds costs one extra ``n d^2`` pass.

    Parameters
    ----------
    K : array_like, shape (n, d)
    rng : None, int, SeedSequence or Generator
        Randomness of the sketch (``numpy.random.default_rng(rng)``).
    oversampling : float, default 20.0
        Sketch rows per ``d (d + 1)``; when the sketch would have at least ``n`` rows, ``S`` is the identity.
    return_bounds : bool, default False
        Also return ``(lower, upper)``.

    Returns
    -------
    scores : ndarray, shape (n,)
    lower, upper : ndarray, shape (n,)
        Only with ``return_bounds=True``.

    Examples
    --------
    >>> import numpy as np, levstream as ls
    >>> K = np.random.default_rng(0).standard_normal((20_000, 4))
    >>> t, lo, hi = ls.approx_leverage_scores(K, rng=1, return_bounds=True)
    >>> tau = ls.leverage_scores(K)
    >>> bool((lo <= tau * (1 + 1e-9)).all() and (tau <= hi * (1 + 1e-9)).all())
    True
    >>> bool(np.abs(t / tau - 1).max() < 0.5)
    True
    """
    import scipy.sparse as sp

    K = as_matrix(K, "K")
    oversampling = check_real(oversampling, "oversampling")
    if not oversampling > 0:
        raise ValueError(f"oversampling must be > 0; got {oversampling} instead.")
    n = K.shape[0]
    gen = np.random.default_rng(rng)
    zeros = np.zeros(n)
    # scores are invariant under column scaling: sketch the column-equilibrated keys, as leverage_scores
    # decides its rank on them (a direction carried by a tiny column is not cut as rounding)
    col_max = np.abs(K).max(axis=0) if n else np.zeros(K.shape[1])
    live = col_max > 0
    if not live.any():
        return (zeros, zeros.copy(), zeros.copy()) if return_bounds else zeros
    K = K[:, live] / col_max[live]
    d = K.shape[1]
    r = int(np.ceil(oversampling * d * (d + 1)))
    if r >= n:
        SK = K
    else:
        buckets = gen.integers(0, r, size=n)
        signs = gen.choice(np.array([-1.0, 1.0]), size=n)
        S = sp.csr_matrix((signs, (buckets, np.arange(n))), shape=(r, n))
        SK = np.asarray(S @ K)
    _, s, vt = sla.svd(SK, full_matrices=False, check_finite=False, lapack_driver="gesdd")
    # the tolerance leverage_scores decides its rank with: a direction it keeps is not cut here, else the keys
    # along it would get bounds near 0 while their score is 1
    rank = int((s > factor_rank_tolerance(s[0], n, d, 1)).sum()) if s.size and s[0] > 0 else 0
    Y = K @ (vt[:rank].T / s[:rank])
    scores = np.einsum("ij,ij->i", Y, Y)
    if not return_bounds:
        return scores
    if rank < d:
        # tau_j = y_j^T C^-1 y_j needs the sketch's range to hold every direction of K: a sketch that lost one
        # (keys cancelling in a bucket, fewer sketch rows than d) gives a well-conditioned C all the same, and
        # bounds near 0 for keys along it, even when that direction is only a key's own tiny component (score
        # 1).  Telling a lost direction from a rank-deficient K costs what the exact scores cost: those.
        tau = leverage_scores(K)
        return scores, tau, tau.copy()
    lam = sla.eigvalsh(Y.T @ Y, check_finite=False)
    slack = 1.0 + 8.0 * d * UNIT_ROUNDOFF * float(lam[-1] / max(lam[0], UNIT_ROUNDOFF))
    if lam[0] <= 1e-8 * lam[-1]:
        # the sketch missed part of the column space: fall back to exact scores (bounds collapse)
        tau = leverage_scores(K)
        return scores, tau, tau.copy()
    return scores, scores / (lam[-1] * slack), scores * slack / lam[0]


def universal_set(K: Any, *, eps: float, p: float = 2) -> UniversalSet:
    """The universal set ``{j : s_j >= eps}`` of a key matrix held in memory (the offline reference).

    For p = 2 the sensitivity ``s_j`` is the leverage score, computed exactly by :func:`leverage_scores`, and
    the set is exact.  For every other ``p > 0`` the set is ``{j : b_j >= eps}`` with the proven upper bounds
    ``b_j = c_p w_j >= s_j`` of :func:`levstream.sensitivity_bounds` (Lewis weights): a superset of the true
    universal set with at most ``d^max(1, p/2) / eps`` keys; ``scores`` are the bounds.

    Examples
    --------
    >>> import numpy as np, levstream as ls
    >>> K = np.vstack([np.eye(2), np.tile([[1.0, 1.0]], (10, 1))])
    >>> ls.universal_set(K, eps=0.5).ids.tolist()
    [0, 1]
    >>> ls.universal_set(K, eps=0.5, p=1).ids.tolist()
    [0, 1]
    """
    K = as_matrix(K, "K")
    eps = check_eps(eps)
    p = check_p(p)
    scores = leverage_scores(K) if p == 2.0 else sensitivity_bounds(K, p)
    ids = np.flatnonzero(scores >= eps * (1.0 - REPORT_RTOL)).astype(np.int64)
    return UniversalSet(ids, K[ids], scores[ids], eps, p, K.shape[0], REPORT_RTOL)
