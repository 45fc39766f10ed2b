"""Numerical linear-algebra conventions shared by the offline scores, the Lewis weights and the summaries."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "CutDirections",
    "factor_rank_tolerance",
    "inverse_upper_factor",
    "pseudo_inverse_factor",
    "rank_tolerance",
    "score_outside_as_one",
]

#: A row whose component along the directions a factor cut exceeds this many times what rounding can put there
#: is scored 1 (:func:`pseudo_inverse_factor`, :func:`score_outside_as_one`).
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


def factor_rank_tolerance(sigma_max: float, n_rows: int, dim: int, qr_steps: int) -> float:
    """The rank tolerance of the leverage scores' R factor, ``min(m, sqrt(m) + qr_steps / 4) eps_machine
    sigma_max`` with ``m = max(n_rows, dim)``: ``qr_steps`` the QR factorisations the factor went through (1
    for one QR of all the keys, one per block folded into a stream's).

    :func:`rank_tolerance`'s ``m eps_machine sigma_max`` is the worst case of the rounding of a QR factor of
    ``m`` rows; the rounding a factor meets grows like ``sqrt(m)`` within one QR and linearly with the number
    of QR steps (docs/theory.md, "Numerics", measured on exactly rank-deficient streams).  A worst-case
    tolerance cuts real directions: ``10^4`` keys of norm ``10^11`` along one direction and two of norm 1
    outside it (each of score 1) lost a direction of ``1e-12 sigma_max``, and both keys' scores.  A rounding
    direction left uncut would add candidates, never drop one.

    Examples
    --------
    >>> factor_rank_tolerance(1.0, 10**6, 64, 123) < rank_tolerance(1.0, 10**6, 64)   # 8192-row blocks
    True
    >>> factor_rank_tolerance(1.0, 10**6, 64, 10**7) == rank_tolerance(1.0, 10**6, 64)  # the worst case
    True
    """
    m = max(int(n_rows), int(dim))
    return min(m, math.sqrt(m) + qr_steps / 4) * float(np.finfo(np.float64).eps) * sigma_max


class CutDirections(NamedTuple):
    """The directions a pseudo-inverse factor cut, and what tells a row's own component along them from
    rounding (:func:`pseudo_inverse_factor`)."""

    #: the cut directions (columns), orthonormal
    N: np.ndarray
    #: the kept directions scaled by ``1 / (s_i - s_r)``, ``s_r`` the largest singular value cut
    W_gap: np.ndarray
    #: ``OUTSIDE_ANGLE_FACTOR`` times the tolerance
    slack: float
    #: ``OUTSIDE_ANGLE_FACTOR`` times the orthogonality of the computed singular vectors, ``d eps_machine``
    floor: float


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
    s: np.ndarray, vt: np.ndarray, n_rows: int, dim: int, qr_steps: int
) -> tuple[np.ndarray, float, CutDirections | None]:
    """``(W, kappa, cut)`` from the SVD ``(s, vt)`` of a column-equilibrated factor of ``n_rows`` keys that went
    through ``qr_steps`` QR factorisations.

    ``W = V_r S_r^-1`` over the numerical rank ``r`` (singular values above :func:`factor_rank_tolerance`), so
    that ``||x W||^2`` is the pseudo-inverse score of an equilibrated row ``x``; ``kappa = s_0 / s_{r-1}``.
    ``cut`` is None when no direction was cut.  Else a row ``x`` in the kept range of the exact factor has a
    component ``||x N||`` along the cut directions of at most ``tol sum_i |<x, v_i>| / (s_i - s_r) + d
    eps_machine ||x||``: rounding of at most ``tol`` turns each kept singular vector ``v_i`` towards the cut
    ones by at most ``tol / (s_i - s_r)`` (Wedin), and the computed vectors are orthonormal to ``d
    eps_machine``.  A component ``OUTSIDE_ANGLE_FACTOR`` times larger is the row's own, along a direction
    whose singular value is below the tolerance: its score cannot be told in float64 and may be anything up to
    1 (docs/theory.md, "Numerics"), so :func:`score_outside_as_one` scores it 1.

    Examples
    --------
    >>> import numpy as np
    >>> K = np.array([[1.0, 0.0], [1.0, 1e-14]])
    >>> _, s, vt = np.linalg.svd(K)
    >>> W, kappa, cut = pseudo_inverse_factor(s, vt, 10**4, 2, 10**4)   # a QR per row: one direction cut
    >>> W.shape, cut is not None
    ((2, 1), True)
    """
    tol = factor_rank_tolerance(s[0], n_rows, dim, qr_steps)
    rank = int((s > tol).sum())
    W = vt[:rank].T / s[:rank]
    kappa = float(s[0] / s[rank - 1]) if rank else 1.0
    cut = None
    if 0 < rank < vt.shape[0]:
        unit = float(np.finfo(np.float64).eps)
        cut = CutDirections(
            np.ascontiguousarray(vt[rank:].T),
            np.ascontiguousarray(vt[:rank].T / (s[:rank] - s[rank])),
            OUTSIDE_ANGLE_FACTOR * float(tol),
            OUTSIDE_ANGLE_FACTOR * vt.shape[1] * unit,
        )
    return W, kappa, cut


def score_outside_as_one(
    X: np.ndarray, scores: np.ndarray, cut: CutDirections | None
) -> np.ndarray:
    """``scores`` (of the equilibrated rows ``X``) with every row that has a component of its own along the
    directions ``cut`` (:func:`pseudo_inverse_factor`) raised to 1, the bound of every leverage score: its
    score cannot be told in float64, so it must be kept rather than dropped (in place; returned)."""
    if cut is None or X.shape[0] == 0:
        return scores
    with np.errstate(over="ignore", invalid="ignore"):
        O = X @ cut.N
        along = np.sqrt(np.einsum("ij,ij->i", O, O))
        turned = np.abs(X @ cut.W_gap).sum(axis=1)
        far = along > cut.slack * turned + cut.floor * np.sqrt(np.einsum("ij,ij->i", X, X))
    scores[far] = np.maximum(scores[far], 1.0)
    return scores
