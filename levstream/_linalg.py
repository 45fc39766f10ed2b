"""Numerical linear-algebra conventions shared by the offline scores, the Lewis weights and the summaries."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["rank_tolerance"]


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
