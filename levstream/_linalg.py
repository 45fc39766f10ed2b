"""Numerical linear-algebra conventions shared by the offline scores, the Lewis weights and the summaries."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["inverse_upper_factor", "rank_tolerance"]


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
