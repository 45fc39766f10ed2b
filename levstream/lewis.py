"""l_p Lewis weights and the sensitivity upper bounds they give for ``f(x) = |x|^p``.

Theory and proofs: docs/theory.md, "General p".

The Lewis weights of ``K`` (n x d) are the unique positive ``w`` with
``w_j = (k_j^T (K^T W^(1-2/p) K)^(-1) k_j)^(p/2)``, ``sum w = rank(K)``; equivalently ``w`` is the vector of
leverage scores of ``W^(1/2-1/p) K``.  They bound sensitivities: ``s_j <= c_p * w_j`` with
``c_p = rank^max(0, p/2 - 1)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg as sla

from ._config import UNIT_ROUNDOFF
from ._linalg import rank_tolerance
from ._threads import lowered_blas
from ._validation import as_matrix, check_int, check_p, check_real

__all__ = [
    "LewisConvergenceError",
    "LewisWeights",
    "lewis_constant",
    "lewis_weights",
    "sensitivity_bounds",
]


class LewisConvergenceError(RuntimeError):
    """The Lewis-weight iteration did not reach the requested tolerance within ``max_iter`` iterations."""


@dataclass(frozen=True)
class LewisWeights:
    """Result of :func:`lewis_weights` with ``return_info=True``.

    Attributes
    ----------
    weights : ndarray, shape (n,)
        The weights (0 for zero rows).
    p : float
    rank : int
        Numerical rank of ``K``; ``weights.sum() == rank`` up to the tolerance.
    iterations : int
    residual : float
        ``max_j |log(T(w)_j / w_j)|`` of the returned weights, ``T`` the Lewis map.
    error_bound : float
        ``residual / (1 - rate)`` with ``rate = |p - 2| / (p + 2)``: the a-posteriori bound on
        ``max_j |log(w_j / w*_j)|`` (``w*`` the exact weights) of a map contracting at ``rate``.  The rate is
        that of the linearised damped map at the fixed point (see Notes of :func:`lewis_weights`), so this is
        a bound near convergence (where it is used, at residuals of 1e-3 or below), not a global one.
    """

    weights: np.ndarray
    p: float
    rank: int
    iterations: int
    residual: float
    error_bound: float


def lewis_constant(p: float, rank: int) -> float:
    """``c_p = rank^max(0, p/2 - 1)``: sensitivities are at most ``c_p`` times the Lewis weights
    (docs/theory.md, "General p", proof 12)."""
    return float(max(int(rank), 1)) ** max(0.0, p / 2.0 - 1.0)


#: Below this condition number of ``Z^T Z`` leverage scores come from the Gram matrix (relative error about
#: ``kappa * 1e-16 <= 1e-10``); above it from a QR factorisation, which does not square the condition number.
_GRAM_KAPPA = 1e6


def _column_space_coordinates(K: np.ndarray) -> np.ndarray:
    """``K V_r / s_r`` for the thin SVD of ``K``'s R factor: full column rank, same Lewis weights as ``K``.

    Lewis weights are invariant under ``K -> K G`` for invertible ``G``, and rows outside the numerical column
    space are rounding noise, so the rank-``r`` coordinates have the same weights (summing to ``r``).
    """
    n, d = K.shape
    if n > d:
        lam, V = sla.eigh(K.T @ K, check_finite=False)
        if lam[0] > _GRAM_KAPPA**2 * UNIT_ROUNDOFF * lam[-1]:  # clearly full rank: no QR needed
            return K @ (V / np.sqrt(lam))
        with lowered_blas(1, user_api=None):
            R = sla.qr(K, mode="r", check_finite=False)[0][:d]
    else:
        R = K
    _, s, vt = sla.svd(R, full_matrices=False, check_finite=False, lapack_driver="gesdd")
    if s.size == 0 or s[0] == 0.0:
        return np.zeros((n, 0))
    r = int((s > rank_tolerance(s[0], n, d)).sum())
    return K @ (vt[:r].T / s[:r])


def _log_leverage(Y: np.ndarray, log_scale: np.ndarray) -> np.ndarray:
    """``log`` of the leverage scores of ``diag(exp(log_scale)) Y`` (full column rank ``Y``).

    Computed row by row as ``||z_j^T R^-1||^2`` with ``R^T R = Z^T Z``: each score then has a small
    *relative* error even when it is tiny (``||Q_j||^2`` would only be accurate in absolute terms), which
    keeps the log-space iteration accurate for large ``p``.  ``R`` comes from the Cholesky factor of the Gram
    matrix (BLAS-3, fast) when it is well-conditioned, else from a QR of ``Z`` (run single-threaded: tall
    skinny multithreaded QR is 20x slower on the reference machine).
    """
    scale = np.exp(log_scale - log_scale.max())
    Z = Y * scale[:, None]
    G = Z.T @ Z
    lam = sla.eigvalsh(G, check_finite=False)
    if lam[0] > 0 and lam[-1] <= _GRAM_KAPPA * lam[0]:
        R = sla.cholesky(G, lower=False, check_finite=False)
    else:
        R = sla.qr(Z, mode="r", check_finite=False)[0][: Y.shape[1]]
    X = Z @ sla.solve_triangular(R, np.eye(R.shape[0]), check_finite=False)
    with np.errstate(divide="ignore"):
        return np.log(np.einsum("ij,ij->i", X, X))


def _iterate(
    Y: np.ndarray, p: float, log_w: np.ndarray, tol: float, max_iter: int
) -> tuple[np.ndarray, float, int]:
    """Damped log-space Lewis iteration from ``log_w``; returns ``(log_w, residual, iterations)``."""
    expo = 0.5 - 1.0 / p
    eta_max = 4.0 / (p + 2.0)
    eta = eta_max
    step = 0.5 * p * (_log_leverage(Y, expo * log_w) - log_w)  # log T(w) - log w
    residual = float(np.max(np.abs(step)))
    iterations = 0
    while residual > tol and iterations < max_iter:
        trial = log_w + eta * step
        trial_step = 0.5 * p * (_log_leverage(Y, expo * trial) - trial)
        trial_res = float(np.max(np.abs(trial_step)))
        iterations += 1
        if not trial_res <= residual:
            eta *= 0.5  # safeguard: never accept a step that increases the residual
            if eta < 1e-12:
                break
            continue
        log_w, step, residual = trial, trial_step, trial_res
        eta = min(eta_max, 1.5 * eta)
    return log_w, residual, iterations


#: Homotopy factor for p > 4: weights for p are started from the converged weights of p / HOMOTOPY.
_HOMOTOPY = 1.5


def lewis_weights(
    K: Any,
    p: float,
    *,
    tol: float = 1e-10,
    max_iter: int = 10000,
    return_info: bool = False,
    init: Any = None,
) -> np.ndarray | LewisWeights:
    """l_p Lewis weights of the rows of ``K``, for ``0.01 <= p <= 32``.

    Parameters
    ----------
    K : array_like, shape (n, d)
    p : float
        Exponent, ``0.01 <= p <= 32``.  ``p = 2`` gives the leverage scores.
    tol : float, default 1e-10
        Stop when ``max_j |log(T(w)_j / w_j)| <= tol`` (``T`` the Lewis map below).
    max_iter : int, default 10000
        Iterations allowed in total (p = 100 needs about 1200, p <= 6 fewer than 100).
    return_info : bool, default False
        Return a :class:`LewisWeights` with the iteration count, residual and error bound.
    init : array_like, shape (n,), optional
        Starting weights (a warm start, e.g. the weights of a similar matrix); entries that are not finite
        and positive start at ``d / n``.  With ``init`` the p > 4 homotopy is skipped.

    Returns
    -------
    ndarray, shape (n,) or LewisWeights

    Raises
    ------
    LewisConvergenceError
        If the residual is still above ``tol`` after ``max_iter`` iterations (the message gives both).

    Notes
    -----
    Zero rows get weight 0 and are removed first (they break ``p < 2``); ``K`` is replaced by full-rank
    coordinates of its column space.  The Lewis map is ``T(w)_j = tau_j(W^(1/2-1/p) K)^(p/2) w_j^(1-p/2)``;
    its fixed point is the Lewis weights.  The iteration runs in log space,
    ``log w <- log w + eta (log T(w) - log w)`` with ``eta = 4 / (p + 2)``.  ``eta = 1`` is the Cohen–Peng
    iteration (a contraction with rate ``|1 - p/2|`` for ``p < 4``); linearising at the
    fixed point, the Jacobian of ``log T`` has eigenvalues in ``[min(0, 1 - p/2), max(0, 1 - p/2)]`` (it is
    ``(1 - p/2) I + (p/2) D`` with ``D = (1 - 2/p)(I - H)``, ``H`` stochastic), so ``eta = 4/(p+2)`` makes
    the local rate ``|p - 2| / (p + 2) < 1`` for every ``p`` (p = 3: 0.2, p = 6: 0.5).  A step that would
    increase the residual is rejected and ``eta`` halved.  For ``p > 4`` the iteration is started from the
    weights of ``p / 1.5`` (down to p = 4, a homotopy), which keeps it inside the region of local convergence.

    Examples
    --------
    >>> import numpy as np, levstream as ls
    >>> K = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    >>> ls.lewis_weights(K, 1.0).round(6).tolist()
    [1.0, 0.5, 0.5]
    >>> bool(np.isclose(ls.lewis_weights(np.random.default_rng(0).standard_normal((50, 3)), 6.0).sum(), 3.0))
    True
    """
    K = as_matrix(K, "K")
    p = check_p(p)
    tol = check_real(tol, "tol")
    if not tol > 0:
        raise ValueError(f"tol must be > 0; got {tol} instead.")
    max_iter = check_int(max_iter, "max_iter", minimum=1)
    n = K.shape[0]
    nonzero = np.flatnonzero(np.einsum("ij,ij->i", K, K) > 0)
    Y = _column_space_coordinates(K[nonzero])
    r = Y.shape[1]
    weights = np.zeros(n)
    if r == 0:
        info = LewisWeights(weights, p, 0, 0, 0.0, 0.0)
        return info if return_info else weights
    m = nonzero.size
    ladder = [p]
    log_w = np.full(m, np.log(r / m))
    if init is not None:
        start = np.asarray(init, dtype=np.float64)
        if start.shape != (n,):
            raise ValueError(
                f"init must have one weight per row, shape ({n},); got shape {start.shape}."
            )
        start = start[nonzero]
        good = np.isfinite(start) & (start > 0)
        log_w[good] = np.log(start[good])
    while init is None and ladder[-1] > 4.0:
        ladder.append(max(4.0, ladder[-1] / _HOMOTOPY))
    iterations = 0
    residual = np.inf
    for step_p in reversed(ladder):
        stage_tol = tol if step_p == p else 1e-3
        # tall-skinny BLAS calls: one thread is fastest (see _log_leverage)
        with lowered_blas(1, user_api=None):
            log_w, residual, it = _iterate(Y, step_p, log_w, stage_tol, max_iter - iterations)
        iterations += it
        if residual > stage_tol:
            raise LewisConvergenceError(
                f"lewis_weights did not converge for p = {p:g}: residual {residual:.3g} > tol {stage_tol:g} "
                f"at p = {step_p:g} after {iterations} iterations (max_iter = {max_iter}). "
                "Raise max_iter or tol."
            )
    weights[nonzero] = np.exp(log_w)
    if not return_info:
        return weights
    rate = abs(p - 2.0) / (p + 2.0)
    return LewisWeights(weights, p, r, iterations, residual, residual / (1.0 - rate))


def sensitivity_bounds(K: Any, p: float, *, tol: float = 1e-10) -> np.ndarray:
    """Proven upper bounds ``b_j >= s_j`` on the ``|x|^p``-sensitivities of the rows of ``K``.

    ``b_j = min(1, c_p * w_j * exp(err))`` with ``w`` the Lewis weights, ``c_p = rank^max(0, p/2-1)``
    (docs/theory.md, "General p", proof 12) and ``err`` the a-posteriori bound on the weights' log
    error, so rounding of the iteration can only raise a bound.  For p = 2 these are the leverage
    scores (to ``tol``).

    Parameters
    ----------
    K : array_like, shape (n, d)
    p : float
    tol : float, default 1e-10
        Passed to :func:`lewis_weights`.

    Returns
    -------
    ndarray, shape (n,)
        ``sum(b) <= rank^max(1, p/2)`` (up to the inflation), so ``{j : b_j >= eps}`` has at most
        ``d^max(1, p/2) / eps`` members.

    Examples
    --------
    >>> import numpy as np, levstream as ls
    >>> K = np.vstack([np.eye(2), np.tile([[1.0, 1.0]], (4, 1))])
    >>> b = ls.sensitivity_bounds(K, 1.0)
    >>> bool((b >= ls.testing.exact_sensitivities(K, p=1.0) - 1e-9).all())
    True
    """
    info = lewis_weights(K, p, tol=tol, return_info=True)
    assert isinstance(info, LewisWeights)
    inflate = np.exp(info.error_bound + 8.0 * UNIT_ROUNDOFF * max(info.rank, 1))
    return np.minimum(1.0, lewis_constant(info.p, info.rank) * info.weights * inflate)
