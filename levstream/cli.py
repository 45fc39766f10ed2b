"""The ``levstream`` command: ``demo``, ``build``, ``merge``, ``query``, ``info``, ``bench``.

Every command validates its arguments once, turns each user error into one line
``levstream: error: ...`` on stderr and a documented exit code (see :data:`EXIT_CODES`), and never prints a
traceback for them.  Sketch files are the bytes of :meth:`levstream.KeySketch.to_bytes`, written atomically.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import textwrap
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from ._format import format_bytes, print_table

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_FAILED_CHECK = 3
EXIT_INPUT = 4
EXIT_SKETCH = 5
EXIT_UNAVAILABLE = 6
EXIT_INTERRUPTED = 130

#: Exit codes and their meaning (shown by ``levstream --help``).
EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_INTERNAL: "internal error (a bug: please report it with the traceback)",
    EXIT_USAGE: "bad command line: unknown option, missing argument, value out of range (eps, p, ...)",
    EXIT_FAILED_CHECK: "demo/bench: the sketch disagreed with brute force",
    EXIT_INPUT: "keys/queries/output file: missing, unreadable, not a 2-D real array, wrong width, "
    "non-finite value, stdin ending mid-row, output not writable",
    EXIT_SKETCH: "sketch file missing, corrupted or of a newer format; sketches that cannot be merged "
    "(different dim/eps/p, clashing key ids)",
    EXIT_UNAVAILABLE: "an optional dependency or service is unavailable (dask/distributed or matplotlib not "
    "installed, Dask scheduler unreachable)",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
}

DEFAULT_CHUNK_ROWS = 65536


class CliError(Exception):
    """A user error: printed as one line, exits with ``code``."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(" ".join(str(message).split()))
        self.code = code


# ---------------------------------------------------------------------- shared helpers
def _checked_eps(value: float | None, flag: str = "--eps") -> float | None:
    from ._validation import check_eps

    if value is None:
        return None
    try:
        return check_eps(value, flag)
    except (ValueError, TypeError) as exc:
        raise CliError(str(exc), EXIT_USAGE) from None


def _new_sketch(dim: int, eps: float, p: float) -> Any:
    from .sketch import KeySketch

    try:
        return KeySketch(dim, eps=eps, p=p)
    except (ValueError, TypeError, NotImplementedError) as exc:
        raise CliError(str(exc), EXIT_USAGE) from None


def _load_sketch(path: str) -> tuple[Any, int, int]:
    """(sketch, format version, file size) of a sketch file; sketch errors exit with EXIT_SKETCH."""
    from . import _serialize
    from .sketch import KeySketch

    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise CliError(f"{path}: no such sketch file.", EXIT_SKETCH) from None
    except OSError as exc:
        raise CliError(f"{path}: cannot read the sketch ({exc.strerror}).", EXIT_SKETCH) from None
    try:
        _, _, version = _serialize.unpack(data)
        return KeySketch.from_bytes(data), version, len(data)
    except (ValueError, TypeError) as exc:
        raise CliError(f"{path}: {exc}", EXIT_SKETCH) from None


def _save_sketch(sketch: Any, path: str) -> None:
    try:
        sketch.save(path)
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc.strerror}.", EXIT_INPUT) from None


def _refuse_overwrite(path: str, force: bool, hint: str) -> None:
    if os.path.exists(path) and not force:
        raise CliError(f"{path} exists; {hint}", EXIT_USAGE)


def _open_keys(spec: str, dim: int | None = None, dtype: str | None = None) -> Any:
    from ._io import InputError, open_keys

    try:
        return open_keys(spec, dim=dim, dtype=dtype)
    except InputError as exc:
        code = EXIT_USAGE if spec == "-" and (dim is None or dtype is None) else EXIT_INPUT
        raise CliError(str(exc), code) from None


def _chunks(source: Any, chunk_rows: int) -> Iterator[np.ndarray]:
    from ._io import InputError

    try:
        yield from source.chunks(chunk_rows)
    except InputError as exc:
        raise CliError(str(exc), EXIT_INPUT) from None


def _progress(total: int | None, quiet: bool, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        unit=" rows",
        unit_scale=True,
        desc=desc,
        disable=quiet,
        file=sys.stderr,
        dynamic_ncols=True,
        leave=False,
    )


# ---------------------------------------------------------------------- build
def cmd_build(args: argparse.Namespace) -> int:
    chunk_rows = args.chunk
    if chunk_rows < 1:
        raise CliError(f"--chunk must be >= 1; got {chunk_rows}.", EXIT_USAGE)
    if args.offset is not None and args.offset < 0:
        raise CliError(f"--offset must be >= 0; got {args.offset}.", EXIT_USAGE)
    if args.jobs is not None and args.jobs < 1:
        raise CliError(f"--jobs must be >= 1; got {args.jobs}.", EXIT_USAGE)
    eps = _checked_eps(args.eps)
    if args.append:
        if not os.path.exists(args.output):
            raise CliError(
                f"--append: {args.output} does not exist; drop --append to create it.", EXIT_SKETCH
            )
        sketch, _, _ = _load_sketch(args.output)
        for flag, given, have in (("--eps", eps, sketch.eps), ("--p", args.p, sketch.p)):
            if given is not None and given != have:
                raise CliError(
                    f"{flag} {given:g} differs from the {flag[2:]} of {args.output} ({have:g}); "
                    f"omit {flag} with --append.",
                    EXIT_USAGE,
                )
        if args.dim is not None and args.dim != sketch.dim:
            raise CliError(
                f"--dim {args.dim} differs from the dim of {args.output} ({sketch.dim}).",
                EXIT_USAGE,
            )
        source = _open_keys(args.keys, args.dim if args.keys == "-" else None, args.dtype)
        if source.dim != sketch.dim:
            raise CliError(
                f"{source.name} has rows of width {source.dim}; {args.output} has dim {sketch.dim}.",
                EXIT_INPUT,
            )
    else:
        if eps is None:
            raise CliError(
                "--eps is required to create a sketch (or pass --append to extend one).", EXIT_USAGE
            )
        _refuse_overwrite(
            args.output, args.force, "pass --append to add keys to it or --force to replace it."
        )
        source = _open_keys(args.keys, args.dim, args.dtype)
        sketch = _new_sketch(source.dim, eps, 2.0 if args.p is None else args.p)
    start = sketch.next_id if args.offset is None else args.offset

    if args.jobs is not None or args.scheduler is not None:
        part = _build_in_parallel(args, source, sketch, start, chunk_rows)
        try:
            sketch.merge(part)
        except ValueError as exc:
            raise CliError(f"cannot add the keys to {args.output}: {exc}", EXIT_SKETCH) from None
    else:
        from ._threads import capped_threads

        pos = start
        # one stream runs on one core (--jobs N for more): multithreaded BLAS on tall-skinny blocks is
        # erratic, up to 100x slower on a busy machine
        with (
            capped_threads(1),
            _progress(source.n_rows, args.quiet, f"build {os.path.basename(args.output)}") as bar,
        ):
            for chunk in _chunks(source, chunk_rows):
                if not chunk.shape[0]:  # a source without rows adds nothing (its width was checked)
                    continue
                try:
                    sketch.update_many(chunk, offset=pos)
                except ValueError as exc:
                    raise CliError(
                        f"cannot add rows {pos}.. of {source.name}: {exc}", EXIT_SKETCH
                    ) from None
                pos += chunk.shape[0]
                bar.update(chunk.shape[0])
    sketch.flush()  # saved settled: the rows still buffered are folded in (a smaller file)
    U = sketch.universal_set()
    _save_sketch(sketch, args.output)
    print(
        f"{args.output}: n={sketch.n:,} keys, dim={sketch.dim}, eps={sketch.eps:g}, p={sketch.p:g}, "
        f"|U|={len(U):,}, {format_bytes(os.path.getsize(args.output))}"
    )
    return EXIT_OK


def _build_in_parallel(
    args: argparse.Namespace, source: Any, sketch: Any, start: int, chunk_rows: int
) -> Any:
    """A sketch of ``source`` (ids from ``start``) built by ``levstream.build_sketch`` (--jobs) or on Dask."""
    if args.scheduler is None:
        from .build import build_sketch

        if source.name.endswith(".npy"):
            data: Any = os.path.abspath(args.keys)
        else:  # the width of an empty first chunk sets build_sketch's dim even when no row follows
            data = itertools.chain([np.empty((0, source.dim))], _chunks(source, chunk_rows))
        try:
            return build_sketch(
                data,
                n_jobs=args.jobs,
                chunk_rows=chunk_rows,
                offset=start,
                progress=not args.quiet,
                **sketch._part_options(),  # the options of the sketch appended to (p, exact, delta, decay, ...)
            )
        except ValueError as exc:
            raise CliError(f"{source.name}: {exc}", EXIT_INPUT) from None
    if not source.name.endswith(".npy"):
        raise CliError(
            f"--scheduler reads a .npy file that every worker can open; got {args.keys!r}.",
            EXIT_USAGE,
        )
    try:
        from dask import delayed

        import levstream.dask as lsd
    except ImportError as exc:
        raise CliError(f"--scheduler needs Dask ({exc}).", EXIT_UNAVAILABLE) from None
    from ._io import load_rows

    path = os.path.abspath(args.keys)
    bounds = list(range(0, source.n_rows, chunk_rows)) or [0]  # no rows: one empty partition
    parts = [delayed(load_rows)(path, a, min(a + chunk_rows, source.n_rows)) for a in bounds]
    try:
        return lsd.build_sketch(
            parts,
            offsets=[start + a for a in bounds],
            scheduler=args.scheduler,
            **sketch._part_options(),
        )
    except (OSError, TimeoutError) as exc:
        raise CliError(
            f"cannot build on the Dask scheduler at {args.scheduler}: {exc}", EXIT_UNAVAILABLE
        ) from None
    except ValueError as exc:
        raise CliError(f"{source.name}: {exc}", EXIT_INPUT) from None


# ---------------------------------------------------------------------- merge
def cmd_merge(args: argparse.Namespace) -> int:
    if len(args.sketches) < 2:
        raise CliError("merge needs at least two sketch files.", EXIT_USAGE)
    if args.output not in args.sketches:
        _refuse_overwrite(args.output, args.force, "pass --force to replace it.")
    merged, _, _ = _load_sketch(args.sketches[0])
    for path in args.sketches[1:]:
        sketch, _, _ = _load_sketch(path)
        try:
            merged.merge(sketch)
        except (ValueError, TypeError) as exc:
            raise CliError(f"cannot merge {path}: {exc}", EXIT_SKETCH) from None
    U = merged.universal_set()
    _save_sketch(merged, args.output)
    print(
        f"{args.output}: merged {len(args.sketches)} sketches, n={merged.n:,} keys, |U|={len(U):,}, "
        f"{format_bytes(os.path.getsize(args.output))}"
    )
    return EXIT_OK


# ---------------------------------------------------------------------- query
def top_entries(hits: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(indptr, index)``: the ``k`` largest entries of each row of ``hits``, largest first, as a CSR
    ``indptr`` and the positions of the kept entries in ``hits``' arrays.  Ties go to the smaller key id.
    """
    counts = np.minimum(np.diff(hits.indptr), k)
    indptr = np.zeros(hits.n_queries + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    index = np.empty(indptr[-1], dtype=np.int64)
    for i in range(hits.n_queries):
        start, stop = hits.indptr[i], hits.indptr[i + 1]
        order = np.lexsort((hits.key_ids[start:stop], -hits.values[start:stop]))[:k]
        index[indptr[i] : indptr[i + 1]] = start + order
    return indptr, index


def cmd_query(args: argparse.Namespace) -> int:
    from ._io import InputError, read_matrix

    sketch, _, _ = _load_sketch(args.sketch)
    eps = _checked_eps(args.eps)
    if eps is not None and eps < sketch.eps:
        raise CliError(
            f"--eps must be >= the sketch's eps ({sketch.eps:g}); got {eps:g}. "
            "Build the sketch with a smaller eps to query lower thresholds.",
            EXIT_USAGE,
        )
    if args.top_k is not None and args.top_k < 1:
        raise CliError(f"--top-k must be >= 1; got {args.top_k}.", EXIT_USAGE)
    try:
        Q = read_matrix(args.queries)
    except InputError as exc:
        raise CliError(str(exc), EXIT_INPUT) from None
    if Q.shape[1] != sketch.dim:
        raise CliError(
            f"{args.queries} has rows of width {Q.shape[1]}; the sketch {args.sketch} has dim "
            f"{sketch.dim}.",
            EXIT_INPUT,
        )
    hits = sketch.heavy_entries(Q, eps=eps)
    if args.top_k is None:
        indptr, index = hits.indptr, np.arange(len(hits))
    else:
        indptr, index = top_entries(hits, args.top_k)
    arrays = {"indptr": indptr, "key_ids": hits.key_ids[index], "values": hits.values[index]}
    if hits.lower is not None:  # approximate normaliser (p != 2): bounds on the true values
        arrays.update(lower=hits.lower[index], upper=hits.upper[index])
    if args.output is not None:
        try:
            with open(args.output, "wb") as fh:
                np.savez(fh, **arrays, eps=np.float64(hits.eps))
        except OSError as exc:
            raise CliError(f"cannot write {args.output}: {exc.strerror}.", EXIT_INPUT) from None
        print(
            f"{args.output}: {index.shape[0]:,} entries >= {hits.eps:g} for {Q.shape[0]:,} queries"
        )
        return EXIT_OK
    limit = "" if args.top_k is None else f" (at most {args.top_k} per query, largest first)"
    print(f"# {index.shape[0]:,} entries >= {hits.eps:g} for {Q.shape[0]:,} queries{limit}")
    columns = [
        np.repeat(np.arange(Q.shape[0]), np.diff(indptr)),
        arrays["key_ids"],
        arrays["values"],
    ]
    header = f"{'query':>8}  {'key_id':>12}  attention"
    if hits.lower is not None:
        print("# values use an approximate normaliser; the true value lies in [lower, upper]")
        columns += [arrays["lower"], arrays["upper"]]
        header += f"  {'lower':>10}  {'upper':>10}"
    print(header)
    if hits.lower is not None:
        line = "{:>8}  {:>12}  {:<9.6g}  {:>10.6g}  {:>10.6g}\n"
    else:
        line = "{:>8}  {:>12}  {:.6g}\n"
    sys.stdout.writelines(line.format(*row) for row in zip(*(c.tolist() for c in columns)))
    return EXIT_OK


# ---------------------------------------------------------------------- info
def cmd_info(args: argparse.Namespace) -> int:
    sketch, version, size = _load_sketch(args.sketch)
    U = sketch.universal_set()
    print(f"{args.sketch}")
    print_table(
        [
            ("format version", str(version)),
            ("dim", str(sketch.dim)),
            ("p", f"{sketch.p:g}"),
            ("eps", f"{sketch.eps:g}"),
            ("n (keys seen)", f"{sketch.n:,}"),
            ("|U| (universal set)", f"{len(U):,}"),
            ("bound on |U|", f"{U.size_bound:,.0f}"),
            ("retained rows", f"{sketch.num_retained:,}"),
            ("next key id", f"{sketch.next_id:,}"),
            ("file bytes", f"{size:,}"),
            ("memory bytes", f"{sketch.nbytes:,}"),
        ]
    )
    return EXIT_OK


# ---------------------------------------------------------------------- demo and bench
def cmd_demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    for flag, value in (
        ("--n", args.n),
        ("--dim", args.dim),
        ("--shards", args.shards),
        ("--queries", args.queries),
        ("--check", args.check),
    ):
        if value < 1:
            raise CliError(f"{flag} must be >= 1; got {value}.", EXIT_USAGE)
    _checked_eps(args.eps)
    _new_sketch(args.dim, args.eps, args.p)  # the demo's sketch parameters are valid
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise CliError(
                "--plot needs matplotlib: pip install matplotlib (or 'levstream[plot]').",
                EXIT_UNAVAILABLE,
            ) from None
    return EXIT_OK if run_demo(args) else EXIT_FAILED_CHECK


def cmd_bench(args: argparse.Namespace) -> int:
    import platform

    from . import __version__
    from ._bench import format_bench, run_bench

    for flag, value in (
        ("--dim", args.dim),
        ("--queries", args.queries),
        ("--repeat", args.repeat),
        *(("--sizes", n) for n in args.sizes),
    ):
        if value < 1:
            raise CliError(f"{flag} must be >= 1; got {value}.", EXIT_USAGE)
    eps = _checked_eps(args.eps)
    assert eps is not None  # --eps has a default
    print(
        f"levstream {__version__} bench: d={args.dim}, eps={eps:g}, p=2, {args.queries} queries, best of "
        f"{args.repeat}; BLAS and numba threads 1; {platform.machine()}, {os.cpu_count()} cores, NumPy {np.__version__}"
    )
    print(
        "  build = KeySketch.update_many over chunks of 8192 rows + universal_set(); Gram = G += X.T @ X "
        "over the same chunks"
    )
    print(
        "  query = heavy_entries(Q); dense = blocked NumPy over all keys in memory (the oracle for recall)"
    )
    points = run_bench(sorted(args.sizes), args.dim, eps, 2.0, args.queries, args.seed, args.repeat)
    for line in format_bench(points):
        print(f"  {line}")
    return (
        EXIT_OK
        if all(pt.recall == 1.0 and pt.precision == 1.0 for pt in points)
        else EXIT_FAILED_CHECK
    )


# ---------------------------------------------------------------------- parser
def _wrap(text: str) -> str:
    return textwrap.fill(" ".join(text.split()), width=88)


def _epilog() -> str:
    lines = ["exit codes:"] + [f"  {code:<4} {text}" for code, text in EXIT_CODES.items()]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="levstream",
        formatter_class=fmt,
        epilog=_epilog(),
        description=_wrap(
            "Find every heavy attention entry from a small, mergeable sketch of streamed keys."
        ),
    )
    parser.add_argument("--version", action="version", version=f"levstream {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        formatter_class=fmt,
        epilog=_epilog(),
        help="stream synthetic keys into shards, merge, query, check against brute force",
        description=_wrap(
            "Stream synthetic attention-like keys from a generator into shards built in parallel "
            "threads, merge them, query new rows and check the answer against brute force."
        ),
    )
    demo.add_argument(
        "--n", type=int, default=1_000_000, help="number of keys (default: 1,000,000)"
    )
    demo.add_argument("--dim", type=int, default=64, help="key width (default: 64)")
    demo.add_argument("--eps", type=float, default=0.01, help="heaviness threshold (default: 0.01)")
    demo.add_argument("--p", type=float, default=2.0, help="exponent of f(x) = |x|^p (default: 2)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.add_argument("--shards", type=int, default=4, help="shards built in parallel (default: 4)")
    demo.add_argument("--queries", type=int, default=1000, help="query rows (default: 1000)")
    demo.add_argument(
        "--check",
        type=int,
        default=100,
        help="queries checked against brute force over all keys (default: 100)",
    )
    demo.add_argument(
        "--plot", metavar="PATH", help="write a PNG: leverage scores and query time vs n"
    )
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=cmd_demo)

    build = sub.add_parser(
        "build",
        formatter_class=fmt,
        epilog=_epilog(),
        help="stream keys into a sketch file",
        description=_wrap(
            "Stream the rows of KEYS into a sketch and write it to SKETCH.  KEYS is a .npy file "
            "(read chunk by chunk: files larger than memory work), FILE.npz:MEMBER, or - for raw "
            "little-endian rows on stdin (then --dim and --dtype are required)."
        ),
    )
    build.add_argument("keys", metavar="KEYS", help="PATH.npy, PATH.npz:MEMBER or - (stdin)")
    build.add_argument(
        "-o", "--output", metavar="SKETCH", required=True, help="sketch file to write"
    )
    build.add_argument(
        "--eps",
        type=float,
        help="heaviness threshold, 1e-300 <= eps <= 1 (required unless --append)",
    )
    build.add_argument("--p", type=float, help="exponent of f(x) = |x|^p (default: 2)")
    build.add_argument(
        "--chunk",
        type=int,
        default=DEFAULT_CHUNK_ROWS,
        metavar="N",
        help=f"rows read at a time (default: {DEFAULT_CHUNK_ROWS})",
    )
    build.add_argument("--append", action="store_true", help="add the keys to the existing SKETCH")
    build.add_argument(
        "--offset",
        type=int,
        metavar="N",
        help="number the keys from N (default: 0, or the next id of SKETCH with --append)",
    )
    build.add_argument(
        "--dim", type=int, metavar="D", help="row width of stdin input (checked for files)"
    )
    build.add_argument(
        "--dtype", choices=["float32", "float64"], help="element type of stdin input"
    )
    where = build.add_mutually_exclusive_group()
    where.add_argument(
        "--jobs",
        type=int,
        metavar="N",
        help="build N shards in parallel threads and merge them (levstream.build_sketch); "
        "without it keys are streamed on one core",
    )
    where.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="build on a running Dask scheduler, e.g. tcp://host:8786 (levstream.dask."
        "build_sketch; KEYS must be a .npy file every worker can read)",
    )
    build.add_argument("--force", action="store_true", help="replace an existing SKETCH")
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    build.set_defaults(func=cmd_build)

    merge = sub.add_parser(
        "merge",
        formatter_class=fmt,
        epilog=_epilog(),
        help="merge sketch files",
        description=_wrap("Merge sketches of disjoint key sets (same dim, eps, p) into one."),
    )
    merge.add_argument("sketches", nargs="+", metavar="SKETCH", help="two or more sketch files")
    merge.add_argument(
        "-o", "--output", metavar="OUT", required=True, help="merged sketch file to write"
    )
    merge.add_argument("--force", action="store_true", help="replace an existing OUT")
    merge.set_defaults(func=cmd_merge)

    query = sub.add_parser(
        "query",
        formatter_class=fmt,
        epilog=_epilog(),
        help="heavy attention entries of query rows",
        description=_wrap(
            "Report every attention entry A[i, key] >= eps of the query rows over all keys of "
            "the sketch: as a table on stdout, or as an .npz with indptr, key_ids, values (CSR)."
        ),
    )
    query.add_argument("sketch", metavar="SKETCH", help="sketch file")
    query.add_argument(
        "queries", metavar="QUERIES", help="PATH.npy or PATH.npz:MEMBER, one query per row"
    )
    query.add_argument(
        "--eps", type=float, help="threshold, at least the sketch's eps (default: the sketch's)"
    )
    query.add_argument(
        "--top-k",
        type=int,
        metavar="K",
        help="at most the K largest entries >= eps per query, largest first (these are the "
        "true top K over all keys whenever a query has K entries >= eps)",
    )
    query.add_argument(
        "-o", "--output", metavar="HITS.npz", help="write the entries to an .npz file"
    )
    query.set_defaults(func=cmd_query)

    info = sub.add_parser(
        "info",
        formatter_class=fmt,
        epilog=_epilog(),
        help="describe a sketch file",
        description=_wrap("Print dim, p, eps, n, |U|, sizes and the format version of a sketch."),
    )
    info.add_argument("sketch", metavar="SKETCH", help="sketch file")
    info.set_defaults(func=cmd_info)

    bench = sub.add_parser(
        "bench",
        formatter_class=fmt,
        epilog=_epilog(),
        help="quick benchmark: build vs Gram-only, query vs dense",
        description=_wrap(
            "Time the sketch build against the Gram-only floor and heavy_entries against blocked "
            "dense NumPy on synthetic keys, side by side in this process (the full suite is in "
            "benchmarks/ of the source tree)."
        ),
    )
    bench.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[30_000, 100_000, 300_000],
        metavar="N",
        help="numbers of keys (default: 30000 100000 300000)",
    )
    bench.add_argument("--dim", type=int, default=64, help="key width (default: 64)")
    bench.add_argument("--eps", type=float, default=0.01, help="threshold (default: 0.01)")
    bench.add_argument("--queries", type=int, default=200, help="query rows (default: 200)")
    bench.add_argument("--repeat", type=int, default=3, help="best of this many runs (default: 3)")
    bench.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except CliError as exc:
        print(f"levstream: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("levstream: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `levstream query ... | head`
        sys.stderr.close()
        return EXIT_OK
    except RuntimeError as exc:
        from .lewis import LewisConvergenceError  # (not imported up front: it loads SciPy)

        if not isinstance(exc, LewisConvergenceError):
            raise
        # a coreset of large p whose Lewis iteration did not converge on these keys
        print(f"levstream: error: {exc} Use a smaller --p.", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
