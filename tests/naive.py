"""Brute-force twins of everything the sketch computes (STYLE.md: "every routine has a naive twin").

Deliberately simple, written with NumPy only, and independent of levstream's code paths: no Gram matrix
accumulation, no Cholesky, no R-factor updates, no numba, no pruning.  Small inputs only.
"""

from __future__ import annotations

import numpy as np


def leverage_svd(K: np.ndarray, rcond: float | None = None) -> np.ndarray:
    """``tau_j = ||U_j||^2`` for the left singular vectors of ``K`` above a relative rank tolerance.

    Pseudo-inverse semantics: the tolerance is ``max(n, d) * eps_machine * sigma_max`` (NumPy's
    ``matrix_rank`` default) unless ``rcond`` is given.  tau is invariant under scaling a column, so the
    rank is decided on ``K`` with every non-zero column scaled to max-abs 1.
    """
    K = np.asarray(K, dtype=np.float64)
    n, d = K.shape
    col_max = np.abs(K).max(axis=0) if n else np.zeros(d)
    K = K[:, col_max > 0] / col_max[col_max > 0]
    U, s, _ = np.linalg.svd(K, full_matrices=False)
    if s.size == 0 or s[0] == 0.0:
        return np.zeros(n)
    tol = (max(n, d) * np.finfo(np.float64).eps if rcond is None else rcond) * s[0]
    r = int((s > tol).sum())
    return (U[:, :r] ** 2).sum(axis=1)


def leverage_qr(K: np.ndarray) -> np.ndarray:
    """``tau_j = ||Q_j||^2`` from the thin QR of a full-column-rank ``K``."""
    Qf, _ = np.linalg.qr(np.asarray(K, dtype=np.float64))
    return (Qf**2).sum(axis=1)


def leverage_pinv(K: np.ndarray) -> np.ndarray:
    """``tau_j = k_j^T (K^T K)^+ k_j`` with ``numpy.linalg.pinv`` (squares the condition number: well-conditioned K only)."""
    K = np.asarray(K, dtype=np.float64)
    Gp = np.linalg.pinv(K.T @ K, hermitian=True)
    return np.einsum("ij,jk,ik->i", K, Gp, K)


def offline_set(tau: np.ndarray, eps: float) -> set[int]:
    """``{j : tau_j >= eps}`` as a Python set."""
    return set(np.flatnonzero(np.asarray(tau) >= eps).tolist())


def dense_attention(Q: np.ndarray, K: np.ndarray) -> np.ndarray:
    """``A = (Q K^T)^2 / rowsum`` with rows of zero sum left at zero (m x n, p = 2)."""
    B = (np.asarray(Q, np.float64) @ np.asarray(K, np.float64).T) ** 2
    Z = B.sum(axis=1, keepdims=True)
    A = np.zeros_like(B)
    np.divide(B, Z, out=A, where=Z > 0)
    return A


def dense_heavy(Q: np.ndarray, K: np.ndarray, eps: float, ids: np.ndarray | None = None) -> dict[tuple[int, int], float]:
    """``{(i, key_id): A[i, j]}`` for every dense entry ``A[i, j] >= eps``."""
    A = dense_attention(Q, K)
    ids = np.arange(K.shape[0]) if ids is None else np.asarray(ids)
    rows, cols = np.nonzero(A >= eps)
    return {(int(i), int(ids[j])): float(A[i, j]) for i, j in zip(rows, cols)}


def dense_normalizer(Q: np.ndarray, K: np.ndarray) -> np.ndarray:
    """``Z(q_i) = sum_l <q_i, k_l>^2`` by summing squares directly."""
    return ((np.asarray(Q, np.float64) @ np.asarray(K, np.float64).T) ** 2).sum(axis=1)


def dense_top_k(Q: np.ndarray, K: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per query: the ``k`` key indices with the largest dense attention (descending) and their values."""
    A = dense_attention(Q, K)
    order = np.argsort(-A, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(A, order, axis=1)


def random_orthonormal(n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    """An n x d matrix with orthonormal columns (Haar-like, from the QR of a Gaussian)."""
    Qf, R = np.linalg.qr(rng.standard_normal((n, d)))
    return Qf * np.sign(np.diag(R))
