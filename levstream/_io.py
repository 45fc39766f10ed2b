"""Key and query sources for the command line: ``.npy`` files, ``.npz`` members and raw rows on stdin.

Every source is read in chunks of rows, so a ``.npy`` file larger than memory streams (its header is read by
``np.load(mmap_mode="r")``, its rows by plain reads, so the process never holds more than one chunk), an
``.npz`` member streams through its (possibly compressed) zip entry, and stdin streams ``chunk`` rows at a
time.  Each chunk comes out as a validated, C-contiguous float64 array; a problem (missing file, not an array,
wrong shape or dtype, a non-finite value, stdin ending mid-row) raises :class:`InputError` with a message
that names the source and, for bad values, the global row and column.
"""

from __future__ import annotations

import os
import sys
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO

import numpy as np

from ._npyrows import NpyRows

__all__ = ["InputError", "KeySource", "load_rows", "open_keys", "read_matrix"]

#: dtypes accepted for raw rows on stdin.
STDIN_DTYPES = ("float32", "float64")


class InputError(ValueError):
    """A key or query source that cannot be read as a finite real matrix."""


@dataclass
class KeySource:
    """A matrix of rows that can be read once, chunk by chunk.

    ``n_rows`` is ``None`` when the length is only known at the end (stdin).
    """

    name: str
    dim: int
    n_rows: int | None
    _read: Callable[[int], Iterator[np.ndarray]] = field(repr=False)

    def chunks(self, chunk_rows: int) -> Iterator[np.ndarray]:
        """Yield validated float64 chunks of at most ``chunk_rows`` rows, in order."""
        start = 0
        for raw in self._read(chunk_rows):
            chunk = np.ascontiguousarray(raw, dtype=np.float64)
            _check_finite(chunk, self.name, start)
            start += chunk.shape[0]
            yield chunk


def _check_finite(chunk: np.ndarray, name: str, start: int) -> None:
    if not np.isfinite(chunk).all():
        row, col = (int(i) for i in np.argwhere(~np.isfinite(chunk))[0])
        raise InputError(
            f"{name}: row {start + row}, column {col} is {chunk[row, col]}; "
            "every value must be finite."
        )


def _check_array_header(name: str, shape: tuple[int, ...], dtype: np.dtype) -> int:
    """Validate the shape and dtype of a stored array of key rows; return its width."""
    if dtype.kind not in "fiu":
        raise InputError(
            f"{name} must hold real numbers (float or integer dtype); got dtype {dtype}."
        )
    if len(shape) != 2:
        raise InputError(
            f"{name} must be a 2-D array (one vector per row); got shape {tuple(shape)}."
        )
    if shape[1] == 0:
        raise InputError(f"{name} must have at least one column; got shape {tuple(shape)}.")
    return int(shape[1])


def _npy_source(path: str) -> KeySource:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file.") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, not a .npy file.") from None
    except PermissionError:
        raise InputError(f"{path}: permission denied.") from None
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(f"{path}: not a readable .npy array ({exc}).") from None
    if not isinstance(arr, np.ndarray):  # an .npz opened without a member
        names = ", ".join(arr.files)
        arr.close()
        raise InputError(
            f"{path} is an .npz archive; name the array as {path}:MEMBER (members: {names})."
        )
    dim = _check_array_header(path, arr.shape, arr.dtype)
    n_rows = int(arr.shape[0])
    if (
        arr.flags.f_contiguous and not arr.flags.c_contiguous
    ):  # column-major: rows are strided slices

        def read_strided(chunk_rows: int, rows: np.ndarray = arr) -> Iterator[np.ndarray]:
            for start in range(0, n_rows, chunk_rows):
                yield rows[start : start + chunk_rows]

        return KeySource(path, dim, n_rows, read_strided)
    # Row-major: plain reads after the header, so the process holds one chunk, never the mapped file.
    assert isinstance(arr, np.memmap)
    offset, dtype = int(arr.offset), arr.dtype
    del arr

    def read(chunk_rows: int) -> Iterator[np.ndarray]:
        ranges = [(a, min(a + chunk_rows, n_rows)) for a in range(0, n_rows, chunk_rows)]
        try:
            yield from NpyRows(path, offset, (n_rows, dim), dtype).chunks(ranges, reuse=False)
        except ValueError as exc:  # the file ended early
            raise InputError(str(exc)) from None

    return KeySource(path, dim, n_rows, read)


def _npz_source(path: str, member: str) -> KeySource:
    name = f"{path}:{member}"
    try:
        archive = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file.") from None
    except (zipfile.BadZipFile, OSError) as exc:
        raise InputError(f"{path}: not a readable .npz archive ({exc}).") from None
    members = [m[:-4] for m in archive.namelist() if m.endswith(".npy")]
    if member not in members:
        archive.close()
        raise InputError(
            f"{path} has no array named {member!r}; members: {', '.join(members) or 'none'}."
        )
    with archive.open(f"{member}.npy") as fh:
        shape, fortran_order, dtype = _read_npy_header(fh, name)
    dim = _check_array_header(name, shape, dtype)

    def read(chunk_rows: int) -> Iterator[np.ndarray]:
        try:
            yield from read_member(chunk_rows)
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as exc:
            raise InputError(f"{name}: the archive is corrupted ({exc}).") from None

    def read_member(chunk_rows: int) -> Iterator[np.ndarray]:
        with archive, archive.open(f"{member}.npy") as fh:
            _read_npy_header(fh, name)
            row_bytes = dim * dtype.itemsize
            if fortran_order:  # column-major rows cannot be streamed; such members are read whole
                buf = fh.read(shape[0] * row_bytes)
                if len(buf) != shape[0] * row_bytes:
                    raise InputError(f"{name}: archive member is truncated.")
                yield np.frombuffer(buf, dtype=dtype).reshape(shape, order="F")
                return
            for start in range(0, shape[0], chunk_rows):
                rows = min(chunk_rows, shape[0] - start)
                buf = fh.read(rows * row_bytes)
                if len(buf) != rows * row_bytes:
                    raise InputError(f"{name}: archive member is truncated at row {start}.")
                yield np.frombuffer(buf, dtype=dtype).reshape(rows, dim)

    return KeySource(name, dim, int(shape[0]), read)


def _read_npy_header(fh: IO[bytes], name: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    try:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(fh)
        return np.lib.format.read_array_header_2_0(fh)
    except ValueError as exc:
        raise InputError(f"{name}: not a .npy array ({exc}).") from None


def _stdin_source(stream: IO[bytes], dim: int | None, dtype: str | None) -> KeySource:
    if dim is None or dtype is None:
        raise InputError(
            "reading raw rows from stdin ('-') needs --dim D and --dtype float32|float64."
        )
    if dtype not in STDIN_DTYPES:
        raise InputError(f"--dtype must be one of {', '.join(STDIN_DTYPES)}; got {dtype!r}.")
    dt = np.dtype(dtype)
    row_bytes = dim * dt.itemsize

    def read(chunk_rows: int) -> Iterator[np.ndarray]:
        start = 0
        while True:
            buf = stream.read(chunk_rows * row_bytes)
            if not buf:
                return
            if len(buf) % row_bytes:
                raise InputError(
                    f"stdin ended mid-row: {len(buf) % row_bytes} bytes after row "
                    f"{start + len(buf) // row_bytes} do not fill a row of {dim} {dtype} "
                    f"values ({row_bytes} bytes)."
                )
            rows = np.frombuffer(buf, dtype=dt).reshape(-1, dim)
            start += rows.shape[0]
            yield rows

    return KeySource("stdin", dim, None, read)


def open_keys(
    spec: str, *, dim: int | None = None, dtype: str | None = None, stdin: IO[bytes] | None = None
) -> KeySource:
    """Open ``spec`` as a source of rows.

    Parameters
    ----------
    spec : str
        ``PATH.npy`` (read chunk by chunk), ``PATH.npz:MEMBER`` (streamed from the archive), or ``-`` for raw
        little-endian rows on stdin.
    dim : int, optional
        Row width: required for stdin; for files, checked against the stored width when given.
    dtype : {"float32", "float64"}, optional
        Element type of raw stdin rows (required for stdin).
    stdin : binary file, optional
        Stream to read for ``-`` (default ``sys.stdin.buffer``).

    Examples
    --------
    >>> import io, numpy as np
    >>> from levstream._io import open_keys
    >>> raw = io.BytesIO(np.arange(12, dtype=np.float32).tobytes())
    >>> [c.shape for c in open_keys("-", dim=3, dtype="float32", stdin=raw).chunks(3)]
    [(3, 3), (1, 3)]
    """
    if spec == "-":
        return _stdin_source(sys.stdin.buffer if stdin is None else stdin, dim, dtype)
    path, sep, member = spec.rpartition(":")
    if sep and path.endswith(".npz") and member:
        source = _npz_source(path, member)
    elif spec.endswith(".npz") and os.path.isfile(spec):
        with zipfile.ZipFile(spec) as archive:
            names = [m[:-4] for m in archive.namelist() if m.endswith(".npy")]
        if len(names) != 1:
            raise InputError(
                f"{spec} holds {len(names)} arrays; name one as {spec}:MEMBER "
                f"(members: {', '.join(names) or 'none'})."
            )
        source = _npz_source(spec, names[0])
    else:
        source = _npy_source(spec)
    if dim is not None and source.dim != dim:
        raise InputError(f"{source.name} has rows of width {source.dim}; expected {dim}.")
    return source


def read_matrix(spec: str) -> np.ndarray:
    """Read a whole (small) matrix, e.g. queries, from a ``.npy`` file or an ``.npz`` member."""
    source = open_keys(spec)
    chunks = list(source.chunks(1 << 16))
    return np.concatenate(chunks) if chunks else np.empty((0, source.dim))


def load_rows(path: str, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of the ``.npy`` file at ``path`` (a task run by Dask workers for ``--scheduler``)."""
    return np.array(np.load(path, mmap_mode="r", allow_pickle=False)[start:stop])
