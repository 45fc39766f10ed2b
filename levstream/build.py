"""``build_sketch``: the embedded parallel build — shards on a thread pool, merged with the Dask path's tree.

No Dask here (see :mod:`levstream.dask` for clusters).  Shards are fed by threads of one process: the Gram
update (BLAS) and the numba kernels release the GIL, so shards run side by side on separate cores.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from ._config import default_block_rows
from ._npyrows import NpyRows
from ._threads import capped_threads, get_num_threads, lowered_blas, numba_turn
from ._tree import (
    describe,
    feed_chunk,
    keys_of,
    merge_group,
    named_errors,
    new_sketch,
    partition_options,
    reduce_tree,
    root_options,
    split_pair,
    value_width,
)
from ._validation import as_real_array, check_int
from .sketch import KeySketch

__all__ = ["build_sketch"]

#: Fan-in of the merge tree (as :func:`levstream.dask.build_sketch`'s default ``split_every``).
SPLIT_EVERY = 8


#: Chunks waiting per shard thread when the source is an iterable (bounds memory).
QUEUE_DEPTH = 2

_DONE = None  # end-of-stream marker on a shard thread's queue

Chunk = tuple[int, int, Any]  # (chunk number, global id of its first row, the chunk)


def build_sketch(
    source: Any,
    *,
    eps: float,
    p: float = 2,
    n_jobs: int | None = None,
    chunk_rows: int | None = None,
    offset: int = 0,
    progress: bool = False,
    values: Any = None,
    **sketch_options: Any,
) -> KeySketch:
    """Sketch all keys of ``source``, using ``n_jobs`` threads; the result equals one stream over the keys.

    Parameters
    ----------
    source : array_like, str or os.PathLike, or iterable of array_like
        The keys: a 2-D array (NumPy array, ``np.memmap``, or anything with ``ndim``/``shape`` and row
        slicing), a path to a ``.npy`` file holding a 2-D array (never loaded whole: a row-major file is
        read chunk by chunk into one reusable buffer of ``chunk_rows`` rows per shard, a column-major one
        is sliced from a memory mapping), or an iterable of 2-D chunks of one width (e.g. a
        generator), or of ``(K, V)`` pairs of key and value chunks when values travel with the keys.
        Key ``j`` of the source (in row order, chunks in iteration order) gets the global id ``offset + j``.
    eps, p : float
        As for :class:`KeySketch`.
    n_jobs : int, optional
        Number of shards, fed in parallel by at most :func:`levstream.get_num_threads` threads
        (the default ``n_jobs``).  ``n_jobs=1`` is a plain stream in the calling thread.
    chunk_rows : int, optional
        Rows read at a time from an array or ``.npy`` source (default: one processing block, about 4 MiB:
        8192 rows for dim 64).  Iterables keep their own chunks; either way chunks are fed one processing
        block at a time, so that every pass over the rows runs in cache.
    offset : int, default 0
        Global id of the first key.
    progress : bool, default False
        Show a tqdm progress bar (rows).
    values : array_like or str or os.PathLike, optional
        Value rows aligned with an array or ``.npy`` source (row ``j`` is the value of key ``j``):
        a 2-D array or a ``.npy`` path, read chunk by chunk with the keys.  The sketch then keeps
        value rows (``value_dim`` defaults to their width; see :meth:`KeySketch.attend`), and with
        ``exact_output=True`` the exact p = 2 outputs over every key.  An iterable source yields
        ``(K, V)`` pairs instead.
    **sketch_options
        Passed to :class:`KeySketch` (e.g. ``block_rows``, ``value_dim``, ``exact_output``).
        ``seed=``/``rng=`` seeds randomised modes;
        each shard gets its own child seed (``SeedSequence.spawn``), so a seed, ``n_jobs`` and the chunking
        reproduce the build.  The exact p = 2 mode uses no randomness and needs no seed.

    Returns
    -------
    KeySketch
        The sketch of all keys, with global ids ``offset, offset + 1, ...``.

    Raises
    ------
    ValueError, TypeError
        For invalid parameters, a source that is not 2-D, values that do not match the keys, or a
        chunk with bad keys or values (NaN, inf, wrong width): the error names the chunk and its
        global rows, and no sketch is returned.

    Notes
    -----
    Partitioning.  An array or ``.npy`` source is cut into chunks of ``chunk_rows`` rows and shard ``s`` of
    ``n_jobs`` takes the ``s``-th contiguous run of chunks; chunks of an iterable are dealt round-robin
    (chunk ``k`` to shard ``k % n_jobs``), at most 2 waiting per shard.  The shard sketches are merged in
    the tree of :func:`levstream.dask.build_sketch` (groups of 8).  A stream that forgets (``decay=``) merges
    consecutive parts only, so an iterable source is then fed as one stream (``n_jobs`` ignored); an array
    source is split into consecutive shards as usual.  For p = 2 the universal set and every
    query answer are those of a single stream, whatever ``n_jobs`` and the chunking (docs/theory.md,
    "Merging shards").  Chunks with zero rows (of the right width) are no-ops; a source without rows
    gives an empty sketch.  Value rows travel with their keys into the shards and through the
    merges (retained keys keep them), and the moment states of ``exact_output=True`` add up
    exactly, so outputs are those of a single stream too.

    Threads.  The shards run on ``min(n_jobs, levstream.get_num_threads())`` threads (a thread
    feeds its shards in turn; the shards, hence the sketch, do not depend on the thread count).
    Each is limited to ``max(1, get_num_threads() // threads)`` BLAS threads (a process-wide
    limit, restored afterwards) and as many numba threads, so the build never runs more threads
    than its budget; ``n_jobs=1`` holds BLAS and numba to the budget.  No limit set by the caller
    is raised.

    Examples
    --------
    >>> import numpy as np, levstream as ls
    >>> rng = np.random.default_rng(0)
    >>> K = rng.standard_normal((30_000, 8)) * rng.pareto(3.0, size=(30_000, 1))
    >>> sk = ls.build_sketch(K, eps=0.05, n_jobs=2, chunk_rows=4096)
    >>> bool(np.array_equal(sk.universal_set().ids, ls.universal_set(K, eps=0.05).ids))
    True
    >>> chunks = (K[i:i + 5000] for i in range(0, 30_000, 5000))
    >>> bool(np.array_equal(ls.build_sketch(chunks, eps=0.05, n_jobs=3).universal_set().ids, sk.universal_set().ids))
    True

    With values (here the exact p = 2 attention outputs over all keys):

    >>> V = rng.standard_normal((30_000, 3))
    >>> skv = ls.build_sketch(K, eps=0.05, values=V, exact_output=True, n_jobs=2, chunk_rows=4096)
    >>> Q = rng.standard_normal((2, 8))
    >>> W = (Q @ K.T) ** 2
    >>> bool(np.allclose(skv.attend(Q).output, W @ V / W.sum(axis=1, keepdims=True), rtol=1e-10))
    True
    """
    n_jobs = get_num_threads() if n_jobs is None else check_int(n_jobs, "n_jobs", minimum=1)
    offset = check_int(offset, "offset", minimum=0)
    if chunk_rows is not None:
        chunk_rows = check_int(chunk_rows, "chunk_rows", minimum=1)
    array = _as_array_source(source)
    value_rows = None
    if array is not None:
        dim, total = int(array.shape[1]), int(array.shape[0])
        if values is not None:
            value_rows = _aligned_values(values, total)
        rows = chunk_rows or _block_rows(dim, sketch_options)
        spans = [
            (k, offset + a, a, min(a + rows, total)) for k, a in enumerate(range(0, total, rows))
        ]
        chunks: Iterator[Chunk] = _array_chunks(array, spans, value_rows)
        width = None if value_rows is None else int(value_rows.shape[1])
    else:
        if values is not None:
            raise ValueError(
                "values= goes with an array or .npy source; an iterable source yields "
                "(keys, values) pairs instead."
            )
        dim, width, chunks = _peek_width(source, offset)
        spans, total = [], None
    sketch_options = _with_value_dim(sketch_options, width)
    # the single stream's sketch; building it validates eps, p and the options before any work starts
    sketch = KeySketch(dim, eps=eps, p=p, **root_options(sketch_options))
    bar = _progress_bar(total) if progress else None
    # a stream that forgets merges only consecutive parts: the round-robin shards of an iterable are not
    if sketch.forgets and array is None:
        n_jobs = 1
    try:
        if n_jobs == 1:
            with capped_threads():
                for k, start, chunk in chunks:
                    rows_fed = feed_chunk(sketch, chunk, start, "chunk", k)
                    if bar is not None:
                        bar.update(rows_fed)
            return sketch
        if array is not None:
            n_shards = max(1, min(n_jobs, len(spans)))
            bounds = np.linspace(0, len(spans), n_shards + 1).astype(int)
            runs = [
                _array_chunks(array, spans[bounds[s] : bounds[s + 1]], value_rows)
                for s in range(n_shards)
            ]
            return _run_shards(runs, None, dim, eps, p, sketch_options, bar)
        return _run_shards(None, chunks, dim, eps, p, sketch_options, bar, n_shards=n_jobs)
    finally:
        if bar is not None:
            bar.close()


def _block_rows(dim: int, sketch_options: dict[str, Any]) -> int:
    """Rows of one processing block: the default chunk of an array source (read, checked, folded in cache)."""
    block_rows = sketch_options.get("block_rows")
    return (
        default_block_rows(dim)
        if block_rows is None
        else check_int(block_rows, "block_rows", minimum=1)
    )


def _with_value_dim(sketch_options: dict[str, Any], width: int | None) -> dict[str, Any]:
    """The sketch options with ``value_dim`` set to the width of the values (``width``, None without
    values); a ``value_dim`` given without values, or of another width, is an error."""
    given = sketch_options.get("value_dim")
    if width is None:
        if given is not None:
            raise ValueError(
                f"value_dim={given!r} needs the value rows: pass values= (aligned "
                "with an array source) or an iterable of (keys, values) pairs."
            )
        return sketch_options
    if given is None:
        return dict(sketch_options, value_dim=width)
    if check_int(given, "value_dim", minimum=1) != width:
        raise ValueError(
            f"value_dim must equal the width of the values ({width}); got value_dim={given}."
        )
    return sketch_options


def _aligned_values(values: Any, total: int) -> Any:
    """The value rows of an array source: a 2-D array or ``.npy`` file with one row per key."""
    rows = _as_array_source(values, "values")
    if rows is None:
        raise TypeError(
            f"values must be a 2-D array or a path to a .npy file aligned with the "
            f"source; got {type(values).__name__} instead. An iterable source yields "
            "(keys, values) pairs."
        )
    if int(rows.shape[0]) != total:
        raise ValueError(
            f"values must have one row per key ({total} rows); got shape {tuple(rows.shape)}."
        )
    return rows


def _array_chunks(
    array: Any, spans: list[tuple[int, int, int, int]], values: Any = None
) -> Iterator[Chunk]:
    """The numbered chunks ``(k, first id, rows a..b-1)`` of an array source, read lazily; with
    ``values``, ``(k, first id, (keys, values))``."""
    if values is not None:
        keys, vals = _array_chunks(array, spans), _array_chunks(values, spans)
        return ((k, first_id, (K, V)) for (k, first_id, K), (_, _, V) in zip(keys, vals))
    if isinstance(
        array, NpyRows
    ):  # one reusable buffer per reader: the sketch copies the rows it keeps
        read = array.chunks([(a, b) for _, _, a, b in spans])
        return ((k, first_id, rows) for (k, first_id, _, _), rows in zip(spans, read))
    return ((k, first_id, array[a:b]) for k, first_id, a, b in spans)


def _as_array_source(source: Any, name: str = "source") -> Any:
    """The 2-D random-access rows behind ``source`` (an array, or :class:`NpyRows` for a ``.npy`` path), or
    None when ``source`` is an iterable of chunks.  ``name`` names it in errors."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        with named_errors(f"{name} {path!r}"):
            try:  # the header is parsed and checked by NumPy; the rows are then read without the mapping
                array = np.load(path, mmap_mode="r", allow_pickle=False)
            except ValueError as exc:
                raise ValueError(f"must be a .npy file of a numeric 2-D array ({exc}).") from exc
            if not isinstance(array, np.ndarray):
                array.close()
                raise ValueError(  # noqa: TRY004 - a bad file's content, reported as such
                    "must be a .npy file holding one 2-D array; got an .npz archive. "
                    "Pass one of its arrays instead."
                )
            as_real_array(array[:0], "the stored array")
            if array.ndim != 2:
                raise ValueError(f"must hold a 2-D array (rows x dim); got shape {array.shape}.")
        if isinstance(array, np.memmap) and array.flags.c_contiguous and array.size:
            return NpyRows(
                path, array.offset, array.shape, array.dtype
            )  # read, not mapped (see _npyrows)
        return array  # Fortran order (rows are not contiguous on disk) or empty: sliced from the mapping
    if hasattr(source, "ndim") and hasattr(source, "shape"):
        if source.ndim != 2:
            raise ValueError(
                f"{name} must be 2-D (rows x dim); got shape {tuple(source.shape)}. "
                "Pass a 2-D array, a .npy path or an iterable of 2-D chunks."
            )
        if source.shape[1] == 0:
            raise ValueError(
                f"{name} must have at least one column; got shape {tuple(source.shape)}."
            )
        return source
    if isinstance(source, (bytes, bytearray)) or not isinstance(source, Iterable):
        raise TypeError(
            f"{name} must be a 2-D array, a path to a .npy file or an iterable of 2-D "
            f"chunks; got {type(source).__name__} instead."
        )
    return None


def _peek_width(source: Iterable[Any], offset: int) -> tuple[int, int | None, Iterator[Chunk]]:
    """Width of the keys (and of the values, for ``(K, V)`` pairs, else None) of the first chunk of
    an iterable source, and the numbered chunks (first one included)."""
    items = iter(source)
    try:
        first = next(items)
    except StopIteration:
        raise ValueError(
            "source yielded no chunks; an iterable source needs at least one 2-D chunk "
            "(its width sets the sketch's dim)."
        ) from None
    with named_errors(describe("chunk", 0, offset, keys_of(first))):
        keys, values = split_pair(first)
        arr = as_real_array(keys, "chunk")
        if arr.ndim != 2 or arr.shape[1] == 0:
            raise ValueError(
                f"every chunk must be 2-D (rows x dim); got shape {arr.shape}. "
                "Wrap single rows as 1-row chunks; a whole matrix must be passed as an array."
            )
        width = value_width(first)

    def numbered() -> Iterator[Chunk]:
        start = offset
        for k, chunk in enumerate(_chain(arr if values is None else (arr, values), items)):
            yield k, start, chunk
            keys = keys_of(chunk)
            start += int(np.shape(keys)[0]) if np.ndim(keys) == 2 else 0

    return int(arr.shape[1]), width, numbered()


def _chain(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


def _progress_bar(total: int | None) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit=" rows", unit_scale=True, desc="levstream build")


def _run_shards(
    runs: list[Iterator[Chunk]] | None,
    dealt: Iterator[Chunk] | None,
    dim: int,
    eps: float,
    p: float,
    sketch_options: dict[str, Any],
    bar: Any,
    n_shards: int | None = None,
) -> KeySketch:
    """Feed shards on at most :func:`get_num_threads` threads, then merge them in the shared tree.

    Either ``runs`` (one chunk iterator per shard, read by the thread that feeds the shard) or
    ``dealt`` (chunks read in this thread; chunk ``k`` goes to shard ``k % n_shards``, through a
    bounded queue to the thread that owns that shard) is given.
    """
    n_shards = len(runs) if runs is not None else int(n_shards or 1)
    sketches = [
        new_sketch(dim, eps, p, opts) for opts in partition_options(sketch_options, n_shards)
    ]
    n_threads = min(n_shards, get_num_threads())
    share = max(1, get_num_threads() // n_threads)  # BLAS and numba threads of each shard thread
    stop = threading.Event()
    failures: list[tuple[int, BaseException]] = []
    bar_lock = threading.Lock()
    queues: list[queue.Queue[Chunk | None]] = (
        [queue.Queue(maxsize=QUEUE_DEPTH) for _ in range(n_threads)] if dealt is not None else []
    )

    def drain(q: queue.Queue[Chunk | None]) -> Iterator[Chunk]:
        while (item := q.get()) is not _DONE:
            yield item

    def work(items: Iterator[Chunk], shard: int | None) -> None:
        """Feed ``items`` to shard ``shard`` (a run), or each to shard ``k % n_shards`` (dealt)."""
        k = -1
        with capped_threads(share):
            while True:
                try:  # reading is part of the shard's work: a file that ends early fails the build at once
                    item = next(items, None)
                except BaseException as exc:  # noqa: BLE001 - reported by the calling thread below
                    failures.append((k + 1, exc))
                    stop.set()
                    return
                if item is None:
                    return
                k, start, chunk = item
                if (
                    stop.is_set()
                ):  # another shard failed: stop reading; a dealt shard keeps draining its queue
                    if runs is not None:
                        return
                    continue
                try:
                    target = sketches[k % n_shards if shard is None else shard]
                    with numba_turn():
                        fed = feed_chunk(target, chunk, start, "chunk", k)
                except BaseException as exc:  # noqa: BLE001 - reported by the calling thread below
                    failures.append((k, exc))
                    stop.set()
                    continue
                if bar is not None:
                    with bar_lock:
                        bar.update(fed)

    with (
        lowered_blas(share),
        ThreadPoolExecutor(max_workers=n_threads, thread_name_prefix="levstream-shard") as pool,
    ):
        if runs is not None:
            futures = [pool.submit(work, run, s) for s, run in enumerate(runs)]
        elif dealt is not None:
            futures = [pool.submit(work, drain(q), None) for q in queues]
            try:
                for item in dealt:
                    if stop.is_set():
                        break
                    t = item[0] % n_shards % n_threads
                    _put(queues[t], item, futures[t])
            except BaseException:
                stop.set()
                raise
            finally:
                for q, fut in zip(queues, futures):
                    _put(q, _DONE, fut)
        for fut in futures:
            fut.result()
        if failures:  # the first bad chunk in stream order; the shard sketches are dropped
            raise min(failures, key=lambda f: f[0])[1]
        shards: list[KeySketch | None] = list(sketches)  # merge_group's type: None is "nothing"
        merged = reduce_tree(shards, merge_group, SPLIT_EVERY)
        assert merged is not None  # every shard has a sketch, empty or not
        return merged


def _put(q: queue.Queue, item: Any, consumer: Future) -> None:
    """Put ``item`` on a bounded queue unless its consumer thread has already ended."""
    while not consumer.done():
        try:
            q.put(item, timeout=0.05)
            return
        except queue.Full:
            continue
