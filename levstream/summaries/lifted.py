"""Exact normaliser summary for ``f(x) = x^4``: the Gram matrix of symmetric degree-2 lifted keys.

``<q, k>^4 = <phi(q), phi(k)>^2`` with ``phi(x)`` the symmetric degree-2 monomials (off-diagonal ones scaled
by ``sqrt(2)``), of dimension ``D = d (d + 1) / 2`` (docs/theory.md, "General p").  So the p = 4 problem on the keys is the
p = 2 problem on the lifted keys: this summary is a :class:`GramSummary` of width ``D`` fed with ``phi(X)``.
``Z(q) = phi(q)^T G4 phi(q)`` is exact, and the lifted leverage score ``tau_j(Phi(K))`` is an upper bound on
the p = 4 sensitivity of key ``j`` (the sup over all ``D``-vectors includes the lifted queries), with
``sum tau <= D``.
"""

from __future__ import annotations

import numpy as np

from .._kernels.lift import lift_degree2
from .base import NormalizerSummary
from .gram import GramSummary

#: Default memory budget of the lifted summary: the Gram matrix and its compensation term (``2 D^2`` float64)
#: plus an R factor when ill-conditioned (``D^2``), ``3 * 8 * D^2`` bytes in all.  256 MiB allows d <= 67.
DEFAULT_MEMORY_BUDGET = 256 * 2**20


def lifted_dim(dim: int) -> int:
    """``D = d (d + 1) / 2``, the dimension of the symmetric degree-2 lifting."""
    return dim * (dim + 1) // 2


def lift(X: np.ndarray) -> np.ndarray:
    """``phi`` applied to every row of ``X`` (C-contiguous float64, shape (n, d)) -> shape (n, D).

    Examples
    --------
    >>> import numpy as np
    >>> from levstream.summaries.lifted import lift
    >>> x, y = np.array([[1.0, 2.0, -1.0]]), np.array([[0.5, -1.0, 3.0]])
    >>> bool(np.isclose((lift(x) @ lift(y).T)[0, 0], (x @ y.T)[0, 0] ** 2))
    True
    """
    return lift_degree2(np.ascontiguousarray(X, dtype=np.float64))


class LiftedSummary(NormalizerSummary):
    """Exact ``Z(q) = sum_l <q, k_l>^4`` and lifted leverage scores, from the ``D x D`` lifted Gram matrix.

    Parameters
    ----------
    dim : int
        Key width ``d``.
    memory_budget : int, default 256 MiB
        Refuse (``ValueError``) when ``3 * 8 * D^2`` bytes exceed it.

    Examples
    --------
    >>> import numpy as np
    >>> from levstream.summaries import LiftedSummary
    >>> K = np.random.default_rng(0).standard_normal((300, 3))
    >>> s = LiftedSummary(3); s.add(K[:100]); s.add(K[100:])
    >>> q = np.array([[1.0, -2.0, 0.5]])
    >>> bool(np.isclose(s.normalizer(q)[0], ((K @ q[0]) ** 4).sum()))
    True
    """

    kind = "lifted"

    def __init__(self, dim: int, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> None:
        self.dim = int(dim)
        self.lifted_dim = lifted_dim(self.dim)
        self.memory_budget = int(memory_budget)
        need = 3 * 8 * self.lifted_dim**2
        if need > self.memory_budget:
            raise ValueError(
                f"exact p = 4 needs the lifted Gram matrix of dimension D = d(d+1)/2 = {self.lifted_dim} "
                f"({need / 2**20:.1f} MiB) but memory_budget is {self.memory_budget / 2**20:.1f} MiB. "
                "Use exact=False (the l_p coreset) or raise memory_budget."
            )
        self._gram = GramSummary(self.lifted_dim)
        #: the last block added and its lifting (the sketch prefilters that block right after adding it)
        self._last: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def config(self) -> tuple:
        return (self.kind, self.dim)

    @property
    def n_rows(self) -> int:  # type: ignore[override]  # read-only here: the inner Gram summary counts rows
        """Keys added."""
        return self._gram.n_rows

    @property
    def mode(self) -> str:
        return self._gram.mode

    @property
    def size_bound(self) -> float:
        """``D``: the lifted leverage scores sum to at most ``D``."""
        return float(self.lifted_dim)

    def _lifted(self, X: np.ndarray) -> np.ndarray:
        if self._last is not None and self._last[0] is X:
            return self._last[1]
        return lift(X)

    @staticmethod
    def block_gram(X: np.ndarray) -> np.ndarray:
        """``X^T X`` of a block: the sketch uses its diagonal to validate chunks; :meth:`add` does not need it."""
        return X.T @ X

    def add(self, X: np.ndarray, block: np.ndarray | None = None) -> None:
        L = lift(X)
        self._gram.add(L)
        self._last = (X, L)

    def merge(self, other: LiftedSummary) -> None:
        self._last = None
        self._gram.merge(other._gram)

    def copy(self) -> LiftedSummary:
        out = LiftedSummary.__new__(LiftedSummary)
        out.__dict__.update(self.__dict__)
        out._gram = self._gram.copy()
        out._last = None
        return out

    @property
    def rel_error(self) -> float:
        return self._gram.rel_error

    def scores(self, rows: np.ndarray) -> np.ndarray:
        """Lifted leverage scores ``phi(k)^T G4^+ phi(k)`` (upper bounds on the p = 4 sensitivities)."""
        return self._gram.scores(self._lifted(rows))

    def prefilter(self, X: np.ndarray, threshold: float) -> np.ndarray:
        """Indices of rows whose lifted leverage score may be ``>= threshold`` (the Gram norm pre-filter)."""
        return self._gram.prefilter(self._lifted(X), threshold)

    def normalizer(self, Q: np.ndarray) -> np.ndarray:
        """Exact ``Z(q) = phi(q)^T G4 phi(q) = sum_l <q, k_l>^4``."""
        return self._gram.normalizer(lift(Q))

    @property
    def nbytes(self) -> int:
        return self._gram.nbytes

    def to_state(self) -> tuple[dict, dict]:
        meta, arrays = self._gram.to_state()
        return {
            "kind": self.kind,
            "dim": self.dim,
            "memory_budget": self.memory_budget,
            "gram": meta,
        }, arrays

    @classmethod
    def from_state(cls, meta: dict, arrays: dict) -> LiftedSummary:
        out = cls(int(meta["dim"]), int(meta["memory_budget"]))
        out._gram = GramSummary.from_state(meta["gram"], arrays)
        if out._gram.dim != out.lifted_dim:
            raise ValueError(
                f"lifted summary must have dimension {out.lifted_dim}; got {out._gram.dim}."
            )
        return out
