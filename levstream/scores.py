"""Offline, whole-matrix scores: leverage scores and the universal set of a matrix held in memory."""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.linalg as sla

from ._config import TIE_RTOL, UNIT_ROUNDOFF
from ._validation import as_matrix, check_eps, check_p
from .results import UniversalSet

__all__ = ["leverage_scores", "universal_set"]


def leverage_scores(K: Any) -> np.ndarray:
    """Leverage scores ``tau_j = k_j^T (K^T K)^+ k_j`` of the rows of ``K``.

    Computed from the thin SVD of the R factor of ``K`` (so the condition number is not squared), with the
    pseudo-inverse rank tolerance ``max(n, d) * eps_machine * sigma_max``: rank-deficient ``K`` gives scores
    summing to its numerical rank.

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
    if n > d:
        R = sla.qr(K, mode="r", check_finite=False)[0][:d]
    else:
        R = K
    _, s, vt = sla.svd(R, full_matrices=False, check_finite=False, lapack_driver="gesdd")
    if s.size == 0 or s[0] == 0.0:
        return np.zeros(n)
    tol = max(n, d) * 2 * UNIT_ROUNDOFF * s[0]
    r = int((s > tol).sum())
    Y = K @ (vt[:r].T / s[:r])
    return np.einsum("ij,ij->i", Y, Y)


def universal_set(K: Any, *, eps: float, p: float = 2) -> UniversalSet:
    """The universal set ``{j : s_j >= eps}`` of a key matrix held in memory (the offline reference).

    For p = 2 the sensitivity ``s_j`` is the leverage score, computed exactly by :func:`leverage_scores`.

    Examples
    --------
    >>> import numpy as np, levstream as ls
    >>> K = np.vstack([np.eye(2), np.tile([[1.0, 1.0]], (10, 1))])
    >>> ls.universal_set(K, eps=0.5).ids.tolist()
    [0, 1]
    """
    K = as_matrix(K, "K")
    eps = check_eps(eps)
    p = check_p(p)
    if p != 2.0:
        raise NotImplementedError(f"universal_set supports p = 2 in this version; got p = {p:g} (issue #4).")
    tau = leverage_scores(K)
    ids = np.flatnonzero(tau >= eps * (1.0 - TIE_RTOL)).astype(np.int64)
    return UniversalSet(ids, K[ids], tau[ids], eps, p, K.shape[0], TIE_RTOL)
