"""``MomentState``: the exact p = 2 attention output of every key fed so far, from a state that does not grow.

For ``f(x) = x^2`` the output of query ``q`` over keys ``k_j`` with values ``v_j`` is

    o(q) = sum_j <q, k_j>^2 v_j / sum_j <q, k_j>^2 = phi(q)^T S / q^T G q,   S = sum_j phi(k_j) v_j^T,

with ``phi`` the symmetric degree-2 features (``<phi(q), phi(k)> = <q, k>^2``, ``D = d (d + 1) / 2`` of them) and
``G`` the Gram matrix the sketch keeps anyway (docs/theory.md, "Values and exact outputs").  ``S`` is the
recurrent state of symmetric-power ("power attention") transformers; merging two states adds them.
"""

from __future__ import annotations

import numpy as np

from .summaries.gram import _two_sum_add
from .summaries.lifted import lift, lifted_dim


class MomentState:
    """``S = sum_j phi(k_j) v_j^T`` (shape ``(D, value_dim)``), accumulated in float64 with a compensated sum.

    Examples
    --------
    >>> import numpy as np
    >>> from levstream.moments import MomentState
    >>> rng = np.random.default_rng(0)
    >>> K, V, q = rng.standard_normal((50, 3)), rng.standard_normal((50, 2)), rng.standard_normal((1, 3))
    >>> S = MomentState(3, 2); S.add(K[:20], V[:20]); S.add(K[20:], V[20:])
    >>> w = (K @ q[0]) ** 2
    >>> bool(np.allclose(S.numerator(q)[0], w @ V))
    True
    """

    def __init__(self, dim: int, value_dim: int) -> None:
        self.dim, self.value_dim = int(dim), int(value_dim)
        D = lifted_dim(self.dim)
        self._hi = np.zeros((D, self.value_dim))
        self._lo = np.zeros((D, self.value_dim))
        self._sum: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        return int(self._hi.nbytes + self._lo.nbytes)

    def add(self, X: np.ndarray, V: np.ndarray) -> None:
        """Fold keys ``X`` (m, dim) and their values ``V`` (m, value_dim): ``S += phi(X)^T V`` (one GEMM)."""
        if X.shape[0] == 0:
            return
        _two_sum_add(self._hi, self._lo, lift(X).T @ V)
        self._sum = None

    def merge(self, other: MomentState) -> None:
        _two_sum_add(self._hi, self._lo, other._hi)
        self._lo += other._lo
        self._sum = None

    def copy(self) -> MomentState:
        out = MomentState.__new__(MomentState)
        out.dim, out.value_dim = self.dim, self.value_dim
        out._hi, out._lo, out._sum = self._hi.copy(), self._lo.copy(), None
        return out

    def numerator(self, Q: np.ndarray) -> np.ndarray:
        """``phi(q)^T S = sum_j <q, k_j>^2 v_j`` for every row of ``Q`` (shape (m, value_dim))."""
        if self._sum is None:
            self._sum = self._hi + self._lo
        return lift(Q) @ self._sum

    def to_state(self) -> dict[str, np.ndarray]:
        return {"moments_hi": self._hi, "moments_lo": self._lo}

    @classmethod
    def from_state(cls, dim: int, value_dim: int, arrays: dict[str, np.ndarray]) -> MomentState:
        out = cls(dim, value_dim)
        for name in ("moments_hi", "moments_lo"):
            arr = arrays[name]
            if arr.shape != out._hi.shape or arr.dtype != np.float64 or not np.isfinite(arr).all():
                raise ValueError(f"stored array {name!r} must be finite float64 of shape {out._hi.shape}; "
                                 f"got {arr.dtype} {arr.shape}")
        out._hi, out._lo = arrays["moments_hi"].copy(), arrays["moments_lo"].copy()
        return out
