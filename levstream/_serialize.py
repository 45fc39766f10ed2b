"""Versioned, checksummed binary format shared by every sketch (no pickle inside).

Layout: ``MAGIC`` (8 bytes) | format version (uint16) | reserved (uint16) | payload length (uint64) |
SHA-256 of the payload (32 bytes) | payload.  The payload is a JSON header (length-prefixed) followed by the
raw little-endian bytes of every array it lists.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import struct

import numpy as np

MAGIC = b"LEVSTRM\x00"
#: The newest format this levstream writes and reads: 1 (keys only, levstream 0.1.0 and later), 2 (values), 3 (a
#: stream that forgets), 4 (key rows held as float32).
FORMAT_VERSION = 4
_PREFIX = struct.Struct("<8sHHQ32s")
_ALLOWED_DTYPES = {"<f8", "<i8", "<f4", "|u1", "|b1"}


def pack(meta: dict, arrays: dict[str, np.ndarray], version: int = 1) -> bytes:
    """Serialize ``meta`` (JSON-able) and named arrays as format ``version`` (1 <= version <= FORMAT_VERSION)."""
    if not 1 <= version <= FORMAT_VERSION:
        raise ValueError(f"format version must be in 1..{FORMAT_VERSION}; got {version}.")
    table = []
    blobs = []
    offset = 0
    for name, arr in arrays.items():
        a = np.ascontiguousarray(arr)
        a = a.astype(a.dtype.newbyteorder("<"), copy=False)
        raw = a.tobytes()
        table.append(
            {
                "name": name,
                "dtype": a.dtype.str,
                "shape": list(a.shape),
                "offset": offset,
                "nbytes": len(raw),
            }
        )
        blobs.append(raw)
        offset += len(raw)
    header = json.dumps({"meta": meta, "arrays": table}, sort_keys=True).encode()
    payload = struct.pack("<I", len(header)) + header + b"".join(blobs)
    digest = hashlib.sha256(payload).digest()
    return _PREFIX.pack(MAGIC, version, 0, len(payload), digest) + payload


def unpack(data: bytes) -> tuple[dict, dict[str, np.ndarray], int]:
    """Inverse of :func:`pack`; returns ``(meta, arrays, format_version)``.  Raises ``ValueError`` on any corruption."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"serialized sketch must be bytes; got {type(data).__name__} instead.")
    data = bytes(data)
    if len(data) < _PREFIX.size:
        raise ValueError(
            f"serialized sketch is truncated: {len(data)} bytes, the header alone needs {_PREFIX.size}."
        )
    magic, version, reserved, length, digest = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise ValueError(f"not a levstream sketch: magic bytes {magic!r}, expected {MAGIC!r}.")
    if (
        reserved != 0
    ):  # not covered by the checksum, so a flipped bit here must be caught explicitly
        raise ValueError(
            f"serialized sketch is corrupted: reserved header field is {reserved}, expected 0."
        )
    if version > FORMAT_VERSION or version < 1:
        raise ValueError(
            f"unsupported sketch format version {version}; this levstream reads 1..{FORMAT_VERSION}."
        )
    payload = data[_PREFIX.size :]
    if len(payload) != length:
        raise ValueError(
            f"serialized sketch is truncated or padded: payload of {len(payload)} bytes, header says {length}."
        )
    if hashlib.sha256(payload).digest() != digest:
        raise ValueError("serialized sketch is corrupted: checksum mismatch.")
    try:
        (hlen,) = struct.unpack_from("<I", payload)
        header = json.loads(payload[4 : 4 + hlen].decode())
        body = payload[4 + hlen :]
        arrays = {}
        for entry in header["arrays"]:
            if entry["dtype"] not in _ALLOWED_DTYPES:
                raise ValueError(f"unexpected dtype {entry['dtype']}")
            start, nbytes = int(entry["offset"]), int(entry["nbytes"])
            if start < 0 or start + nbytes > len(body):
                raise ValueError("array extends past the payload")
            arr = np.frombuffer(body[start : start + nbytes], dtype=np.dtype(entry["dtype"]))
            arrays[entry["name"]] = arr.reshape(entry["shape"]).copy()
        return header["meta"], arrays, int(version)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, struct.error) as exc:
        raise ValueError(f"serialized sketch is malformed: {exc}.") from exc


def kind(data: bytes) -> object:
    """The ``kind`` a serialized object's metadata names (which class wrote it), read without checking the rest;
    None when the bytes do not parse that far (the reader named then reports what is wrong)."""
    try:
        payload = bytes(data[_PREFIX.size :])
        (hlen,) = struct.unpack_from("<I", payload)
        return json.loads(payload[4 : 4 + hlen].decode())["meta"].get("kind")
    except Exception:  # noqa: BLE001 (the full reader reports it)
        return None


_tmp_serial = itertools.count()


def write_atomic(path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file renamed into place (no torn files on a crash)."""
    import os
    import threading

    path = os.fspath(path)
    # a file of this writer's own next to the target (the rename stays on one file system; "x": never another
    # writer's), removed should anything fail
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}-{next(_tmp_serial)}"
    try:
        with open(tmp, "xb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
