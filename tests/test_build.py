"""The embedded parallel build ``levstream.build_sketch`` (thread pool, shared merge tree; issue #5).

References: a single stream over the same keys (``KeySketch.update_many`` on the whole matrix) and the
brute-force twins in ``naive.py`` (SVD leverage scores, dense attention).
"""

from __future__ import annotations

import os
from itertools import pairwise

import numba
import numpy as np
import pytest

import levstream as ls
import levstream._tree as tree
from levstream._threads import blas_threads
import levstream.build as build
from levstream._npyrows import NpyRows
from conftest import (
    BOUND_RTOL,
    CORESET_DELTA,
    TIE_RTOL,
    VALUE_RTOL,
    assert_heavy_matches_dense,
    assert_matches_offline,
    assert_no_ties,
    heavy_tailed_keys,
)
from naive import dense_attention, dense_heavy, leverage_svd

EPS = 0.02
N_JOBS = (1, 2, 3)
DV = 3

#: attend(Q).output against the dense output, relative to each row's scale max_c sum_j A_j |v_jc|
#: (the contract's 1e-10, as in test_contract.py).  Belongs next to VALUE_RTOL in conftest.py.
OUTPUT_RTOL = 1e-10


@pytest.fixture(scope="module")
def K() -> np.ndarray:
    keys = heavy_tailed_keys(12_000, 8, seed=5)
    assert_no_ties(leverage_svd(keys), EPS)
    return keys


@pytest.fixture(scope="module")
def Q() -> np.ndarray:
    return np.random.default_rng(11).standard_normal((30, 8))


def single_stream(K: np.ndarray, offset: int = 0) -> ls.KeySketch:
    return ls.KeySketch(K.shape[1], eps=EPS).update_many(K, offset=offset)


def assert_same_answers(got: ls.KeySketch, want: ls.KeySketch, Q: np.ndarray) -> None:
    """Universal set and heavy entries equal (index sets exactly, values to VALUE_RTOL)."""
    assert got.n == want.n
    Ug, Uw = got.universal_set(), want.universal_set()
    np.testing.assert_array_equal(Ug.ids, Uw.ids)
    np.testing.assert_allclose(Ug.scores, Uw.scores, rtol=VALUE_RTOL)
    hg, hw = got.heavy_entries(Q), want.heavy_entries(Q)
    np.testing.assert_array_equal(hg.indptr, hw.indptr)
    np.testing.assert_array_equal(hg.key_ids, hw.key_ids)
    np.testing.assert_allclose(hg.values, hw.values, rtol=VALUE_RTOL)
    np.testing.assert_allclose(got.normalizer(Q), want.normalizer(Q), rtol=VALUE_RTOL)


def assert_matches_brute_force(sk: ls.KeySketch, K: np.ndarray, Q: np.ndarray, offset: int = 0) -> None:
    tau = leverage_svd(K)
    assert_matches_offline(sk.universal_set().ids - offset, tau, EPS)
    expected = dense_heavy(Q, K, EPS, ids=np.arange(K.shape[0]) + offset)
    assert_heavy_matches_dense(sk.heavy_entries(Q), expected, EPS)


@pytest.fixture(scope="module")
def V() -> np.ndarray:
    """Value rows aligned with ``K``."""
    return np.random.default_rng(12).standard_normal((12_000, DV))


def queries_hitting_every_heavy_key(K: np.ndarray, Q: np.ndarray) -> np.ndarray:
    """``Q`` plus ``q = (K^T K)^-1 k_j`` for every key with leverage score ``tau_j >= eps``: that
    query gives key ``j`` the entry ``tau_j``, so every value row a sketch must keep shows in
    ``heavy_output``."""
    heavy = np.flatnonzero(leverage_svd(K) >= EPS)
    assert heavy.size > 20, "fixture must have heavy keys"
    return np.vstack([Q, np.linalg.solve(K.T @ K, K[heavy].T).T])


def assert_sums_close(got: np.ndarray, A: np.ndarray, V: np.ndarray, rtol: float,
                      what: str) -> None:
    """``got == A @ V`` to ``rtol`` times each row's scale ``max_c (A |V|)_c``."""
    want, scale = A @ V, (A @ np.abs(V)).max(axis=1, keepdims=True)
    err = np.abs(got - want)
    assert np.all(err <= rtol * scale), f"{what}: largest error / scale {(err / scale).max():.3g}"


def assert_attend_matches_dense(sk: ls.KeySketch, K: np.ndarray, V: np.ndarray, Q: np.ndarray,
                                offset: int = 0, exact_output: bool = True) -> None:
    """``attend(Q)`` against dense p = 2 attention over all keys: the heavy entries, their output
    and mass (so every value row of a returned key is checked), and the exact output when kept."""
    r = sk.attend(Q)
    ids = np.arange(K.shape[0]) + offset
    assert_heavy_matches_dense(r.entries, dense_heavy(Q, K, EPS, ids=ids), EPS)
    A = dense_attention(Q, K)
    heavy = np.zeros_like(A)
    rows, cols = r.entries.rows(), r.entries.key_ids - offset
    heavy[rows, cols] = A[rows, cols]
    assert_sums_close(r.heavy_output, heavy, V, VALUE_RTOL, "heavy_output")
    np.testing.assert_allclose(r.captured_mass, heavy.sum(axis=1), rtol=VALUE_RTOL, atol=0.0)
    if exact_output:
        assert_sums_close(r.output, A, V, OUTPUT_RTOL, "output")
    else:
        assert r.output is None


# ------------------------------------------------------------------------------------------ equal answers
@pytest.mark.parametrize("n_jobs", N_JOBS)
def test_array_equals_single_stream(K, Q, n_jobs):
    sk = ls.build_sketch(K, eps=EPS, n_jobs=n_jobs, chunk_rows=1777)
    assert_same_answers(sk, single_stream(K), Q)
    assert_matches_brute_force(sk, K, Q)


@pytest.mark.parametrize("n_jobs", N_JOBS)
def test_npy_path_is_read_in_chunks_and_equals_single_stream(K, Q, n_jobs, tmp_path, monkeypatch):
    path = tmp_path / "keys.npy"
    np.save(path, K.astype(np.float32))
    modes = []
    real_load = np.load

    def spy_load(*args, **kwargs):
        modes.append(kwargs.get("mmap_mode"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(np, "load", spy_load)
    sk = ls.build_sketch(str(path), eps=EPS, n_jobs=n_jobs, chunk_rows=2500)
    assert modes == ["r"]  # the header only: the rows are read by NpyRows, not sliced from the mapping
    assert isinstance(build._as_array_source(str(path)), NpyRows)
    K32 = K.astype(np.float32).astype(np.float64)  # the keys the file holds
    assert_same_answers(sk, single_stream(K32), Q)
    assert_same_answers(ls.build_sketch(path, eps=EPS, n_jobs=n_jobs), single_stream(K32), Q)  # PathLike


@pytest.mark.parametrize("n_jobs", N_JOBS)
@pytest.mark.parametrize("layout", ["fortran", "big-endian", "int16"])
def test_npy_layouts_equal_single_stream(K, Q, n_jobs, layout, tmp_path):
    stored = {"fortran": np.asfortranarray(K), "big-endian": K.astype(">f8"),
              "int16": np.round(K * 1000).astype(np.int16)}[layout]
    np.save(tmp_path / "keys.npy", stored)
    sk = ls.build_sketch(tmp_path / "keys.npy", eps=EPS, n_jobs=n_jobs, chunk_rows=1500)
    assert_same_answers(sk, single_stream(stored.astype(np.float64)), Q)


@pytest.mark.parametrize("n_jobs", N_JOBS)
def test_npy_source_exact_p4_equals_the_array(K, n_jobs, tmp_path):
    """The lifted (p = 4) summary is fed from the reader's reused buffer too."""
    K4 = np.ascontiguousarray(K[:3000, :4])
    np.save(tmp_path / "keys.npy", K4)
    from_file = ls.build_sketch(tmp_path / "keys.npy", eps=0.05, p=4, exact=True, n_jobs=n_jobs, chunk_rows=700)
    from_array = ls.build_sketch(K4, eps=0.05, p=4, exact=True, n_jobs=n_jobs, chunk_rows=700)
    np.testing.assert_array_equal(from_file.universal_set().ids, from_array.universal_set().ids)
    assert from_file.to_bytes() == from_array.to_bytes()


@pytest.mark.parametrize("n_jobs", N_JOBS)
def test_npy_read_failure_in_a_shard_fails_the_build(K, n_jobs, tmp_path, monkeypatch):
    from levstream._npyrows import NpyRows

    np.save(tmp_path / "keys.npy", K)
    real_chunks = NpyRows.chunks

    def failing_chunks(self, ranges, reuse=True):  # the file "ends" after the first chunk of every reader
        for i, rows in enumerate(real_chunks(self, ranges, reuse)):
            if i == 1:
                raise ValueError(f"{self.path}: the file ended at row {list(ranges)[1][0]} (simulated)")
            yield rows

    monkeypatch.setattr(NpyRows, "chunks", failing_chunks)
    with pytest.raises(ValueError, match=r"the file ended at row \d+ \(simulated\)"):
        ls.build_sketch(tmp_path / "keys.npy", eps=EPS, n_jobs=n_jobs, chunk_rows=1000)


def test_npy_file_truncated_during_the_build_is_an_error_not_a_short_sketch(K, tmp_path):
    from levstream.build import _as_array_source

    path = tmp_path / "keys.npy"
    np.save(path, K)
    rows = _as_array_source(str(path))  # header read; the file then shrinks before the rows are read
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 10 * K.shape[1] * 8)
    with pytest.raises(ValueError, match=r"ended at row 11990 while reading rows 5000\.\.11999.*truncated"):
        list(rows.chunks([(0, 5000), (5000, K.shape[0])]))


@pytest.mark.parametrize("n_jobs", N_JOBS)
def test_iterable_equals_single_stream(K, Q, n_jobs):
    cuts = [0, 5, 1000, 1001, 4000, 7777, 12_000]  # uneven chunks, one of a single row
    chunks = (K[a:b] for a, b in zip(cuts[:-1], cuts[1:]))
    sk = ls.build_sketch(chunks, eps=EPS, n_jobs=n_jobs)
    assert_same_answers(sk, single_stream(K), Q)
    assert_matches_brute_force(sk, K, Q)


@pytest.mark.parametrize("n_jobs", N_JOBS)
def test_offset_numbers_keys_from_offset(K, Q, n_jobs):
    sk = ls.build_sketch(K, eps=EPS, n_jobs=n_jobs, chunk_rows=3000, offset=1_000_000)
    assert_same_answers(sk, single_stream(K, offset=1_000_000), Q)
    assert_matches_brute_force(sk, K, Q, offset=1_000_000)


def test_more_jobs_than_chunks_and_empty_chunks(K, Q):
    sk = ls.build_sketch([K[:0], K[:6000], K[6000:6000], K[6000:]], eps=EPS, n_jobs=3)
    assert_same_answers(sk, single_stream(K), Q)
    sk = ls.build_sketch(K, eps=EPS, n_jobs=3, chunk_rows=10 ** 6)  # one chunk, one shard
    assert_same_answers(sk, single_stream(K), Q)


@pytest.mark.parametrize("n_jobs", N_JOBS)
def test_sources_without_rows_give_an_empty_sketch(n_jobs, tmp_path):
    """Empty chunks are no-ops (issue 11): an array, a .npy file or chunks without rows give n = 0."""
    np.save(tmp_path / "empty.npy", np.zeros((0, 4), dtype=np.float32))
    np.save(tmp_path / "empty_f.npy", np.asfortranarray(np.zeros((0, 4))))
    sources = [np.zeros((0, 4)), tmp_path / "empty.npy", tmp_path / "empty_f.npy",
               iter([np.zeros((0, 4))]), [np.zeros((0, 4))] * 3]
    for source in sources:
        sk = ls.build_sketch(source, eps=0.1, n_jobs=n_jobs, offset=5)
        assert sk.is_empty() and (sk.n, sk.dim) == (0, 4)
        assert len(sk.universal_set()) == 0


@pytest.mark.parametrize("n_jobs", N_JOBS)
def test_empty_chunks_anywhere_are_no_ops(K, Q, n_jobs):
    """Empty chunks of the right width, first, inside and last, change no answer and no id."""
    e = K[:0]
    chunks = [e, e, K[:5000], e, K[5000:5001], e, K[5001:], e]
    sk = ls.build_sketch(iter(chunks), eps=EPS, n_jobs=n_jobs)
    assert_same_answers(sk, single_stream(K), Q)
    assert_matches_brute_force(sk, K, Q)
    sk = ls.build_sketch(chunks, eps=EPS, n_jobs=n_jobs, offset=77)  # a list: also an iterable
    assert_same_answers(sk, single_stream(K, offset=77), Q)


@pytest.mark.parametrize("n_jobs", N_JOBS)
def test_an_empty_chunk_of_the_wrong_width_is_an_error(K, n_jobs):
    with pytest.raises(ValueError, match=r"chunk 1 \(rows from 100\) rejected: .*8 columns.*\(0, 7\)"):
        ls.build_sketch([K[:100], np.zeros((0, 7)), K[100:200]], eps=EPS, n_jobs=n_jobs)
    with pytest.raises(ValueError, match=r"chunk 1 \(rows 0\.\.99\) rejected: .*7 columns"):
        ls.build_sketch([np.zeros((0, 7)), K[:100]], eps=EPS, n_jobs=n_jobs)  # the first chunk sets dim


def test_default_n_jobs_and_sketch_options_are_used(K, Q):
    sk = ls.build_sketch(K, eps=EPS, block_rows=512)
    assert_same_answers(sk, single_stream(K), Q)
    # the default is n_jobs = os.cpu_count(): the same shards and merge tree, hence the same bytes
    assert sk.to_bytes() == ls.build_sketch(K, eps=EPS, block_rows=512, n_jobs=os.cpu_count()).to_bytes()
    # block_rows reaches the sketch: one job is one stream with those options, byte for byte
    sequential = ls.KeySketch(K.shape[1], eps=EPS, block_rows=512).update_many(K)
    assert ls.build_sketch(K, eps=EPS, block_rows=512, n_jobs=1).to_bytes() == sequential.to_bytes()
    # the bytes round trip: same bytes again, same answers as a single stream
    restored = ls.KeySketch.from_bytes(sk.to_bytes())
    assert restored.to_bytes() == sk.to_bytes()
    assert_same_answers(restored, single_stream(K), Q)


def test_progress_bar_counts_rows(K, capsys):
    ls.build_sketch(K, eps=EPS, n_jobs=2, chunk_rows=4000, progress=True)
    err = capsys.readouterr().err
    assert "levstream build" in err and "12.0k" in err


# ------------------------------------------------------------------------------------------ values
def value_sources(K: np.ndarray, V: np.ndarray, tmp_path) -> dict:
    """The same keys and values as every kind of source: ``(source, values=)``."""
    np.save(tmp_path / "keys.npy", K)
    np.save(tmp_path / "values.npy", V)
    cuts = [0, 5, 1000, 1001, 4000, 7777, 12_000]  # uneven chunks, one of a single row
    return {"array": (K, V), "npy": (tmp_path / "keys.npy", str(tmp_path / "values.npy")),
            "npy keys, array values": (tmp_path / "keys.npy", V),
            "fortran values": (K, np.asfortranarray(V)),
            "pairs": (((K[a:b], V[a:b]) for a, b in pairwise(cuts)), None)}


@pytest.mark.parametrize("n_jobs", N_JOBS)
@pytest.mark.parametrize("kind", ["array", "npy", "npy keys, array values", "fortran values",
                                  "pairs"])
def test_values_travel_with_keys_into_every_shard(K, V, Q, n_jobs, kind, tmp_path):
    """Values carried: heavy entries, their output and mass, and the exact output (moment states
    summed over the merge tree) equal dense attention over all keys; the keys' answers are a single
    stream's."""
    source, values = value_sources(K, V, tmp_path)[kind]
    sk = ls.build_sketch(source, eps=EPS, n_jobs=n_jobs, chunk_rows=1777, values=values,
                         exact_output=True, offset=10)
    assert (sk.n, sk.value_dim, sk.exact_output) == (K.shape[0], DV, True)
    assert_same_answers(sk, single_stream(K, offset=10), Q)
    assert_attend_matches_dense(sk, K, V, queries_hitting_every_heavy_key(K, Q), offset=10)


@pytest.mark.parametrize("n_jobs", N_JOBS)
def test_values_without_exact_output(K, V, Q, n_jobs):
    sk = ls.build_sketch(K, eps=EPS, n_jobs=n_jobs, chunk_rows=2500, values=V, value_dim=DV)
    assert (sk.value_dim, sk.exact_output) == (DV, False)
    assert_attend_matches_dense(sk, K, V, queries_hitting_every_heavy_key(K, Q), exact_output=False)


@pytest.mark.parametrize("n_jobs", N_JOBS)
def test_exact_output_merges_exactly(K, V, n_jobs):
    """Many small shards merged in a tree of depth 2: the exact output is still dense attention's to
    OUTPUT_RTOL, for random queries and for queries that cancel against most keys."""
    rng = np.random.default_rng(13)
    Q = np.vstack([rng.standard_normal((20, 8)), K[:10], np.linalg.svd(K[:7])[2][-1:]])
    pairs = ((k, v) for k, v in zip(np.array_split(K, 70), np.array_split(V, 70)))
    sk = ls.build_sketch(pairs, eps=EPS, n_jobs=n_jobs, exact_output=True)
    A = dense_attention(Q, K)
    assert_sums_close(sk.attend(Q).output, A, V, OUTPUT_RTOL, "output")


@pytest.mark.parametrize("n_jobs", N_JOBS)
def test_empty_pairs_anywhere_are_no_ops(K, V, Q, n_jobs):
    e, ev = K[:0], V[:0]
    chunks = [(e, ev), (K[:5000], V[:5000]), (e, ev), (K[5000:], V[5000:]), (e, ev)]
    sk = ls.build_sketch(iter(chunks), eps=EPS, n_jobs=n_jobs, exact_output=True)
    assert sk.n == K.shape[0]
    assert_attend_matches_dense(sk, K, V, Q)
    empty = ls.build_sketch([(e, ev)], eps=EPS, n_jobs=n_jobs, exact_output=True)
    assert empty.is_empty() and empty.value_dim == DV
    empty = ls.build_sketch(K[:0], eps=EPS, n_jobs=n_jobs, values=V[:0], exact_output=True)
    assert empty.is_empty() and empty.value_dim == DV and empty.attend(Q).output.shape == (30, DV)


def test_values_with_a_coreset_sketch(V):
    """p = 3: the value row of every returned key is the key's own (``heavy_output`` is the sum of
    the returned values times those rows), and a seed reproduces the build with its values."""
    K3 = heavy_tailed_keys(6000, 6, seed=9)
    V3 = V[:6000]

    def build_p3() -> ls.KeySketch:
        return ls.build_sketch(K3, eps=0.05, p=3, n_jobs=2, chunk_rows=1000, seed=4, values=V3)

    sk = build_p3()
    assert sk.to_bytes() == build_p3().to_bytes()
    top = np.argsort(-leverage_svd(K3))[:10]
    Q = np.vstack([np.random.default_rng(14).standard_normal((10, 6)), K3[top]])
    r = sk.attend(Q)
    assert len(r.entries) > 10
    want = np.zeros((Q.shape[0], DV))
    np.add.at(want, r.entries.rows(), r.entries.values[:, None] * V3[r.entries.key_ids])
    np.testing.assert_allclose(r.heavy_output, want, rtol=VALUE_RTOL, atol=1e-15)
    assert r.output is None


@pytest.mark.parametrize("n_jobs", (1, 2))
def test_bad_values_are_named(K, V, n_jobs):
    pairs = [(K[:100], V[:100]), (K[100:200], V[100:199]), (K[200:300], V[200:300])]
    with pytest.raises(ValueError, match=r"chunk 1 \(rows 100\.\.199\) rejected: values must have "
                                         r"one row of width 3 per key: shape \(100, 3\); got "
                                         r"shape \(99, 3\)"):
        ls.build_sketch(pairs, eps=EPS, n_jobs=n_jobs)
    bad = V.copy()
    bad[7000, 1] = np.inf
    with pytest.raises(ValueError, match=r"chunk 3 \(rows 6000\.\.7999\) rejected: .*V must "
                                         r"contain only finite values"):
        ls.build_sketch(K, eps=EPS, n_jobs=n_jobs, chunk_rows=2000, values=bad)
    with pytest.raises(ValueError, match=r"chunk 1 \(rows 100\.\.199\) rejected: every chunk "
                                         r"must come with its values"):
        ls.build_sketch([(K[:100], V[:100]), K[100:200]], eps=EPS, n_jobs=n_jobs)
    with pytest.raises(ValueError, match=r"chunk 1 \(rows 100\.\.199\) rejected: .*keeps no "
                                         r"values"):
        ls.build_sketch([K[:100], (K[100:200], V[100:200])], eps=EPS, n_jobs=n_jobs)
    with pytest.raises(ValueError, match=r"chunk 1 \(rows from 100\) rejected: .*width 3.*"
                                         r"\(0, 2\)"):
        ls.build_sketch([(K[:100], V[:100]), (K[:0], V[:0, :2])], eps=EPS, n_jobs=n_jobs)
    with pytest.raises(ValueError, match=r"chunk 1 .* rejected: .*\(keys, values\) pair; got a "
                                         r"tuple of 3"):
        ls.build_sketch([(K[:100], V[:100]), (K[100:200], V[100:200], V[100:200])], eps=EPS,
                        n_jobs=n_jobs)


def test_bad_value_arguments(K, V, tmp_path):
    with pytest.raises(ValueError, match=r"values must have one row per key \(12000 rows\); got "
                                         r"shape \(11999, 3\)"):
        ls.build_sketch(K, eps=EPS, values=V[1:])
    with pytest.raises(ValueError, match=r"value_dim must equal the width of the values \(3\); got "
                                         r"value_dim=4"):
        ls.build_sketch(K, eps=EPS, values=V, value_dim=4)
    with pytest.raises(ValueError, match=r"value_dim must equal the width of the values \(3\)"):
        ls.build_sketch([(K, V)], eps=EPS, value_dim=2)
    with pytest.raises(ValueError, match="value_dim=3 needs the value rows: pass values="):
        ls.build_sketch(K, eps=EPS, value_dim=3)
    with pytest.raises(ValueError, match="exact_output=True needs value rows"):
        ls.build_sketch(K, eps=EPS, exact_output=True)
    with pytest.raises(ValueError, match="values= goes with an array or .npy source"):
        ls.build_sketch(iter([K]), eps=EPS, values=V)
    with pytest.raises(TypeError, match="values must be a 2-D array or a path to a .npy file"):
        ls.build_sketch(K, eps=EPS, values=iter([V]))
    with pytest.raises(ValueError, match=r"values must be 2-D"):
        ls.build_sketch(K, eps=EPS, values=V[:, 0])
    with pytest.raises(ValueError, match=r"chunk 0 .* rejected: values must be 2-D"):
        ls.build_sketch([(K, V[:, 0])], eps=EPS)
    np.save(tmp_path / "cube.npy", np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match=r"values '.*cube.npy' rejected: .*2-D"):
        ls.build_sketch(K, eps=EPS, values=tmp_path / "cube.npy")
    with pytest.raises(ValueError, match="exact_output=True is available for p = 2"):
        ls.build_sketch(K, eps=EPS, p=3, values=V, exact_output=True)


# ------------------------------------------------------------------------------------------ bad data
@pytest.mark.parametrize("n_jobs", N_JOBS)
def test_nan_chunk_fails_naming_the_chunk(K, n_jobs, tmp_path):
    bad = K.copy()
    bad[7000, 3] = np.nan
    with pytest.raises(ValueError, match=r"chunk 3 \(rows 6000\.\.7999\) rejected: .*finite"):
        ls.build_sketch(bad, eps=EPS, n_jobs=n_jobs, chunk_rows=2000)
    np.save(tmp_path / "bad.npy", bad)
    with pytest.raises(ValueError, match=r"chunk 3 \(rows 6000\.\.7999\) rejected: .*finite"):
        ls.build_sketch(tmp_path / "bad.npy", eps=EPS, n_jobs=n_jobs, chunk_rows=2000)
    chunks = [bad[i:i + 2500] for i in range(0, 12_000, 2500)]
    with pytest.raises(ValueError, match=r"chunk 2 \(rows 5000\.\.7499\) rejected: .*finite"):
        ls.build_sketch(iter(chunks), eps=EPS, n_jobs=n_jobs)


@pytest.mark.parametrize("n_jobs", (1, 2))
def test_bad_chunks_are_named(K, n_jobs):
    with pytest.raises(ValueError, match=r"chunk 1 \(rows 100\.\.149\) rejected: .*8 columns"):
        ls.build_sketch([K[:100], np.ones((50, 7)), K[150:300]], eps=EPS, n_jobs=n_jobs)
    with pytest.raises(ValueError, match=r"chunk 1 \(rows from 100\) rejected: .*2-D"):
        ls.build_sketch([K[:100], K[100]], eps=EPS, n_jobs=n_jobs)
    with pytest.raises(TypeError, match=r"chunk 1 .* rejected: .*real"):
        ls.build_sketch([K[:100], K[100:200].astype(complex)], eps=EPS, n_jobs=n_jobs)


@pytest.mark.parametrize("n_jobs", (1, 2))
def test_error_in_the_users_generator_propagates(K, n_jobs):
    def chunks():
        yield K[:1000]
        yield K[1000:2000]
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError, match="disk gone"):
        ls.build_sketch(chunks(), eps=EPS, n_jobs=n_jobs)


def test_bad_arguments(K, tmp_path):
    with pytest.raises(ValueError, match="2-D"):
        ls.build_sketch(K.reshape(2, 6000, 8), eps=EPS)
    with pytest.raises(ValueError, match="2-D"):
        ls.build_sketch(K[0], eps=EPS)
    with pytest.raises(ValueError, match="no chunks"):
        ls.build_sketch(iter([]), eps=EPS)
    with pytest.raises(ValueError, match="first chunk|chunk 0 .*2-D"):
        ls.build_sketch([K[0], K[1]], eps=EPS)
    with pytest.raises(TypeError, match="source must be"):
        ls.build_sketch(42, eps=EPS)
    with pytest.raises(ValueError, match="n_jobs must be >= 1"):
        ls.build_sketch(K, eps=EPS, n_jobs=0)
    with pytest.raises(TypeError, match="n_jobs must be an integer"):
        ls.build_sketch(K, eps=EPS, n_jobs=2.0)
    with pytest.raises(ValueError, match="chunk_rows must be >= 1"):
        ls.build_sketch(K, eps=EPS, chunk_rows=0)
    with pytest.raises(ValueError, match="offset must be >= 0"):
        ls.build_sketch(K, eps=EPS, offset=-1)
    with pytest.raises(ValueError, match="eps must satisfy"):
        ls.build_sketch(K, eps=0.0)
    with pytest.raises(ValueError, match="rng= or seed=, not both"):
        ls.build_sketch(K, eps=EPS, rng=1, seed=1)
    np.savez(tmp_path / "keys.npz", K=K)
    with pytest.raises(ValueError, match="npz"):
        ls.build_sketch(tmp_path / "keys.npz", eps=EPS)
    np.save(tmp_path / "cube.npy", np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="2-D"):
        ls.build_sketch(tmp_path / "cube.npy", eps=EPS)
    with pytest.raises(FileNotFoundError):
        ls.build_sketch(tmp_path / "missing.npy", eps=EPS)


# ------------------------------------------------------------------------------------------ threads
@pytest.mark.parametrize("n_jobs", (1, 2, 3))
def test_threads_are_capped_inside_shards_and_restored(K, n_jobs, monkeypatch):
    seen = []
    real_feed = build.feed_chunk

    def spy_feed(*args, **kwargs):
        seen.append((blas_threads(), numba.get_num_threads()))
        return real_feed(*args, **kwargs)

    monkeypatch.setattr(build, "feed_chunk", spy_feed)
    before_blas, before_numba = blas_threads(), numba.get_num_threads()
    ls.build_sketch(K, eps=EPS, n_jobs=n_jobs, chunk_rows=1000)
    assert seen
    if n_jobs == 1:  # a plain stream leaves the thread settings alone
        assert set(seen) == {(before_blas, before_numba)}
    else:
        share = max(1, ls.get_num_threads() // min(n_jobs, ls.get_num_threads()))
        assert {blas for blas, _ in seen} == {share}
        assert {n for _, n in seen} == {min(share, numba.config.NUMBA_NUM_THREADS)}
    assert blas_threads() == before_blas and numba.get_num_threads() == before_numba


# ------------------------------------------------------------------------------------------ shared plan
def test_reduce_tree_groups_consecutive_items_level_by_level():
    calls = []

    def combine(*group):
        calls.append(group)
        return "(" + "".join(group) + ")"

    assert tree.reduce_tree(list("abcdefghij"), combine, split_every=3) == "(((abc)(def)(ghi))j)"
    assert calls[0] == ("a", "b", "c") and len(calls) == 5
    assert tree.reduce_tree(["x"], combine, split_every=8) == "x"
    with pytest.raises(ValueError, match="split_every must be >= 2"):
        tree.reduce_tree(["a", "b"], combine, split_every=1)


def test_merge_group_leaves_inputs_untouched(K, Q):
    parts = [single_stream(K[:5000]), ls.KeySketch(8, eps=EPS).update_many(K[5000:], offset=5000)]
    before = [p.to_bytes() for p in parts]
    assert_same_answers(tree.merge_group(None, *parts, None), single_stream(K), Q)
    assert [p.to_bytes() for p in parts] == before
    assert tree.merge_group(None, None) is None


def test_partition_seeds_are_spawned_children_of_the_users_seed():
    opts = tree.partition_options({"seed": 7, "block_rows": 64}, 3)
    want = np.random.SeedSequence(7).spawn(3)
    assert [o["block_rows"] for o in opts] == [64] * 3
    assert [(o["rng"].entropy, o["rng"].spawn_key) for o in opts] == [(w.entropy, w.spawn_key) for w in want]
    again = tree.partition_options({"rng": 7}, 3)  # reproducible, and rng= is the same as seed=
    draws = [np.random.default_rng(o["rng"]).random() for o in again]
    assert draws == [np.random.default_rng(o["rng"]).random() for o in opts]
    assert len(set(draws)) == 3
    gen = tree.partition_options({"rng": np.random.default_rng(7)}, 3)
    assert [o["rng"].spawn_key for o in gen] == [w.spawn_key for w in want]
    assert tree.root_options({"seed": 7}) == {"rng": 7}


def test_seed_does_not_change_the_exact_p2_build(K, Q):
    """The exact p = 2 mode takes the seed and draws nothing from it: the answers are a single stream's."""
    assert_same_answers(ls.build_sketch(K, eps=EPS, n_jobs=2, seed=3), single_stream(K), Q)


def test_randomised_mode_is_reproducible_for_a_seed_and_partitioning():
    """General p (coreset normaliser): the same seed, n_jobs and chunking give the same sketch, byte
    for byte, and that sketch answers within the coreset guarantee."""
    K = heavy_tailed_keys(8000, 6, seed=9)

    def build_p3(seed, n_jobs=2):
        return ls.build_sketch(K, eps=0.05, p=3, n_jobs=n_jobs, chunk_rows=1000, seed=seed)

    first = build_p3(42)
    assert first.n == K.shape[0]
    assert first.to_bytes() == build_p3(42).to_bytes()
    assert first.to_bytes() != build_p3(43).to_bytes()  # the seed is really used
    three = build_p3(42, n_jobs=3)
    assert three.to_bytes() == build_p3(42, n_jobs=3).to_bytes()
    # reproducible is not enough: both builds keep the coreset guarantee against brute force, for
    # random, key-aligned (q = k_j) and adversarial (q = (K^T K)^-1 k_j) queries
    rng = np.random.default_rng(10)
    some = np.r_[rng.choice(len(K), 20, replace=False), np.argsort(-leverage_svd(K))[:10]]
    Q = np.vstack([rng.standard_normal((30, 6)), K[some], np.linalg.solve(K.T @ K, K[some].T).T])
    B = np.abs(Q @ K.T) ** 3
    A = B / B.sum(axis=1, keepdims=True)  # dense attention, p = 3
    heavy = set(zip(*(x.tolist() for x in np.nonzero(A >= 0.05 * (1 + TIE_RTOL)))))
    assert len(heavy) > 50, "fixture must have heavy entries"
    for sk in (first, three):
        hits = sk.heavy_entries(Q)
        missing = heavy - hits.as_set()
        assert not missing, f"dense entries >= eps missing: {sorted(missing)[:10]}"
        a = A[hits.rows(), hits.key_ids]
        assert (a >= 0.05 * (1 - CORESET_DELTA) ** 2).all(), "a true value below eps (1 - delta)^2"
        assert (hits.lower <= a * (1 + BOUND_RTOL)).all(), "a true value is below its lower bound"
        assert (a <= hits.upper * (1 + BOUND_RTOL)).all(), "a true value is above its upper bound"


def test_new_sketch_gives_a_fresh_generator_per_call(monkeypatch):
    made = []

    class Recorder:
        def __init__(self, dim, **kwargs):
            made.append(kwargs)

    monkeypatch.setattr(tree, "KeySketch", Recorder)
    child = np.random.SeedSequence(5).spawn(1)[0]
    tree.new_sketch(4, 0.1, 2, {"rng": child})
    tree.new_sketch(4, 0.1, 2, {"rng": child})
    first, second = (m["rng"] for m in made)
    assert isinstance(first, np.random.Generator) and first is not second
    assert first.random() == second.random()


def test_threads_take_turns_under_numbas_workqueue_layer(tmp_path):
    """numba's workqueue layer aborts the process on concurrent parallel launches; shards must take turns."""
    import subprocess
    import sys

    script = tmp_path / "workqueue_build.py"
    script.write_text(
        "import numba, numpy as np, levstream as ls\n"
        "rng = np.random.default_rng(0)\n"
        "K = rng.standard_normal((20_000, 4)) * (1 + rng.pareto(2.0, size=(20_000, 1)))\n"
        "opts = dict(eps=0.02, p=4, exact=True, block_rows=500)  # the lifted Gram ingest runs a parallel kernel\n"
        "one = ls.KeySketch(4, **opts).update_many(K).universal_set().ids\n"
        "a = ls.build_sketch(K, n_jobs=2, chunk_rows=500, **opts)\n"
        "b = ls.build_sketch(iter(np.array_split(K, 40)), n_jobs=3, **opts)\n"
        "ok = one.size > 0 and all(np.array_equal(s.universal_set().ids, one) for s in (a, b))\n"
        "print(numba.threading_layer(), ok)\n")
    env = dict(os.environ, NUMBA_THREADING_LAYER="workqueue")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["workqueue", "True"]


def test_build_module_does_not_import_dask():
    import subprocess
    import sys

    code = "import sys, levstream; levstream.build_sketch; print('dask' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ))
    assert out.stdout.strip() == "False"
