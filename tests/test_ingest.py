"""The ingest path of p = 2 (issue 14): one pass per slab, on the library's threads, in stored precision.

Checked against brute force (SVD leverage scores, NumPy products) and against the same stream fed another
way: the state (``to_bytes``) must not depend on the thread budget nor on the chunking, a refused chunk must
leave no trace even when part of it was folded, and memory must follow what the sketch holds.
"""

from __future__ import annotations

import ctypes
import gc
import itertools
import threading
import tracemalloc
import types

import numpy as np
import pytest
from conftest import (
    NBYTES_TRACED_RTOL,
    SCORE_RTOL,
    assert_matches_offline,
    assert_same_state_as_upcast,
    heavy_tailed_keys,
)
from naive import leverage_svd
from threadpoolctl import threadpool_info

import levstream as ls
import levstream._threads as threads
import levstream.sketch as sketch_module
import levstream.summaries.gram as gram_module
from levstream._kernels import ingest as kernels
from levstream._kernels import blas
from levstream._kernels.blas import dtrmm_function, strmm_function
from levstream._store import RowStore

NO_W32 = np.zeros((0, 0), dtype=np.float32)
from levstream.summaries import GramSummary

EPS = 0.02
BLOCK = 4096  # four slabs of 1024 rows per block
#: Two float64 evaluations of ``||x W||^2`` (sums in different orders) differ by at most this times
#: ``(d + 2) sum_c (sum_a |x_a W_ac|)^2`` (each ``y_c`` within ``d u`` of those terms, its square and the sum of squares
#: another few ``u``): the tie band of the candidate test.
FLOAT64_SPREAD = 8 * 2.0**-53
#: Scores this close to a threshold (relative) may be kept or dropped, depending on the rounding of the product:
#: for the well-conditioned heavy-tailed keys of the prune test, far above the spread of two float64 evaluations
#: (FLOAT64_SPREAD relative to the score, times the condition of the product; 3e-16 observed).
SCORE_TIE = 1e-12


@pytest.fixture(autouse=True)
def default_budget(monkeypatch):
    """Every test starts at the default thread budget and leaves it there."""
    monkeypatch.setattr(threads, "_budget", None)


@pytest.fixture(scope="module")
def K() -> np.ndarray:
    """40 blocks of heavy-tailed keys: one update_many of all of them runs several waves."""
    return heavy_tailed_keys(40 * BLOCK + 123, 6, seed=7)


def feed(K: np.ndarray, cuts: list[int] | None = None, n_threads: int | None = None,
         dtype: type = np.float64) -> ls.KeySketch:
    if n_threads is not None:
        ls.set_num_threads(n_threads)
    sk = ls.KeySketch(K.shape[1], eps=EPS, block_rows=BLOCK)
    bounds = [0, *(cuts or []), K.shape[0]]
    for a, b in itertools.pairwise(bounds):
        sk.update_many(K[a:b].astype(dtype))
    return sk


# ---------------------------------------------------------------------------------------------- kernels
def slab_case(dtype, n, d, seed, quantile):
    """Heavy-tailed rows of ``dtype``, their float64 form, a norm scale, an upper-triangular factor, the rows'
    scaled norms and factor bounds (NumPy), and thresholds at ``quantile`` of each."""
    rng = np.random.default_rng(seed)
    X = (rng.standard_normal((n, d)) * (1 + rng.pareto(2.0, (n, 1)))).astype(dtype)
    X64 = X.astype(np.float64)
    scale = rng.random(d) + 0.5
    W = np.triu(rng.standard_normal((d, d)))
    norms = ((X64 * scale) ** 2).sum(axis=1)
    bounds = ((X64 @ W) ** 2).sum(axis=1)
    return X, X64, scale, W, norms, bounds, np.quantile(norms, quantile), np.quantile(bounds, quantile)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_slab_pass_against_numpy(dtype, monkeypatch):
    d = 16
    X, X64, scale, W, norms, bounds, limit, threshold = slab_case(dtype, 700, d, seed=0, quantile=0.5)
    fn, fn32 = dtrmm_function(), strmm_function()
    monkeypatch.setattr(gram_module, "_SCREEN_MIN_DIM", 0)  # the screen at every size
    W32, w_inv = gram_module.float32_factor(W)
    want = np.flatnonzero((norms >= limit) & (bounds >= threshold))
    for factor32 in ((W32, w_inv), (NO_W32, 0.0)):  # with and without the float32 screen
        wide = np.empty((700, d))
        rows, tested = kernels.slab_pass(X, scale, limit, W, threshold, wide, fn, *factor32, fn32)
        assert tested
        np.testing.assert_array_equal(wide, X64)
        # rounding may move rows sitting exactly on a threshold; none of these random values do
        np.testing.assert_array_equal(rows, want)
    rows, tested = kernels.slab_pass(
        X, np.zeros(0), 0.0, np.zeros((0, 0)), 0.0, np.zeros((0, d)), fn, NO_W32, 0.0, fn32
    )
    assert not tested
    np.testing.assert_array_equal(rows, np.arange(700))
    out = np.empty(700)
    kernels.upper_scores(X, W, fn, out)
    np.testing.assert_allclose(out, bounds, rtol=SCORE_RTOL)


def syrk_of(source: str):
    """``syrk`` from ``source``; NumPy's must be found whenever NumPy's wheel bundles a BLAS exporting a known
    ``dsyrk`` symbol (as on CI: NumPy 2's scipy-openblas64)."""
    syrk = blas.syrk_from(source)
    if source == "numpy":
        exported = blas.bundled_dsyrk_symbols()
        assert (syrk is None) == (not exported), "NumPy bundles a dsyrk but it was not used"
        if syrk is None:
            pytest.skip("this NumPy bundles no BLAS exporting dsyrk (SciPy's is the only one)")
    return syrk


def address(fn) -> int:
    return ctypes.cast(fn, ctypes.c_void_p).value


@pytest.mark.parametrize("source", ["numpy", "scipy"])
@pytest.mark.parametrize("shape", [(0, 3), (4, 0), (1, 1), (7, 5), (1000, 64), (300, 130)])
def test_add_gram_against_numpy(source, shape):
    """``G += X^T X`` from either BLAS: both triangles, exactly symmetric, against NumPy's float64 product."""
    syrk = syrk_of(source)
    rng = np.random.default_rng(shape[0])
    X = rng.standard_normal(shape) * rng.uniform(0.1, 10.0, shape[1])
    G0 = rng.standard_normal((shape[1], shape[1]))
    G0 = G0 + G0.T
    G = G0.copy()
    blas.add_gram(G, X, syrk)
    np.testing.assert_allclose(G, G0 + X.T @ X, rtol=1e-12, atol=1e-12 * (1.0 + np.abs(X.T @ X).sum()))
    np.testing.assert_array_equal(G, G.T)


def test_the_ingest_path_takes_numpys_syrk_when_numpy_bundles_one(monkeypatch):
    """The process-wide choice (the faster BLAS of the two: benchmarks/RESULTS.md, "Ingest"), looked up afresh
    with the default source, whatever LEVSTREAM_SYRK this run has."""
    expected = syrk_of("numpy")
    monkeypatch.setattr(blas, "SYRK_SOURCE", "numpy")
    monkeypatch.setattr(blas, "_functions", {})
    chosen = blas.dsyrk_function()
    assert address(chosen[0]) == address(expected[0]) and chosen[1] == expected[1]
    assert blas.syrk_library().startswith("NumPy's")
    monkeypatch.setattr(blas, "SYRK_SOURCE", "scipy")
    monkeypatch.setattr(blas, "_functions", {})
    assert address(blas.dsyrk_function()[0]) == address(blas.syrk_from("scipy")[0])
    assert blas.syrk_library().startswith("SciPy's")


def test_a_syrk_source_that_is_not_known_is_refused(monkeypatch):
    with pytest.raises(ValueError, match="'numpy' or 'scipy', got 'mkl'"):
        blas.syrk_from("mkl")
    monkeypatch.setattr(blas, "SYRK_SOURCE", "mkl")
    monkeypatch.setattr(blas, "_functions", {})
    with pytest.raises(ValueError, match="LEVSTREAM_SYRK must be 'numpy' or 'scipy', got 'mkl'"):
        blas.dsyrk_function()


def test_add_gram_refuses_arrays_it_would_misread():
    X = np.ones((4, 3))
    with pytest.raises(ValueError, match="C-contiguous"):
        blas.add_gram(np.zeros((3, 3)), np.asfortranarray(X), blas.dsyrk_function())
    with pytest.raises(ValueError, match="C-contiguous"):
        blas.add_gram(np.zeros((3, 6))[:, ::2], X, blas.dsyrk_function())


@pytest.mark.parametrize("source", ["numpy", "scipy"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_slab_run_against_numpy(dtype, source):
    """One call over several slabs: each slab's Gram block (BLAS syrk) and trace against NumPy, the candidate
    rows those of a call per slab, and the result the same bit for bit however the slabs are shared among calls
    (the threads' groups), with the Gram blocks summed in slab order by the call or by the caller."""
    d, n = 12, 1000
    X, X64, scale, W, norms, bounds, limit, threshold = slab_case(dtype, n, d, seed=1, quantile=0.4)
    dtrmm, strmm, dsyrk = dtrmm_function(), strmm_function(), syrk_of(source)
    cuts = np.array([0, 250, 500, 750, n], dtype=np.int64)

    def run(groups, combine, X=X):
        Gs, totals, rows = np.zeros((4, d, d)), np.zeros(4), []
        for f, g in groups:
            a = int(cuts[f])
            widest = int(np.diff(cuts[f : g + 1]).max())
            wide = np.empty((widest if dtype == np.float32 else 0, d))
            got, tested = kernels.slab_run(
                X[a : cuts[g]], cuts[f : g + 1] - a, scale, limit, W, threshold, wide, dtrmm, NO_W32, 0.0,
                strmm, Gs[f:g], totals[f:g], dsyrk, combine,
            )
            assert tested
            rows.append(got + a)
        return Gs, totals, np.concatenate(rows)

    Gs, totals, rows = run([(0, 4)], combine=False)
    np.testing.assert_array_equal(rows, np.flatnonzero((norms >= limit) & (bounds >= threshold)))
    for s in range(4):
        block = X64[cuts[s] : cuts[s + 1]]
        np.testing.assert_allclose(Gs[s], block.T @ block, rtol=1e-13, atol=1e-13 * np.trace(Gs[s]))
        np.testing.assert_array_equal(Gs[s], Gs[s].T)
        assert totals[s] == pytest.approx((block**2).sum(), rel=1e-13)
    summed = Gs[0].copy()
    for s in range(1, 4):
        summed += Gs[s]
    one, one_totals, one_rows = run([(0, 4)], combine=True)
    np.testing.assert_array_equal(one[0], summed)
    np.testing.assert_array_equal(one_totals, totals)
    np.testing.assert_array_equal(one_rows, rows)
    for groups in ([(0, 1), (1, 2), (2, 4)], [(0, 2), (2, 4)]):
        parts, part_totals, part_rows = run(groups, combine=False)
        np.testing.assert_array_equal(parts, Gs)
        np.testing.assert_array_equal(part_totals, totals)
        np.testing.assert_array_equal(part_rows, rows)
    if dtype == np.float32:  # float32 rows and no float64 buffer for their Gram blocks: refused, not misread
        with pytest.raises(ValueError, match="float64 buffer"):
            kernels.slab_run(
                X, cuts, scale, limit, W, threshold, np.empty((0, d)), dtrmm, NO_W32, 0.0, strmm,
                np.zeros((4, d, d)), np.zeros(4), dsyrk, False,
            )
    X_bad = X.copy()
    X_bad[600, 3] = np.nan
    _, bad_totals, _ = run([(0, 4)], combine=False, X=X_bad)
    assert np.isfinite(bad_totals[[0, 1, 3]]).all() and np.isnan(bad_totals[2])


@pytest.mark.parametrize("d", [5, 64, 130, 384])
def test_float32_screen_decides_as_the_float64_test(d, monkeypatch):
    """The float32 screen of the candidate test decides a row only where the float64 test is certain to decide
    the same: the rows kept are identical with and without it, for rows and factors over many scales, factors
    far from orthogonal, thresholds placed right at rows' bounds (ties at rounding level), zero, tiny and huge
    rows, float32 rows, and nan/inf rows (kept, as the float64 test keeps them)."""
    rng = np.random.default_rng(d)
    fn, fn32 = dtrmm_function(), strmm_function()
    monkeypatch.setattr(gram_module, "_SCREEN_MIN_DIM", 0)  # the screen at every size
    decided = 0
    for trial in range(60):
        n = 400
        X = rng.standard_normal((n, d)) * 10.0 ** rng.uniform(-6, 6, (n, 1))
        X[:, : d // 3] *= 10.0 ** rng.uniform(-3, 3)  # uneven columns
        if trial % 4 == 1:
            X[rng.integers(0, n, 5)] = 0.0
            X[rng.integers(0, n, 3)] *= 1e-150
            X[rng.integers(0, n, 3)] *= 1e140
        if trial % 4 == 2:
            X = X.astype(np.float32).astype(np.float64)
        W = np.triu(rng.standard_normal((d, d))) * 10.0 ** rng.uniform(-40, 40)
        W[np.diag_indices(d)] = np.abs(W[np.diag_indices(d)]) * 10.0 ** rng.uniform(-8, 0, d)
        Xc = X.astype(np.float32) if trial % 4 == 3 else X
        with np.errstate(over="ignore", invalid="ignore"):
            u = ((Xc.astype(np.float64) @ W) ** 2).sum(axis=1)
        finite = np.isfinite(u)
        threshold = float(np.quantile(u[finite], rng.uniform(0.1, 0.9)))
        if trial % 3 == 0:
            threshold = float(u[finite][rng.integers(0, finite.sum())])  # exactly some row's float64 bound
        if trial % 5 == 0:
            Xc = Xc.copy()
            Xc[7, 3] = np.nan
            Xc[11, 0] = np.inf
        W32, w_inv = gram_module.float32_factor(W)
        wide = np.zeros((0, d))
        screened, _ = kernels.slab_pass(Xc, np.zeros(0), 0.0, W, threshold, wide, fn, W32, w_inv, fn32)
        plain, _ = kernels.slab_pass(Xc, np.zeros(0), 0.0, W, threshold, wide, fn, NO_W32, 0.0, fn32)
        # The float64 test's own rounding depends on how many rows BLAS's trmm multiplies at once (OpenBLAS on an
        # AVX-512 EPYC, d = 64: fewer than 8 rows and 8 or more round differently), and the screen leaves it fewer rows: a
        # row whose float64 bound is within that rounding of the threshold may go either way, with or without the
        # screen (docs/theory.md, "The float32 screen").  Every other row must be decided alike.
        with np.errstate(over="ignore", invalid="ignore"):
            spread = FLOAT64_SPREAD * (d + 2) * ((np.abs(Xc.astype(np.float64)) @ np.abs(W)) ** 2).sum(axis=1)
        tie = np.flatnonzero(np.isfinite(u) & (np.abs(u - threshold) <= spread))
        differ = np.setxor1d(screened, plain)
        assert np.isin(differ, tie).all(), f"rows decided differently outside the tie band: {differ}"
        verdict = kernels._screen(Xc, np.arange(n), W32, w_inv, threshold, fn32) if W32.size else None
        if verdict is not None:
            decided += int((verdict != kernels._UNDECIDED).sum())
            # what the screen decides is the float64 decision, by any rounding of it (never a row in the tie band)
            sure = np.flatnonzero(verdict != kernels._UNDECIDED)
            assert not np.isin(sure, tie).any()
            np.testing.assert_array_equal(verdict[sure] == kernels._KEEP, ~(u[sure] < threshold))
    assert decided > 60 * 400 // 2  # and the screen decides most rows (else it saves nothing)


def test_float32_screen_leaves_a_threshold_it_cannot_scale_to_the_float64_test(monkeypatch):
    """A threshold that underflows once scaled to unit rows (here 2^-700 (2^-200 2^-199)^2) is left to the float64
    test, which drops these rows (||x W||^2 = 2^-800)."""
    monkeypatch.setattr(gram_module, "_SCREEN_MIN_DIM", 0)
    d, n = 4, 40
    W = np.diag([2.0**199, 1.0, 1.0, 2.0**-600])
    X = np.zeros((n, d))
    X[:, 3] = 2.0**200
    W32, w_inv = gram_module.float32_factor(W)
    fn, fn32 = dtrmm_function(), strmm_function()
    for factor in ((W32, w_inv), (NO_W32, 0.0)):
        kept, _ = kernels.slab_pass(X, np.zeros(0), 0.0, W, 2.0**-700, np.zeros((0, d)), fn, *factor, fn32)
        assert kept.size == 0


def numpy_with_empty(empty):
    """A stand-in for the ``np`` of ``levstream._store`` whose ``np.empty`` is ``empty`` (to make an allocation fail)."""
    fake = types.SimpleNamespace(**{name: getattr(np, name) for name in dir(np) if not name.startswith("__")})
    fake.empty = empty
    return fake


@pytest.mark.parametrize("gate", [None, 0.5])
@pytest.mark.parametrize("failing", [1, 2, 3])
def test_a_float32_store_widened_by_a_float64_row_that_fails_to_grow_is_unchanged(failing, gate, monkeypatch):
    """A full store of float32 rows grows and is widened to float64 for a float64 row: out of memory at any of its
    allocations (keys, values, ids), the sketch is as it was (its rows still float32), and the row fed again gives
    the stream fed once.  (The widening allocates every array before it takes any.)"""
    import levstream._store as store_module

    d, dv = 4, 2
    rng = np.random.default_rng(21)
    K, V = heavy_tailed_keys(300, d, seed=21), rng.standard_normal((300, dv))
    sk = ls.KeySketch(d, eps=0.05, block_rows=256, value_dim=dv)
    sk.update_many(K[:20].astype(np.float32), V[:20])
    t = 20
    while sk._store.n < sk._store.capacity:
        sk.update(K[t].astype(np.float32), V[t])
        t += 1
    assert sk._store.keys.dtype == np.float32
    before = sk.to_bytes()
    twin = ls.KeySketch.from_bytes(before)
    calls = {"n": 0}

    def empty(shape, dtype=float, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == failing:
            raise MemoryError("simulated")
        return np.empty(shape, dtype, *args, **kwargs)

    fake_np = numpy_with_empty(empty)
    monkeypatch.setattr(store_module, "np", fake_np)
    with pytest.raises(MemoryError, match="simulated"):
        sk.update(K[t], V[t], gate=gate)
    monkeypatch.setattr(store_module, "np", np)
    assert calls["n"] >= failing
    assert sk._store.keys.dtype == np.float32
    assert sk.to_bytes() == before
    sk.update(K[t], V[t], gate=gate)
    twin.update(K[t], V[t], gate=gate)
    assert sk.to_bytes() == twin.to_bytes()


@pytest.mark.parametrize("failing", [1, 2])
def test_a_failed_growth_of_the_store_leaves_it_consistent(failing, monkeypatch):
    """Out of memory while the input buffer is given its full size (the keys refused, or the keys allocated and the
    values refused): the row that asked for the room is refused, the store claims only the room every array has,
    and the stream goes on, exact (bytes equal to a stream that never failed, answers equal to brute force)."""
    import levstream._store as store_module

    d, dv, block = 64, 64, 8192
    rng = np.random.default_rng(3)
    K, V = heavy_tailed_keys(5000, d, seed=15), rng.standard_normal((5000, dv))
    calls = {"big": 0}

    def empty(shape, dtype=float, *args, **kwargs):
        if int(np.prod(shape)) * np.dtype(dtype).itemsize >= store_module._FRESH_BYTES:
            calls["big"] += 1
            if calls["big"] == failing:
                raise MemoryError("simulated")
        return np.empty(shape, dtype, *args, **kwargs)

    fake_np = numpy_with_empty(empty)
    twin = ls.KeySketch(d, eps=EPS, block_rows=block, value_dim=dv)
    for i in range(K.shape[0]):
        twin.update(K[i], V[i])
    sk = ls.KeySketch(d, eps=EPS, block_rows=block, value_dim=dv)
    failed_at = None
    monkeypatch.setattr(store_module, "np", fake_np)
    for i in range(K.shape[0]):
        try:
            sk.update(K[i], V[i])
        except MemoryError:
            failed_at = i
            sk.update(K[i], V[i])  # the room is asked for again, and given
        store = sk._store
        assert store.keys.shape[0] >= store.capacity and store.values.shape[0] >= store.capacity
    monkeypatch.setattr(store_module, "np", np)
    assert failed_at is not None and calls["big"] > failing
    assert sk.to_bytes() == twin.to_bytes()
    Q = rng.standard_normal((3, d))
    assert sk.heavy_entries(Q).as_set() == ls.testing.heavy_entries_dense(Q, K, eps=EPS, p=2).as_set()


def test_a_stream_is_the_same_with_and_without_the_float32_screen(monkeypatch):
    """The screen changes no decision, so a sketch streamed with it has the same bytes as one streamed without
    it (d = 256, where the sketch uses it; float64 and float32 keys, chunks that are not aligned to blocks)."""
    d = 256
    K = heavy_tailed_keys(3 * BLOCK + 77, d, seed=12)
    for dtype in (np.float64, np.float32):
        got = []
        for factor in (gram_module.float32_factor, lambda W: (NO_W32, 0.0)):
            monkeypatch.setattr(gram_module, "float32_factor", factor)
            sk = ls.KeySketch(d, eps=EPS, block_rows=BLOCK)
            for a in range(0, K.shape[0], BLOCK - 5):
                sk.update_many(K[a : a + BLOCK - 5].astype(dtype))
            got.append(sk.to_bytes())
        assert got[0] == got[1]


def test_two_sum_add_is_exact():
    """hi + lo carries the exact sum of many additions (checked in exact rational arithmetic via fsum)."""
    import math

    rng = np.random.default_rng(1)
    hi, lo = np.zeros((3, 3)), np.zeros((3, 3))
    adds = [rng.standard_normal((3, 3)) * 10.0 ** rng.integers(-8, 8) for _ in range(200)]
    for a in adds:
        kernels.two_sum_add(hi, lo, a)
    for i in range(3):
        for j in range(3):
            exact = math.fsum(a[i, j] for a in adds)
            assert math.fsum([hi[i, j], lo[i, j]]) == pytest.approx(exact, rel=1e-15, abs=1e-300)


def test_exact_scores_match_svd_on_any_number_of_threads():
    K = heavy_tailed_keys(5000, 12, seed=3)
    s = GramSummary(12)
    s.add(K)
    tau = leverage_svd(K)
    with threads.ingest_threads():  # where the sketch calls it (LAPACK's triangular inverse)
        one = s.exact_scores(K, 1)
        np.testing.assert_allclose(one, tau, rtol=SCORE_RTOL)
        np.testing.assert_array_equal(s.exact_scores(K, 2), one)
        np.testing.assert_array_equal(s.exact_scores(K, 3), one)
        np.testing.assert_array_equal(s.exact_scores(K.astype(np.float32), 3),
                                      s.exact_scores(K.astype(np.float32).astype(np.float64), 1))
    np.testing.assert_allclose(s.exact_scores(K, 2), tau, rtol=SCORE_RTOL)  # NumPy's inverse outside


@pytest.mark.parametrize("d", [12, 300])
def test_exact_keep_decides_as_the_exact_scores(d, monkeypatch):
    """A prune's decision (float32 screen on at every size, then float64 for the rows it leaves open) is the
    exact scores' decision, on any number of threads, for thresholds at quantiles and exactly at scores."""
    monkeypatch.setattr(gram_module, "_SCREEN_MIN_DIM", 0)
    K = heavy_tailed_keys(5000, d, seed=4)
    s = GramSummary(d)
    s.add(K)
    with threads.ingest_threads():
        scores = s.exact_scores(K, 1)
        thresholds = [*np.quantile(scores, [0.1, 0.5, 0.9, 0.99]), float(scores[17]), float(scores[4001])]
        for t in thresholds:
            want = ~(scores < t)
            # a score within rounding of t may go either way: the float64 product's rounding depends on how many
            # rows BLAS's trmm gets at once (see test_float32_screen_decides_as_the_float64_test)
            clear = np.abs(scores - t) > SCORE_TIE * t
            kept = [s.exact_keep(K, t, n_threads) for n_threads in (1, 3)]
            np.testing.assert_array_equal(kept[0], kept[1])  # bit for bit on any number of threads
            np.testing.assert_array_equal(kept[0][clear], want[clear])
            scores32 = s.exact_scores(K.astype(np.float32), 1)
            clear32 = np.abs(scores32 - t) > SCORE_TIE * t
            np.testing.assert_array_equal(
                s.exact_keep(K.astype(np.float32), t, 2)[clear32], ~(scores32 < t)[clear32]
            )


# ---------------------------------------------------------------------------------------------- threads
def test_run_items_results_by_index_errors_and_nesting():
    out = [0] * 50
    threads.run_items(lambda i: out.__setitem__(i, i * i), 50, 3)
    assert out == [i * i for i in range(50)]

    def boom(i):
        if i in (7, 30):
            raise KeyError(i)

    with pytest.raises(KeyError, match="7"):
        threads.run_items(boom, 50, 2)
    inner = [[0] * 5 for _ in range(6)]
    threads.run_items(lambda i: threads.run_items(lambda j: inner[i].__setitem__(j, i + j), 5, 2), 6, 2)
    assert inner == [[i + j for j in range(5)] for i in range(6)]


def test_bit_for_bit_whatever_the_thread_budget(K):
    """The universal set (ids and scores) and the whole state are identical on 1, 2 and 3 threads."""
    ref = feed(K, n_threads=1)
    U = ref.universal_set()
    for n in (2, 3):
        sk = feed(K, n_threads=n)
        assert sk.to_bytes() == ref.to_bytes()
        np.testing.assert_array_equal(sk.universal_set().ids, U.ids)
        np.testing.assert_array_equal(sk.universal_set().scores, U.scores)
    assert_matches_offline(U.ids, leverage_svd(K), EPS)


@pytest.mark.parametrize("block_rows", [5 * 1024 + 300, 8 * 1024])
def test_blocks_of_many_slabs_bit_for_bit_on_any_budget(K, block_rows):
    """Blocks of 5 and 8 slabs: one thread takes a block in one compiled call (its slabs' Gram blocks summed there),
    two and three threads in runs of uneven length (summed by the caller); the states are identical, float32 too."""
    X = K[: 6 * block_rows + 77]
    for dtype in (np.float64, np.float32):
        states = []
        for n in (1, 2, 3):
            ls.set_num_threads(n)
            sk = ls.KeySketch(X.shape[1], eps=EPS, block_rows=block_rows)
            sk.update_many(X[:100].astype(dtype))  # pending rows: the next chunk completes their block first
            sk.update_many(X[100:].astype(dtype))
            states.append(sk.to_bytes())
        assert states[1] == states[0] and states[2] == states[0]


@pytest.mark.parametrize("source", ["numpy", "scipy"])
def test_a_stream_on_either_syrk_is_exact_and_the_same_on_any_budget(K, source, monkeypatch):
    """The whole ingest path on each BLAS's ``syrk``: the universal set is the offline one (SVD), and the state
    the same bit for bit on one thread and on two."""
    syrk = syrk_of(source)
    monkeypatch.setitem(blas._functions, "syrk", syrk)
    one = feed(K, n_threads=1)
    two = feed(K, n_threads=2)
    assert blas.dsyrk_function() is syrk
    assert one.to_bytes() == two.to_bytes()
    assert_matches_offline(one.universal_set().ids, leverage_svd(K), EPS)
    folded = K[: one._summary.n_rows]  # (the rows past the last whole block wait in the input buffer)
    assert folded.shape[0] == 40 * BLOCK
    G = folded.T @ folded
    np.testing.assert_allclose(one._summary.gram, G, rtol=1e-12, atol=1e-12 * np.trace(G))


def test_state_does_not_depend_on_the_chunking(K):
    one_call = feed(K)
    by_block = feed(K, cuts=list(range(BLOCK, K.shape[0], BLOCK)))
    ragged = feed(K, cuts=[5, 1000, 1001, 9000, 9500, 50_000, 100_003])
    assert by_block.to_bytes() == one_call.to_bytes()
    assert ragged.to_bytes() == one_call.to_bytes()
    rows = ls.KeySketch(K.shape[1], eps=EPS, block_rows=BLOCK)
    for x in K[:3 * BLOCK + 17]:
        rows.update(x)
    rows.update_many(K[3 * BLOCK + 17:])
    assert rows.to_bytes() == one_call.to_bytes()


def test_one_update_many_uses_the_budget_and_restores_blas(K, monkeypatch):
    """The slabs of one call run on at most get_num_threads() threads at a time, with BLAS held to one thread
    inside, and the caller's BLAS limits are back afterwards."""
    lock = threading.Lock()
    state = {"running": 0, "most": 0}
    blas_seen: set[frozenset[int]] = set()
    real = sketch_module.slab_run

    def spy(*args):
        with lock:
            state["running"] += 1
            state["most"] = max(state["most"], state["running"])
            blas_seen.add(frozenset(i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"))
        try:
            return real(*args)
        finally:
            with lock:
                state["running"] -= 1

    monkeypatch.setattr(sketch_module, "slab_run", spy)
    before = {(i["filepath"], i["num_threads"]) for i in threadpool_info()}
    for budget in (1, 2):
        state["most"] = 0
        ls.set_num_threads(budget)
        ls.KeySketch(K.shape[1], eps=EPS, block_rows=BLOCK).update_many(K)
        assert 1 <= state["most"] <= budget
        assert blas_seen == {frozenset({1})}
        assert {(i["filepath"], i["num_threads"]) for i in threadpool_info()} == before


def test_writers_on_several_threads_share_the_blas_hold(K, monkeypatch):
    """Two threads feeding their own sketches at once: BLAS stays at one thread until both are done (neither
    restores the limit under the other), the limits are back afterwards, and each sketch is the one a single
    thread makes."""
    blas_seen: set[frozenset[int]] = set()
    lock = threading.Lock()
    real = sketch_module.slab_run

    def spy(*args):
        limits = frozenset(i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas")
        with lock:
            blas_seen.add(limits)
        return real(*args)

    monkeypatch.setattr(sketch_module, "slab_run", spy)
    before = {(i["filepath"], i["num_threads"]) for i in threadpool_info()}
    halves = (K[:20 * BLOCK], K[20 * BLOCK:])
    got: list[bytes] = [b"", b""]

    def writer(i: int) -> None:
        sk = ls.KeySketch(K.shape[1], eps=EPS, block_rows=BLOCK)
        for a in range(0, halves[i].shape[0], BLOCK // 2):
            sk.update_many(halves[i][a:a + BLOCK // 2])
        got[i] = sk.to_bytes()

    workers = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert blas_seen == {frozenset({1})}
    assert {(i["filepath"], i["num_threads"]) for i in threadpool_info()} == before
    for i in range(2):
        assert got[i] == feed(halves[i]).to_bytes()


# ---------------------------------------------------------------------------------------------- bad input
def test_refused_chunk_leaves_no_trace_after_several_waves(K):
    """A nan in the last block of a chunk that is folded in several waves: the folded waves are undone."""
    sk = feed(K[:BLOCK + 100])
    before = sk.to_bytes()
    last_block = (BLOCK - 100) + 37 * BLOCK  # rows 0..BLOCK-101 complete the pending block, then 38 blocks
    for row in (last_block + 10, -50):  # in the last whole block; in the rows left for the buffer
        bad = K[BLOCK + 100:].copy()
        bad[row, 2] = np.nan
        with pytest.raises(ValueError, match=rf"found nan at index \({row % bad.shape[0]}, 2\)"):
            sk.update_many(bad)
        assert sk.to_bytes() == before
    huge = K[BLOCK + 100:].copy()
    huge[last_block + 5] = 1e200
    with pytest.raises(ValueError, match="squares overflow float64"):
        sk.update_many(huge)
    assert sk.to_bytes() == before
    sk.update_many(K[BLOCK + 100:])
    assert sk.to_bytes() == feed(K).to_bytes()


#: (rows fed before, end of the chunk, the call that fails): a chunk of whole blocks; a chunk that completes the
#: pending rows, then whole blocks; a chunk that completes them and leaves rows waiting (one block folded)
FOLDS = {
    "whole blocks": (2 * BLOCK, 12 * BLOCK, 3),
    "pending rows completed, then whole blocks": (2 * BLOCK + 300, 12 * BLOCK, 3),
    "pending rows completed, one block": (2 * BLOCK + 300, 3 * BLOCK + 50, 1),
}


#: Gates of the failure tests: none; mild (no rebase of the frame); strong (the chunk rebases the state).
GATES = {"none": None, "mild": (0.99, 1.0), "strong": (0.5, 0.9)}


def gates_for(kind: str, n: int) -> np.ndarray | None:
    bounds = GATES[kind]
    return None if bounds is None else np.random.default_rng(3).uniform(*bounds, n)


def feed_gated(K: np.ndarray, g: np.ndarray | None, cuts: list[int]) -> ls.KeySketch:
    sk = ls.KeySketch(K.shape[1], eps=EPS, block_rows=BLOCK)
    for a, b in itertools.pairwise([0, *cuts, K.shape[0]]):
        sk.update_many(K[a:b], gates=None if g is None else g[a:b])
    return sk


@pytest.mark.parametrize("fold", list(FOLDS))
@pytest.mark.parametrize("where", ["_fold_result", "_maybe_prune"])
@pytest.mark.parametrize("error", [MemoryError, KeyboardInterrupt])
@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("gates", list(GATES))
def test_a_failure_while_a_chunk_is_folded_leaves_no_part_counted(
    K, monkeypatch, fold, where, error, n_threads, gates
):
    """Out of memory (or interrupted) while the blocks of a chunk are folded (at the third block, or at the only
    one, after the block is added to the summary or after a prune): the error comes through, the sketch is as it
    was before the chunk (its pending rows too, and with gates the frame and the weights of the rows held), and
    feeding the chunk again gives the state of a stream fed once."""
    fed, end, failing_call = FOLDS[fold]
    ls.set_num_threads(n_threads)
    g = gates_for(gates, K.shape[0])
    sk = feed_gated(K[:fed], None if g is None else g[:fed], [])
    before = sk.to_bytes()
    real = getattr(sketch_module, where)
    calls = {"n": 0}

    def fails(*args):  # after its work: the summary holds the block, or the candidates are pruned
        calls["n"] += 1
        out = real(*args)
        if calls["n"] == failing_call:
            raise error("simulated")
        return out

    monkeypatch.setattr(sketch_module, where, fails)
    with pytest.raises(error, match="simulated"):
        sk.update_many(K[fed:end], gates=None if g is None else g[fed:end])
    monkeypatch.setattr(sketch_module, where, real)
    assert calls["n"] == failing_call
    assert sk.to_bytes() == before
    sk.update_many(K[fed:end], gates=None if g is None else g[fed:end])
    sk.update_many(K[end:], gates=None if g is None else g[end:])
    assert sk.to_bytes() == feed_gated(K, g, [fed, end]).to_bytes()


@pytest.mark.parametrize("values", [False, True])
def test_a_gated_row_that_fails_to_be_stored_leaves_the_frame_as_it_was(monkeypatch, values):
    """``update(x, gate=g)`` (and the decode step, ``prefill`` of one row) out of memory when the store makes room
    for the row (or stages it with the block it completes), after the row was weighed in the next frame: the sketch is as it was, frame and rebased rows
    included (strong gates: several of the rows rebase the state), and feeding the row again gives the stream
    fed once.  The store is made to look full, so that the key-only step's fast path (which grows the store only
    when it is full) fails too."""
    d, dv = 5, 2
    rng = np.random.default_rng(8)
    X, Vs = heavy_tailed_keys(300, d, seed=8), rng.standard_normal((300, dv))
    Q = rng.standard_normal((300, d))
    g = rng.uniform(1e-3, 0.5, 300)
    kw = dict(eps=0.05, block_rows=64) | (dict(value_dim=dv, exact_output=True) if values else {})
    sk, once = ls.KeySketch(d, **kw), ls.KeySketch(d, **kw)
    real_room, real_stage = RowStore.room_for_row, RowStore.stage
    real_reserve, real_capacity = RowStore.reserve, RowStore.capacity
    real_rebase = sketch_module.KeySketch._rebase
    rebases = {"n": 0}

    def no_room(self, *args):
        raise MemoryError("simulated")

    def counted_rebase(self, shift):
        rebases["n"] += 1
        return real_rebase(self, shift)

    monkeypatch.setattr(sketch_module.KeySketch, "_rebase", counted_rebase)
    for t in range(X.shape[0]):
        v = Vs[t] if values else None
        before = sk.to_bytes()
        monkeypatch.setattr(RowStore, "room_for_row", no_room)
        monkeypatch.setattr(RowStore, "stage", no_room)  # (a row that completes a block is staged with it)
        monkeypatch.setattr(RowStore, "reserve", no_room)
        monkeypatch.setattr(RowStore, "capacity", property(lambda store: store.n))
        with pytest.raises(MemoryError, match="simulated"):
            if values and t % 2:
                sk.prefill(X[t][None], Vs[t][None], Q[t][None], gates=[g[t]])
            else:
                sk.update(X[t], v, gate=g[t])
        monkeypatch.setattr(RowStore, "room_for_row", real_room)
        monkeypatch.setattr(RowStore, "stage", real_stage)
        monkeypatch.setattr(RowStore, "reserve", real_reserve)
        monkeypatch.setattr(RowStore, "capacity", real_capacity)
        assert sk.to_bytes() == before, t
        sk.update(X[t], v, gate=g[t])
        once.update(X[t], v, gate=g[t])
    assert sk.to_bytes() == once.to_bytes()
    assert rebases["n"] > 10  # the failing rows rebased the state (then undone), and so did the rows fed


@pytest.mark.parametrize("error", [MemoryError, KeyboardInterrupt])
def test_a_gated_prefill_chunk_that_fails_in_a_later_part_leaves_no_part_counted(monkeypatch, error):
    """A gated causal chunk whose gates rebase the state is fed in parts (one per frame): a failure in the second
    part, after it was fed, leaves the sketch as before the chunk, and the chunk fed again gives the stream fed
    once (outputs and entries included)."""
    d, dv, c = 4, 2, 200
    rng = np.random.default_rng(12)
    K, V, Q = heavy_tailed_keys(3 * c, d, seed=12), rng.standard_normal((3 * c, dv)), rng.standard_normal((c, d))
    g = rng.uniform(0.3, 0.6, 3 * c)  # -log g ~ 0.7 per row: the chunk crosses several rebases
    kw = dict(eps=0.05, block_rows=64, value_dim=dv, exact_output=True)
    sk, once = ls.KeySketch(d, **kw), ls.KeySketch(d, **kw)
    for s in (sk, once):
        s.prefill(K[:c], V[:c], Q, gates=g[:c])
    before = sk.to_bytes()
    real = sketch_module.KeySketch._prefill
    calls = {"n": 0}

    def fails_after_the_second(self, *args):
        calls["n"] += 1
        out = real(self, *args)
        if calls["n"] == 2:
            raise error("simulated")
        return out

    monkeypatch.setattr(sketch_module.KeySketch, "_prefill", fails_after_the_second)
    with pytest.raises(error, match="simulated"):
        sk.prefill(K[c : 2 * c], V[c : 2 * c], Q, gates=g[c : 2 * c])
    monkeypatch.setattr(sketch_module.KeySketch, "_prefill", real)
    assert calls["n"] == 2 and sk.to_bytes() == before
    got = sk.prefill(K[c : 2 * c], V[c : 2 * c], Q, gates=g[c : 2 * c])
    want = once.prefill(K[c : 2 * c], V[c : 2 * c], Q, gates=g[c : 2 * c])
    assert sk.to_bytes() == once.to_bytes()
    np.testing.assert_array_equal(got.output, want.output)
    assert got.entries.as_set() == want.entries.as_set()


def fails_at(owner, name: str, nth: int, error: type = MemoryError, after: bool = True):
    """``owner.name`` (a function of a module or class, patched with ``pytest.MonkeyPatch``) replaced by one that
    raises ``error`` at its ``nth`` call, before or after doing its work; returns the call counter."""
    real = getattr(owner, name)
    calls = {"n": 0}

    def patched(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == nth and not after:
            raise error("simulated")
        out = real(*args, **kwargs)
        if calls["n"] == nth and after:
            raise error("simulated")
        return out

    return real, patched, calls


def fail_once(monkeypatch, owner, name: str, nth: int, call, error: type = MemoryError, after: bool = True):
    """Run ``call()`` with ``owner.name`` failing at its ``nth`` call; the error must come through."""
    real, patched, calls = fails_at(owner, name, nth, error, after)
    monkeypatch.setattr(owner, name, patched)
    try:
        with pytest.raises(error, match="simulated"):
            call()
    finally:
        monkeypatch.setattr(owner, name, real)
    assert calls["n"] >= nth


#: Failures the review of the interruption paths found, each as (what the sketch holds, the call that fails, where,
#: which call of it fails, before or after its work): a later wave's Gram blocks; the ids, the rows left for the
#: buffer; a float32 store widened by a float64 chunk; a row that completes a block (its fold, the prune after it);
#: a rebase of the frame; the first prune undone by a copy
INTERRUPTIONS = {
    "later wave": ("f64", "chunk", (sketch_module, "_block_results"), 2, True),
    "ids of the chunk": ("f64", "chunk ids", (sketch_module.KeySketch, "_record_ids"), 1, True),
    "rows left for the buffer": ("f64", "chunk and tail", (RowStore, "append"), 1, True),
    "float32 rows widened": ("f32", "chunk", (sketch_module, "_fold_result"), 1, False),
    "row that completes a block": ("f64", "row value", (sketch_module, "_fold_result"), 1, False),
    "prune after a row's block": ("f64", "row", (GramSummary, "exact_keep"), 1, False),
    "row with a value completing a block": ("f64", "row value", (sketch_module, "_maybe_prune"), 1, True),
    "rebase of a gated chunk": ("f64", "gated chunk", (RowStore, "scale_keys"), 1, False),
    "ids of a chunk for the buffer alone": ("f64", "small chunk ids", (sketch_module.KeySketch, "_record_ids"), 1, True),
    "float32 rows widened by a chunk for the buffer": ("f32", "small chunk", (RowStore, "_unshare"), 1, False),
}


@pytest.mark.parametrize("case", list(INTERRUPTIONS))
def test_an_interruption_anywhere_in_a_feed_leaves_it_uncounted(monkeypatch, case):
    """Each way of feeding, interrupted where the review found the state left half-changed: the sketch is as it
    was (bytes, float32 storage included), and feeding the same input again gives the stream fed once."""
    held, call, (owner, name), nth, after = INTERRUPTIONS[case]
    d, B, eps = 5, 64, 0.002
    rng = np.random.default_rng(4)
    X = heavy_tailed_keys(12 * B, d, seed=3)
    V, g = rng.standard_normal((X.shape[0], 2)), rng.uniform(0.5, 0.9, X.shape[0])
    kw = dict(eps=eps, block_rows=B) | (dict(value_dim=2) if "value" in call else {})
    first = 5 * B - 1 if call.startswith("row") else 2 * B + 30
    dtype = np.float32 if held == "f32" else np.float64

    def feed_to(sk, stop):
        if call.startswith("row"):
            for t in range(sk.n, stop):
                sk.update(X[t], V[t] if "value" in call else None)
        else:
            sk.update_many(X[sk.n : stop].astype(dtype), gates=g[sk.n : stop] if "gated" in call else None)

    sk, once = ls.KeySketch(d, **kw), ls.KeySketch(d, **kw)
    feed_to(sk, first), feed_to(once, first)
    before = sk.to_bytes()
    # (a chunk with a tail alone completes the pending block and leaves 7 rows: the first append is theirs; a small
    # chunk joins the buffer and folds nothing)
    end = first + 1 if call.startswith("row") else (3 if "tail" in call else 9) * B + 7
    if call.startswith("small"):
        end = first + 20

    def feed_rest(s):
        if call.startswith("row"):
            s.update(X[first], V[first] if "value" in call else None)
        elif call.endswith("chunk ids"):
            s.update_many(X[first:end], ids=np.arange(first, end) * 3 + 1000)
        else:
            s.update_many(X[first:end], gates=g[first:end] if "gated" in call else None)

    fail_once(monkeypatch, owner, name, nth, lambda: feed_rest(sk), after=after)
    assert sk.to_bytes() == before
    feed_rest(sk), feed_rest(once)
    assert sk.to_bytes() == once.to_bytes()


def test_an_interrupted_refresh_of_the_live_cache_leaves_the_row_uncounted(monkeypatch):
    """Rows with values, a query after each (the live cache takes every row): a refresh of the cache made due by a
    row runs before the next row changes anything, so an interruption there leaves that row uncounted and the
    sketch as it was; fed again, the stream is the one fed once."""
    d, dv, B, P = 8, 2, 4096, 20
    rng = np.random.default_rng(0)
    X = rng.standard_normal((3000, d)) * (1 + rng.pareto(2.0, (3000, 1)))
    V, Q = rng.standard_normal((3000, dv)), rng.standard_normal((1, d))

    def make():
        return ls.KeySketch(d, eps=0.05, block_rows=B, value_dim=dv).update_many(X[:P], V[:P]).flush()

    sk, once = make(), make()
    real, patched, calls = fails_at(sketch_module._LiveRows, "refresh", 1, KeyboardInterrupt, after=False)
    interrupted = []
    for t in range(P, X.shape[0]):
        sk.heavy_entries(Q), once.heavy_entries(Q)
        once.update(X[t], V[t])
        if not interrupted:
            before = sk.to_bytes()
            monkeypatch.setattr(sketch_module._LiveRows, "refresh", patched)
            try:
                sk.update(X[t], V[t])
            except KeyboardInterrupt:
                interrupted.append(t)
                assert sk.to_bytes() == before
            finally:
                monkeypatch.setattr(sketch_module._LiveRows, "refresh", real)
            if not interrupted:
                continue
        sk.update(X[t], V[t])
    assert interrupted and sk.to_bytes() == once.to_bytes()
    want = ls.testing.heavy_entries_dense(Q, X, eps=0.05, p=2)
    assert sk.heavy_entries(Q).as_set() == want.as_set()


@pytest.mark.parametrize("how", ["update", "update_many"])
def test_an_interruption_as_the_frame_moves_leaves_it_unmoved(monkeypatch, how):
    """A gated row or chunk interrupted right as the frame has moved (before the caller holds what moves it back):
    the sketch is as it was, and feeding again gives the stream fed once.  (A key-only gated row takes the fast
    path of the live step when it can, which sets the frame as the last step of storing the row and has no such
    window: here it is refused, so that the row takes the general path, as a row with a value or a rebase does.)"""
    d, B = 5, 64
    rng = np.random.default_rng(2)
    X, g = heavy_tailed_keys(300, d, seed=2), rng.uniform(0.9, 0.99, 300)
    sk, once = (ls.KeySketch(d, eps=0.05, block_rows=B).update_many(X[:100], gates=g[:100]) for _ in range(2))
    real_append = sketch_module.KeySketch._append_next_rows
    monkeypatch.setattr(
        sketch_module.KeySketch,
        "_append_next_rows",
        lambda self, X, m, frame=None: frame is None and real_append(self, X, m),
    )
    before = sk.to_bytes()
    feed = (lambda s: s.update(X[100], gate=g[100])) if how == "update" else (
        lambda s: s.update_many(X[100:110], gates=g[100:110]))
    fail_once(monkeypatch, sketch_module.KeySketch, "_move_frame", 1, lambda: feed(sk), KeyboardInterrupt)
    assert sk.to_bytes() == before
    feed(sk), feed(once)
    assert sk.to_bytes() == once.to_bytes()


def test_a_flush_interrupted_as_the_rows_kept_move_down_loses_none(monkeypatch):
    """``flush`` interrupted right after the input buffer's kept rows were moved down over the others: the rows are
    as they were, and a flush afterwards equals one never interrupted."""
    d, B = 5, 64
    X = heavy_tailed_keys(9 * B + 20, d, seed=7)
    sk, ref = (ls.KeySketch(d, eps=0.05, block_rows=B).update_many(X) for _ in range(2))
    before = sk.to_bytes()
    fail_once(monkeypatch, RowStore, "keep_from", 1, sk.flush, KeyboardInterrupt)
    assert sk.to_bytes() == before
    assert sk.flush().to_bytes() == ref.flush().to_bytes()


@pytest.mark.parametrize("block", [256, 48])
def test_a_multi_head_hand_over_that_fails_at_a_later_head_feeds_no_head_twice(block, monkeypatch):
    """The buffered tokens of a ``MultiHeadKeySketch`` reach its heads one after another; out of memory at the second
    head (its store cannot grow), the first head holds them and the buffer keeps them.  The next hand-over skips the
    heads that took them: the sketch then equals the stream fed once (tokens that only wait in the heads' input
    buffers, ``block=256``, and tokens that complete a block, ``block=48``)."""
    H, d = 3, 4
    rng = np.random.default_rng(0)
    X0, T = rng.standard_normal((H, 40, d)), rng.standard_normal((10, H, d))

    def build():
        mh = ls.MultiHeadKeySketch(H, d, eps=0.05, block_rows=block)
        mh.update_many(X0)
        for t in T:
            mh.update(t)  # buffered
        return mh

    mh, once = build(), build()
    real = RowStore.reserve
    second, grown = mh._heads[1]._store, {"n": 0}

    def no_room_at_the_second(self, *args, **kwargs):
        if self is second:
            grown["n"] += 1
            raise MemoryError("simulated")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(RowStore, "reserve", no_room_at_the_second)
    with pytest.raises(MemoryError, match="simulated"):
        mh.flush()
    monkeypatch.setattr(RowStore, "reserve", real)
    assert grown["n"] >= 1 and mh._heads[0].n == 50 and mh._heads[1].n == 40  # the first head took them
    assert mh.to_bytes() == once.to_bytes()
    Q = rng.standard_normal((H, 2, d))
    for got, want in zip(mh.heavy_entries(Q), once.heavy_entries(Q)):
        np.testing.assert_array_equal(got.key_ids, want.key_ids)


def test_a_multi_head_merge_keeps_the_head_objects():
    """After ``MultiHeadKeySketch.merge`` a head taken from ``heads`` before it is still the sketch's head."""
    K = np.stack([heavy_tailed_keys(200, 4, seed=s) for s in (1, 2)])
    a = ls.MultiHeadKeySketch(2, 4, eps=0.05).update_many(K[:, :100])
    b = ls.MultiHeadKeySketch(2, 4, eps=0.05).update_many(K[:, 100:], offset=100)
    held = a.heads[0]
    a.merge(b)
    assert a.heads[0] is held and held.n == 200


def test_an_interrupted_flush_or_extend_leaves_a_whole_sketch():
    """``flush`` interrupted after its prune (at the trim that follows), and ``extend`` interrupted after its first
    item ran the sketch's first prune: a flush after the one, the sketch after the other, are as if uninterrupted."""
    X = heavy_tailed_keys(40 * 64, 8, seed=3)
    mp = pytest.MonkeyPatch()
    sk, ref = (ls.KeySketch(8, eps=0.002, block_rows=64).update_many(X[:596]) for _ in range(2))
    fail_once(mp, RowStore, "trim", 1, sk.flush, KeyboardInterrupt, after=False)
    assert sk.flush().to_bytes() == ref.flush().to_bytes()
    sk = ls.KeySketch(8, eps=0.002, block_rows=64).update_many(X[:100])
    before = sk.to_bytes()
    fail_once(mp, sketch_module.KeySketch, "_ingest", 2,
              lambda: sk.extend([X[100 : 12 * 64], X[12 * 64 : 13 * 64]]), KeyboardInterrupt, after=False)
    assert sk.to_bytes() == before


@pytest.mark.parametrize("after", [False, True])
def test_a_query_that_fails_while_it_builds_the_live_cache_leaves_no_half_cache(monkeypatch, after):
    """A query out of memory while the live cache copies the candidates: the next query answers as brute force
    (a half-built cache would miss candidates, or fail)."""
    d, B = 5, 64
    X = heavy_tailed_keys(10 * B + 20, d, seed=3)
    Q = heavy_tailed_keys(4, d, seed=9)
    sk = ls.KeySketch(d, eps=0.05, block_rows=B, value_dim=2)
    sk.update_many(X, np.ones((X.shape[0], 2)))  # candidates held, 20 rows pending
    sk._live = None  # as after a fold: the next query builds the cache
    fail_once(monkeypatch, RowStore, "append", 1, lambda: sk.heavy_entries(Q), after=after)
    want = ls.testing.heavy_entries_dense(Q, X, eps=0.05, p=2)
    assert sk.heavy_entries(Q).as_set() == want.as_set()


@pytest.mark.parametrize("decay", [None, 0.97])
@pytest.mark.parametrize("error", [MemoryError, KeyboardInterrupt])
def test_a_merge_that_fails_leaves_the_sketch_as_it_was(monkeypatch, decay, error):
    """``merge`` out of memory (or interrupted) after the summaries were merged, as the rows are taken: the sketch is
    as it was, and merging again gives the merge that never failed (a decaying stream's earlier part decayed once)."""
    d, B = 5, 64
    X = heavy_tailed_keys(20 * B, d, seed=5)
    kw = dict(eps=0.05, block_rows=B) | ({} if decay is None else dict(decay=decay))
    a = ls.KeySketch(d, **kw).update_many(X[:600])
    b = ls.KeySketch(d, **kw).update_many(X[600:], offset=600)
    before = a.to_bytes()
    fail_once(monkeypatch, RowStore, "extend", 1, lambda: a.merge(b), error)
    assert a.to_bytes() == before
    assert a.merge(b).to_bytes() == ls.KeySketch.from_bytes(before).merge(b).to_bytes()


def test_a_multi_head_merge_that_fails_at_a_later_head_changes_no_head(monkeypatch):
    """A ``MultiHeadKeySketch`` merge that fails at its second head: no head has changed, and merging again gives
    the merge that never failed."""
    H, d, B = 3, 5, 64
    K = np.stack([heavy_tailed_keys(12 * B, d, seed=20 + h) for h in range(H)])
    a = ls.MultiHeadKeySketch(H, d, eps=0.05, block_rows=B).update_many(K[:, :500])
    b = ls.MultiHeadKeySketch(H, d, eps=0.05, block_rows=B).update_many(K[:, 500:], offset=500)
    before = a.to_bytes()
    fail_once(monkeypatch, RowStore, "extend", 2, lambda: a.merge(b), KeyboardInterrupt)
    assert a.to_bytes() == before
    assert a.merge(b).to_bytes() == ls.MultiHeadKeySketch.from_bytes(before).merge(b).to_bytes()


@pytest.mark.parametrize("pending_from", [0, 5, 12])
@pytest.mark.parametrize("prune", ["in place", "none"])
@pytest.mark.parametrize("grow", [False, True])
def test_row_store_snapshot_restores_rows_overwritten_in_place(pending_from, prune, grow):
    """What a fold does to the store after a snapshot whose tail is the pending rows: the pending rows compacted
    in place to the few kept, rows of later blocks appended over the rest, every row sorted and scaled, the
    candidates pruned (rewritten), the arrays grown; :meth:`restore` gives back every row, id and value row as they were."""
    rng = np.random.default_rng(pending_from)
    s = RowStore(3, value_dim=2)
    s.append(rng.standard_normal((12, 3)), np.arange(12) * 2, rng.standard_normal((12, 2)), increasing=True)
    s.reserve(40)  # room: the writes below happen in place unless ``grow``
    want = (s.ids_view().copy(), s.keys_view().copy(), s.values_view().copy(), s.ids_sorted)
    state = s.snapshot()
    mask = np.zeros(12 - pending_from, dtype=bool)
    mask[::3] = True
    s.keep_from(pending_from, mask)  # the pending rows: the few kept move down
    s.append(np.full((2, 3), 7.0), np.array([100, 99]), np.ones((2, 2)))  # ids out of order
    if grow:
        s.reserve(4 * s.capacity)
    s.append(np.full((3, 3), 8.0), np.array([101, 102, 103]), np.zeros((3, 2)), increasing=True)
    s.sort_by_id()  # every row rewritten
    s.scale_keys(0.5)
    if prune == "in place":
        s.keep_from(0, np.arange(s.n) % 2 == 0)
    s.stage(np.full((4, 3), 9.0))  # written and never committed
    s.restore(state)
    assert s.n == 12 and s.ids_sorted == want[3]
    np.testing.assert_array_equal(s.ids_view(), want[0])
    np.testing.assert_array_equal(s.keys_view(), want[1])
    np.testing.assert_array_equal(s.values_view(), want[2])
    assert s._saved is None


@pytest.mark.parametrize("view_held", [False, True])
def test_row_store_grows_in_place_under_a_snapshot_unless_its_arrays_are_referenced(view_held):
    """A growth after a snapshot (a fold appending the rows it keeps) extends the arrays in place when nothing else
    references them: no copy of the rows held (the same array objects, the rows where they were).  With a view of
    the keys alive it moves the store to new arrays and leaves the snapshot's as they were.  Either way rows
    overwritten after the growth are saved, and :meth:`restore` gives back every row, id and value row."""
    rng = np.random.default_rng(5)
    s = RowStore(3, value_dim=2)
    s.append(rng.standard_normal((10, 3)), np.arange(10), rng.standard_normal((10, 2)), increasing=True)
    want = (s.ids_view().copy(), s.keys_view().copy(), s.values_view().copy())
    arrays = [id(s.ids), id(s.keys), id(s.values)]  # (no reference: one would stop NumPy resizing in place)
    state = s.snapshot()
    view = s.keys[:4] if view_held else None
    s.append(rng.standard_normal((50, 3)), np.arange(10, 60), rng.standard_normal((50, 2)))  # grows
    assert s.capacity >= 60
    # (a moved array's old object is alive, held by the snapshot: its id is not reused)
    moved = [id(a) != b for a, b in zip((s.ids, s.keys, s.values), arrays)]
    assert moved == [view_held] * 3
    if view_held:
        np.testing.assert_array_equal(view, want[1][:4])  # the snapshot's arrays untouched
    s.keep_from(2, np.arange(58) % 5 == 0)  # rows of the snapshot overwritten in place after the growth
    s.restore(state)
    assert s.n == 10 and s._saved is None
    np.testing.assert_array_equal(s.ids_view(), want[0])
    np.testing.assert_array_equal(s.keys_view(), want[1])
    np.testing.assert_array_equal(s.values_view(), want[2])


@pytest.mark.parametrize("start", [0, 3])
def test_row_store_prune_under_a_snapshot_moves_the_rows_kept_instead_of_saving_them(start):
    """A prune under a snapshot (``keep_from`` keeping at least as many rows as it leaves before ``start``) gathers
    the rows kept into new arrays: none is saved row by row, the snapshot's arrays are left as they were, a trim
    after it resizes the new arrays in place, and :meth:`restore` gives back every row."""
    rng = np.random.default_rng(9)
    s = RowStore(3, value_dim=2)
    s.append(rng.standard_normal((40, 3)), np.arange(40), rng.standard_normal((40, 2)), increasing=True)
    want = (s.ids_view().copy(), s.keys_view().copy(), s.values_view().copy())
    state = s.snapshot()
    mask = np.arange(40 - start) % 3 != 1
    kept = np.concatenate([np.arange(start), start + np.flatnonzero(mask)])
    s.keep_from(start, mask)
    assert s._saved.pieces == [] and s._saved.arrays is not None and not s._snapshot_held()
    np.testing.assert_array_equal(s._saved.arrays[0][:40], want[0])  # the snapshot's arrays untouched
    np.testing.assert_array_equal(s.ids_view(), want[0][kept])
    np.testing.assert_array_equal(s.keys_view(), want[1][kept])
    np.testing.assert_array_equal(s.values_view(), want[2][kept])
    s.trim()
    s.restore(state)
    np.testing.assert_array_equal(s.ids_view(), want[0])
    np.testing.assert_array_equal(s.keys_view(), want[1])
    np.testing.assert_array_equal(s.values_view(), want[2])


@pytest.mark.parametrize("failure", ["new arrays", "interruption in the in-place growth"])
def test_row_store_growth_that_fails_under_a_snapshot_changes_nothing(monkeypatch, failure):
    """A growth under a snapshot that fails (no memory for the new arrays it must move to, a view being alive; or
    an interruption right as an array is taken aside for NumPy's in-place resize) leaves the store as it was: its
    arrays in place, still the snapshot's (rows overwritten later are saved), and :meth:`restore` gives back every
    row (the review of the in-place growth found both)."""
    import builtins

    import levstream._store as store_module

    s = RowStore(2, value_dim=1)
    s.append(np.arange(20.0).reshape(10, 2), np.arange(10), np.arange(10.0)[:, None], increasing=True)
    want = (s.ids_view().copy(), s.keys_view().copy(), s.values_view().copy())
    state = s.snapshot()
    if failure == "new arrays":
        view = s.keys[:1]  # a view alive: the growth cannot be made in place, the store must move
        calls = {"n": 0}

        def empty(shape, dtype=float, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 3:  # the last of the three arrays
                raise MemoryError("simulated")
            return np.empty(shape, dtype, *args, **kwargs)

        monkeypatch.setattr(store_module, "np", numpy_with_empty(empty))
        with pytest.raises(MemoryError, match="simulated"):
            s.reserve(100)
        monkeypatch.undo()
        assert view.base is s.keys
    else:
        real_setattr = builtins.setattr

        def interrupted(obj, name, value):
            real_setattr(obj, name, value)
            if obj is s and value is None:
                raise KeyboardInterrupt("simulated")

        monkeypatch.setattr(store_module, "setattr", interrupted, raising=False)
        with pytest.raises(KeyboardInterrupt, match="simulated"):
            s.reserve(100)
        monkeypatch.undo()
    assert s.keys is not None and s.values is not None and s.ids is not None and s._snapshot_held()
    s.keep_from(0, np.arange(10) % 2 == 1)  # rows of the snapshot overwritten in place: saved first
    s.restore(state)
    np.testing.assert_array_equal(s.ids_view(), want[0])
    np.testing.assert_array_equal(s.keys_view(), want[1])
    np.testing.assert_array_equal(s.values_view(), want[2])


@pytest.mark.parametrize("rewrite", ["sort_by_id", "scale_keys", "keep_from"])
def test_row_store_snapshot_survives_a_rewrite_of_every_row(rewrite):
    """Right after a snapshot, every row rewritten (sorted, scaled: the store takes arrays of its own, the room
    unchanged) or some rows compacted in place (saved first), then rows compacted again (some saved already, some
    not): :meth:`restore` gives back the rows as they were."""
    s = RowStore(2)
    s.append(np.arange(12.0).reshape(6, 2), np.array([5, 1, 4, 0, 3, 2]))
    want = (s.ids_view().copy(), s.keys_view().copy())
    state = s.snapshot()
    args = {"sort_by_id": (), "scale_keys": (0.5,), "keep_from": (0, np.array([0, 1, 0, 1, 1, 0], bool))}
    getattr(s, rewrite)(*args[rewrite])
    s.keep_from(1, np.array([1, 0, 1, 0, 1], bool)[: s.n - 1])  # rows saved before, and rows not yet
    s.restore(state)
    np.testing.assert_array_equal(s.ids_view(), want[0])
    np.testing.assert_array_equal(s.keys_view(), want[1])


def test_an_input_buffer_filled_row_by_row_is_allocated_in_one_step_once_half_full():
    """Rows fed one at a time (or a few per call) wait in the store until a block is full.  A growth that would
    take the store past half the rows it holds once the block is full takes it all the way in one allocation
    (no sizes in between, where geometric growth would stop once or twice), and the room stays for the blocks
    after; the store never holds more than half again that room (geometric growth)."""
    d, block = 64, 8192
    X = heavy_tailed_keys(3 * block + 100, d, seed=9)
    sk = ls.KeySketch(d, eps=0.01, block_rows=block)
    growths = []  # (capacity after a growth, rows held once the buffer is full)
    capacity = sk._store.capacity
    for i in range(0, X.shape[0], 3):
        if i % 2:
            sk.update_many(X[i : i + 3])
        else:
            for x in X[i : i + 3]:
                sk.update(x)
        if sk._store.capacity != capacity:
            capacity = sk._store.capacity
            growths.append((capacity, sk._buffer_end()))
        assert capacity <= 1.5 * max(sk._buffer_end(), sk._store.n)
    assert not [(c, end) for c, end in growths if end / 2 <= c < end], growths
    assert growths[-1][0] >= block, growths


@pytest.mark.parametrize("rows", [5, BLOCK - 3, BLOCK + 9])
def test_a_refused_float64_chunk_leaves_a_float32_sketch_as_it_was(rows):
    """A float32 sketch would hold its rows as float64 once a float64 row joins them; a float64 chunk refused for a
    nan (in a row that would wait in the buffer, complete a block or start one) changes nothing, not even the
    type the rows are held in."""
    K = heavy_tailed_keys(BLOCK + 100, 16, seed=13).astype(np.float32)
    sk = ls.KeySketch(16, eps=EPS, block_rows=BLOCK)
    sk.update_many(K[: BLOCK // 2 + 7])
    before = sk.to_bytes()
    bad = heavy_tailed_keys(rows, 16, seed=14)
    bad[rows - 1, 3] = np.nan
    with pytest.raises(ValueError, match="nan|finite"):
        sk.update_many(bad)
    assert sk.to_bytes() == before
    assert sk._store.keys.dtype == np.float32


def test_aligned_chunk_is_not_copied():
    """Folding a chunk of whole blocks allocates far less than the chunk (no copy of it, no pass that
    materialises a mask or a temporary of its size; the ids of its rows, 8 bytes a row, are made once)."""
    X = heavy_tailed_keys(24 * BLOCK, 32, seed=4)
    sk = ls.KeySketch(X.shape[1], eps=EPS, block_rows=BLOCK)
    sk.update_many(X[:BLOCK])
    tracemalloc.start()
    try:
        sk.update_many(X[BLOCK:])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < X.nbytes / 8, (peak, X.nbytes)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_candidates_stay_few_and_nbytes_is_what_is_held(dtype):
    """Candidates are pruned once they double (so live queries scan few rows); after flush() nbytes equals
    the bytes the sketch really holds, measured independently with tracemalloc (float32 keys are held as
    float32)."""
    d, eps = 48, 0.01
    chunks = [heavy_tailed_keys(BLOCK, d, seed=100 + i).astype(dtype) for i in range(40)]
    ls.KeySketch(d, eps=eps, block_rows=BLOCK).update_many(chunks[0]).flush()  # caches outside the sketch
    gc.collect()
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        sk = ls.KeySketch(d, eps=eps, block_rows=BLOCK)
        for chunk in chunks:
            sk.update_many(chunk)
            assert sk.num_retained <= max(2 * sk._pruned_rows, sketch_module._PRUNE_MIN_ROWS)
        sk.flush()
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - start
    finally:
        tracemalloc.stop()
    assert sk.num_retained < sk.capacity / 4
    assert sk._store.keys.dtype == dtype
    # Python objects (the sketch, its summary, store, id ranges) come on top of the arrays nbytes counts, and
    # so do the ingest threads' own objects and scratch, which earlier tests may have left at any size: measured
    # 29.6 kB above nbytes in a full clean-clone run, under 16 kB alone.  One byte per key fed would be 164 kB.
    assert sk.nbytes <= held <= sk.nbytes * (1.0 + NBYTES_TRACED_RTOL) + 49_152, (sk.nbytes, held)
