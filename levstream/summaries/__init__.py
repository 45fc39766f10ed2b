"""Normaliser summaries: what a sketch keeps of *all* keys so that ``Z(q) = sum_l f(<q, k_l>)`` and key
sensitivities can be computed without the keys.

Every summary implements :class:`~levstream.summaries.base.NormalizerSummary`; the sketch and the query path
use that interface only.  :func:`make_summary` picks the summary for an exponent ``p``.
"""

from typing import Any

from .base import NormalizerSummary
from .coreset import CoresetSummary
from .gram import GramSummary
from .lifted import DEFAULT_MEMORY_BUDGET, LiftedSummary

__all__ = [
    "CoresetSummary",
    "GramSummary",
    "LiftedSummary",
    "NormalizerSummary",
    "make_summary",
    "summary_from_state",
]


def make_summary(
    dim: int,
    p: float,
    *,
    exact: bool | None = None,
    delta: float = 0.1,
    failure_prob: float | None = None,
    oversampling: float | None = None,
    rng: Any = None,
    memory_budget: int | None = None,
) -> NormalizerSummary:
    """The normaliser summary for exponent ``p``: Gram (p = 2), lifted Gram (p = 4, ``exact=True``) or coreset.

    ``exact=None`` means exact where it is free (p = 2) and the coreset otherwise; ``exact=True`` exists for
    p = 2 and p = 4 only (the lifted Gram matrix needs ``D = d(d+1)/2`` squared memory, see ``memory_budget``).
    """
    if p == 2.0 and exact is not False:
        return GramSummary(dim)
    if exact:
        if p != 4.0:
            raise ValueError(
                f"exact=True is available for p = 2 and p = 4; got p = {p:g}. "
                "Use exact=False (an l_p coreset with (1 ± delta) guarantees)."
            )
        return LiftedSummary(
            dim, DEFAULT_MEMORY_BUDGET if memory_budget is None else int(memory_budget)
        )
    return CoresetSummary(
        dim, p, delta=delta, failure_prob=failure_prob, oversampling=oversampling, rng=rng
    )


def summary_from_state(meta: dict, arrays: dict) -> NormalizerSummary:
    """Rebuild a summary written by ``to_state()`` (dispatch on ``meta["kind"]``)."""
    kinds: dict[str, type[NormalizerSummary]] = {
        "gram": GramSummary,
        "lifted": LiftedSummary,
        "coreset": CoresetSummary,
    }
    kind = meta.get("kind")
    if kind not in kinds:
        raise ValueError(f"unknown summary kind {kind!r}; expected one of {sorted(kinds)}.")
    return kinds[kind].from_state(meta, arrays)
