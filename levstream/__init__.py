"""levstream: find every heavy attention entry from a small, mergeable sketch of streamed keys.

See DESIGN.md for the contract.  Public names::

    KeySketch, load, leverage_scores, universal_set, UniversalSet, HeavyEntries, TopK, testing
"""

__version__ = "0.1.0"

from . import testing
from .attention import lev_attention
from .results import HeavyEntries, TopK, UniversalSet
from .lewis import lewis_weights, sensitivity_bounds
from .online import OnlineLeverageSampler
from .scores import approx_leverage_scores, leverage_scores, universal_set
from .sketch import KeySketch, load
from .build import build_sketch
from .multihead import MultiHeadKeySketch
from ._threads import get_num_threads, set_num_threads

__all__ = [
    "KeySketch",
    "build_sketch",
    "MultiHeadKeySketch",
    "lev_attention",
    "load",
    "leverage_scores",
    "universal_set",
    "approx_leverage_scores",
    "lewis_weights",
    "sensitivity_bounds",
    "OnlineLeverageSampler",
    "UniversalSet",
    "HeavyEntries",
    "TopK",
    "set_num_threads",
    "get_num_threads",
    "testing",
    "__version__",
]
