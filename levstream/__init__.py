"""levstream: find every heavy attention entry from a small, mergeable sketch of streamed keys.

The contract is in the documentation (docs/api.md); the theory in docs/theory.md.  Public names::

    KeySketch, MultiHeadKeySketch, build_sketch, load, UniversalSet, HeavyEntries, HeadEntries, TopK, AttentionResult,
    leverage_scores, approx_leverage_scores, lewis_weights, sensitivity_bounds, universal_set,
    OnlineLeverageSampler, lev_attention, set_num_threads, get_num_threads, testing
"""

__version__ = "0.2.0"

from . import testing
from ._threads import get_num_threads, set_num_threads
from .attention import lev_attention
from .build import build_sketch
from .lewis import lewis_weights, sensitivity_bounds
from .multihead import MultiHeadKeySketch
from .online import OnlineLeverageSampler
from .results import AttentionResult, HeadEntries, HeavyEntries, TopK, UniversalSet
from .scores import approx_leverage_scores, leverage_scores, universal_set
from .sketch import KeySketch, load

__all__ = [
    "AttentionResult",
    "HeadEntries",
    "HeavyEntries",
    "KeySketch",
    "MultiHeadKeySketch",
    "OnlineLeverageSampler",
    "TopK",
    "UniversalSet",
    "__version__",
    "approx_leverage_scores",
    "build_sketch",
    "get_num_threads",
    "lev_attention",
    "leverage_scores",
    "lewis_weights",
    "load",
    "sensitivity_bounds",
    "set_num_threads",
    "testing",
    "universal_set",
]
