"""Synthetic key and query streams that look like real attention keys (for demos, examples, benchmarks).

Real attention keys have heavy-tailed row norms (a few keys carry most of the energy), a low-rank
component shared by most keys (a common offset and a few dominant directions) and isotropic noise.
:func:`attention_like_keys` yields such rows chunk by chunk, reproducibly from a seed, without ever holding
more than one chunk.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ._validation import check_int

__all__ = ["attention_like_keys", "attention_like_queries"]


def _basis(dim: int, rank: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    gen = np.random.default_rng([seed, 0xBA515])
    basis = np.linalg.qr(gen.standard_normal((dim, max(rank, 1))))[0].T[:rank]
    offset = gen.standard_normal(dim) * 0.5
    return basis, offset


def attention_like_keys(
    n: int,
    dim: int = 64,
    *,
    rank: int = 8,
    tail: float = 2.5,
    chunk_rows: int = 65536,
    seed: int = 0,
    dtype: type = np.float64,
) -> Iterator[np.ndarray]:
    """Yield ``n`` synthetic keys of width ``dim`` in chunks of at most ``chunk_rows`` rows.

    Each key is ``scale * (noise + low_rank + offset)`` with ``scale ~ 1 + Pareto(tail)`` (heavy-tailed
    norms), a ``rank``-dimensional component with decaying variances and a common offset.

    Examples
    --------
    >>> from levstream.synthetic import attention_like_keys
    >>> sum(c.shape[0] for c in attention_like_keys(10_000, 16, chunk_rows=4096))
    10000
    """
    # checked here, on the call, not on the first chunk (a chunk size of 0 would yield empty chunks forever)
    n = check_int(n, "n", minimum=0)
    dim = check_int(dim, "dim", minimum=1)
    chunk_rows = check_int(chunk_rows, "chunk_rows", minimum=1)
    rank = min(
        check_int(rank, "rank", minimum=0), dim
    )  # no more low-rank directions than the keys have
    return _keys(n, dim, rank, tail, chunk_rows, seed, dtype)


def _keys(
    n: int, dim: int, rank: int, tail: float, chunk_rows: int, seed: int, dtype: type
) -> Iterator[np.ndarray]:
    """The chunks of :func:`attention_like_keys` (arguments checked)."""
    basis, offset = _basis(dim, rank, seed)
    spectrum = 3.0 / np.sqrt(1.0 + np.arange(rank))
    gen = np.random.default_rng(seed)
    done = 0
    while done < n:
        m = min(chunk_rows, n - done)
        X = gen.standard_normal((m, dim))
        X += (gen.standard_normal((m, rank)) * spectrum) @ basis
        X += offset
        X *= 1.0 + gen.pareto(tail, size=(m, 1))
        done += m
        yield X.astype(dtype, copy=False)


def attention_like_queries(
    m: int, dim: int = 64, *, rank: int = 8, seed: int = 1, key_seed: int = 0
) -> np.ndarray:
    """``m`` queries sharing the keys' low-rank structure (built from ``key_seed``) plus noise."""
    m = check_int(m, "m", minimum=0)
    dim = check_int(dim, "dim", minimum=1)
    rank = min(check_int(rank, "rank", minimum=0), dim)
    basis, _ = _basis(dim, rank, key_seed)
    gen = np.random.default_rng(seed)
    return gen.standard_normal((m, dim)) + 2.0 * gen.standard_normal((m, rank)) @ basis
