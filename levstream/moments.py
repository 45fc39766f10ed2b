"""``MomentState``: the exact p = 2 attention output of every key fed so far, from a state that does not grow.

For ``f(x) = x^2`` the output of query ``q`` over keys ``k_j`` with values ``v_j`` is

    o(q) = sum_j <q, k_j>^2 v_j / sum_j <q, k_j>^2 = phi(q)^T S / q^T G q,   S = sum_j phi(k_j) v_j^T,

with ``phi`` the symmetric degree-2 features (``<phi(q), phi(k)> = <q, k>^2``, ``D = d (d + 1) / 2`` of them) and
``G`` the Gram matrix the sketch keeps anyway (docs/theory.md, "Values and exact outputs").  ``S`` is the
recurrent state of symmetric-power ("power attention") transformers; merging two states adds them.

Rows fed one at a time wait in a small buffer (``BUFFER_ROWS``) and are folded into ``S`` together by one
matrix product; a query adds the waiting rows' terms ``<q, k>^2 v`` directly.  A rank-one update of ``S`` per
key would read and write all ``D x dv`` numbers for every key; the buffer makes that a BLAS-3 product.
"""

from __future__ import annotations

import numpy as np

from ._kernels.lift import lift_degree2, lift_rows
from ._kernels.live import moment_numerator
from .summaries.gram import _two_sum_add
from .summaries.lifted import lifted_dim

#: Keys waiting before they are folded into ``S`` (a query costs ``O(BUFFER_ROWS (d + dv))`` for them).
BUFFER_ROWS = 128

#: Chunks are folded in pieces of this many rows (the lifted rows take ``rows x D`` floats).
_FOLD_ROWS = 1024

#: Up to this many rows are lifted by a serial loop: a parallel region costs more to start than it saves, and on a
#: busy machine it can wait milliseconds for a core.
_SERIAL_LIFT_ROWS = 1024


#: Up to this many queries the numerator is one compiled loop over ``S`` (a decode step).
_LOOP_QUERY_ROWS = 8


def _lift(X: np.ndarray) -> np.ndarray:
    return lift_rows(X) if X.shape[0] <= _SERIAL_LIFT_ROWS else lift_degree2(X)


class MomentState:
    """``S = sum_j phi(k_j) v_j^T`` (shape ``(D, value_dim)``), accumulated in float64 with a compensated sum.

    ``degree=4`` keeps the same state over lifted keys (``<q, k>^4 = <phi(q), phi(k)>^2``) for exact p = 4
    outputs: ``D`` is then ``d (d + 1) / 2`` lifted once more, which only small ``d`` afford.

    Examples
    --------
    >>> import numpy as np
    >>> from levstream.moments import MomentState
    >>> rng = np.random.default_rng(0)
    >>> K, V, q = rng.standard_normal((50, 3)), rng.standard_normal((50, 2)), rng.standard_normal((1, 3))
    >>> S = MomentState(3, 2); S.add(K[:20], V[:20]); S.add_row(K[20], V[20]); S.add(K[21:], V[21:])
    >>> w = (K @ q[0]) ** 2
    >>> bool(np.allclose(S.numerator(q)[0], w @ V))
    True
    """

    def __init__(self, dim: int, value_dim: int, degree: int = 2) -> None:
        if degree not in (2, 4):
            raise ValueError(f"degree must be 2 or 4; got {degree} instead.")
        self.dim, self.value_dim, self.degree = int(dim), int(value_dim), int(degree)
        #: degree 4: ``<q, k>^4 = <phi(q), phi(k)>^2``, so the state of degree 2 over lifted keys and queries
        self._inner = self.dim if degree == 2 else lifted_dim(self.dim)
        D = lifted_dim(self._inner)
        self._hi = np.zeros((D, self.value_dim))
        self._lo = np.zeros((D, self.value_dim))
        self._sum: np.ndarray | None = None
        self._buf_keys = np.empty((BUFFER_ROWS, self._inner))
        self._buf_values = np.empty((BUFFER_ROWS, self.value_dim))
        self._buf_n = 0

    @property
    def nbytes(self) -> int:
        """Bytes held (the compensated state and the row buffer)."""
        return int(
            self._hi.nbytes + self._lo.nbytes + self._buf_keys.nbytes + self._buf_values.nbytes
        )

    def _fold(self, X: np.ndarray, V: np.ndarray) -> None:
        for s in range(0, X.shape[0], _FOLD_ROWS):
            _two_sum_add(self._hi, self._lo, _lift(X[s : s + _FOLD_ROWS]).T @ V[s : s + _FOLD_ROWS])
        self._sum = None

    def _fold_buffer(self) -> None:
        if self._buf_n:
            self._fold(self._buf_keys[: self._buf_n], self._buf_values[: self._buf_n])
            self._buf_n = 0

    @staticmethod
    def nbytes_for(dim: int, value_dim: int, degree: int = 2) -> int:
        """Bytes of the state for keys of width ``dim`` (two ``D x value_dim`` float64 arrays)."""
        inner = dim if degree == 2 else lifted_dim(dim)
        return 2 * 8 * lifted_dim(inner) * value_dim

    def _inner_rows(self, X: np.ndarray) -> np.ndarray:
        return X if self.degree == 2 else _lift(X)

    def add_row(self, x: np.ndarray, v: np.ndarray) -> None:
        """Add one key and its value (buffered)."""
        if self.degree == 4:
            x = _lift(x[None, :])[0]
        self._buf_keys[self._buf_n] = x
        self._buf_values[self._buf_n] = v
        self._buf_n += 1
        if self._buf_n == BUFFER_ROWS:
            self._fold_buffer()

    def add(self, X: np.ndarray, V: np.ndarray) -> None:
        """Fold keys ``X`` (m, dim) and their values ``V`` (m, value_dim): ``S += phi(X)^T V``."""
        if X.shape[0] == 0:
            return
        X = self._inner_rows(X)
        if self._buf_n + X.shape[0] <= BUFFER_ROWS:
            self._buf_keys[self._buf_n : self._buf_n + X.shape[0]] = X
            self._buf_values[self._buf_n : self._buf_n + X.shape[0]] = V
            self._buf_n += X.shape[0]
            if self._buf_n == BUFFER_ROWS:
                self._fold_buffer()
            return
        self._fold_buffer()
        self._fold(X, V)

    def merge(self, other: MomentState) -> None:
        """Add ``other``'s state (keys of another shard): ``S = S1 + S2``."""
        self._fold_buffer()
        _two_sum_add(self._hi, self._lo, other._hi)
        self._lo += other._lo
        if other._buf_n:
            self._fold(other._buf_keys[: other._buf_n], other._buf_values[: other._buf_n])
        self._sum = None

    def scale(self, factor: float) -> None:
        """Multiply the state by ``factor`` (``S <- factor S``; the waiting keys by ``sqrt(factor)``): a decaying
        stream's change of reference frame (docs/theory.md, "Decay and gates").  Exact for a power of 4."""
        self._hi *= factor
        self._lo *= factor
        self._buf_keys[: self._buf_n] *= np.sqrt(factor)
        self._sum = None

    def copy(self) -> MomentState:
        """An independent copy."""
        out = MomentState.__new__(MomentState)
        out.dim, out.value_dim, out._buf_n = self.dim, self.value_dim, self._buf_n
        out.degree, out._inner = self.degree, self._inner
        out._hi, out._lo, out._sum = self._hi.copy(), self._lo.copy(), None
        out._buf_keys, out._buf_values = self._buf_keys.copy(), self._buf_values.copy()
        return out

    def numerator(self, Q: np.ndarray) -> np.ndarray:
        """``sum_j <q, k_j>^degree v_j`` for every row of ``Q`` (shape (m, value_dim))."""
        Q = self._inner_rows(Q)
        if self._sum is None:
            self._sum = self._hi + self._lo
        if (
            Q.shape[0] <= _LOOP_QUERY_ROWS and Q.flags.c_contiguous
        ):  # no lifted copy, no threaded GEMV
            out = moment_numerator(Q, self._sum)
        else:
            out = _lift(Q) @ self._sum
        if self._buf_n:
            W = Q @ self._buf_keys[: self._buf_n].T
            out += (W * W) @ self._buf_values[: self._buf_n]
        return out

    def to_state(self) -> dict[str, np.ndarray]:
        """Named arrays for serialization (the state and the waiting rows)."""
        return {
            "moments_hi": self._hi,
            "moments_lo": self._lo,
            "moments_buf_keys": self._buf_keys[: self._buf_n],
            "moments_buf_values": self._buf_values[: self._buf_n],
        }

    @classmethod
    def from_state(
        cls, dim: int, value_dim: int, arrays: dict[str, np.ndarray], degree: int = 2
    ) -> MomentState:
        """Inverse of :meth:`to_state` (raises ``ValueError`` for inconsistent shapes)."""
        out = cls(dim, value_dim, degree)
        for name in ("moments_hi", "moments_lo"):
            arr = arrays[name]
            if arr.shape != out._hi.shape:
                raise ValueError(
                    f"stored array {name!r} must have shape {out._hi.shape}; got {arr.shape}"
                )
        keys, values = arrays["moments_buf_keys"], arrays["moments_buf_values"]
        m = keys.shape[0]
        if keys.shape != (m, out._inner) or values.shape != (m, value_dim) or m >= BUFFER_ROWS:
            raise ValueError(
                f"stored moment buffer must hold fewer than {BUFFER_ROWS} rows of shapes ({m}, {out._inner}) "
                f"and ({m}, {value_dim}); got {keys.shape} and {values.shape}"
            )
        out._hi, out._lo = arrays["moments_hi"].copy(), arrays["moments_lo"].copy()
        out._buf_keys[:m], out._buf_values[:m], out._buf_n = keys, values, m
        return out
