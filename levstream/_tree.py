"""The build plan shared by the embedded and the Dask builds: one sketch per partition, then a tree of merges.

Both :func:`levstream.build_sketch` (thread pool) and :func:`levstream.dask.build_sketch` use the pieces here,
so a given partitioning gives the same leaves, the same merge tree and the same seeds on either path:

* :func:`partition_options` gives every partition its own ``rng`` (children of the user's seed by
  ``SeedSequence.spawn``);
* :func:`sketch_partition` feeds one partition's chunks with global ids and names the partition in any error;
* :func:`reduce_tree` merges partitions in groups of ``split_every`` consecutive ones, level by level;
  :func:`merge_group` is the merge done at every node of that tree;
* :func:`capped_threads` bounds the BLAS and numba threads a task may use (the oversubscription policy),
  :func:`numba_turn` serialises parallel kernels under numba's non-thread-safe ``workqueue`` layer.

Thread policy
-------------
A task that runs next to ``slots`` other tasks on ``cores`` cores gets ``max(1, cores // slots)`` threads for
BLAS and for numba, never more than the BLAS limit its process already has (distributed's nanny sets that
to 1 per worker process).  The BLAS limit is process-wide (one OpenBLAS thread pool per process, changed by
one thread at a time), so where several tasks share a process it is lowered once by the thread that runs
them all (the caller of the thread pool, or of Dask's threaded scheduler) and tasks only check it; numba's
limit is per thread and set in every task.  numba's ``workqueue`` threading layer aborts the process when
two threads launch parallel kernels at once, so under that layer the threads of one process take turns,
chunk by chunk (install ``tbb``, or use the default OpenMP layer, to run them side by side).
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, ContextManager, Iterable, Iterator, Sequence, TypeVar

import numpy as np

from ._validation import as_real_array, check_int
from .sketch import KeySketch

T = TypeVar("T")

_RNG_OPTIONS = ("rng", "seed")


def available_cores() -> int:
    """Cores this process may run on (CPU affinity where the OS reports it)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


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


# ---------------------------------------------------------------------------------------------- threads
_workqueue_lock = threading.Lock()


def blas_threads() -> int:
    """The largest thread count of the BLAS libraries loaded in this process (0 if none is found)."""
    from threadpoolctl import threadpool_info

    return max([info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"], default=0)


def lowered_blas(n_threads: int) -> ContextManager[Any]:
    """Lower the process-wide BLAS thread limit to ``n_threads`` for a ``with`` block; never raise it.

    OpenBLAS (pthreads) has one thread pool per process and threadpoolctl lets one thread at a time change
    it, so this belongs in the thread that runs the whole parallel section (the caller of a thread pool), or
    in a task that has its process to itself.  When the limit is already low enough nothing is changed.
    """
    from threadpoolctl import threadpool_limits

    n_threads = max(1, int(n_threads))
    if blas_threads() <= n_threads:
        return nullcontext()
    return threadpool_limits(limits=n_threads, user_api="blas")


def numba_turn() -> ContextManager[Any]:
    """Exclusive use of numba's parallel runtime when it is the non-thread-safe ``workqueue`` layer.

    That layer aborts the process when two threads launch parallel kernels at once, so under it threads
    take turns (hold this around one chunk or one task, never around a wait for another thread).  Under the
    OpenMP or TBB layers it is a no-op.
    """
    import numba

    numba.get_num_threads()  # launches the threading layer if needed, so that it can be named
    return _workqueue_lock if numba.threading_layer() == "workqueue" else nullcontext()


@contextmanager
def capped_threads(n_threads: int) -> Iterator[None]:
    """Run a task with at most ``n_threads`` BLAS threads (see :func:`lowered_blas`) and numba threads.

    numba's limit is per thread and restored afterwards.
    """
    import numba

    n_threads = max(1, int(n_threads))
    previous = numba.get_num_threads()
    with lowered_blas(n_threads):
        numba.set_num_threads(min(n_threads, numba.config.NUMBA_NUM_THREADS))
        try:
            yield
        finally:
            numba.set_num_threads(previous)


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
        raise ValueError(f"every chunk must be 2-D (rows x dim); got shape {arr.shape}. "
                         "Wrap single rows as 1-row chunks.")
    return arr


def feed_chunk(sketch: KeySketch, chunk: Any, offset: int, kind: str, index: int) -> int:
    """Feed ``chunk`` (global ids from ``offset``) in pieces of one processing block; returns the rows fed.

    A chunk larger than the sketch's block is fed block by block, so that the Gram pass and the scoring
    pass over each piece run in cache (a whole large chunk would be read from memory twice).  Errors name
    ``kind index`` and the global rows of the piece, e.g. ``"partition 3 (rows 8192..16383) rejected:
    ..."``, with indices relative to the piece; the rejected piece leaves the sketch unchanged.  Zero-row
    chunks hold no keys and are skipped.
    """
    with named_errors(describe(kind, index, offset, chunk)):
        arr = _as_chunk(chunk)
    step = max(int(sketch._block_rows), 1)
    for start in range(0, arr.shape[0], step):
        piece = arr[start:start + step]
        with named_errors(describe(kind, index, offset + start, piece)):
            sketch.update_many(piece, offset=offset + start)
    return int(arr.shape[0])


def sketch_partition(chunks: Iterable[Any], offset: int, index: int, *, dim: int | None, eps: float,
                     p: float, options: dict[str, Any]) -> KeySketch | None:
    """The sketch of partition ``index``: its chunks fed in order with global ids from ``offset`` on.

    ``dim=None`` takes the width from the first non-empty chunk; a partition without rows then gives
    ``None`` (nothing to merge).  An invalid chunk raises a ``ValueError``/``TypeError`` naming the
    partition and its global rows.
    """
    sketch = None if dim is None else new_sketch(dim, eps, p, options)
    position = offset
    for chunk in chunks:
        if sketch is None:
            with named_errors(describe("partition", index, position, chunk)):
                width = _as_chunk(chunk).shape
            if not width[0]:
                continue
            sketch = new_sketch(int(width[1]), eps, p, options)
        position += feed_chunk(sketch, chunk, position, "partition", index)
    # settled before it travels: the candidates of a young sketch are mostly rows a prune would drop
    return None if sketch is None else sketch.flush()


# ---------------------------------------------------------------------------------------------- merges
def merge_group(*sketches: KeySketch | None) -> KeySketch | None:
    """Merge a group of sketches in order into a new sketch (inputs untouched); ``None`` entries are skipped."""
    present = [s for s in sketches if s is not None]
    if not present:
        return None
    out = present[0].copy()
    for other in present[1:]:
        out.merge(other)
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
        level = [level[i] if i + 1 == len(level) else combine(*level[i:i + split_every])
                 for i in range(0, len(level), split_every)]
    return level[0]
