"""Brute-force twins of everything the sketch computes (every routine has a naive twin).

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


class NaiveStream:
    """A brute-force streaming twin of one head of a sketch: keeps every key (and value) with its id.

    Every call answers from scratch over all rows fed so far with plain NumPy: no Gram accumulation, no
    pruning, no factorisation.  Ids follow the sketches' rule: a running counter unless ``ids=`` or
    ``offset=`` is given, and the counter continues after the largest id fed.  Empty chunks are no-ops.
    """

    def __init__(self, dim: int, *, p: float = 2.0, value_dim: int | None = None) -> None:
        self.dim, self.p, self.value_dim = int(dim), float(p), value_dim
        self.K = np.zeros((0, self.dim))
        self.V = np.zeros((0, value_dim or 0))
        self.ids = np.zeros(0, dtype=np.int64)
        self.next_id = 0

    @property
    def n(self) -> int:
        return int(self.ids.size)

    def update(self, x, v=None) -> NaiveStream:
        V = None if v is None else np.asarray(v, np.float64)[None, :]
        return self.update_many(np.asarray(x, np.float64)[None, :], V)

    def update_many(self, X, V=None, ids=None, offset=None) -> NaiveStream:
        X = np.asarray(X, np.float64).reshape(-1, self.dim)
        m = X.shape[0]
        if m == 0:
            return self
        if ids is None:
            start = self.next_id if offset is None else int(offset)
            ids = np.arange(start, start + m)
        ids = np.asarray(ids, np.int64).reshape(m)
        if np.unique(ids).size != m or np.intersect1d(ids, self.ids).size:
            raise ValueError("ids clash")
        if self.value_dim is not None:
            self.V = np.vstack([self.V, np.asarray(V, np.float64).reshape(m, self.value_dim)])
        self.K = np.vstack([self.K, X])
        self.ids = np.concatenate([self.ids, ids])
        self.next_id = max(self.next_id, int(ids.max()) + 1)
        return self

    def merge(self, other: NaiveStream) -> NaiveStream:
        if np.intersect1d(self.ids, other.ids).size:
            raise ValueError("ids clash")
        self.K, self.ids = np.vstack([self.K, other.K]), np.concatenate([self.ids, other.ids])
        self.V = np.vstack([self.V, other.V])
        self.next_id = max(self.next_id, other.next_id)
        return self

    def weights(self, Q) -> np.ndarray:
        """``|<q_i, k_j>|^p`` for every query row and key fed (m x n, columns in feeding order)."""
        return np.abs(np.asarray(Q, np.float64) @ self.K.T) ** self.p

    def attention(self, Q) -> np.ndarray:
        """Dense attention ``|<q, k>|^p / sum``; rows of zero sum stay zero."""
        B = self.weights(Q)
        Z = B.sum(axis=1, keepdims=True)
        return np.divide(B, Z, out=np.zeros_like(B), where=Z > 0)

    def normalizer(self, Q) -> np.ndarray:
        return self.weights(Q).sum(axis=1)

    def heavy_entries(self, Q, eps: float) -> dict[tuple[int, int], float]:
        """``{(query_row, key_id): A}`` for every dense entry ``A >= eps``."""
        A = self.attention(Q)
        rows, cols = np.nonzero(A >= eps)
        return {(int(i), int(self.ids[j])): float(A[i, j]) for i, j in zip(rows, cols)}

    def top_k(self, Q, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Per query row: ids of the ``k`` largest dense entries (descending) and their values."""
        A = self.attention(Q)
        order = np.argsort(-A, axis=1, kind="stable")[:, :k]
        return self.ids[order], np.take_along_axis(A, order, axis=1)

    def scores(self) -> np.ndarray:
        """Leverage score of every key fed (p = 2; SVD, pseudo-inverse semantics), feeding order."""
        assert self.p == 2.0, "leverage scores are the p = 2 sensitivities"
        return leverage_svd(self.K) if self.n else np.zeros(0)

    def universal_set(self, eps: float) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, scores)`` of the keys with leverage score ``>= eps`` (p = 2), ids ascending."""
        tau = self.scores()
        sel = np.flatnonzero(tau >= eps)
        order = np.argsort(self.ids[sel])
        return self.ids[sel][order], tau[sel][order]

    def attend(self, Q, eps: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(output, heavy_output, captured_mass)``: ``sum_j A_j v_j`` over all keys, the same sum
        over the entries ``A_j >= eps`` only, and ``sum A_j`` over those entries (p = 2, values)."""
        assert self.p == 2.0 and self.value_dim is not None
        A = self.attention(Q)
        heavy = np.where(A >= eps, A, 0.0)
        return A @ self.V, heavy @ self.V, heavy.sum(axis=1)


class DecayedStream:
    """Brute-force twin of a stream that forgets: every key, value and gate kept, attention recomputed from
    scratch in log space.

    Row ``t`` arrives with gate ``g_t`` (times a constant ``decay``); key ``j`` weighs
    ``c_j(t) = g_{j+1} ... g_t`` at time ``t`` (the newest key weighs 1).  ``log c_j`` is summed backwards from
    the newest row in extended precision (``np.longdouble``), and the attention ``c_j <q, k_j>^2 / sum`` is
    formed as ``exp(a_j - max a)`` with ``a_j = log c_j + log <q, k_j>^2``: nothing overflows or underflows
    before the weights are compared with each other.
    """

    def __init__(self, dim: int, *, value_dim: int | None = None, decay: float | None = None) -> None:
        self.dim, self.value_dim, self.decay = int(dim), value_dim, decay
        self.K = np.zeros((0, self.dim))
        self.V = np.zeros((0, value_dim or 0))
        self.log_gates = np.zeros(0)
        self.ids = np.zeros(0, dtype=np.int64)

    @property
    def n(self) -> int:
        return int(self.ids.size)

    def update_many(self, X, V=None, gates=None, ids=None) -> DecayedStream:
        X = np.asarray(X, np.float64).reshape(-1, self.dim)
        m = X.shape[0]
        g = np.ones(m) if gates is None else np.asarray(gates, np.float64).reshape(m)
        lg = np.log(g) + (0.0 if self.decay is None else np.log(self.decay))
        start = int(self.ids.max()) + 1 if self.ids.size else 0
        ids = np.arange(start, start + m) if ids is None else np.asarray(ids, np.int64)
        self.K = np.vstack([self.K, X])
        if self.value_dim is not None:
            self.V = np.vstack([self.V, np.asarray(V, np.float64).reshape(m, self.value_dim)])
        self.log_gates = np.concatenate([self.log_gates, lg])
        self.ids = np.concatenate([self.ids, ids])
        return self

    def log_weights(self, upto: int | None = None) -> np.ndarray:
        """``log c_j(t)`` of keys ``0..t`` at time ``t = upto`` (default: the newest row)."""
        t = self.n - 1 if upto is None else upto
        lg = self.log_gates[1 : t + 1].astype(np.longdouble)
        after = np.concatenate([np.cumsum(lg[::-1])[::-1], [np.longdouble(0.0)]])  # sum_{s=j+1..t}
        return after.astype(np.float64)

    def attention(self, q, upto: int | None = None) -> np.ndarray:
        """Decayed attention of one query over keys ``0..upto`` (zero when every weight is zero)."""
        t = self.n - 1 if upto is None else upto
        dots = self.K[: t + 1] @ np.asarray(q, np.float64)
        with np.errstate(divide="ignore"):
            a = self.log_weights(t) + np.log(dots * dots)
        if not np.isfinite(a.max()):
            return np.zeros(t + 1)
        w = np.exp(a - a.max())
        return w / w.sum()

    def heavy(self, Q, eps: float, upto=None) -> dict[tuple[int, int], float]:
        """``{(query_row, key_id): A}`` for every entry ``A >= eps``; ``upto[i]`` is query ``i``'s time."""
        out = {}
        for i, q in enumerate(np.atleast_2d(Q)):
            A = self.attention(q, None if upto is None else upto[i])
            for j in np.flatnonzero(A >= eps):
                out[(i, int(self.ids[j]))] = float(A[j])
        return out

    def outputs(self, Q, upto=None) -> np.ndarray:
        return np.array([self.attention(q, None if upto is None else upto[i]) @ self.V[: (self.n if upto is None else upto[i] + 1)]
                         for i, q in enumerate(np.atleast_2d(Q))])

    def universal_scores(self) -> np.ndarray:
        """Leverage scores of the weighted keys ``sqrt(c_j) k_j`` (by SVD; the scale of the weights cancels)."""
        lw = self.log_weights()
        return leverage_svd(self.K * np.exp(0.5 * (lw - lw.max()))[:, None])
