"""BLAS level-3 calls from compiled code: ctypes functions called without the GIL.

``trmm`` is SciPy's Cython BLAS.  The Gram update ``syrk`` is the ``dsyrk`` of the BLAS NumPy itself uses
when NumPy's wheel bundles one that exports it (often a newer OpenBLAS build than SciPy's), else SciPy's:
see :func:`dsyrk_function`.

The functions are looked up once (on first use) and passed to the kernels as arguments rather than read from a
global, so that the kernels stay in numba's on-disk cache.  The wrappers take C-contiguous arrays (float64;
float32 for ``strmm``) and describe them to column-major BLAS as their transposes, so no array is copied.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

import numba
import numpy as np

_functions: dict[str, Any] = {}


def blas_function(name: str, n_args: int) -> Any:
    """SciPy's Cython-BLAS function ``name`` (``n_args`` pointer arguments) as a ctypes function."""
    fn = _functions.get(name)
    if fn is None:
        from numba.extending import get_cython_function_address

        address = get_cython_function_address("scipy.linalg.cython_blas", name)
        fn = _functions[name] = ctypes.CFUNCTYPE(None, *([ctypes.c_void_p] * n_args))(address)
    return fn


#: The Fortran ``dsyrk`` symbols of the OpenBLAS builds NumPy's wheels bundle, with whether they take 64-bit
#: integers: ``scipy-openblas64`` (NumPy 2) and NumPy 1's ``openblas64_`` name theirs with the ``64_`` suffix of
#: the 64-bit-integer build, ``scipy-openblas32`` has none.  The width is read from the name, and trusted: the
#: check of :func:`_syrk_works` cannot catch a wrong one (a 64-bit build given 32-bit integers may crash).
_NUMPY_SYRK_SYMBOLS = (("scipy_dsyrk_64_", True), ("dsyrk_64_", True), ("scipy_dsyrk_", False))

#: Where :func:`dsyrk_function` takes ``syrk`` from: ``"numpy"`` (NumPy's own BLAS when it has one) or
#: ``"scipy"`` (always SciPy's).  Set before the first ingest (or ``LEVSTREAM_SYRK=scipy``) to compare them.
SYRK_SOURCE = os.environ.get("LEVSTREAM_SYRK", "numpy")


def _real(path: str) -> str:
    return os.path.normcase(os.path.realpath(path))


def _numpy_blas_paths() -> list[str]:
    """The BLAS libraries loaded from NumPy's own wheel (its bundled OpenBLAS), as threadpoolctl finds them."""
    from threadpoolctl import threadpool_info

    home = os.path.dirname(os.path.dirname(_real(np.__file__)))
    bundled = tuple(
        os.path.join(home, *parts) + os.sep for parts in (("numpy.libs",), ("numpy", ".dylibs"))
    )
    return [
        info["filepath"]
        for info in threadpool_info()
        if info.get("user_api") == "blas" and _real(info["filepath"]).startswith(bundled)
    ]


def bundled_dsyrk_symbols() -> list[tuple[str, str, bool, int]]:
    """``(library path, symbol, takes 64-bit integers, address)`` of every known ``dsyrk`` symbol the BLAS
    libraries of NumPy's wheel export (:data:`_NUMPY_SYRK_SYMBOLS`), in the order they are tried."""
    found = []
    for path in _numpy_blas_paths():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for symbol, ilp64 in _NUMPY_SYRK_SYMBOLS:
            address = ctypes.cast(getattr(lib, symbol, None) or 0, ctypes.c_void_p).value
            if address:
                found.append((path, symbol, ilp64, address))
    return found


def _numpy_dsyrk() -> tuple[tuple[Any, bool], str] | None:
    """NumPy's bundled ``dsyrk`` (with whether it takes 64-bit integers) and a label naming it, or None (none
    found, or none passes the check of :func:`_syrk_works`)."""
    for path, symbol, ilp64, address in bundled_dsyrk_symbols():
        fn = ctypes.CFUNCTYPE(None, *([ctypes.c_void_p] * 10))(address)
        if _syrk_works((fn, ilp64)):
            return (fn, ilp64), f"NumPy's {os.path.basename(path)} ({symbol})"
    return None


def _syrk_works(syrk: tuple[Any, bool]) -> bool:
    """Whether ``syrk`` computes a small Gram update exactly (integer entries: every order of summation gives
    the same result) on top of what ``G`` held."""
    X = np.arange(1.0, 16.0).reshape(5, 3) - 7.0
    G = np.full((3, 3), 2.0)
    add_gram(G, X, syrk)
    return bool(np.array_equal(G, X.T @ X + 2.0))


def syrk_from(source: str) -> tuple[Any, bool] | None:
    """``syrk`` for :func:`add_gram` from ``source``: ``"numpy"`` (NumPy's bundled ``dsyrk``, None when NumPy
    has none or it fails the check of :func:`_syrk_works`) or ``"scipy"`` (SciPy's Cython ``dsyrk``)."""
    if source == "numpy":
        found = _numpy_dsyrk()
        return None if found is None else found[0]
    if source == "scipy":
        return blas_function("dsyrk", 10), False
    raise ValueError(f"syrk source must be 'numpy' or 'scipy', got {source!r}")


def dsyrk_function() -> tuple[Any, bool]:
    """``syrk`` for :func:`add_gram`: ``(function, takes 64-bit integers)``, looked up once per process.

    NumPy's own ``dsyrk`` when its wheel bundles an OpenBLAS that exports one and it passes a numeric check,
    else SciPy's Cython ``dsyrk`` (:data:`SYRK_SOURCE` ``"scipy"`` asks for SciPy's).  The Gram update is the
    ingest path's main cost, and NumPy's bundled OpenBLAS can be markedly faster than SciPy's at small ``d``
    (1.3-1.4x at d = 64 on one Zen 3 host, where NumPy's wheel carried OpenBLAS 0.3.31 and SciPy's 0.3.30:
    benchmarks/RESULTS.md, "Ingest").  Every call of the process uses the same function, so the sketch stays
    the same bit for bit on any number of threads."""
    syrk = _functions.get("syrk")
    if syrk is None:
        if SYRK_SOURCE not in ("numpy", "scipy"):
            raise ValueError(f"LEVSTREAM_SYRK must be 'numpy' or 'scipy', got {SYRK_SOURCE!r}")
        found = _numpy_dsyrk() if SYRK_SOURCE == "numpy" else None
        syrk, label = found or ((blas_function("dsyrk", 10), False), "SciPy's cython_blas (dsyrk)")
        _functions["syrk"], _functions["syrk library"] = syrk, label
    return syrk


def syrk_library() -> str:
    """Which library's ``dsyrk`` the Gram updates of this process use (for benchmark headers)."""
    dsyrk_function()
    return str(_functions["syrk library"])


def dtrmm_function() -> Any:
    """``dtrmm`` (for :func:`times_upper`)."""
    return blas_function("dtrmm", 11)


def strmm_function() -> Any:
    """``strmm`` (for :func:`times_upper`'s float32 form)."""
    return blas_function("strmm", 11)


@numba.njit(nogil=True, cache=True)
def times_upper(Y, W, dtrmm):  # pragma: no cover - compiled
    """``Y <- Y @ W`` in place for C-contiguous float64 ``Y`` (b, d) and upper-triangular ``W`` (d, d).

    In Fortran's column-major view ``Y^T`` is a (d, b) matrix and ``W^T`` a lower-triangular (d, d) one, so
    ``dtrmm('L', 'L', 'N', 'N')`` computes ``Y^T <- W^T Y^T`` with no transposed copies.  float32 ``Y`` and ``W``
    with ``strmm`` in place of ``dtrmm`` work the same way.
    """
    b, d = Y.shape
    if b == 0:
        return
    flags = np.array([ord("L"), ord("L"), ord("N"), ord("N")], dtype=np.uint8)
    sizes = np.array([d, b, d, d], dtype=np.int32)
    alpha = np.ones(1, dtype=Y.dtype)
    dtrmm(
        flags[0:].ctypes,
        flags[1:].ctypes,
        flags[2:].ctypes,
        flags[3:].ctypes,
        sizes[0:].ctypes,
        sizes[1:].ctypes,
        alpha.ctypes,
        W.ctypes,
        sizes[2:].ctypes,
        Y.ctypes,
        sizes[3:].ctypes,
    )


@numba.njit(nogil=True, cache=True)
def _syrk_lower(dsyrk, sizes, X, G):  # pragma: no cover - compiled
    """``dsyrk('L', 'N', n, k, 1, X, lda, 1, G, ldg)`` with ``sizes = [n, k, lda, ldg]`` in the integers
    ``dsyrk`` takes (int32 or int64)."""
    flags = np.array([ord("L"), ord("N")], dtype=np.uint8)
    one = np.ones(1)
    dsyrk(
        flags[0:].ctypes,
        flags[1:].ctypes,
        sizes[0:].ctypes,
        sizes[1:].ctypes,
        one.ctypes,
        X.ctypes,
        sizes[2:].ctypes,
        one.ctypes,
        G.ctypes,
        sizes[3:].ctypes,
    )


@numba.njit(nogil=True, cache=True)
def add_gram(G, X, syrk):  # pragma: no cover - compiled
    """``G += X^T X`` in place for a C-contiguous symmetric float64 ``G`` (d, d) and C-contiguous ``X`` (b, d):
    BLAS ``syrk`` on one triangle (half the flops of a general product), then the other mirrored from it.
    ``syrk`` is ``(dsyrk, takes 64-bit integers)`` (:func:`dsyrk_function`).

    In Fortran's view ``X`` is ``X^T`` (d, b), so ``dsyrk('L', 'N')`` adds ``X^T X`` to the lower triangle of
    Fortran's ``G``, which is the upper triangle of the C-ordered one (the triangle NumPy's ``X.T @ X`` asks
    for: OpenBLAS computed it ~10% faster than the other at d = 64).
    """
    b, d = X.shape
    if not (G.flags.c_contiguous and X.flags.c_contiguous):
        raise ValueError("add_gram: G and X must be C-contiguous")
    if b == 0 or d == 0:
        return
    dsyrk, ilp64 = syrk
    if ilp64:
        _syrk_lower(dsyrk, np.array([d, b, d, d], dtype=np.int64), X, G)
    else:
        _syrk_lower(dsyrk, np.array([d, b, d, d], dtype=np.int32), X, G)
    for a in range(d):
        for c in range(a + 1, d):
            G[c, a] = G[a, c]
