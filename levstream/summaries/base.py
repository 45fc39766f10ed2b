"""``NormalizerSummary``: the one interface every normaliser summary implements.

A summary is what a sketch keeps of *all* keys so that ``Z(q) = sum_l f(<q, k_l>)`` and bounds on key
sensitivities can be computed without the keys.  The sketch and the query path talk to summaries through this
interface only (docs/theory.md, "The guarantee" and "General p").
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import numpy as np


class NormalizerSummary(abc.ABC):
    """Interface of the normaliser summaries (Gram, lifted Gram, coreset).

    Subclasses set ``kind``, ``dim`` and ``n_rows`` and implement the abstract members.  The defaults below
    describe an exact summary: no distortion, no query rescaling, scores that are their own upper bounds.
    """

    kind: ClassVar[str]
    dim: int
    n_rows: int

    # ------------------------------------------------------------------ description
    @property
    @abc.abstractmethod
    def mode(self) -> str:
        """The representation in use (``"gram"``, ``"qr"``, ``"coreset"``)."""

    @property
    def config(self) -> tuple:
        """Settings two summaries must share to be merged."""
        return (self.kind, self.dim)

    @property
    def size_bound(self) -> float:
        """Bound on the sum of the scores of all keys: the candidate capacity is ``2 size_bound / eps``."""
        return float(self.dim)

    @property
    def distortion(self) -> float:
        """``delta`` of an approximate normaliser (``Z~`` within ``(1 ± delta) Z``); 0 when exact."""
        return 0.0

    @property
    @abc.abstractmethod
    def rel_error(self) -> float:
        """Estimated relative rounding error of :meth:`scores` (it sets the safety margins)."""

    @property
    @abc.abstractmethod
    def nbytes(self) -> int:
        """Bytes held."""

    # ------------------------------------------------------------------ updates
    @staticmethod
    @abc.abstractmethod
    def block_gram(X: np.ndarray) -> np.ndarray:
        """A ``(dim, dim)`` matrix whose diagonal is non-finite iff the block ``X`` holds a nan/inf (or squares
        that overflow): the sketch validates whole blocks with it for free.  :meth:`add` may reuse it."""

    @abc.abstractmethod
    def add(self, X: np.ndarray, block: np.ndarray | None = None) -> None:
        """Fold the rows of ``X`` (C-contiguous float64, finite) into the summary."""

    @abc.abstractmethod
    def prefilter(self, X: np.ndarray, threshold: float) -> np.ndarray:
        """Indices of the rows of the block just added by :meth:`add` whose score may be ``>= threshold``
        (a cheap test that never drops a row whose score reaches the threshold)."""

    @abc.abstractmethod
    def merge(self, other: Any) -> None:
        """Fold ``other`` (same :attr:`config`) into this summary."""

    @abc.abstractmethod
    def copy(self) -> NormalizerSummary:
        """An independent copy."""

    # ------------------------------------------------------------------ scores and normaliser
    @abc.abstractmethod
    def scores(self, rows: np.ndarray) -> np.ndarray:
        """Sensitivity scores (p = 2: exact leverage scores; otherwise upper bounds) of ``rows``."""

    def score_upper_bounds(self, rows: np.ndarray) -> np.ndarray:
        """Upper bounds on :meth:`scores`, possibly cheaper (no refactorisation); here the scores themselves."""
        return self.scores(rows)

    @abc.abstractmethod
    def normalizer(self, Q: np.ndarray) -> np.ndarray:
        """``Z(q)`` (or its estimate ``Z~(q)``) over every key added, for each row of ``Q``."""

    #: Whether :meth:`query_scale` rescales queries (it then needs every row a query will meet).
    rescales_queries: ClassVar[bool] = False

    def query_scale(self, Q: np.ndarray, rows: np.ndarray) -> np.ndarray | None:
        """Per-query factors applied before ``|<q, k>|^p`` is formed, or None (no rescaling needed)."""
        return None

    # ------------------------------------------------------------------ persistence
    @abc.abstractmethod
    def to_state(self) -> tuple[dict, dict]:
        """``(meta, arrays)``: a JSON-able header and named arrays."""

    @classmethod
    @abc.abstractmethod
    def from_state(cls, meta: dict, arrays: dict) -> NormalizerSummary:
        """Inverse of :meth:`to_state` (raises ``ValueError`` for inconsistent state)."""
