"""levstream: find every heavy attention entry from a small, mergeable sketch of streamed keys.

See DESIGN.md for the contract.  Public names::

    KeySketch, load, leverage_scores, universal_set, UniversalSet, HeavyEntries, TopK, testing
"""

__version__ = "0.1.0"

from . import testing
from .results import HeavyEntries, TopK, UniversalSet
from .scores import leverage_scores, universal_set
from .sketch import KeySketch, load

__all__ = [
    "KeySketch",
    "load",
    "leverage_scores",
    "universal_set",
    "UniversalSet",
    "HeavyEntries",
    "TopK",
    "testing",
    "__version__",
]
