"""Approximate normaliser summary for any ``f(x) = |x|^p``: a reweighted l_p coreset of the keys.

The summary holds rows ``S`` (sampled keys, each rescaled by ``pi^(-1/p)``) with ``Z~(q) = ||S q||_p^p``
an unbiased estimate of ``Z(q) = ||K q||_p^p`` (docs/theory.md, "General p").  Two sampling operations, both
importance sampling with probabilities ``pi_j = min(1, beta * b_j)`` where ``b_j`` is a proven upper bound on
the row's sensitivity with respect to the rows it is sampled among:

* **online** (every new row): ``b_j = (1 + delta) c_p (k_j^T M^-1 k_j)^(p/2)``, ``M`` the Lewis form
  ``S^T W^(1-2/p) S`` of the coreset of the prefix (``W`` its Lewis weights, ``c_p = d^max(0, p/2-1)``).
  It bounds ``|<k_j,q>|^p / Z_prefix(q)`` (docs/theory.md, "General p": a key outside a matrix), so the row's term has
  conditional variance at most ``Z(q)^2 / beta`` summed over the stream.  The equilibrated norm bound
  ``||D^-1/2 k||^2 / lambda_min(D^-1/2 M D^-1/2)`` (``D = diag M``) decides most rows without a solve
  (rejection sampling: the same distribution).  ``M`` may be stale (computed from an earlier, smaller
  coreset of the same stream): the bound stays valid because ``Z`` only grows.
* **reduce** (merge-and-reduce): when the coreset exceeds ``capacity`` rows it is re-sampled with
  ``b_j = c_p w_j`` (its own Lewis weights), which halves it; a merge of two summaries concatenates the
  coresets (the same tree operation) and reduces when needed.

Guarantee (per query, Freedman's inequality on the martingale of all sampling rounds): for every query ``q``
fixed independently of the sampling, ``|Z~(q) - Z(q)| <= delta Z(q)`` except with probability at most
``failure_bound = 2 exp(-delta^2 beta / (2 (1 + delta)^2 (R + delta / 3)))``, ``R`` the number of rounds (one
online round plus one per reduce on the path of a row, ``rounds``).  Given ``failure_prob`` the summary sets
``beta`` from this formula with ``R = PLANNED_ROUNDS``.  Otherwise ``beta = max(max(DEFAULT_OVERSAMPLING,
MIN_CORESET_ROWS / d) / c_p, MIN_OVERSAMPLING)``, much smaller and chosen empirically (about max(256 d, 4096)
rows after a reduce; recall 1.0 on every test and benchmark), and ``failure_bound`` states what is proven (at the default it is vacuous).
Size: about ``beta c_p d`` rows after a reduce, at most ``capacity = 2 beta c_p d + 4 d`` ever, so memory
does not grow with ``n``; the number of reduces grows like ``log n``.
"""

from __future__ import annotations

import copy as _copy
from typing import Any

import numpy as np

from .._buffers import append_rows
from .._config import LAMBDA_SAFETY
from .._kernels.rows import scaled_sq_norms
from .._linalg import rank_tolerance
from .._threads import lowered_blas
from ..lewis import LewisWeights, lewis_constant, lewis_weights
from .base import NormalizerSummary

#: ``beta * c_p`` used when no ``failure_prob`` is given (practical default; see module docstring).  Measured
#: (d = 32, heavy-tailed keys, 300 random and key-aligned queries): beta c_p = 200 gives a largest relative
#: normaliser error of 0.033 for p = 1 and 0.002 for p = 3, well inside delta = 0.1.
DEFAULT_OVERSAMPLING = 256.0

#: Floor of the default ``beta`` (large p make ``c_p = d^(p/2-1)`` huge; ``beta`` must stay well above 1 so that
#: keys that dominate some query are kept with probability 1).  Measured: p = 6, 10, 20 with beta = 16 gave
#: recall 1.0 and normaliser errors below 1e-3 on key-aligned queries.
MIN_OVERSAMPLING = 16.0

#: Small ``d``: the default aims at no fewer than this many coreset rows (``beta c_p d``).  Measured: d = 5,
#: p = 1, heavy-tailed keys, 600 queries: largest normaliser error 0.077 with 1 800 rows, 0.041 with 4 900.
MIN_CORESET_ROWS = 4096

#: Sampling rounds assumed when ``beta`` is derived from ``failure_prob`` (reduces up to n ~ 2^PLANNED_ROUNDS
#: times the first coreset).
PLANNED_ROUNDS = 12

#: Lewis weights of the coreset are computed to this log-accuracy; the bounds are inflated by the error.
_LEWIS_TOL = 1e-3

#: The Lewis form is factored by eigendecomposition while its eigenvalue ratio exceeds this (small eigenvalues
#: then carry a relative error below 1e-6), otherwise by an SVD of ``W^(1/2-1/p) S``.
_FORM_EIG_RATIO = 1e-10

#: A row whose component outside the form's range exceeds this fraction of its norm is outside the span of
#: the coreset (bound 1); rounding leaves components of about 1e-16.
_OUTSIDE_RTOL = 1e-12

#: The Lewis form is recomputed when the coreset has grown by this factor since the last computation.
_REFRESH_GROWTH = 1.5


def oversampling_for(delta: float, failure_prob: float, rounds: int = PLANNED_ROUNDS) -> float:
    """``beta`` such that ``failure_bound <= failure_prob`` after ``rounds`` sampling rounds."""
    return 2.0 * (1.0 + delta) ** 2 * (rounds + delta / 3.0) * np.log(2.0 / failure_prob) / delta**2


class _LewisForm:
    """Spectral factors of the Lewis form ``M = S^T W^(1-2/p) S`` with pseudo-inverse semantics.

    ``M = V diag(vals) V^T`` on its numerical range; ``null`` spans the rest.  The factors come from the
    eigendecomposition of ``M`` when it is well-conditioned and otherwise from the SVD of ``W^(1/2-1/p) S``
    (so the condition number of the keys is not squared: keys with kappa up to 1e8 keep every direction).
    """

    def __init__(self, S: np.ndarray, p: float, dim: int, info: LewisWeights | None = None) -> None:
        self.n_rows = S.shape[0]
        if S.shape[0] == 0:
            self.vecs, self.vals, self.null, self.inflate = (
                np.zeros((dim, 0)),
                np.zeros(0),
                np.eye(dim),
                1.0,
            )
            self._set_derived()
            return
        if info is None:
            found = lewis_weights(S, p, tol=_LEWIS_TOL, max_iter=100_000, return_info=True)
            assert isinstance(found, LewisWeights)
            info = found
        w = info.weights
        keep = w > 0
        F = S[keep] * (w[keep] ** (0.5 - 1.0 / p))[:, None]
        vals, vecs = np.linalg.eigh(F.T @ F)
        if vals[0] > _FORM_EIG_RATIO * vals[-1]:
            sel = np.ones(dim, dtype=bool)
        else:
            with lowered_blas(1):
                _, sv, vt = np.linalg.svd(F, full_matrices=True)
            vecs = vt[::-1].T  # ascending, like eigh
            sv = np.concatenate([np.zeros(dim - sv.size), sv[::-1]])
            vals = sv * sv
            sel = sv > rank_tolerance(sv[-1], *F.shape)
        self.vecs, self.vals = np.ascontiguousarray(vecs[:, sel]), vals[sel]
        self.null = np.ascontiguousarray(vecs[:, ~sel])
        self._set_derived()
        # weights off by exp(+-e) change k^T M^-1 k by at most exp(|1 - 2/p| e), the bound by its p/2 power
        self.inflate = float(np.exp(abs(p / 2.0 - 1.0) * info.error_bound) * (1.0 + 1e-9))

    def _set_derived(self) -> None:
        """Whitening matrix ``V / sqrt(vals)`` and, for full rank, the equilibrated norm bound
        ``k^T M^-1 k <= ||D^-1/2 k||^2 / lambda_min(D^-1/2 M D^-1/2)`` (``D = diag M``), all from ``(vecs, vals)``
        so that a restored form is bit-identical.  ``lambda_min`` is the squared smallest singular value of
        ``D^-1/2 V vals^1/2`` (accurate even when ``M`` is ill-conditioned)."""
        self.whiten = (
            np.ascontiguousarray(self.vecs / np.sqrt(self.vals)) if self.vals.size else self.vecs
        )
        self.scale, self.lam_eq = np.zeros(self.vecs.shape[0]), 0.0
        if self.vals.size == self.vecs.shape[0] and self.vals.size:
            F = self.vecs * np.sqrt(self.vals)
            diag = np.einsum("ij,ij->i", F, F)
            if (diag > 0).all():
                s = 1.0 / np.sqrt(diag)
                self.scale = s
                self.lam_eq = float(np.linalg.svd(F * s[:, None], compute_uv=False)[-1]) ** 2

    def quad(self, rows: np.ndarray) -> np.ndarray:
        """``k^T M^+ k`` per row, ``inf`` for rows with a component outside the range of ``M``."""
        W = rows @ self.whiten
        quad = np.einsum("ij,ij->i", W, W)
        if self.null.shape[1]:
            N = rows @ self.null
            outside = np.einsum("ij,ij->i", N, N)
            # rows inside the range have components of rounding size (~1e-16 ||k||) along the null space
            quad[outside > _OUTSIDE_RTOL**2 * np.einsum("ij,ij->i", rows, rows)] = np.inf
        return quad


class CoresetSummary(NormalizerSummary):
    """``Z~(q) = ||S q||_p^p`` within ``(1 ± delta)`` of ``sum_l |<q, k_l>|^p`` w.h.p., and sensitivity bounds.

    Parameters
    ----------
    dim : int
    p : float
        Exponent ``p > 0``.
    delta : float, default 0.1
        Relative accuracy of the normaliser the guarantee is stated for.
    failure_prob : float, optional
        Per-query failure probability; sets ``beta = oversampling_for(delta, failure_prob)``.
    oversampling : float, optional
        ``beta >= 1`` directly (exclusive with ``failure_prob``); default
        ``max(max(DEFAULT_OVERSAMPLING, MIN_CORESET_ROWS / d) / c_p, MIN_OVERSAMPLING)``.
    rng : None, int, SeedSequence or Generator
        Source of the sampling randomness (a PCG64 stream; its state is part of the serialized summary).

    Examples
    --------
    >>> import numpy as np
    >>> from levstream.summaries import CoresetSummary
    >>> K = np.random.default_rng(0).standard_normal((20_000, 4))
    >>> s = CoresetSummary(4, p=1.0, rng=1)
    >>> for X in np.array_split(K, 10):
    ...     s.add(X)
    >>> q = np.ones((1, 4))
    >>> bool(abs(s.normalizer(q)[0] / np.abs(K @ q[0]).sum() - 1) < s.delta)
    True
    >>> s.num_rows < 20_000
    True
    """

    kind = "coreset"
    rescales_queries = True

    def __init__(
        self,
        dim: int,
        p: float,
        *,
        delta: float = 0.1,
        failure_prob: float | None = None,
        oversampling: float | None = None,
        rng: Any = None,
    ) -> None:
        if not 0.0 < delta < 1.0:
            raise ValueError(f"delta must satisfy 0 < delta < 1; got {delta} instead.")
        if failure_prob is not None and oversampling is not None:
            raise ValueError("pass failure_prob= or oversampling=, not both.")
        if failure_prob is not None:
            if not 0.0 < failure_prob < 1.0:
                raise ValueError(
                    f"failure_prob must satisfy 0 < failure_prob < 1; got {failure_prob} instead."
                )
            oversampling = oversampling_for(delta, failure_prob)
        elif oversampling is None:
            target = max(DEFAULT_OVERSAMPLING, MIN_CORESET_ROWS / dim)
            oversampling = max(target / lewis_constant(float(p), int(dim)), MIN_OVERSAMPLING)
        if not oversampling >= 1:
            raise ValueError(
                f"oversampling must be >= 1; got {oversampling} instead. With beta < 1 even a key "
                "of sensitivity 1 would be sampled with probability beta (an unbounded error)."
            )
        self.dim, self.p, self.delta, self.beta = (
            int(dim),
            float(p),
            float(delta),
            float(oversampling),
        )
        self.failure_prob = failure_prob
        self.c_p = lewis_constant(self.p, self.dim)
        self.capacity = int(np.ceil(2.0 * self.beta * self.c_p * self.dim)) + 4 * self.dim
        self.n_rows = 0
        self.rounds = 1
        self._rows = np.empty((0, self.dim))
        self._m = 0
        self._form = _LewisForm(self._rows, self.p, self.dim)
        gen = np.random.default_rng(rng)
        if not isinstance(gen.bit_generator, np.random.PCG64):
            gen = np.random.Generator(np.random.PCG64(gen.integers(0, 2**63, size=4)))
        self._rng = gen

    # ------------------------------------------------------------------ properties
    @property
    def mode(self) -> str:
        return "coreset"

    @property
    def config(self) -> tuple:
        return (self.kind, self.dim, self.p, self.delta, self.beta)

    @property
    def rows(self) -> np.ndarray:
        """The coreset rows ``S`` (rescaled; read-only view)."""
        v = self._rows[: self._m]
        v.flags.writeable = False
        return v

    @property
    def num_rows(self) -> int:
        """Rows in the coreset now (sampled, rescaled keys)."""
        return self._m

    @property
    def distortion(self) -> float:
        """``delta``: the normaliser is within ``(1 ± delta)`` except with probability ``failure_bound``."""
        return self.delta

    @property
    def failure_bound(self) -> float:
        """Proven per-query probability that ``|Z~ - Z| > delta Z`` after ``rounds`` sampling rounds."""
        d, R = self.delta, self.rounds
        return float(
            min(1.0, 2.0 * np.exp(-d * d * self.beta / (2.0 * (1.0 + d) ** 2 * (R + d / 3.0))))
        )

    @property
    def size_bound(self) -> float:
        """Bound on the sum of the sensitivity bounds returned by :meth:`scores`: ``(1 + delta) c_p d``."""
        return (1.0 + self.delta) * self.c_p * self.dim * self._form.inflate

    @property
    def rel_error(self) -> float:
        return 0.0  # scores are upper bounds with their numerical slack already included

    @property
    def form_rank(self) -> int:
        """Numerical rank of the coreset's Lewis form (directions outside it get sensitivity bound 1)."""
        return int(self._form.vals.size)

    @property
    def nbytes(self) -> int:
        return int(self._rows.nbytes + self._form.vecs.nbytes + self._form.vals.nbytes)

    # ------------------------------------------------------------------ bounds
    def _factor(self) -> float:
        # x / Z_true <= (1 + delta) x / Z~ on the good event; Lewis-weight error inflation; the constant c_p
        return (1.0 + self.delta) * self._form.inflate * self.c_p

    def scores(self, rows: np.ndarray) -> np.ndarray:
        """Upper bounds ``min(1, (1 + delta) c_p (k^T M^+ k)^(p/2))`` on each row's sensitivity over all keys."""
        if rows.shape[0] == 0:
            return np.zeros(0)
        if (
            self._form.vals.size == 0
        ):  # no keys yet (or only zero keys): every nonzero key may be heavy
            return (np.einsum("ij,ij->i", rows, rows) > 0).astype(np.float64)
        with np.errstate(over="ignore"):
            b = self._factor() * self._form.quad(rows) ** (0.5 * self.p)
        return np.minimum(1.0, b)

    def _norm_bounds(self, X: np.ndarray) -> np.ndarray:
        """``(1 + delta) c_p (||D^-1/2 k||^2 / lambda_eq)^(p/2) >= scores`` (the equilibrated norm bound of
        of docs/theory.md, "The norm pre-filter", for the Lewis form; the exact scores when ``M`` is singular)."""
        if self._form.vals.size < self.dim:
            return self.scores(X)
        if not self._form.lam_eq > 0:
            return np.ones(X.shape[0])
        sq = scaled_sq_norms(X, self._form.scale)
        with np.errstate(over="ignore"):
            b = self._factor() * (sq / (self._form.lam_eq * LAMBDA_SAFETY)) ** (0.5 * self.p)
        return np.minimum(1.0, b)

    def prefilter(self, X: np.ndarray, threshold: float) -> np.ndarray:
        """Indices of rows whose sensitivity bound may be ``>= threshold`` (norm bound, no solve)."""
        return np.flatnonzero(self._norm_bounds(X) >= threshold)

    # ------------------------------------------------------------------ sampling
    def _append(self, rows: np.ndarray) -> None:
        self._rows, self._m = append_rows(self._rows, self._m, rows)

    def _lewis(self, S: np.ndarray) -> LewisWeights:
        """Lewis weights of ``S`` warm-started from the current form: ``(s^T M^+ s)^(p/2)`` is the Lewis
        weight of ``s`` at the form's fixed point, a close guess for any coreset of the same stream."""
        init = self._form.quad(S) ** (0.5 * self.p) if self._form.vals.size else None
        info = lewis_weights(
            S, self.p, tol=_LEWIS_TOL, max_iter=100_000, return_info=True, init=init
        )
        assert isinstance(info, LewisWeights)
        return info

    def _refresh(self) -> None:
        S = self._rows[: self._m]
        self._form = _LewisForm(S, self.p, self.dim, self._lewis(S))

    @staticmethod
    def block_gram(X: np.ndarray) -> np.ndarray:
        """``diag(X^T X)`` as a diagonal matrix: the sketch validates chunks by the diagonal's finiteness;
        :meth:`add` needs no Gram matrix, so the ``d^2`` product is skipped (cost ``n d``)."""
        return np.diag(np.einsum("ij,ij->j", X, X))

    def add(self, X: np.ndarray, block: np.ndarray | None = None) -> None:
        """Sample the rows of ``X`` (C-contiguous float64) into the coreset against the prefix's Lewis form.

        While there is no form yet, the first ``capacity // 4`` rows are kept as they are and give the first
        form; the rest of the block is sampled against it (cheaper than keeping a whole large block).
        """
        head = max(8 * self.dim, self.capacity // 4)
        if self._form.vals.size == 0 and X.shape[0] > head:
            self._add_block(X[:head])
            self._add_block(X[head:])
        else:
            self._add_block(X)

    def _add_block(self, X: np.ndarray) -> None:
        self.n_rows += X.shape[0]
        u = np.asarray(self._rng.random(X.shape[0]))
        idx = np.flatnonzero(u < self.beta * self._norm_bounds(X))
        if idx.size:
            rows = X[idx]
            pi = np.asarray(np.minimum(1.0, self.beta * self.scores(rows)))
            keep = (u[idx] < pi) & (np.einsum("ij,ij->i", rows, rows) > 0)
            if keep.any():
                self._append(rows[keep] * (pi[keep] ** (-1.0 / self.p))[:, None])
        self._settle()

    def _settle(self) -> None:
        if self._m > self.capacity:
            self._reduce()
        elif self._m > _REFRESH_GROWTH * self._form.n_rows or (
            self._form.vals.size == 0 and self._m
        ):
            self._refresh()

    def _reduce(self) -> None:
        """Re-sample the coreset by its own Lewis weights: one merge-and-reduce level."""
        S = self._rows[: self._m]
        info = self._lewis(S)
        # The form of S (an embedding of the same stream) stays a valid pruning/sampling form after the
        # reduce; new rows only increase Z.  Reusing it saves one Lewis computation per level.
        form = _LewisForm(S, self.p, self.dim, info)
        inflate = np.exp(info.error_bound) * (1.0 + 1e-9)
        pi = np.minimum(1.0, self.beta * np.minimum(1.0, self.c_p * info.weights * inflate))
        keep = (self._rng.random(self._m) < pi) & (info.weights > 0)
        kept = S[keep] * (pi[keep] ** (-1.0 / self.p))[:, None]
        self._rows = np.ascontiguousarray(kept)
        self._m = kept.shape[0]
        self.rounds += 1
        if (
            self._m > self.capacity // 2
        ):  # nothing left to gain at this size: allow growth before retrying
            self.capacity = 2 * self._m
        form.n_rows = self._m  # next refresh after the reduced coreset has grown by _REFRESH_GROWTH
        self._form = form

    def merge(self, other: CoresetSummary) -> None:
        """Fold ``other`` in: concatenate the coresets (each embeds its own keys), reduce if over capacity."""
        if other.config != self.config:
            raise ValueError(
                f"cannot merge coreset summaries with different settings: {self.config} vs {other.config}."
            )
        self.n_rows += other.n_rows
        self.rounds = max(self.rounds, other.rounds)
        self.capacity = max(self.capacity, other.capacity)
        if other._m:
            self._append(other._rows[: other._m])
            if self._m > self.capacity:
                self._reduce()
            else:
                self._refresh()

    def copy(self) -> CoresetSummary:
        out = CoresetSummary.__new__(CoresetSummary)
        out.__dict__.update(self.__dict__)
        out._rows = self._rows[: self._m].copy()
        out._rng = _copy.deepcopy(self._rng)
        return out

    # ------------------------------------------------------------------ normaliser
    def normalizer(self, Q: np.ndarray) -> np.ndarray:
        """``Z~(q) = sum_i |<q, s_i>|^p`` over the coreset rows (the estimate of ``Z(q)``)."""
        if self._m == 0:
            return np.zeros(Q.shape[0])
        P = np.abs(Q @ self._rows[: self._m].T)
        return (P * P if self.p == 2.0 else P**self.p).sum(axis=1)

    def query_scale(self, Q: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Per-query factors ``1 / (||q|| R)``, ``R`` the largest norm among the coreset and ``rows``.

        Attention values are invariant under scaling a query, and after this scaling every ``|<q, k>|`` is at
        most 1, so ``|<q, k>|^p`` cannot overflow for any ``p`` (docs/theory.md, "General p"); zero queries keep
        factor 1.
        """
        norms = [
            np.sqrt(np.einsum("ij,ij->i", R, R).max())
            for R in (self._rows[: self._m], rows)
            if R.shape[0]
        ]
        big = max(norms) if norms else 0.0
        qn = np.sqrt(np.einsum("ij,ij->i", Q, Q)) * big
        return np.divide(1.0, qn, out=np.ones_like(qn), where=qn > 0)

    # ------------------------------------------------------------------ persistence
    def to_state(self) -> tuple[dict, dict]:
        meta = {
            "kind": self.kind,
            "dim": self.dim,
            "p": self.p,
            "delta": self.delta,
            "beta": self.beta,
            "failure_prob": self.failure_prob,
            "capacity": self.capacity,
            "n_rows": self.n_rows,
            "rounds": self.rounds,
            "rng": self._rng.bit_generator.state,
            "form_rows": self._form.n_rows,
            "form_inflate": self._form.inflate,
        }
        arrays = {
            "rows": self._rows[: self._m],
            "form_vecs": self._form.vecs,
            "form_vals": self._form.vals,
            "form_null": self._form.null,
        }
        return meta, arrays

    @classmethod
    def from_state(cls, meta: dict, arrays: dict) -> CoresetSummary:
        out = cls(
            int(meta["dim"]),
            float(meta["p"]),
            delta=float(meta["delta"]),
            oversampling=float(meta["beta"]),
        )
        out.failure_prob = None if meta["failure_prob"] is None else float(meta["failure_prob"])
        out.capacity, out.n_rows, out.rounds = (
            int(meta["capacity"]),
            int(meta["n_rows"]),
            int(meta["rounds"]),
        )
        rows = arrays["rows"]
        if rows.ndim != 2 or rows.shape[1] != out.dim or not np.isfinite(rows).all():
            raise ValueError(
                f"coreset rows must be finite with shape (m, {out.dim}); got {rows.shape}."
            )
        out._rows, out._m = rows.copy(), rows.shape[0]
        vecs, vals, null = arrays["form_vecs"], arrays["form_vals"], arrays["form_null"]
        if vecs.shape != (out.dim, vals.shape[0]) or null.shape != (
            out.dim,
            out.dim - vals.shape[0],
        ):
            raise ValueError("coreset Lewis form has inconsistent shapes.")
        form = _LewisForm.__new__(_LewisForm)
        form.n_rows, form.inflate = int(meta["form_rows"]), float(meta["form_inflate"])
        form.vecs, form.vals, form.null = vecs.copy(), vals.copy(), null.copy()
        form._set_derived()
        out._form = form
        bitgen = np.random.PCG64()
        bitgen.state = meta["rng"]
        out._rng = np.random.Generator(bitgen)
        return out
