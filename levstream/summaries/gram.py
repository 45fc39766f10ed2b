"""Exact normaliser summary for ``f(x) = x^2``: the Gram matrix ``G = K^T K``, or its R factor when ill-conditioned.

Two representations, chosen automatically (docs/theory.md, "Numerics"):

* **Gram** (fast path): ``G`` accumulated in float64 with a compensated (two-sum) running total, one
  BLAS-3 rank-``b`` update per block.  Scores by Cholesky.  Used while the equilibrated ``G`` has condition
  number at most ``GRAM_KAPPA_MAX`` so that scores stay accurate to ``rel_error``.
* **R factor** (robust path): ``R`` with ``R^T R = G`` updated by TSQR, ``R <- qr([R; X]).R``.  Scores by the
  SVD of the column-equilibrated ``R`` with pseudo-inverse semantics (relative rank tolerance
  ``min(m, sqrt(m) + qr_steps / 4) * eps_machine``, ``m = max(n, d)``:
  :func:`~levstream._linalg.factor_rank_tolerance`; a row along a direction it cuts is scored 1), accurate
  up to ``kappa(K)`` rather than ``kappa(K)^2``.  Used for rank-deficient or ill-conditioned keys; the
  summary returns to the Gram path when the conditioning allows.

The ingest path calls SciPy's BLAS, without the GIL, for the Gram update of each slab (``syrk``) and for products
with triangular factors (``trmm``), from one compiled call per run of slabs (:mod:`levstream._kernels.ingest`);
this summary's own products (``block_gram``, conditioning checks) use NumPy's.  SciPy ships its own OpenBLAS with
its own thread pool; interleaving small SciPy calls with NumPy's multithreaded products made the two pools spin
against each other (measured: the Gram loop 8x slower with default threads).  So both run inside the sketch's
ingest section, where every BLAS is held to one thread and the slabs of a block are shared among the library's
own threads (:mod:`levstream._threads`).

The switch from Gram to R happens *before* an ill-conditioned block is folded into ``G``: the previous ``G``
was well-conditioned, so its Cholesky factor is accurate, and the block is then added by QR.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .._config import GRAM_KAPPA_MAX, GRAM_KAPPA_RETURN, LAMBDA_SAFETY, UNIT_ROUNDOFF
from .._kernels.blas import dtrmm_function, strmm_function
from .._kernels.ingest import slab_pass, two_sum_add, upper_scores
from .._kernels.live import gram_quadratic
from .._kernels.rows import scaled_sq_norms
from .._linalg import CutDirections, pseudo_inverse_factor, score_outside_as_one
from .._threads import in_ingest_section, run_items
from .base import NormalizerSummary

#: A new candidate-test plan is made once the row count has grown by this factor since the last one (1.25
#: and 1.5 were measured too: the tighter bounds save no more than the extra factorisations cost).
_PLAN_GROWTH = 2.0

#: ... or once the largest diagonal entry of ``G`` has doubled, or grown by this factor more than the row count
#: (a decaying stream's ``G`` grows in its frame by the weights of its rows, not by their number).
_PLAN_WEIGHT_GROWTH = 1.25

#: Rows per work item when candidates are rescored on several threads.
_SCORE_ITEM_ROWS = 2048

_NO_FACTOR32 = np.zeros((0, 0), dtype=np.float32)

#: Smallest head size for the float32 screen (docs/theory.md, "The float32 screen").  Measured (one thread,
#: 8192-row chunks of attention-like keys, eps = 0.01): at d = 384 the build takes 15% less time, at d = 256 the
#: candidate test alone was no faster, and at d = 128 it was 3-10% slower: the rows that pass the norm
#: pre-filter are few and the float64 product of each is cheap.
_SCREEN_MIN_DIM = 256


def float32_factor(W: np.ndarray) -> tuple[np.ndarray, float]:
    """``(W / ||W||_F in float32, 1 / ||W||_F)`` for the float32 screen of the candidate test and of prunes
    (``slab_pass``), or an empty array when ``W`` is empty or smaller than ``_SCREEN_MIN_DIM``, or its norm is
    not finite or outside ``2^+-400``."""
    if W.shape[0] < _SCREEN_MIN_DIM:
        return _NO_FACTOR32, 0.0
    with np.errstate(over="ignore", invalid="ignore"):
        norm = float(np.sqrt(np.einsum("ij,ij->", W, W)))
    if not 2.0**-400 <= norm <= 2.0**400:
        return _NO_FACTOR32, 0.0
    w_inv = 1.0 / norm
    return (W * w_inv).astype(np.float32), w_inv


def _in_pieces(m: int, n_threads: int, work: Callable[[int, int], None]) -> None:
    """``work(a, b)`` for the rows ``a..b-1`` of ``m``, in fixed pieces of ``_SCORE_ITEM_ROWS`` on up to
    ``n_threads`` threads (so that no result depends on ``n_threads``)."""
    step = _SCORE_ITEM_ROWS
    run_items(lambda i: work(i * step, min(m, (i + 1) * step)), -(-m // step), n_threads)


def _upper_scores_in_pieces(rows: np.ndarray, W: np.ndarray, n_threads: int) -> np.ndarray:
    """``||k W||^2`` of every row (float32 or float64) for an upper-triangular ``W`` (:func:`_in_pieces`)."""
    out = np.empty(rows.shape[0])
    fn = dtrmm_function()
    _in_pieces(rows.shape[0], n_threads, lambda a, b: upper_scores(rows[a:b], W, fn, out[a:b]))
    return out


def _two_sum_add(hi: np.ndarray, lo: np.ndarray, add: np.ndarray) -> None:
    """In place: ``hi + lo += add`` with the rounding error of the addition carried in ``lo`` (Knuth two-sum,
    one compiled pass)."""
    two_sum_add(hi, lo, np.ascontiguousarray(add))


def _on_columns(F: np.ndarray, live: np.ndarray) -> np.ndarray:
    """A factor of the live columns' rows (``F`` of shape (live.sum(), k)) as one of all ``d`` (zero rows
    for the dead columns)."""
    out = np.zeros((live.shape[0], F.shape[1]))
    out[live] = F
    return out


def _inverse_transpose(L: np.ndarray) -> np.ndarray:
    """``L^-T`` (upper triangular, C-contiguous) of a lower-triangular Cholesky factor.

    In the ingest section, where every BLAS is held to one thread, LAPACK's triangular inverse ``trtri``
    (``d^3 / 3`` flops); elsewhere NumPy's general inverse (a SciPy call there could wake SciPy's own
    OpenBLAS thread pool next to NumPy's), its rounding noise below the diagonal zeroed so that triangular
    and general products with the factor agree."""
    if in_ingest_section():
        from scipy.linalg.lapack import dtrtri

        inverse, info = dtrtri(L, lower=1)
        if info == 0:
            return np.ascontiguousarray(np.triu(inverse.T))
    return np.ascontiguousarray(np.triu(np.linalg.inv(L).T))


#: Columns of the R factor whose largest entry is below this are set to zero (a rebase of a decaying stream:
#: the direction's keys weigh below ``2^-1800`` of the frame; above it the factor of _get_factor, ``1 / (column
#: maximum x singular value)``, stays finite).
_R_COLUMN_FLOOR = 2.0**-900


def _without_tiny_columns(R: np.ndarray) -> np.ndarray:
    """``R`` with the columns whose largest entry is below ``_R_COLUMN_FLOOR`` set to 0."""
    out = R.copy()
    out[:, np.abs(R).max(axis=0) < _R_COLUMN_FLOOR] = 0.0
    return out


def gram_rel_error_max(dim: int) -> float:
    """The largest :attr:`GramSummary.rel_error` of the Gram path (its condition number is kept at most
    ``GRAM_KAPPA_MAX``): thresholds lowered by this margin stay valid whatever the next conditioning check
    finds."""
    return 4.0 * dim * UNIT_ROUNDOFF * GRAM_KAPPA_MAX


def _diag_floor(n_rows: int) -> float:
    """Smallest Gram diagonal entry trusted on the Gram path: below ``n_rows`` times the smallest normal
    float64, subnormal rounding of the products (absolute error ``tiny * u`` each) is no longer negligible."""
    return max(n_rows, 1) * float(np.finfo(np.float64).tiny)


def _equilibrated_min_eig(G: np.ndarray, n_rows: int) -> tuple[float, np.ndarray]:
    """Smallest eigenvalue of ``D^-1/2 G D^-1/2`` (D = diag G) and the diagonal; 0 when a diagonal entry is 0
    or below :func:`_diag_floor` (such keys take the R-factor path, whose QR handles tiny values exactly)."""
    diag = np.diag(G).copy()
    if not (
        np.isfinite(diag).all() and (diag >= _diag_floor(n_rows)).all()
    ):  # overflowed: R-factor path
        return 0.0, diag
    s = 1.0 / np.sqrt(diag)
    C = G * s[:, None] * s[None, :]
    lam = float(np.linalg.eigvalsh(C)[0])
    return lam, diag


def _normalizer_floor(Q: np.ndarray, diag: np.ndarray) -> np.ndarray:
    """Rounding level of ``q^T G q``, scale-aware per column (a query along a direction carried only by tiny
    keys keeps its ``Z``): values at or below it are 0 (the query is orthogonal to every key)."""
    # d u applied before squaring: q_a^2 G_aa may overflow where the floor does not
    Qs = Q * (Q.shape[1] * UNIT_ROUNDOFF)
    with np.errstate(over="ignore"):
        return (Qs * Qs) @ diag


#: Up to this many queries the normaliser is one compiled loop (no temporaries); more go through BLAS.
_SMALL_QUERY_ROWS = 8


def gram_normalizer(Q: np.ndarray, G: np.ndarray) -> np.ndarray:
    """``q^T G q`` for every row of ``Q``, with values at rounding level set to 0."""
    if Q.shape[0] <= _SMALL_QUERY_ROWS and Q.flags.c_contiguous:
        return gram_quadratic(Q, G)
    z = np.einsum("ij,ij->i", Q @ G, Q)
    z[z <= _normalizer_floor(Q, np.diag(G))] = 0.0
    return z


class GramSummary(NormalizerSummary):
    """``Z(q) = q^T G q`` and leverage scores ``k^T G^+ k`` for all keys added so far, exactly.

    Examples
    --------
    >>> import numpy as np
    >>> from levstream.summaries import GramSummary
    >>> K = np.random.default_rng(0).standard_normal((500, 4))
    >>> s = GramSummary(4)
    >>> s.add(K[:200]); s.add(K[200:])
    >>> tau = s.scores(K)
    >>> bool(np.isclose(tau.sum(), 4.0))
    True
    """

    kind = "gram"

    def __init__(self, dim: int) -> None:
        self.dim = int(dim)
        self.n_rows = 0
        self._mode = "gram"
        d = self.dim
        self._hi = np.zeros((d, d))
        self._lo = np.zeros((d, d))
        self._r: np.ndarray | None = None
        #: QR factorisations the R factor went through since it was entered (its rounding grows with them)
        self._qr_steps = 0
        # last full conditioning check (Gram mode): diagonal of G then and lambda_min of the equilibrated G.
        self._chk_diag = np.zeros(d)
        self._chk_lam = 0.0
        self._factor: Any = None
        #: L^-T of an earlier Gram matrix of this stream (Gram path only): G only grows, so it gives upper
        #: bounds on current scores without refactoring (see score_upper_bounds)
        self._past_factor: np.ndarray | None = None
        self._past_diag_max = 0.0
        #: the norm pre-filter bound taken before the last add() (valid after it: G only grows)
        self._bound: tuple[np.ndarray | None, float] = (None, 0.0)
        #: ``G`` itself while in Gram mode (``hi + lo``), formed once per update for the normaliser
        self._gram_sum: np.ndarray | None = None
        #: the ingest path's candidate test ``(scale, lam, W)`` (see ingest_plan), made when ``n_rows`` was
        #: ``_plan_rows``; None until the first block and after a merge or a change of representation
        self._plan: tuple[np.ndarray | None, float, np.ndarray | None] | None = None
        #: the plan's factor in float32 (derived, never serialized): ``(W, W32, w_inv)``
        self._plan_factor32: tuple[np.ndarray, np.ndarray, float] | None = None
        self._plan_rows = 0
        #: the largest diagonal entry of ``G`` when the plan was made (a new plan is made once it has doubled)
        self._plan_diag = 0.0

    @property
    def mode(self) -> str:
        """``"gram"`` (Gram matrix, Cholesky scores) or ``"qr"`` (R factor, SVD scores)."""
        return self._mode

    # ------------------------------------------------------------------ helpers
    @property
    def gram(self) -> np.ndarray:
        """The Gram matrix ``K^T K`` of everything added (a new array)."""
        if self.mode == "gram":
            return self._hi + self._lo
        assert self._r is not None
        return self._r.T @ self._r

    def _gram_is_safe(self, lam_eq: float) -> bool:
        # Between full checks the diagonal may grow by 2x, which can halve lambda_min of the equilibrated
        # matrix; lambda_max <= d always.  Require the bound to hold with that slack.
        return lam_eq > 0 and 2.0 * self.dim / lam_eq <= GRAM_KAPPA_MAX

    def _r_factor(self) -> np.ndarray:
        """An upper-triangular ``R`` (d x d) with ``R^T R = G``."""
        if self.mode == "qr":
            assert self._r is not None
            return self._r
        if self.n_rows == 0:
            return np.zeros((self.dim, self.dim))
        # Gram mode is only kept while G is well-conditioned, so this Cholesky succeeds and is accurate.
        return np.linalg.cholesky(self._hi + self._lo).T

    def _enter_qr(self, R: np.ndarray, blocks: list[np.ndarray]) -> None:
        stacked = np.vstack([R, *blocks]) if blocks else R
        r = np.asarray(np.linalg.qr(stacked, mode="r"))
        self._qr_steps += 1  # the rounding of R grows with its QR steps (factor_rank_tolerance)
        d = self.dim
        out = np.zeros((d, d))
        k = min(r.shape[0], d)
        out[:k] = r[:k]
        self._mode = "qr"
        self._past_factor = None
        self._past_diag_max = 0.0
        self._plan = None
        self._r = out
        self._hi = np.zeros((d, d))
        self._lo = np.zeros((d, d))
        self._chk_lam = 0.0
        self._chk_diag = np.zeros(d)
        self._maybe_return_to_gram()

    def _maybe_return_to_gram(self) -> None:
        assert self._r is not None
        with np.errstate(over="ignore"):  # keys whose Gram matrix overflows stay on the R factor
            colsq = (self._r * self._r).sum(axis=0)
        if not (np.isfinite(colsq).all() and (colsq >= _diag_floor(self.n_rows)).all()):
            return
        sv = np.linalg.svd(self._r / np.sqrt(colsq)[None, :], compute_uv=False)
        lam = float(sv[-1]) ** 2
        if lam > 0 and 2.0 * self.dim / lam <= GRAM_KAPPA_RETURN:
            self._mode = "gram"
            self._qr_steps = 0
            self._plan = None
            self._hi = self._r.T @ self._r
            self._lo = np.zeros_like(self._hi)
            self._r = None
            self._chk_lam, self._chk_diag = _equilibrated_min_eig(self._hi, self.n_rows)

    # ------------------------------------------------------------------ updates
    @staticmethod
    def block_gram(X: np.ndarray) -> np.ndarray:
        """``X^T X`` of one block (BLAS syrk); callers may compute it ahead to validate a chunk cheaply:
        a nan/inf anywhere in ``X`` makes the diagonal non-finite."""
        with np.errstate(over="ignore", invalid="ignore"):
            return X.T @ X

    def add(self, X: np.ndarray, block: np.ndarray | None = None) -> None:
        """Fold the rows of ``X`` (C-contiguous float64 or float32, shape (b, dim)) into the summary.

        ``block`` is ``block_gram(X)`` if the caller already has it.  When the Gram matrix would overflow
        float64 the summary moves to its R factor (entries up to ``sqrt`` of the Gram's), so it never fails.
        """
        self._bound = (
            self.bound_weights()
        )  # taken before the block: valid after it, as G only grows
        self._gram_sum = None
        if self.mode == "qr":
            assert self._r is not None
            self._factor = None
            self.n_rows += X.shape[0]
            self._enter_qr(self._r, [X])
            return
        if block is None:
            X64 = X.astype(
                np.float64, copy=False
            )  # float32 rows: the products are float64 all the same
            # rows whose sum of squares overflows: the R factor takes them
            with np.errstate(over="ignore"):
                block = X64.T @ X64
        with np.errstate(
            over="ignore"
        ):  # an overflow (inf on the diagonal) sends the block to the R factor
            diag_new = np.diag(self._hi) + np.diag(self._lo) + np.diag(block)
            unchecked_ok = (
                self._chk_lam > 0
                and np.isfinite(diag_new).all()
                and (diag_new <= 2.0 * self._chk_diag).all()
            )
        self._factor = None
        if unchecked_ok:
            _two_sum_add(self._hi, self._lo, block)
            self.n_rows += X.shape[0]
            return
        # Full check on the would-be Gram matrix before committing the block.
        with np.errstate(over="ignore"):
            candidate = self._hi + self._lo + block
        lam, diag = _equilibrated_min_eig(candidate, self.n_rows + X.shape[0])
        if self._gram_is_safe(lam):
            _two_sum_add(self._hi, self._lo, block)
            self._chk_lam, self._chk_diag = lam, diag
            self.n_rows += X.shape[0]
            return
        R_prev = self._r_factor()
        self.n_rows += X.shape[0]
        self._enter_qr(R_prev, [X])

    def prefilter(self, X: np.ndarray, threshold: float) -> np.ndarray:
        """Rows of the block just added whose score may reach ``threshold``: the norm pre-filter
        ``tau(k) <= ||D^-1/2 k||^2 / lambda_min`` of the last conditioning check (docs/theory.md, "The norm
        pre-filter"); every row when no bound is at hand (empty, or R-factor mode)."""
        scale, lam = self._bound
        if scale is None:
            return np.arange(X.shape[0])
        return np.flatnonzero(scaled_sq_norms(X, scale) >= threshold * lam)

    def merge(self, other: GramSummary) -> None:
        """Fold ``other`` (same dim) into this summary: ``G = G1 + G2``."""
        self._factor = None
        self._gram_sum = None
        self._bound = (None, 0.0)
        self._plan = None
        if other.n_rows == 0:
            return
        if self.mode == "gram" and other.mode == "gram":
            with np.errstate(
                over="ignore"
            ):  # an overflow sends the merge down the R-factor path below
                candidate = self._hi + self._lo + other._hi + other._lo
            lam, diag = _equilibrated_min_eig(candidate, self.n_rows + other.n_rows)
            if self._gram_is_safe(lam):
                _two_sum_add(self._hi, self._lo, other._hi)
                self._lo += other._lo
                self._chk_lam, self._chk_diag = lam, diag
                self.n_rows += other.n_rows
                return
        R_self, R_other = self._r_factor(), other._r_factor()
        self.n_rows += other.n_rows
        self._qr_steps += other._qr_steps
        self._enter_qr(R_self, [R_other])

    def scale(self, factor: float) -> None:
        """``G <- factor G`` for every row weighted by ``sqrt(factor)`` (``factor > 0``): a decaying stream's change
        of reference frame (docs/theory.md, "Decay and gates").  Scores, the equilibrated eigenvalue bounds and
        the mode are unchanged; ``G``, its factors and the pre-filter scales are rescaled with it, so every
        bound held stays valid.  Exact (no rounding) for ``factor`` a power of 4 in the normal range."""
        if factor == 0.0:  # every weight flushed to zero: G = 0 (rank 0), held as a zero R factor
            self.release_factors()
            self._bound = (None, 0.0)
            self._enter_qr(np.zeros((self.dim, self.dim)), [])
            return
        root = float(np.sqrt(factor))
        floor = _diag_floor(self.n_rows)
        if self.mode == "gram" and self.n_rows and (np.diag(self._hi) * factor < floor).any():
            # a direction whose weight leaves the range of G's entries: keep G as its R factor (entries of the
            # order of the square roots of G's, so directions carried only by old keys stay exact)
            R = self._r_factor() * root
            self.release_factors()
            self._bound = (None, 0.0)
            self._enter_qr(_without_tiny_columns(R), [])
            return
        self._hi *= factor
        self._lo *= factor
        if self._r is not None:
            self._r *= root
            tiny = np.abs(self._r).max(axis=0) < _R_COLUMN_FLOOR
            if tiny.any():
                self._r[:, tiny & (np.abs(self._r).max(axis=0) > 0)] = 0.0
                self._factor = None
        if (
            self._chk_diag * factor < floor
        ).any():  # the last check's bounds would leave the range too
            self._chk_lam = 0.0
        self._chk_diag = self._chk_diag * factor
        self._past_diag_max *= factor
        self._plan_diag *= factor
        scaled: dict[int, np.ndarray] = {}

        def inv(
            W: np.ndarray | None,
        ) -> np.ndarray | None:  # a factor of G^-1 scales by 1/sqrt(factor)
            if W is None:
                return None
            if id(W) not in scaled:  # the plan's factor is often the stale factor itself
                with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
                    scaled[id(W)] = W / root
            return scaled[id(W)]

        def usable(W: np.ndarray | None) -> bool:
            # a factor that left float64's range (a rebase by a tiny factor) is dropped, never used: its bounds
            # would be inf or nan, and a nan bound fails every test (a false negative)
            return W is None or bool(np.isfinite(W).all())

        past = inv(self._past_factor)
        self._past_factor = past if usable(past) else None
        if self._factor is not None:
            kind, W, err, cols, outside = self._factor
            if cols is None:
                W = inv(W)
                self._factor = (kind, W, err, None, None) if usable(W) else None
            else:  # the R path's factor: the columns scale, the equilibrated factor does not
                self._factor = (kind, W, err, cols * root, outside) if usable(cols * root) else None
        if self._plan is not None:
            scale, lam, W = self._plan
            scale, W = inv(scale), inv(W)
            self._plan = (scale, lam, W) if usable(scale) and usable(W) else None
        bscale, blam = self._bound
        bscale = inv(bscale)
        self._bound = (bscale, blam) if usable(bscale) else (None, 0.0)
        self._gram_sum = None

    def copy(self) -> GramSummary:
        out = GramSummary.__new__(GramSummary)
        out.__dict__.update(self.__dict__)
        out._hi, out._lo = self._hi.copy(), self._lo.copy()
        out._r = None if self._r is None else self._r.copy()
        out._chk_diag = self._chk_diag.copy()
        out._factor = None
        out._gram_sum = None
        return out

    # ------------------------------------------------------------------ scores
    def _get_factor(
        self, remember: bool = True, cache: bool = True
    ) -> tuple[str, np.ndarray, float, np.ndarray | None, CutDirections | None]:
        """``(kind, W, rel_error, cols, outside)``: the factor of the current ``G`` (computed once per update),
        with ``k^T G^+ k = ||(k / cols) W||^2`` (``cols`` None on the Cholesky path; ``outside`` the directions
        the R path's rank tolerance cut, :func:`~levstream._linalg.pseudo_inverse_factor`, else None);
        ``remember``: also keep a new Cholesky factor as the stale factor of later bounds; ``cache=False``: compute it without keeping it (a prune's
        factor: pruning then changes neither the bounds of the ingest path nor the memory held)."""
        if self._factor is None and not cache:
            held = self._past_factor, self._past_diag_max
            factor = self._get_factor(remember=False)
            self._factor = None
            self._past_factor, self._past_diag_max = held
            return factor
        if self._factor is None:
            d = self.dim
            if self.n_rows == 0:
                self._factor = ("pinv", np.zeros((d, 0)), 0.0, None, None)
            elif self.mode == "gram":
                # LAPACK directly: scipy's wrappers cost more than the 64 x 64 factorisation itself.
                # Gram mode's conditioning invariant makes this Cholesky succeed; scores use L^-1 (d^3 once
                # per factor), applied by one GEMM to the rows being scored.
                L = np.linalg.cholesky(self._hi + self._lo)
                self._factor = ("chol", _inverse_transpose(L), self.rel_error, None, None)
                if remember:
                    self._past_factor = self._factor[1]
                    self._past_diag_max = float(np.diag(self._hi).max())
            else:
                assert self._r is not None
                # Rank decided on the column-equilibrated R (scores are invariant under column scaling), so a
                # direction carried only by tiny keys is not mistaken for rounding noise.  The factor stays in
                # the equilibrated frame: rows are divided by the column maxima before it is applied, since
                # ``1 / column maximum`` overflows for a subnormal column (and 0 x inf would be a nan score).
                # Rows with a component along a direction cut by the rank tolerance are scored 1 (their score
                # cannot be told in float64: docs/theory.md, "Numerics"), so that pruning keeps them.
                col_max = np.abs(self._r).max(axis=0)
                live = col_max > 0
                W = np.zeros((d, 0))
                kappa = 1.0
                outside = None
                if live.any():
                    _, s, vt = np.linalg.svd(self._r[:, live] / col_max[live], full_matrices=False)
                    W_live, kappa, cut = pseudo_inverse_factor(
                        s, vt, self.n_rows, d, self._qr_steps
                    )
                    W = _on_columns(W_live, live)
                    if cut is not None:
                        outside = cut._replace(
                            N=_on_columns(cut.N, live), W_gap=_on_columns(cut.W_gap, live)
                        )
                cols = np.where(live, col_max, 1.0)
                self._factor = (
                    "pinv",
                    np.ascontiguousarray(W),
                    4.0 * d * UNIT_ROUNDOFF * kappa,
                    cols,
                    outside,
                )
        return self._factor

    @property
    def rel_error(self) -> float:
        """Estimated relative error of :meth:`scores` (drives the safety margins of pruning and reporting).

        Gram path: ``4 d u kappa`` with ``kappa <= 2 d / lambda_min`` of the equilibrated Gram matrix at the
        last check (Cholesky is scaling-invariant, so the equilibrated condition number is what matters).
        R path: ``4 d u kappa(R)`` over the numerical rank.
        """
        if self.mode == "gram":
            if self.n_rows == 0 or self._chk_lam <= 0:
                return 0.0
            return 4.0 * self.dim * UNIT_ROUNDOFF * (2.0 * self.dim / self._chk_lam)
        return self._get_factor()[2]

    def score_upper_bounds(self, rows: np.ndarray) -> np.ndarray:
        """Upper bounds on :meth:`scores`, cheaper: with ``L^-T`` of an earlier Gram matrix ``G_0 <= G``,
        ``k^T G^-1 k <= k^T G_0^-1 k`` (no refactorisation per block); exact scores when none is at hand."""
        # Refactor once the largest diagonal entry has doubled (the trace could overflow), so the bounds stay within about 2x of the scores and the
        # candidate store stays near its exact size (a few d^3 factorisations over the whole stream).
        if (
            self._factor is None
            and self._past_factor is not None
            and self.mode == "gram"
            and rows.shape[0]
            and np.diag(self._hi).max() <= 2.0 * self._past_diag_max
        ):
            Y = rows @ self._past_factor
            return np.einsum("ij,ij->i", Y, Y)
        return self.scores(rows)

    def ingest_plan(self) -> tuple[np.ndarray | None, float, np.ndarray | None, int]:
        """``(scale, lam, W, until)``: the candidate test of every block folded while ``n_rows < until``.

        Bounds taken from the Gram matrix ``G_0`` of the moment the plan was made, valid for every later ``G``
        (it only grows): ``tau(k) <= sum_j (k_j scale_j)^2 / lam`` with ``scale = diag(G_0)^-1/2`` and ``lam``
        the smallest eigenvalue of the equilibrated ``G_0`` (docs/theory.md, "The norm pre-filter"), and
        ``tau(k) <= ||k W||^2`` with ``W = L_0^-T`` upper triangular (docs/theory.md, "Stale factors").  A plan
        is made when ``n_rows`` or the largest diagonal entry of ``G`` has doubled since the last one, or that
        entry has grown ``_PLAN_WEIGHT_GROWTH`` times more than ``n_rows`` (a decaying stream's ``G`` grows in
        its frame by the weights, not by the rows).  The ingest path asks for the plan once each block is added
        and tests the block under it, so a plan changes at stream positions alone (not with the chunking), may
        hold the block it tests, and its bounds stay within a small factor of the scores.  ``W`` is None (and
        ``until = n_rows + 1``) in R-factor mode and before the first block; ``scale`` None when no bound is
        at hand.  The plan is part of the state (serialized), so a restored sketch continues identically."""
        if self.mode != "gram" or self.n_rows == 0:
            return None, 0.0, None, self.n_rows + 1
        if (
            self._plan is None
            or self.n_rows >= self._plan_rows * _PLAN_GROWTH
            or self._plan_weights_grew()
        ):
            lam, diag = _equilibrated_min_eig(self._hi + self._lo, self.n_rows)
            # a full conditioning check of G as it is: add() counts its growth from here
            if self._gram_is_safe(lam):
                self._chk_lam, self._chk_diag = lam, diag
            scale = 1.0 / np.sqrt(diag) if lam > 0 else None
            fresh = self._get_factor(remember=False)[1]
            self._past_factor, self._past_diag_max = (
                fresh,
                float(np.diag(self._hi).max()),
            )  # the live bound too
            self._plan, self._plan_rows = (scale, lam * LAMBDA_SAFETY, fresh), self.n_rows
            self._plan_diag = self._past_diag_max
        made = self.plan_in_force()
        assert made is not None
        return made

    def plan_in_force(self) -> tuple[np.ndarray | None, float, np.ndarray | None, int] | None:
        """What :meth:`ingest_plan` gives between blocks, without making a plan: the plan in force, None when
        there is none on the Gram path (before the first block; after :meth:`release_factors`, a merge or a
        rebase that dropped it).  Plans are made only once a block is added, so that every way of feeding a
        stream makes them at the same points."""
        if self.mode != "gram":
            return None, 0.0, None, self.n_rows + 1
        if self._plan is None or self.n_rows == 0:
            return None
        scale, lam, W = self._plan
        return scale, lam, W, int(np.ceil(self._plan_rows * _PLAN_GROWTH))

    @property
    def plan_is_new(self) -> bool:
        """Whether the plan in force was made after the last block was added (from the Gram matrix as it is)."""
        return self._plan is not None and self._plan_rows == self.n_rows

    def _plan_weights_grew(self) -> bool:
        """Whether the largest diagonal entry of ``G`` has doubled since the plan, or grown by
        ``_PLAN_WEIGHT_GROWTH`` times more than the row count."""
        top = float(np.diag(self._hi).max())
        grown = top / self._plan_diag if self._plan_diag > 0 else np.inf
        rows = self.n_rows / max(self._plan_rows, 1)
        return grown > _PLAN_GROWTH or grown > _PLAN_WEIGHT_GROWTH * rows

    def release_factors(self) -> None:
        """Drop every factor held (the plan, the stale factor, the caches): a settled sketch keeps ``G`` only.
        The next block makes a new plan (deterministically: at the same point of the same operations)."""
        self._plan = None
        self._plan_factor32 = None
        self._past_factor, self._past_diag_max = None, 0.0
        self._factor = None
        self._gram_sum = None

    #: what :meth:`ingest_plan` may change (serialized state)
    _PLAN_FIELDS = (
        "_plan",
        "_plan_rows",
        "_plan_diag",
        "_past_factor",
        "_past_diag_max",
        "_chk_lam",
        "_chk_diag",
    )

    def plan_state(self) -> tuple:
        """What :meth:`ingest_plan` may change, for :meth:`restore_plan` (none of it is changed in place)."""
        return tuple(getattr(self, name) for name in self._PLAN_FIELDS)

    def restore_plan(self, state: tuple) -> None:
        """Undo :meth:`ingest_plan` (a chunk refused after its plan was made leaves no trace)."""
        for name, value in zip(self._PLAN_FIELDS, state, strict=True):
            setattr(self, name, value)

    def exact_scores(self, rows: np.ndarray, n_threads: int = 1) -> np.ndarray:
        """:meth:`scores` of ``rows`` (float32 or float64), on up to ``n_threads`` threads: on the Gram path by the
        triangular product with ``L^-T`` (BLAS trmm, half the flops of :meth:`scores`' general product), in
        fixed pieces, so that the result does not depend on ``n_threads``.  Call it where BLAS is held to one
        thread (:func:`levstream._threads.ingest_threads`)."""
        kind, W, _, _, _ = self._get_factor(remember=False, cache=False)
        if kind != "chol" or rows.shape[0] == 0:
            return self.scores(rows.astype(np.float64, copy=False))
        return _upper_scores_in_pieces(rows, W, n_threads)

    def exact_keep(self, rows: np.ndarray, threshold: float, n_threads: int = 1) -> np.ndarray:
        """``~(exact_scores(rows) < threshold)`` (a nan score keeps its row), on up to ``n_threads`` threads: the
        decision alone, so that the float32 screen decides most rows at half the cost of their scores
        (docs/theory.md, "The float32 screen"; the others are scored as by :meth:`exact_scores`).  Call it where
        BLAS is held to one thread."""
        kind, W, _, _, _ = self._get_factor(remember=False, cache=False)
        m = rows.shape[0]
        if kind != "chol" or m == 0:
            return ~(self.scores(rows.astype(np.float64, copy=False)) < threshold)
        W32, w_inv = float32_factor(W)
        if W32.shape[0] == 0:  # no screen: the scores, in small pieces
            return ~(_upper_scores_in_pieces(rows, W, n_threads) < threshold)
        keep = np.zeros(m, dtype=bool)
        fn, fn32 = dtrmm_function(), strmm_function()
        no_scale, no_wide = np.zeros(0), np.zeros((0, rows.shape[1]))

        def work(a: int, b: int) -> None:
            kept, _ = slab_pass(
                rows[a:b], no_scale, 0.0, W, threshold, no_wide, fn, W32, w_inv, fn32
            )
            keep[a + kept] = True

        _in_pieces(m, n_threads, work)
        return keep

    def plan_factor32(self, W: np.ndarray) -> tuple[np.ndarray, float]:
        """:func:`float32_factor` of the plan's factor ``W``, made once per plan (held with it, counted in
        :attr:`nbytes`, dropped with it); of any other factor, made afresh."""
        if self._plan is None or self._plan[2] is not W:
            return float32_factor(W)
        cached = self._plan_factor32
        if cached is None or cached[0] is not W:
            cached = self._plan_factor32 = (W, *float32_factor(W))
        return cached[1], cached[2]

    def scores(self, rows: np.ndarray) -> np.ndarray:
        """Leverage scores ``k^T G^+ k`` of ``rows`` (shape (m, dim)) against everything added so far."""
        if rows.shape[0] == 0:
            return np.zeros(0)
        # Both factors are a (d x r) W with k^T G^+ k = ||k W||^2: L^-T for the Cholesky path; on the R path
        # V S^-1 of the column-equilibrated R, applied to the rows divided by the column maxima ``cols``.
        # Rows with a component along a direction the rank tolerance cut are scored 1 (pseudo_inverse_factor).
        _, W, _, cols, outside = self._get_factor()
        X = rows if cols is None else rows / cols
        Y = X @ W
        return score_outside_as_one(X, np.einsum("ij,ij->i", Y, Y), outside)

    def bound_weights(self) -> tuple[np.ndarray | None, float]:
        """``(scale, lam)`` such that ``tau(k) <= sum_j (k_j scale_j)^2 / lam`` now *and after any later update*.

        From the last conditioning check: ``tau(k) <= k^T G_c^-1 k <= ||D_c^-1/2 k||^2 / lambda_min(C_c)`` for the
        Gram matrix ``G_c`` then (``G >= G_c`` in Loewner order, and G only grows), ``D_c = diag(G_c)`` and
        ``C_c`` the equilibrated ``G_c`` (docs/theory.md, "The norm pre-filter").  ``scale`` is None when no bound
        is available (empty, or R-factor mode): every row must then be scored exactly.
        """
        if self.mode != "gram" or self._chk_lam <= 0:
            return None, 0.0
        return 1.0 / np.sqrt(self._chk_diag), self._chk_lam * LAMBDA_SAFETY

    # ------------------------------------------------------------------ live streams
    def gram_sum(self) -> np.ndarray | None:
        """``G`` (Gram mode; a cached array, read-only use), or None in R-factor mode."""
        if self.mode != "gram":
            return None
        if self._gram_sum is None:
            self._gram_sum = self._hi + self._lo
        return self._gram_sum

    def bound_factor(self) -> np.ndarray | None:
        """A ``W`` with ``||k W||^2 >= k^T G^-1 k`` for the current ``G`` without computing anything: ``L^-T`` of
        the current or of an earlier Gram matrix (``G_0 <= G`` gives ``G^-1 <= G_0^-1``, docs/theory.md, "Stale
        factors"); None in R-factor mode or before the first factorisation."""
        if self.mode != "gram":
            return None
        if self._factor is not None and self._factor[0] == "chol":
            return self._factor[1]
        return self._past_factor

    # ------------------------------------------------------------------ normaliser
    def normalizer(self, Q: np.ndarray) -> np.ndarray:
        """``Z(q) = q^T G q = sum_l <q, k_l>^2`` for every row of ``Q``; 0 for queries numerically orthogonal to all keys."""
        if self.n_rows == 0:
            return np.zeros(Q.shape[0])
        G = self.gram_sum()
        if G is not None:
            return gram_normalizer(Q, G)
        assert self._r is not None
        T = Q @ self._r.T
        z = np.einsum("ij,ij->i", T, T)
        # the floor's sum_a q_a^2 G_aa with G_aa = ||R_:a||^2 taken as (q_a c_a)^2 ||R_:a / c_a||^2 (c_a the column's
        # largest entry): on this path G_aa itself may overflow (keys near 1e154), while z stays finite
        c = np.abs(self._r).max(axis=0)
        unit = self._r / np.where(c > 0, c, 1.0)
        with np.errstate(over="ignore"):  # (q_a c_a beyond float64: so is z)
            Qc = Q * c
        z[z <= _normalizer_floor(Qc, (unit * unit).sum(axis=0))] = 0.0
        return z

    # ------------------------------------------------------------------ persistence
    @property
    def nbytes(self) -> int:
        """Bytes of every array held: ``G`` (hi and lo) or ``R``, the cached factors and the plan."""
        held = [
            self._hi,
            self._lo,
            self._r,
            self._chk_diag,
            self._past_factor,
            self._gram_sum,
            self._bound[0],
        ]
        if self._factor is not None:
            held.append(self._factor[1])
        if self._plan is not None:
            held += [self._plan[0], self._plan[2]]
            cached = self._plan_factor32
            if cached is not None and cached[0] is self._plan[2]:
                held.append(cached[1])
        unique = {id(a): a for a in held if a is not None}
        return int(sum(a.nbytes for a in unique.values()))

    def to_state(self) -> tuple[dict, dict]:
        meta = {
            "kind": self.kind,
            "dim": self.dim,
            "n_rows": self.n_rows,
            "mode": self.mode,
            "chk_lam": self._chk_lam,
            "past_diag_max": self._past_diag_max,
        }
        arrays = {"hi": self._hi, "lo": self._lo, "chk_diag": self._chk_diag}
        if self._r is not None:
            arrays["r"] = self._r
        if self.mode == "qr":
            meta["qr_steps"] = self._qr_steps
        if self._past_factor is not None:
            arrays["past_factor"] = self._past_factor
        if self._plan is not None:
            scale, lam, factor = self._plan
            meta.update(
                plan_rows=self._plan_rows,
                plan_diag=self._plan_diag,
                plan_lam=lam,
                plan_factor_is_past=factor is self._past_factor,
            )
            if scale is not None:
                arrays["plan_scale"] = scale
            if factor is not None and factor is not self._past_factor:
                arrays["plan_factor"] = factor
        return meta, arrays

    @classmethod
    def from_state(cls, meta: dict, arrays: dict) -> GramSummary:
        d = int(meta["dim"])
        out = cls(d)
        out.n_rows = int(meta["n_rows"])
        out._mode = str(meta["mode"])
        if out.mode not in ("gram", "qr"):
            raise ValueError(f"summary mode must be 'gram' or 'qr'; got {out.mode!r}.")
        out._chk_lam = float(meta["chk_lam"])
        for name in ("hi", "lo"):
            if arrays[name].shape != (d, d):
                raise ValueError(
                    f"summary array {name!r} must have shape {(d, d)}; got {arrays[name].shape}."
                )
        out._hi, out._lo = arrays["hi"].copy(), arrays["lo"].copy()
        if arrays["chk_diag"].shape != (d,):
            raise ValueError(
                f"summary array 'chk_diag' must have shape {(d,)}; got {arrays['chk_diag'].shape}."
            )
        out._chk_diag = arrays["chk_diag"].copy()
        if out.mode == "qr":
            if "r" not in arrays or arrays["r"].shape != (d, d):
                raise ValueError("summary in 'qr' mode must carry an R factor of shape (dim, dim).")
            out._r = arrays["r"].copy()
            # bytes written before the count was kept: as many steps as make the tolerance the one they were
            # written with, the worst case m 2u sigma_max (factor_rank_tolerance), so that they answer as then
            steps = meta.get("qr_steps", 4 * max(out.n_rows, d))
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
                raise ValueError(
                    f"summary 'qr_steps' must be a non-negative integer; got {steps!r}."
                )
            out._qr_steps = steps
        if "past_factor" in arrays:
            past = arrays["past_factor"]
            if out.mode != "gram" or past.shape != (d, d) or not np.isfinite(past).all():
                raise ValueError(
                    "summary array 'past_factor' must be a finite (dim, dim) matrix of the Gram path."
                )
            out._past_factor = past.copy()
            out._past_diag_max = float(meta.get("past_diag_max", 0.0))
        if "plan_rows" in meta:
            W = out._past_factor if meta.get("plan_factor_is_past") else arrays.get("plan_factor")
            scale = arrays.get("plan_scale")
            if (
                out.mode != "gram"
                or W is None
                or W.shape != (d, d)
                or not np.isfinite(W).all()
                or (scale is not None and (scale.shape != (d,) or not np.isfinite(scale).all()))
            ):
                raise ValueError(
                    "summary plan must be a finite (dim, dim) factor of the Gram path with a scale of "
                    "shape (dim,)."
                )
            out._plan = (
                None if scale is None else scale.copy(),
                float(meta["plan_lam"]),
                W if W is out._past_factor else W.copy(),
            )
            out._plan_rows = int(meta["plan_rows"])
            # bytes of levstream <= 0.2.0 renew plans by the row count alone
            out._plan_diag = float(meta.get("plan_diag", np.inf))
        return out
