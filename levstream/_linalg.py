"""Numerical linear-algebra conventions shared by the offline scores, the Lewis weights and the summaries."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = [
    "inverse_upper_factor",
    "pseudo_inverse_factor",
    "rank_tolerance",
    "score_outside_as_one",
]

#: A row whose component outside the numerical range of a factor exceeds this many times the rounding angle of
#: that range (``rank tolerance / gap``) is scored 1 (:func:`score_outside_as_one`).
OUTSIDE_ANGLE_FACTOR = 16.0


def rank_tolerance(sigma_max: Any, n_rows: int, dim: int, *, dtype: Any = np.float64) -> Any:
    """The pseudo-inverse rank tolerance ``max(n_rows, dim) * eps_machine * sigma_max``.

    Singular values of an ``n_rows x dim`` matrix at or below it are rounding noise and are treated as
    zero (pseudo-inverse semantics; NumPy's ``matrix_rank`` default).  ``sigma_max`` is the largest
    singular value, a float or an array (one per matrix of a batch; the result broadcasts).  ``dtype`` is
    the precision the singular values were computed in.

    Examples
    --------
    >>> import numpy as np
    >>> s = np.linalg.svd(np.array([[1.0, 1.0], [1.0, 1.0 + 1e-17]]), compute_uv=False)
    >>> int((s > rank_tolerance(s[0], 2, 2)).sum())  # numerically rank one
    1
    """
    return max(int(n_rows), int(dim)) * float(np.finfo(dtype).eps) * sigma_max


def factor_rank_tolerance(sigma_max: float, n_rows: int, dim: int) -> float:
    """The rank tolerance of the leverage scores' R factor: ``min(m, dim sqrt(m)) eps_machine sigma_max`` with
    ``m = max(n_rows, dim)``.

    :func:`rank_tolerance`'s ``m eps_machine sigma_max`` is the worst case of the rounding of a QR factor of
    ``m`` rows; the rounding it actually meets grows like ``sqrt(m)``: on the column-equilibrated R factors of
    exactly rank-deficient streams (ranks 2 of 16, 8 of 64 and 7 of 8, keys of norms spread over ``e^+-6``,
    ``10^3`` to ``10^6`` rows), the singular values that should be 0 stayed below ``7e-15 sigma_max``, 2000
    times under this tolerance at ``10^6`` rows.  A worst-case tolerance cuts real directions instead: ``10^4``
    keys of norm ``10^11`` along one direction and two of norm 1 outside it (each of score 1) lost a direction
    of ``1e-12 sigma_max`` and both keys' scores (docs/theory.md, "Numerics").  A rounding direction left
    uncut would add candidates, never drop one.

    Examples
    --------
    >>> factor_rank_tolerance(1.0, 10**6, 64) < rank_tolerance(1.0, 10**6, 64)
    True
    """
    m = max(int(n_rows), int(dim))
    return min(m, dim * math.sqrt(m)) * float(np.finfo(np.float64).eps) * sigma_max


def inverse_upper_factor(G: np.ndarray) -> np.ndarray | None:
    """``W = R^-1`` for the Cholesky factor ``G = R^T R`` (upper triangular, C-contiguous), so that
    ``x^T G^-1 x = ||x W||^2``; None when the factorisation fails (``G`` not numerically positive definite).

    LAPACK ``potrf`` and ``trtri`` (``d^3 / 3`` flops each, about a sixth of a Cholesky factor and a general
    inverse).  Call it where every BLAS is held to one thread: SciPy's OpenBLAS has a thread pool of its own.

    Examples
    --------
    >>> import numpy as np
    >>> G = np.array([[4.0, 2.0], [2.0, 3.0]])
    >>> W = inverse_upper_factor(G)
    >>> x = np.array([1.0, -1.0])
    >>> bool(np.isclose(np.sum((x @ W) ** 2), x @ np.linalg.solve(G, x)))
    True
    >>> inverse_upper_factor(np.array([[1.0, 2.0], [2.0, 1.0]])) is None
    True
    """
    from scipy.linalg.lapack import dpotrf, dtrtri

    R, info = dpotrf(G, lower=0, clean=1)
    if info != 0:
        return None
    W, info = dtrtri(R, lower=0)
    return np.ascontiguousarray(W) if info == 0 else None


def pseudo_inverse_factor(
    s: np.ndarray, vt: np.ndarray, n_rows: int, dim: int
) -> tuple[np.ndarray, float, tuple[np.ndarray, float] | None]:
    """``(W, kappa, outside)`` from the SVD ``(s, vt)`` of a column-equilibrated factor of ``n_rows`` keys.

    ``W = V_r S_r^-1`` over the numerical rank ``r`` (singular values above :func:`factor_rank_tolerance`), so that
    ``||x W||^2`` is the pseudo-inverse score of an equilibrated row ``x``; ``kappa = s_0 / s_{r-1}``.
    ``outside`` is None when no direction was cut, else ``(N, theta^2)``: ``N`` the cut directions (columns) and
    ``theta = OUTSIDE_ANGLE_FACTOR tol / (s_{r-1} - s_r)``, a multiple of the angle by which rounding of the
    factor (at most ``tol``) can turn the kept range (Wedin's bound): a row in that range has
    ``||x N|| <= theta ||x|| / OUTSIDE_ANGLE_FACTOR``, so a larger component is the row's own, along a direction
    whose singular value is below the tolerance.  Such a row's score cannot be told in float64, and may be
    anything up to 1 (docs/theory.md, "Numerics"): :func:`score_outside_as_one`.

    Examples
    --------
    >>> import numpy as np
    >>> K = np.array([[1.0, 0.0], [1.0, 1e-14]])
    >>> _, s, vt = np.linalg.svd(K)
    >>> W, kappa, outside = pseudo_inverse_factor(s, vt, 10**4, 2)   # as if from 10^4 keys: one direction cut
    >>> W.shape, outside is not None
    ((2, 1), True)
    """
    tol = factor_rank_tolerance(s[0], n_rows, dim)
    rank = int((s > tol).sum())
    W = vt[:rank].T / s[:rank]
    kappa = float(s[0] / s[rank - 1]) if rank else 1.0
    outside = None
    if 0 < rank < vt.shape[0]:
        gap = float(s[rank - 1] - s[rank])
        theta = OUTSIDE_ANGLE_FACTOR * float(tol) / gap if gap > 0 else np.inf
        if theta < 1.0:
            outside = (np.ascontiguousarray(vt[rank:].T), theta * theta)
    return W, kappa, outside


def score_outside_as_one(
    X: np.ndarray, scores: np.ndarray, outside: tuple[np.ndarray, float] | None
) -> np.ndarray:
    """``scores`` (of the equilibrated rows ``X``) with every row that has a component outside the numerical
    range (``outside`` of :func:`pseudo_inverse_factor`) raised to 1, the bound every leverage score obeys: its
    score cannot be told in float64, so it must be kept rather than dropped (in place; returned)."""
    if outside is None or X.shape[0] == 0:
        return scores
    N, theta2 = outside
    O = X @ N
    with np.errstate(over="ignore", invalid="ignore"):
        far = np.einsum("ij,ij->i", O, O) > theta2 * np.einsum("ij,ij->i", X, X)
    scores[far] = np.maximum(scores[far], 1.0)
    return scores
