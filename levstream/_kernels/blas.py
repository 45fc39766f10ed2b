"""BLAS level-3 calls from compiled code: SciPy's Cython BLAS as ctypes functions, called without the GIL.

The functions are looked up once (on first use) and passed to the kernels as arguments rather than read from a
global, so that the kernels stay in numba's on-disk cache.  Both wrappers take C-contiguous float64 arrays and
describe them to column-major BLAS as their transposes, so no array is copied.
"""

from __future__ import annotations

import ctypes
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


def dtrmm_function() -> Any:
    """``dtrmm`` (for :func:`times_upper`)."""
    return blas_function("dtrmm", 11)


def dsyrk_function() -> Any:
    """``dsyrk`` (for :func:`add_gram`)."""
    return blas_function("dsyrk", 10)


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
def add_gram(G, X, dsyrk):  # pragma: no cover - compiled
    """``G += X^T X`` in place for a C-contiguous symmetric float64 ``G`` (d, d) and C-contiguous ``X`` (b, d):
    BLAS ``syrk`` on one triangle (half the flops of a general product), then the other mirrored from it.

    In Fortran's view ``X`` is ``X^T`` (d, b), so ``dsyrk('U', 'N')`` adds ``X^T X`` to the upper triangle of
    Fortran's ``G``, which is the lower triangle of the C-ordered one.
    """
    b, d = X.shape
    if b == 0:
        return
    flags = np.array([ord("U"), ord("N")], dtype=np.uint8)
    sizes = np.array([d, b, d, d], dtype=np.int32)
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
    for a in range(d):
        for c in range(a + 1, d):
            G[a, c] = G[c, a]
