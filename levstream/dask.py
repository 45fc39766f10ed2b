"""Build a :class:`~levstream.KeySketch` on Dask: one sketch per partition, then a tree of merges.

Optional: needs ``dask`` (``pip install 'levstream[dask]'``); ``import levstream`` never imports this module.
The partition sketches, the merge tree and the per-partition seeds are those of the embedded
:func:`levstream.build_sketch` (shared code in ``levstream._tree``), so the two paths agree.

Threads (no oversubscription): a partition or merge task that shares its process with ``slots`` concurrent
tasks (the threads of a ``distributed`` worker, or the local schedulers' ``num_workers``, one per core by
default) uses at most ``max(1, budget // slots)`` numba threads and as many BLAS threads, never more
BLAS threads than its process already allows; the budget is :func:`levstream.get_num_threads` of the
process that runs the task (its cores unless capped there).  Dask's own worker threads are Dask's
to configure.  With Dask's threaded scheduler the BLAS limit (one per process) is lowered once
around the whole computation; a task of the process scheduler lowers its own.
``distributed``'s nanny starts workers with ``OMP/MKL/OPENBLAS_NUM_THREADS=1``, so on a cluster every task
runs single-threaded and the parallelism comes from the partitions; numba, which the nanny does not cap, is
held to the same number.  (With an in-process cluster, ``LocalCluster(processes=False)``, set the BLAS
threads yourself, e.g. with ``threadpoolctl.threadpool_limits``.)
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np

try:
    import dask
    import dask.array as da
    import dask.bag as db
    import dask.threaded
    from dask.base import get_scheduler
    from dask.delayed import Delayed, delayed
except ImportError as exc:  # pragma: no cover - exercised only without the optional dependency
    raise ImportError(
        "levstream.dask needs Dask: pip install 'levstream[dask]' "
        "(or: pip install 'dask[array,bag]' distributed)."
    ) from exc

from ._threads import blas_threads, capped_threads, get_num_threads, lowered_blas, numba_turn
from ._tree import (
    keys_of,
    merge_group,
    named_errors,
    new_sketch,
    partition_options,
    reduce_tree,
    sketch_partition,
)
from ._validation import check_int
from .sketch import KeySketch

__all__ = ["build_sketch"]


def build_sketch(
    keys: Any,
    *,
    eps: float,
    p: float = 2,
    split_every: int = 8,
    compute: bool = True,
    offsets: Sequence[int] | None = None,
    scheduler: Any = None,
    values: Any = None,
    **sketch_options: Any,
) -> KeySketch | Delayed:
    """Sketch keys held in a Dask collection: one sketch per partition, merged in a tree of fan-in ``split_every``.

    Parameters
    ----------
    keys : dask.array.Array, dask.bag.Bag or list of dask.delayed.Delayed
        * a 2-D Dask array with any row chunking (columns are rechunked to the full width); each row block
          is a partition;
        * a Dask bag whose items are 2-D chunks; each bag partition is a partition, its chunks fed in order;
        * a list of ``Delayed`` objects, each computing one 2-D chunk (a partition).

        With values, bag items and delayed chunks are ``(K, V)`` pairs of keys and their value rows.
    eps, p : float
        As for :class:`~levstream.KeySketch`.
    split_every : int, default 8
        Fan-in of the merge tree (``>= 2``): ``ceil(log_split_every(partitions))`` levels of merges.
    compute : bool, default True
        Return the computed sketch; with ``False`` return a ``Delayed`` that computes it.
    offsets : sequence of int, optional
        Global id of the first key of every partition.  A Dask array with known chunk sizes numbers its
        rows ``0 .. n-1`` from its chunks.  For a bag, a list of ``Delayed`` or an array with unknown chunk
        sizes, omitting ``offsets`` runs a first pass that computes every partition's length (each
        partition is then computed twice: pass ``offsets`` when you know them).  Partitions must not share
        ids; an overlap fails the build when the two sketches meet in a merge.
    scheduler : str, distributed.Client or None
        Passed to ``dask.compute``: ``"threads"``, ``"processes"``, ``"sync"``, a ``Client``, or None for
        Dask's default (the active client if there is one).  An address (``"tcp://host:8786"``, or
        ``"host:8786"``) names a running ``distributed`` scheduler: a client is connected for this call
        and closed afterwards.
    values : dask.array.Array or array_like, optional
        Value rows of a Dask array of keys (row ``j`` is the value of key ``j``): a 2-D array with
        the same number of rows, cut into the keys' row chunks (a Dask array with other row chunks
        is rechunked, a NumPy array wrapped).  The sketch then keeps value rows (``value_dim``
        defaults to their width; see :meth:`~levstream.KeySketch.attend`), and with
        ``exact_output=True`` the exact p = 2 outputs over every key.  Bags and delayed lists carry
        values as ``(K, V)`` pairs instead (pass ``value_dim`` there to check their width; by
        default the first pair sets it).
    **sketch_options
        Passed to :class:`~levstream.KeySketch` (e.g. ``block_rows``, ``value_dim``,
        ``exact_output``).  ``seed=``/``rng=`` seeds randomised
        modes: partition ``i`` gets child ``i`` of ``SeedSequence(seed).spawn``, so a seed and a
        partitioning reproduce the build on any scheduler.  The exact p = 2 mode needs no seed.

    Returns
    -------
    KeySketch or Delayed
        The sketch of all keys with their global ids; a ``Delayed`` when ``compute=False``.

    Raises
    ------
    ValueError, TypeError
        For invalid parameters, or (when computed) a partition with bad data — NaN, inf, wrong width,
        chunks that are not 2-D: the error names the partition and its global rows and no sketch is
        returned.

    Notes
    -----
    For p = 2 the universal set and every query answer equal those of one stream over the same keys, on
    any scheduler (docs/theory.md, "Merging shards").  Partitions and chunks with zero rows (of the right
    width) are no-ops; keys without rows give an empty sketch.  Sketches travel between processes as :meth:`KeySketch.to_bytes`
    (``O(d^2 + |candidates| d)`` bytes each, independent of the partition size).  A worker lost mid-build
    costs the recomputation of its tasks: every task is a pure function of its inputs.

    Thread policy: see the module docstring.

    Examples
    --------
    >>> import numpy as np, dask.array as da, levstream as ls
    >>> import levstream.dask as lsd
    >>> rng = np.random.default_rng(0)
    >>> K = rng.standard_normal((30_000, 8)) * rng.pareto(3.0, size=(30_000, 1))
    >>> keys = da.from_array(K, chunks=(7_000, 4))
    >>> sk = lsd.build_sketch(keys, eps=0.05, split_every=2, scheduler="threads")
    >>> bool(np.array_equal(sk.universal_set().ids, ls.universal_set(K, eps=0.05).ids))
    True

    With values (here the exact p = 2 attention outputs over all keys):

    >>> V = da.from_array(rng.standard_normal((30_000, 3)), chunks=(7_000, 3))
    >>> skv = lsd.build_sketch(keys, eps=0.05, values=V, exact_output=True, scheduler="threads")
    >>> Q = rng.standard_normal((2, 8))
    >>> W = (Q @ K.T) ** 2
    >>> out = W @ V.compute() / W.sum(axis=1, keepdims=True)
    >>> bool(np.allclose(skv.attend(Q).output, out, rtol=1e-10))
    True
    """
    split_every = check_int(split_every, "split_every", minimum=2)
    parts, dim, known_offsets, many = _partitions(keys)
    value_parts: list[Any] = [None] * len(parts)
    if values is not None:
        value_parts, width = _value_partitions(keys, values)
        sketch_options = _with_value_dim(sketch_options, width)
    starts = _check_offsets(offsets, len(parts)) if offsets is not None else known_offsets
    options = partition_options(sketch_options, len(parts))
    # validates eps, p and the options before anything runs (the value_dim of (K, V) pairs may be
    # known only when the first pair is computed)
    new_sketch(dim or 1, eps, p, _checkable(options[0]))
    client = _connect(scheduler)
    try:
        sched = client if client is not None else scheduler
        if starts is None:  # first pass: the length of every partition
            lengths = dask.compute(
                *[delayed(_partition_rows)(part, i, many) for i, part in enumerate(parts)],
                scheduler=sched,
            )
            starts = [0, *np.cumsum(lengths[:-1], dtype=np.int64).tolist()]
        leaves = [
            (delayed(_sketch_leaf)(part, start, i, dim, eps, p, opts, many, vpart), i, i)
            for i, (part, start, opts, vpart) in enumerate(zip(parts, starts, options, value_parts))
        ]
        root, first, last = reduce_tree(leaves, _merge_node, split_every)
        result = delayed(_finish)(root, first, last)
        if not compute:
            return result
        with _lowered_blas_for_local_threads(sched, result):
            (sketch,) = dask.compute(result, scheduler=sched)
        return sketch
    finally:
        if client is not None:
            client.close()


# ---------------------------------------------------------------------------------------------- client side
def _partitions(keys: Any) -> tuple[list[Any], int | None, list[int] | None, bool]:
    """(partitions as Delayed, dim if known, offsets if known, whether a partition holds many chunks)."""
    if isinstance(keys, da.Array):
        if keys.ndim != 2:
            raise ValueError(f"keys must be a 2-D Dask array (rows x dim); got shape {keys.shape}.")
        if np.isnan(keys.shape[1]) or keys.shape[1] == 0:
            raise ValueError(
                f"keys must have a known, non-zero number of columns; got shape {keys.shape}."
            )
        if keys.numblocks[1] > 1:
            keys = keys.rechunk({1: -1})
        rows = keys.chunks[0]
        known = None if any(np.isnan(rows)) else [0, *np.cumsum(rows[:-1], dtype=np.int64).tolist()]
        return list(keys.to_delayed().ravel()), int(keys.shape[1]), known, False
    if isinstance(keys, db.Bag):
        return list(keys.to_delayed()), None, None, True
    if isinstance(keys, (list, tuple)) and keys and all(isinstance(k, Delayed) for k in keys):
        return list(keys), None, None, False
    if isinstance(keys, (list, tuple)) and not keys:
        raise ValueError("keys must hold at least one partition; got an empty list.")
    raise TypeError(
        "keys must be a 2-D dask.array.Array, a dask.bag.Bag of 2-D chunks or a list of "
        f"dask.delayed chunks; got {type(keys).__name__} instead. For NumPy arrays, "
        ".npy files or iterables use levstream.build_sketch."
    )


def _value_partitions(keys: Any, values: Any) -> tuple[list[Any], int]:
    """The row blocks of ``values`` aligned with the partitions of a Dask array of keys, and their
    width."""
    if not isinstance(keys, da.Array):
        raise TypeError(
            f"values= goes with a Dask array of keys; a {type(keys).__name__} carries "
            "values as (keys, values) pairs instead."
        )
    if not isinstance(values, da.Array):
        if not (hasattr(values, "ndim") and hasattr(values, "shape")):
            raise TypeError(
                f"values must be a 2-D Dask or NumPy array; got {type(values).__name__} instead."
            )
        if values.ndim != 2:
            raise ValueError(
                f"values must be 2-D (rows x value_dim); got shape {tuple(values.shape)}."
            )
        if any(np.isnan(keys.chunks[0])) or values.shape[0] != keys.shape[0]:
            raise ValueError(
                f"values must have one row per key ({keys.shape[0]} rows, in the row "
                f"chunks of the keys); got shape {tuple(values.shape)}."
            )
        values = da.from_array(values, chunks=(keys.chunks[0], -1))
    if values.ndim != 2 or np.isnan(values.shape[1]) or values.shape[1] == 0:
        raise ValueError(
            f"values must be 2-D with a known, non-zero number of columns; got shape "
            f"{values.shape}."
        )
    rows, value_rows = keys.chunks[0], values.chunks[0]
    if value_rows != rows:
        if any(np.isnan(rows)) or any(np.isnan(value_rows)):
            raise ValueError(
                f"values must have the row chunks of the keys ({rows}); got "
                f"{value_rows} (chunk sizes unknown: rechunk one of them to the "
                "other's chunks)."
            )
        if values.shape[0] != keys.shape[0]:
            raise ValueError(
                f"values must have one row per key ({keys.shape[0]} rows); got shape "
                f"{values.shape}."
            )
        values = values.rechunk({0: rows})
    if values.numblocks[1] > 1:
        values = values.rechunk({1: -1})
    return list(values.to_delayed().ravel()), int(values.shape[1])


def _with_value_dim(sketch_options: dict[str, Any], width: int) -> dict[str, Any]:
    given = sketch_options.get("value_dim")
    if given is None:
        return dict(sketch_options, value_dim=width)
    if check_int(given, "value_dim", minimum=1) != width:
        raise ValueError(
            f"value_dim must equal the width of the values ({width}); got value_dim={given}."
        )
    return sketch_options


def _checkable(options: dict[str, Any]) -> dict[str, Any]:
    """Options for the up-front check: ``exact_output`` without ``value_dim`` is checked once the
    first ``(K, V)`` pair of a bag or delayed list sets the width, so a placeholder width stands in
    for it."""
    if options.get("exact_output") and options.get("value_dim") is None:
        return dict(options, value_dim=1)
    return options


def _check_offsets(offsets: Sequence[int], n_partitions: int) -> list[int]:
    values = list(offsets)
    if len(values) != n_partitions:
        raise ValueError(
            f"offsets must give one start id per partition ({n_partitions}); got {len(values)}."
        )
    return [check_int(v, f"offsets[{i}]", minimum=0) for i, v in enumerate(values)]


_LOCAL_SCHEDULERS = {
    "threads",
    "threading",
    "processes",
    "multiprocessing",
    "sync",
    "synchronous",
    "single-threaded",
}


def _connect(scheduler: Any) -> Any:
    """A client for a scheduler address (``"tcp://host:port"`` or ``"host:port"``), else None."""
    if not (isinstance(scheduler, str) and scheduler not in _LOCAL_SCHEDULERS and ":" in scheduler):
        return None
    from distributed import Client

    return Client(scheduler, set_as_default=False)


def _lowered_blas_for_local_threads(scheduler: Any, result: Delayed) -> AbstractContextManager[Any]:
    """Dask's threaded scheduler runs tasks in threads of this process: lower BLAS here, once, for all."""
    if get_scheduler(scheduler=scheduler, collections=[result]) is not dask.threaded.get:
        return nullcontext()
    return lowered_blas(_share(get_num_threads(), dask.config.get("num_workers", None)))


# ---------------------------------------------------------------------------------------------- tasks
def _share(cores: int, slots: int | None) -> int:
    return max(1, cores // max(int(slots or cores), 1))


def _task_threads() -> int:
    """Threads a task may use here: ``budget // concurrent tasks`` of this process, within its BLAS
    limit."""
    try:
        from distributed import get_worker

        slots = get_worker().state.nthreads
    except (ImportError, ValueError):
        slots = dask.config.get("num_workers", None)
    share = _share(get_num_threads(), slots)
    return min(share, blas_threads() or share)


def _chunks_of(part: Any, many: bool) -> Any:
    return part if many else (part,)


def _partition_rows(part: Any, index: int, many: bool) -> int:
    """Number of key rows in one partition (the first pass that numbers bags and delayed lists)."""
    total = 0
    for chunk in _chunks_of(part, many):
        keys = keys_of(chunk)
        with named_errors(f"partition {index}"):
            if np.ndim(keys) != 2:
                raise ValueError(
                    f"every chunk must be 2-D (rows x dim); got shape {np.shape(keys)}."
                )
        total += int(np.shape(keys)[0])
    return total


def _sketch_leaf(
    part: Any,
    offset: int,
    index: int,
    dim: int | None,
    eps: float,
    p: float,
    options: dict[str, Any],
    many: bool,
    values: Any = None,
) -> KeySketch | None:
    chunks = _chunks_of(part, many) if values is None else ((part, values),)
    with capped_threads(_task_threads()), numba_turn():
        return sketch_partition(chunks, offset, index, dim=dim, eps=eps, p=p, options=options)


def _merge_node(*group: tuple[Delayed, int, int]) -> tuple[Delayed, int, int]:
    first, last = group[0][1], group[-1][2]
    return delayed(_merge_task)(first, last, *[g[0] for g in group]), first, last


def _merge_task(first: int, last: int, *sketches: KeySketch | None) -> KeySketch | None:
    with (
        capped_threads(_task_threads()),
        numba_turn(),
        named_errors(f"merging partitions {first}..{last}", "failed"),
    ):
        return merge_group(*sketches)


def _finish(sketch: KeySketch | None, first: int, last: int) -> KeySketch:
    if sketch is None:
        raise ValueError(
            f"keys must contain at least one 2-D chunk (its width sets the sketch's dim); "
            f"partitions {first}..{last} hold none."
        )
    return sketch
