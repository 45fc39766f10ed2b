"""Bad input raises a clear ValueError/TypeError naming what was expected and what came, and leaves the sketch
exactly as it was (same bytes, same answers)."""

from __future__ import annotations

import naive
import numpy as np
import pytest
from conftest import answer, assert_matches_offline, heavy_tailed_keys

import levstream as ls

DIM = 8
EPS = 0.02


@pytest.fixture(scope="module")
def K():
    return heavy_tailed_keys(2000, DIM, seed=12)


@pytest.fixture(scope="module")
def Q():
    return np.random.default_rng(13).standard_normal((10, DIM))


@pytest.fixture
def sk(K):
    """A sketch with settled candidates, a partly filled input buffer and ids 0..1099."""
    s = ls.KeySketch(DIM, eps=EPS, block_rows=256).update_many(K[:1000])
    for x in K[1000:1100]:
        s.update(x)
    return s


def assert_rejected(sk, Q, call, exc, match):
    """``call(sk)`` raises ``exc`` matching ``match`` and changes neither the bytes nor the answers of ``sk``."""
    before_bytes = sk.to_bytes()
    before = answer(sk.copy(), Q)
    with pytest.raises(exc, match=match):
        call(sk)
    assert sk.to_bytes() == before_bytes, "rejected call changed the serialized state"
    assert answer(sk, Q) == before, "rejected call changed the answers"


def _with(X, index, value):
    X = np.array(X, dtype=np.float64, copy=True)
    X[index] = value
    return X


# ---------------------------------------------------------------------------------------------- rows and chunks
@pytest.mark.parametrize("call, exc, match", [
    (lambda s, K: s.update(_with(K[0], 3, np.nan)), ValueError, r"x must contain only finite values; found nan at index \(3,\)"),
    (lambda s, K: s.update(_with(K[0], 0, np.inf)), ValueError, "x must contain only finite values; found inf"),
    (lambda s, K: s.update([-np.inf] + [0.0] * (DIM - 1)), ValueError, "found -inf"),
    (lambda s, K: s.update_many(_with(K[:5], (2, 3), np.nan)), ValueError, r"X must contain only finite values; found nan at index \(2, 3\)"),
    (lambda s, K: s.update_many(_with(K[:700], (650, 1), -np.inf)), ValueError, r"found -inf at index \(650, 1\)"),
    (lambda s, K: s.update_many(_with(K[:700], (3, 1), np.inf)), ValueError, r"found inf at index \(3, 1\)"),
    (lambda s, K: s.update(np.ones(DIM + 1)), ValueError, "x must have length 8 .*; got length 9"),
    (lambda s, K: s.update_many(np.ones((3, DIM - 1))), ValueError, r"X must have 8 columns .*; got shape \(3, 7\)"),
    (lambda s, K: s.update_many(np.ones(DIM)), ValueError, r"X must be 2-D with 8 columns; got shape \(8,\)\. Use update\(x\)"),
    (lambda s, K: s.update_many(np.ones((2, 2, DIM))), ValueError, r"must be 2-D .*got shape \(2, 2, 8\)"),
    (lambda s, K: s.update(np.ones((1, DIM))), ValueError, r"x must be 1-D of length 8; got shape \(1, 8\)\. Use update_many"),
    (lambda s, K: s.update(3.0), ValueError, "x must be 1-D of length 8; got shape \\(\\)"),
    (lambda s, K: s.update_many(np.ones((0, DIM + 1))), ValueError, r"X must have 8 columns .*got shape \(0, 9\)"),
    (lambda s, K: s.update_many([]), ValueError, r"must be 2-D .*got shape \(0,\)"),
    (lambda s, K: s.update_many(np.ones((3, DIM), complex)), TypeError, "real floating or integer dtype; got dtype complex128"),
    (lambda s, K: s.update(np.ones(DIM, np.complex64)), TypeError, "got dtype complex64"),
    (lambda s, K: s.update_many(np.ones((3, DIM), object)), TypeError, "X must be a real numeric array; got an object array"),
    (lambda s, K: s.update_many(np.full((3, DIM), "1.0")), TypeError, "got dtype <U3"),
    (lambda s, K: s.update("12345678"), TypeError, "x must be a real numeric array; got str"),
    (lambda s, K: s.update_many(np.ones((3, DIM), bool)), TypeError, "got dtype bool"),
    (lambda s, K: s.update(np.ones(DIM, bool)), TypeError, "got dtype bool"),
    (lambda s, K: s.update_many([[1.0] * DIM, [1.0] * (DIM - 1)]), TypeError, "X must be a real numeric array"),
    (lambda s, K: s.update_many(None), TypeError, "X must be a real numeric array; got an object array|dtype object"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_rows_and_chunks(sk, K, Q, call, exc, match):
    assert_rejected(sk, Q, lambda s: call(s, K), exc, match)


# ---------------------------------------------------------------------------------------------- ids
@pytest.mark.parametrize("kwargs, exc, match", [
    ({"ids": [5000, 5001, 5000]}, ValueError, "ids must be unique; id 5000 appears more than once"),
    ({"ids": [5000, 5001, 7]}, ValueError, "ids clash: id 7 was already fed"),
    ({"ids": [1099, 1100, 1101]}, ValueError, "ids clash: id 1099 was already fed"),  # a buffered row's id
    ({"offset": 1098}, ValueError, r"ids clash: id 1098 was already fed .*1098\.\.1100.*pass offset= or ids="),
    ({"offset": 0}, ValueError, "ids clash: id 0 was already fed"),
    ({"ids": [5000, 5001]}, ValueError, r"ids must be 1-D with one id per row \(3\); got shape \(2,\)"),
    ({"ids": [[5000, 5001, 5002]]}, ValueError, r"one id per row \(3\); got shape \(1, 3\)"),
    ({"ids": [5000.0, 5001.0, 5002.0]}, TypeError, "ids must be an integer array; got dtype float64"),
    ({"ids": [-1, 5001, 5002]}, ValueError, "ids must be non-negative; got minimum -1"),
    ({"ids": np.array([2**63, 1, 2], dtype=np.uint64)}, ValueError, "ids must fit in int64"),
    ({"ids": [5000, 5001, 5002], "offset": 5000}, ValueError, "pass ids= or offset=, not both"),
    ({"offset": -1}, ValueError, "offset must be >= 0; got -1"),
    ({"offset": 1.5}, TypeError, r"offset must be an integer; got 1.5 \(float\)"),
    ({"offset": True}, TypeError, "offset must be an integer; got True"),
    ({"offset": 2**63 - 2}, ValueError, "ids would overflow int64 from offset"),
])
def test_bad_ids(sk, K, Q, kwargs, exc, match):
    assert_rejected(sk, Q, lambda s: s.update_many(K[1500:1503], **kwargs), exc, match)


def test_default_ids_skip_past_explicit_ids_and_offsets_clash_exactly(K, Q):
    """Default ids continue after the largest id seen; an offset= range is refused exactly when it overlaps."""
    s = ls.KeySketch(DIM, eps=EPS).update_many(K[:10])
    s.update_many(K[10:12], ids=[12, 13])
    s.update_many(K[12:14])  # default ids continue after the largest id seen: 14, 15
    assert s.next_id == 16
    s.update_many(K[14:16], ids=[16, 17])
    s2 = ls.KeySketch(DIM, eps=EPS).update_many(K[:3], ids=[0, 2, 4])
    s2.update_many(K[3:4], offset=1)  # id 1 is free
    assert_rejected(s2, Q, lambda t: t.update_many(K[4:6], offset=1), ValueError, "ids clash: id 1")


# ---------------------------------------------------------------------------------------------- merge
def test_merge_with_clashing_ids_is_rejected(sk, K, Q):
    other = ls.KeySketch(DIM, eps=EPS).update_many(K[1099:1200], offset=1099)
    assert_rejected(sk, Q, lambda s: s.merge(other), ValueError,
                    "cannot merge: both sketches contain key id 1099.*pass offset= or ids=")
    light = ls.KeySketch(DIM, eps=EPS).update_many(np.zeros((1, DIM)), ids=[5])
    assert_rejected(sk, Q, lambda s: s.merge(light), ValueError, "both sketches contain key id 5")
    assert_rejected(sk, Q, lambda s: s + other, ValueError, "both sketches contain key id 1099")
    assert_rejected(sk, Q, lambda s: ls.KeySketch.merge_all([s, other]), ValueError, "key id 1099")


@pytest.mark.parametrize("other, exc, match", [
    (lambda: ls.KeySketch(DIM + 1, eps=EPS), ValueError, r"different \(dim, eps, p\): \(8, 0.02, 2.0\) vs \(9, 0.02, 2.0\)"),
    (lambda: ls.KeySketch(DIM, eps=0.03), ValueError, r"\(8, 0.02, 2.0\) vs \(8, 0.03, 2.0\)"),
    (lambda: np.ones((3, DIM)), TypeError, "can only merge a KeySketch; got ndarray instead"),
    (lambda: None, TypeError, "got NoneType instead"),
    (lambda: b"LEVSTRM", TypeError, "got bytes instead"),
])
def test_merge_with_incompatible_objects_is_rejected(sk, Q, other, exc, match):
    o = other()
    assert_rejected(sk, Q, lambda s: s.merge(o), exc, match)


def test_merge_with_different_p_is_rejected(sk, Q):
    other = ls.KeySketch(DIM, eps=EPS, p=4)
    assert_rejected(sk, Q, lambda s: s.merge(other), ValueError, r"\(8, 0.02, 2.0\) vs \(8, 0.02, 4.0\)")


def test_merge_with_itself_is_rejected(sk, Q):
    assert_rejected(sk, Q, lambda s: s.merge(s), ValueError, "cannot merge a sketch with itself")


# ---------------------------------------------------------------------------------------------- extend
@pytest.mark.parametrize("bad, index, exc, match", [
    (np.ones(DIM + 1), 2, ValueError, "x must have length 8"),
    (np.full((3, DIM), np.nan), 2, ValueError, "X must contain only finite values"),
    (np.ones((0, DIM + 1)), 2, ValueError, "X must have 8 columns"),
    (np.ones((1, 1, DIM)), 2, ValueError, r"must be a 1-D row or a 2-D chunk; got shape \(1, 1, 8\)"),
    ("row", 2, TypeError, "item 2 must be a real numeric array"),
    (np.ones(DIM, complex), 2, TypeError, "complex128"),
])
def test_extend_is_all_or_nothing(sk, K, Q, bad, index, exc, match):
    """A bad item in the middle of a generator: the rows before it are rolled back and the error names the item."""
    def items():
        yield K[1500:1600]   # whole chunk (some blocks processed)
        yield K[1600]        # one row
        yield bad
        yield K[1700:1800]

    assert_rejected(sk, Q, lambda s: s.extend(items()), exc,
                    f"extend: item {index} rejected \\(.*{match}.*\\); the sketch was left as before the call")


def test_extend_rolls_back_when_the_generator_itself_fails(sk, K, Q):
    def items():
        yield K[1500:1900]
        raise RuntimeError("source went away")

    assert_rejected(sk, Q, lambda s: s.extend(items()), RuntimeError, "source went away")
    assert_rejected(sk, Q, lambda s: s.extend(5), TypeError, "not iterable")


# ---------------------------------------------------------------------------------------------- parameters
@pytest.mark.parametrize("eps, exc, match", [
    (0, ValueError, "eps must satisfy 1e-300 <= eps <= 1; got 0.0 instead"),
    (-0.1, ValueError, "got -0.1 instead"),
    (1.5, ValueError, "got 1.5 instead"),
    (float("nan"), ValueError, "eps must be finite; got nan"),
    (float("inf"), ValueError, "eps must be finite; got inf"),
    (True, TypeError, r"eps must be a real number; got True \(bool\)"),
    ("0.1", TypeError, r"got '0.1' \(str\)"),
    (None, TypeError, r"got None \(NoneType\)"),
])
def test_bad_eps(eps, exc, match):
    with pytest.raises(exc, match=match):
        ls.KeySketch(DIM, eps=eps)


@pytest.mark.parametrize("p, exc, match", [
    (0, ValueError, "p must satisfy 0.01 <= p <= 32; got 0.0"),
    (-2, ValueError, "p must satisfy 0.01 <= p <= 32; got -2.0"),
    (float("nan"), ValueError, "p must be finite; got nan"),
    (float("inf"), ValueError, "p must be finite; got inf"),
    (True, TypeError, r"p must be a real number; got True \(bool\)"),
    ("2", TypeError, r"got '2' \(str\)"),
])
def test_bad_p(p, exc, match):
    with pytest.raises(exc, match=match):
        ls.KeySketch(DIM, eps=0.1, p=p)


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"dim": 0}, ValueError, "dim must be >= 1; got 0"),
    ({"dim": 8.0}, TypeError, r"dim must be an integer; got 8.0 \(float\)"),
    ({"dim": True}, TypeError, "dim must be an integer; got True"),
    ({"dim": 8, "block_rows": 0}, ValueError, "block_rows must be >= 1; got 0"),
])
def test_bad_constructor_arguments(kwargs, exc, match):
    dim = kwargs.pop("dim")
    with pytest.raises(exc, match=match):
        ls.KeySketch(dim, eps=0.1, **kwargs)


def test_eps_is_keyword_only():
    with pytest.raises(TypeError):
        ls.KeySketch(DIM, 0.1)


# ---------------------------------------------------------------------------------------------- queries
@pytest.mark.parametrize("call, exc, match", [
    (lambda s, Q: s.heavy_entries(Q, eps=0.01), ValueError, r"eps must be >= the sketch's eps \(0.02\); got 0.01"),
    (lambda s, Q: s.heavy_entries(Q, eps=float("nan")), ValueError, "eps must be finite"),
    (lambda s, Q: s.heavy_entries(Q, eps=1.5), ValueError, "1e-300 <= eps <= 1; got 1.5"),
    (lambda s, Q: s.heavy_entries(Q[:, :5]), ValueError, r"Q must have 8 columns .*; got shape \(10, 5\)"),
    (lambda s, Q: s.heavy_entries(Q[0]), ValueError, r"Q must be 2-D with 8 columns; got shape \(8,\)"),
    (lambda s, Q: s.heavy_entries(_with(Q, (1, 1), np.nan)), ValueError, r"Q must contain only finite values; found nan at index \(1, 1\)"),
    (lambda s, Q: s.normalizer(_with(Q, (0, 0), np.inf)), ValueError, "Q must contain only finite values"),
    (lambda s, Q: s.normalizer(Q.astype(complex)), TypeError, "complex128"),
    (lambda s, Q: s.top_k(Q, 0), ValueError, "k must be >= 1; got 0"),
    (lambda s, Q: s.top_k(Q, 2.0), TypeError, r"k must be an integer; got 2.0 \(float\)"),
    (lambda s, Q: s.top_k(Q[:, :3], 2), ValueError, "Q must have 8 columns"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_queries(sk, Q, call, exc, match):
    assert_rejected(sk, Q, lambda s: call(s, Q), exc, match)


# ---------------------------------------------------------------------------------------------- overflow
@pytest.mark.parametrize("feed", ["big chunk", "small chunk", "rows"])
def test_keys_whose_squares_overflow_are_rejected(sk, K, Q, feed):
    """Entries near 1e160 square to inf in float64: refuse them clearly instead of corrupting the summary."""
    huge = K[1500:1900] * 1e160
    if feed == "big chunk":
        call = lambda s: s.update_many(huge)
    elif feed == "small chunk":
        call = lambda s: s.update_many(huge[:3])
    else:
        call = lambda s: s.update(huge[0])
    assert_rejected(sk, Q, call, ValueError, "overflow")


def test_stream_whose_gram_matrix_overflows_stays_exact():
    """Every chunk is representable, but the running Gram matrix of keys near 1e153 overflows float64: the
    summary moves to its R factor (entries ~ sqrt of the Gram's) and the universal set stays exact (scores are
    scale-invariant, so it equals that of the unscaled keys).  Nothing is rejected, nothing half-applied."""
    X = heavy_tailed_keys(80 * 640, DIM, seed=15, tail=20.0)
    tau = naive.leverage_svd(X)
    big = X * (np.sqrt(4.0 / (X * X).sum(axis=0).max()) * 1e154)  # largest Gram diagonal entry: 4e308
    with np.errstate(over="ignore"):
        assert not np.isfinite((big * big).sum(axis=0)).all(), "fixture must overflow the Gram matrix"
        assert all(np.isfinite(np.einsum("ij,ij->", c, c)) for c in np.split(big, 80)), "chunks must not"
    s = ls.KeySketch(DIM, eps=EPS, block_rows=64)
    for i, part in enumerate(np.split(big, 80)):
        s.update_many(part)
    assert s.n == len(X)
    assert_matches_offline(s.universal_set().ids, tau, EPS)
    s.update_many(big[:5])  # and it keeps streaming
    assert s.n == len(X) + 5


def test_clashes_with_retained_keys_are_caught_after_id_tracking_becomes_inexact(Q):
    """More than MAX_RANGES disjoint id runs: the sketch stops tracking every id (and says so), but an id
    it still holds (a candidate or a buffered row) is refused, by update_many as by merge."""
    from levstream._ids import MAX_RANGES

    n = 2 * MAX_RANGES + 10
    X = heavy_tailed_keys(n, DIM, seed=14)
    s = ls.KeySketch(DIM, eps=EPS, block_rows=512).update_many(X, ids=np.arange(n) * 2)
    assert not s.ids_tracked_exactly
    held = int(s.universal_set().ids[0])
    assert_rejected(s, Q, lambda t: t.update_many(X[:2], ids=[held + 1, held]), ValueError,
                    f"ids clash: id {held} was already fed")
    assert_rejected(s, Q, lambda t: t.update_many(X[:3], offset=held - 1), ValueError, f"ids clash: id {held}")
    other = ls.KeySketch(DIM, eps=EPS).update_many(X[:1], ids=[held])
    assert_rejected(s, Q, lambda t: t.merge(other), ValueError, f"both sketches contain key id {held}")
    s.update_many(X[:2], ids=[10 * n, 10 * n + 1])  # fresh ids are still accepted
    assert s.n == n + 2


def test_testing_helpers_refuse_bad_sizes_with_clear_errors():
    """The brute-force helpers: a negative offset gave negative key ids, ``block_rows=0`` a bare ``range()``
    error, keys of another width than the queries NumPy's matmul error."""
    from levstream.testing import DenseHeavyScan, dense_attention, heavy_entries_dense

    with pytest.raises(ValueError, match="offset must be >= 0; got -5"):
        DenseHeavyScan(np.ones((1, 2)), eps=0.1, offset=-5)
    with pytest.raises(ValueError, match="block_rows must be >= 1; got 0"):
        heavy_entries_dense(np.ones((2, 2)), np.ones((3, 2)), eps=0.1, block_rows=0)
    with pytest.raises(ValueError, match=r"K must have 3 columns.*got shape \(4, 2\)"):
        dense_attention(np.ones((2, 3)), np.ones((4, 2)))


def test_online_sampler_takes_an_empty_chunk_as_a_no_op():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((300, 3))
    a = ls.OnlineLeverageSampler(3, delta=0.5, ridge=1.0, rng=1).update_many(X[:100])
    b = ls.OnlineLeverageSampler(3, delta=0.5, ridge=1.0, rng=1).update_many(X[:100])
    b.update_many(np.zeros((0, 3)))  # a filter that kept nothing: no draw, no row
    a.update_many(X[100:])
    b.update_many(X[100:])
    assert a.n == b.n == 300
    np.testing.assert_array_equal(a.sample, b.sample)
    with pytest.raises(ValueError, match="X must have 3 columns"):
        b.update_many(np.zeros((0, 4)))
