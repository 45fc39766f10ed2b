"""The build plan shared by the embedded and the Dask builds: one sketch per partition, then a tree of merges.

Both :func:`levstream.build_sketch` (thread pool) and :func:`levstream.dask.build_sketch` use the pieces here,
so a given partitioning gives the same leaves, the same merge tree and the same seeds on either path:

* :func:`partition_options` gives every partition its own ``rng`` (children of the user's seed by
  ``SeedSequence.spawn``);
* :func:`sketch_partition` feeds one partition's chunks with global ids and names the partition in any error;
  a chunk is an array of keys or a ``(K, V)`` pair of keys and their value rows (:func:`feed_chunk`);
* :func:`reduce_tree` merges partitions in groups of ``split_every`` consecutive ones, level by level;
  :func:`merge_group` is the merge done at every node of that tree.

Thread caps (the oversubscription policy, the ``workqueue`` turns) are in :mod:`levstream._threads`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import numpy as np

from ._validation import as_real_array, check_int
from .sketch import KeySketch

T = TypeVar("T")

_RNG_OPTIONS = ("rng", "seed")


# ---------------------------------------------------------------------------------------------- randomness
def _split_seed(sketch_options: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """The options without ``rng``/``seed``, and the seed given by either name (None if neither)."""
    options = dict(sketch_options)
    given = [name for name in _RNG_OPTIONS if name in options]
    if len(given) > 1:
        raise ValueError("pass rng= or seed=, not both; got both.")
    return options, (options.pop(given[0]) if given else None)


def partition_options(sketch_options: dict[str, Any], n_partitions: int) -> list[dict[str, Any]]:
    """Constructor options for each of ``n_partitions`` partition sketches.

    ``rng`` or ``seed`` (one of them) is the user's seed.  Partition ``i`` gets the ``i``-th child of
    ``SeedSequence(seed).spawn`` as its ``rng``; so an integer seed and a partitioning reproduce the build.
    (A ``SeedSequence`` or ``Generator`` passed as the seed spawns from its own sequence, which advances
    with every build.)  Exact modes draw nothing from it.

    Examples
    --------
    >>> from levstream._tree import partition_options
    >>> [o["block_rows"] for o in partition_options({"block_rows": 512, "seed": 7}, 2)]
    [512, 512]
    """
    n_partitions = check_int(n_partitions, "n_partitions", minimum=0)
    options, seed = _split_seed(sketch_options)
    if isinstance(seed, np.random.Generator):
        root = seed.bit_generator.seed_seq
        assert isinstance(root, np.random.SeedSequence)
    else:
        root = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    return [dict(options, rng=child) for child in root.spawn(n_partitions)]


def new_sketch(dim: int, eps: float, p: float, options: dict[str, Any]) -> KeySketch:
    """A partition's empty sketch.  A ``SeedSequence`` seed becomes a fresh Generator here, so a task that is
    run again (retried after a lost worker) draws exactly the same numbers."""
    seed = options.get("rng")
    if isinstance(seed, np.random.SeedSequence):
        options = dict(options, rng=np.random.default_rng(seed))
    return KeySketch(dim, eps=eps, p=p, **options)


def root_options(sketch_options: dict[str, Any]) -> dict[str, Any]:
    """Constructor options for a single (unpartitioned) stream: the user's seed is passed through as ``rng``."""
    options, seed = _split_seed(sketch_options)
    if seed is not None:
        options["rng"] = seed
    return options


# ---------------------------------------------------------------------------------------------- leaves
def describe(kind: str, index: int, offset: int, chunk: Any) -> str:
    """``"partition 3 (rows 300..399)"``: how errors name a piece of the input by its global rows."""
    shape = getattr(chunk, "shape", None)
    if shape is not None and len(shape) == 2 and shape[0]:
        return f"{kind} {index} (rows {offset}..{offset + shape[0] - 1})"
    return f"{kind} {index} (rows from {offset})"


@contextmanager
def named_errors(where: str, verb: str = "rejected") -> Iterator[None]:
    """Re-raise a ``ValueError``/``TypeError`` of the body as ``"<where> <verb>: <message>"``."""
    try:
        yield
    except (ValueError, TypeError) as exc:
        cls = TypeError if isinstance(exc, TypeError) else ValueError
        raise cls(f"{where} {verb}: {exc}") from exc


def _as_chunk(chunk: Any) -> np.ndarray:
    arr = as_real_array(chunk, "chunk")
    if arr.ndim != 2:
        raise ValueError(
            f"every chunk must be 2-D (rows x dim); got shape {arr.shape}. "
            "Wrap single rows as 1-row chunks."
        )
    return arr


def split_pair(chunk: Any) -> tuple[Any, Any]:
    """``(keys, values)`` of a chunk: a ``(K, V)`` pair, or keys alone (values ``None``)."""
    if isinstance(chunk, tuple):
        if len(chunk) != 2:
            raise ValueError(
                f"a tuple chunk must be a (keys, values) pair; got a tuple of {len(chunk)}."
            )
        return chunk
    return chunk, None


def keys_of(chunk: Any) -> Any:
    """The keys of a chunk (the chunk itself, or the first of a ``(K, V)`` pair); never raises."""
    return chunk[0] if isinstance(chunk, tuple) and chunk else chunk


def value_width(chunk: Any) -> int | None:
    """Width of the values of a ``(K, V)`` chunk (None for keys alone); raises for malformed
    values."""
    _, values = split_pair(chunk)
    if values is None:
        return None
    arr = as_real_array(values, "values")
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise ValueError(f"values must be 2-D (rows x value_dim); got shape {arr.shape}.")
    return int(arr.shape[1])


def _as_values(values: Any, rows: int, value_dim: int | None) -> np.ndarray | None:
    """The value rows of a chunk of ``rows`` keys, checked against the sketch (shape only:
    finiteness is checked by the sketch, piece by piece)."""
    if value_dim is None:
        if values is not None:
            raise ValueError(
                "got (keys, values) pairs but the sketch keeps no values; pass "
                "value_dim= (or values=) to the build."
            )
        return None
    if values is None:
        raise ValueError(
            f"every chunk must come with its values (the build keeps value rows of "
            f"width {value_dim}); got keys alone. Pass (keys, values) pairs."
        )
    arr = as_real_array(values, "values")
    if arr.ndim != 2 or arr.shape != (rows, value_dim):
        raise ValueError(
            f"values must have one row of width {value_dim} per key: shape ({rows}, "
            f"{value_dim}); got shape {arr.shape}."
        )
    return arr


def feed_chunk(sketch: KeySketch, chunk: Any, offset: int, kind: str, index: int) -> int:
    """Feed ``chunk`` (global ids from ``offset``) in pieces of one processing block; returns the
    rows fed.

    ``chunk`` is a 2-D array of keys, or a ``(K, V)`` pair of keys and their value rows when the
    sketch keeps values.  A chunk larger than the sketch's block is fed block by block, so that the
    Gram pass and the scoring pass over each piece run in cache (a whole large chunk would be read
    from memory twice).  Errors name ``kind index`` and the global rows of the piece, e.g.
    ``"partition 3 (rows 8192..16383) rejected: ..."``, with indices relative to the piece; the
    rejected piece leaves the sketch unchanged.  A chunk with zero rows and the sketch's width is a
    no-op; a wrong width (of keys or values) is an error, rows or not.
    """
    with named_errors(describe(kind, index, offset, keys_of(chunk))):
        keys, values = split_pair(chunk)
        arr = _as_chunk(keys)
        if arr.shape[1] != sketch.dim:
            raise ValueError(
                f"every chunk must have {sketch.dim} columns (the sketch's dim); "
                f"got shape {arr.shape}."
            )
        vals = _as_values(values, arr.shape[0], sketch.value_dim)
    step = max(int(sketch._block_rows), 1)
    for start in range(0, arr.shape[0], step):
        piece = arr[start : start + step]
        with named_errors(describe(kind, index, offset + start, piece)):
            sketch.update_many(
                piece, None if vals is None else vals[start : start + step], offset=offset + start
            )
    return int(arr.shape[0])


def sketch_partition(
    chunks: Iterable[Any],
    offset: int,
    index: int,
    *,
    dim: int | None,
    eps: float,
    p: float,
    options: dict[str, Any],
) -> KeySketch | None:
    """The sketch of partition ``index``: its chunks fed in order with global ids from ``offset`` on.

    ``dim=None`` takes the width from the first chunk (empty or not), and a ``value_dim`` missing
    from ``options`` the width of the first chunk's values when chunks are ``(K, V)`` pairs; a
    partition without any chunk then gives ``None`` (nothing to merge), one whose chunks hold no
    rows an empty sketch.  An invalid chunk raises a ``ValueError``/``TypeError`` naming the
    partition and its global rows.
    """
    sketch = None if dim is None else new_sketch(dim, eps, p, options)
    position = offset
    for chunk in chunks:
        if sketch is None:
            with named_errors(describe("partition", index, position, keys_of(chunk))):
                width = value_width(chunk)
                opts = (
                    options
                    if width is None or options.get("value_dim") is not None
                    else dict(options, value_dim=width)
                )
                sketch = new_sketch(int(_as_chunk(keys_of(chunk)).shape[1]), eps, p, opts)
        position += feed_chunk(sketch, chunk, position, "partition", index)
    # settled before it travels: the candidates of a young sketch are mostly rows a prune would drop
    return None if sketch is None else sketch.flush()


# ---------------------------------------------------------------------------------------------- merges
def merge_group(*sketches: KeySketch | None) -> KeySketch | None:
    """Merge a group of sketches in order into a new sketch (inputs untouched); ``None`` entries are skipped."""
    present = [s for s in sketches if s is not None]
    if not present:
        return None
    out = present[0].copy()  # (a copy no caller sees yet: its merges need not be undoable)
    for other in present[1:]:
        out._merge(other, atomic=False)
    return out


def reduce_tree(items: Sequence[T], combine: Callable[..., T], split_every: int) -> T:
    """Combine ``items`` in a tree: groups of ``split_every`` consecutive items per node, level by level.

    ``combine(*group)`` is called for every group of two or more; a lone last item goes up unchanged.  The
    tree depends only on ``len(items)`` and ``split_every``, so every executor builds the same one.

    Examples
    --------
    >>> from levstream._tree import reduce_tree
    >>> reduce_tree(list("abcde"), lambda *g: "(" + "".join(g) + ")", split_every=2)
    '(((ab)(cd))e)'
    """
    split_every = check_int(split_every, "split_every", minimum=2)
    level = list(items)
    if not level:
        raise ValueError("nothing to merge: the build has no partitions.")
    while len(level) > 1:
        level = [
            level[i] if i + 1 == len(level) else combine(*level[i : i + split_every])
            for i in range(0, len(level), split_every)
        ]
    return level[0]
