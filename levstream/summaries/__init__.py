"""Normaliser summaries: what a sketch keeps of *all* keys so that ``Z(q) = sum_l f(<q, k_l>)`` and key
sensitivities can be computed without the keys.

Every summary offers the same small interface (used by :class:`levstream.KeySketch`):

``add(X)``, ``merge(other)``, ``copy()``, ``prefilter(X, threshold)``, ``scores(rows)``, ``normalizer(Q)``,
``rank_bound``, ``rel_error``, ``nbytes``, ``to_state()`` / ``from_state(state)``.
"""

from .gram import GramSummary

__all__ = ["GramSummary"]
