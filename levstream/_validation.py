"""Validation at the public boundary: shapes, dtypes, finiteness, parameters.

Every function here either returns a C-contiguous float64 (or int64) array / a checked scalar, or raises a
``ValueError``/``TypeError`` whose message says what must hold, what was received and, where useful, the fix.
Nothing here mutates its inputs.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np


def _shape_of(obj: Any) -> str:
    shape = getattr(obj, "shape", None)
    return f"shape {tuple(shape)}" if shape is not None else f"a {type(obj).__name__}"


def as_real_array(obj: Any, name: str) -> np.ndarray:
    """Convert to an ndarray, refusing complex, object, string and boolean data."""
    if isinstance(obj, (str, bytes)):
        raise TypeError(f"{name} must be a real numeric array; got {type(obj).__name__} instead.")
    try:
        arr = np.asarray(obj)
    except Exception as exc:  # ragged lists and other unconvertible inputs
        raise TypeError(
            f"{name} must be a real numeric array; got {type(obj).__name__} ({exc})."
        ) from exc
    if arr.dtype == object:
        # ragged nested sequences end up here
        raise TypeError(
            f"{name} must be a real numeric array; got an object array ({_shape_of(arr)})."
        )
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(
            f"{name} must have a real floating or integer dtype; got dtype {arr.dtype} instead."
        )
    return arr


def as_ndarray(obj: Any) -> Any:
    """``np.asarray(obj)`` for an object with ``__array__`` that is not an ndarray (a CPU torch tensor), so that
    every entry point sees the same array (a float32 tensor is float32 data, as a float32 ndarray is); anything
    else as it is (what ``np.asarray`` refuses is left to the full validation, which says what is wrong)."""
    if type(obj) is np.ndarray or not hasattr(obj, "__array__"):
        return obj
    try:
        return np.asarray(obj)
    except Exception:  # noqa: BLE001 (the full validation reports it)
        return obj


def fast_float64(obj: Any) -> np.ndarray | None:
    """``obj`` as a C-contiguous, writeable float64 array when it is an ndarray of float64 or float32 (itself when
    it is one already; a copy when it is strided, read-only or float32: a slice of a larger array, a model's
    float32 activations), else None.  An object with ``__array__`` (a CPU torch tensor) is converted first
    (:func:`as_ndarray`).  The small-input fast paths take what this returns after checking its shape and
    finiteness; anything else goes through the full validation."""
    if type(obj) is not np.ndarray:
        obj = as_ndarray(obj)
        if type(obj) is not np.ndarray:
            return None
    dtype = obj.dtype
    if dtype == np.float64:
        flags = obj.flags
        return obj if flags.c_contiguous and flags.writeable else np.array(obj)
    if dtype == np.float32:
        return obj.astype(np.float64)
    return None


def check_finite(arr: np.ndarray, name: str) -> None:
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise ValueError(
            f"{name} must contain only finite values; found {arr[tuple(bad)]} at index {tuple(int(i) for i in bad)}."
        )


def as_matrix(
    obj: Any,
    name: str,
    dim: int | None = None,
    *,
    hint: str = "",
    allow_empty: bool = False,
    finite: bool = True,
) -> np.ndarray:
    """Validate a 2-D real finite matrix (optionally of width ``dim``) and return it as C-contiguous float64.

    ``finite=False`` skips the finiteness check, for callers that fuse it into their own first pass (they
    must call :func:`check_finite` before using the data).
    """
    arr = as_real_array(obj, name)
    if arr.ndim != 2:
        extra = f" {hint}" if hint else ""
        width = f" with {dim} columns" if dim is not None else ""
        raise ValueError(f"{name} must be 2-D{width}; got {_shape_of(arr)}.{extra}")
    if dim is not None and arr.shape[1] != dim:
        raise ValueError(
            f"{name} must have {dim} columns (the sketch's dim); got shape {arr.shape}."
        )
    if arr.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{name} must have at least one row; got shape {arr.shape}.")
    if arr.shape[1] == 0:
        raise ValueError(f"{name} must have at least one column; got shape {arr.shape}.")
    if finite:
        check_finite(arr, name)
    return np.ascontiguousarray(arr, dtype=np.float64)


def as_row(obj: Any, name: str, dim: int, what: str = "dim") -> np.ndarray:
    """One finite row of length ``dim`` (the sketch's ``what``) as a C-contiguous float64 array."""
    arr = as_real_array(obj, name)
    if arr.ndim != 1:
        hint = " Use update_many(X) for a chunk of rows." if arr.ndim == 2 else ""
        raise ValueError(f"{name} must be 1-D of length {dim}; got {_shape_of(arr)}.{hint}")
    if arr.shape[0] != dim:
        raise ValueError(
            f"{name} must have length {dim} (the sketch's {what}); got length {arr.shape[0]}."
        )
    check_finite(arr, name)
    return np.ascontiguousarray(arr, dtype=np.float64)


def as_ids(obj: Any, n_rows: int, name: str = "ids") -> np.ndarray:
    """Validate ids for ``n_rows`` rows: unique non-negative integers, returned as int64."""
    arr = np.asarray(obj)
    if arr.size == 0 and arr.dtype.kind == "f" and not isinstance(obj, np.ndarray):
        arr = arr.astype(
            np.int64
        )  # an empty list (no ids for an empty chunk) has no integer dtype of its own
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"{name} must be an integer array; got dtype {arr.dtype} instead.")
    if arr.ndim != 1 or arr.shape[0] != n_rows:
        raise ValueError(
            f"{name} must be 1-D with one id per row ({n_rows}); got {_shape_of(arr)}."
        )
    if n_rows and arr.min() < 0:
        raise ValueError(f"{name} must be non-negative; got minimum {int(arr.min())}.")
    if arr.dtype == np.uint64 and n_rows and arr.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{name} must fit in int64; got maximum {int(arr.max())}.")
    ids = np.ascontiguousarray(arr, dtype=np.int64)
    if n_rows > 1:
        srt = np.sort(ids)
        dup = srt[1:] == srt[:-1]
        if dup.any():
            raise ValueError(
                f"{name} must be unique; id {int(srt[1:][dup][0])} appears more than once."
            )
    return ids


def check_int(value: Any, name: str, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, np.integer)):
        raise TypeError(
            f"{name} must be an integer; got {value!r} ({type(value).__name__}) instead."
        )
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value} instead.")
    return value


def check_real(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
        raise TypeError(
            f"{name} must be a real number; got {value!r} ({type(value).__name__}) instead."
        )
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite; got {value} instead.")
    return value


#: Smallest eps: thresholds and the candidate budget ``2 d / eps`` stay far inside float64's range.
EPS_MIN = 1e-300

#: The exponents the sketch supports: ``|x|^p`` for ``P_MIN <= p <= P_MAX``.  Beyond, the Lewis-weight iteration of
#: the coreset converges too slowly (it contracts by ``|p - 2| / (p + 2)`` per step; it failed from p = 66 on
#: heavy-tailed keys) and its constants overflow (``d^(p/2 - 1)``); below, ``|x|^p`` is 1 to working precision.
P_MIN, P_MAX = 0.01, 32.0


def check_eps(value: Any, name: str = "eps") -> float:
    eps = check_real(value, name)
    if not EPS_MIN <= eps <= 1.0:
        raise ValueError(f"{name} must satisfy {EPS_MIN:g} <= {name} <= 1; got {eps} instead.")
    return eps


def check_p(value: Any) -> float:
    p = check_real(value, "p")
    if not P_MIN <= p <= P_MAX:
        raise ValueError(f"p must satisfy {P_MIN:g} <= p <= {P_MAX:g}; got {p} instead.")
    return p
