"""Degenerate fixtures (docs/theory.md, "Numerics"): the tight d/eps construction, duplicates, zero
rows, rank-deficient keys and prefixes, kappa(K) = 1e7, float32 input, values near 1e±150."""

from __future__ import annotations

import itertools
from fractions import Fraction

import naive
import numpy as np
import pytest
from conftest import (
    FLOAT32_RTOL,
    ILL_COND_KAPPA,
    ILL_COND_SLACK,
    SEEDS,
    VALUE_RTOL,
    answer,
    assert_heavy_matches_dense,
    assert_matches_offline,
    assert_no_ties,
    assert_same_state_as_upcast,
    heavy_tailed_keys,
)

import levstream as ls


def _feed(sk: ls.KeySketch, K: np.ndarray, pattern: str) -> ls.KeySketch:
    if pattern == "chunk":
        sk.update_many(K)
    elif pattern == "rows":
        for x in K:
            sk.update(x)
    else:  # uneven chunks from a generator
        sk.extend(K[a:b] for a, b in zip([0, 1, 4, 11], [1, 4, 11, len(K)]))
    return sk


# ---------------------------------------------------------------------------------------------- tight d/eps
@pytest.mark.parametrize("rotate", [False, True])
@pytest.mark.parametrize("order", ["blocked", "interleaved"])
@pytest.mark.parametrize("pattern", ["chunk", "rows", "generator"])
def test_tight_construction_keeps_all_d_over_eps_ties(rotate, order, pattern):
    """d orthonormal directions, each repeated m = 1/eps times: every key has tau = eps exactly (a tie);
    all d/eps keys must be kept and a query along a direction sees A = eps on its m copies."""
    d, m = 6, 8
    eps = 1.0 / m
    rng = np.random.default_rng(3)
    B = naive.random_orthonormal(d, d, rng).T if rotate else np.eye(d)
    K = np.repeat(B, m, axis=0) if order == "blocked" else np.tile(B, (m, 1))
    np.testing.assert_allclose(naive.leverage_svd(K), eps, rtol=1e-12)
    sk = _feed(ls.KeySketch(d, eps=eps, block_rows=5), K, pattern)
    U = sk.universal_set()
    assert U.ids.tolist() == list(range(d * m))
    assert len(U) == d / eps
    np.testing.assert_allclose(U.scores, eps, rtol=1e-12)
    hits = sk.heavy_entries(B)
    direction_of_key = np.repeat(np.arange(d), m) if order == "blocked" else np.tile(np.arange(d), m)
    assert hits.as_set() == {(int(direction_of_key[j]), j) for j in range(d * m)}
    np.testing.assert_allclose(hits.values, eps, rtol=VALUE_RTOL)
    # a threshold just above the tie returns nothing
    assert len(sk.heavy_entries(B, eps=eps * (1 + 1e-6))) == 0


def test_tight_construction_across_shards():
    d, m = 5, 10
    eps = 1.0 / m
    B = naive.random_orthonormal(d, d, np.random.default_rng(4)).T
    K = np.tile(B, (m, 1))
    shards = [ls.KeySketch(d, eps=eps).update_many(part, offset=start)
              for start, part in zip(range(0, d * m, 7), np.array_split(K, range(7, d * m, 7)))]
    merged = ls.KeySketch.merge_all(shards[::-1])
    assert merged.universal_set().ids.tolist() == list(range(d * m))


# ---------------------------------------------------------------------------------------------- duplicates
@pytest.mark.parametrize("m", [2, 5, 16])
def test_duplicates_split_their_score(m):
    """A key repeated m times, orthogonal to every other key: each copy has tau = 1/m exactly."""
    rng = np.random.default_rng(m)
    d = 4
    others = np.c_[np.zeros(200), rng.standard_normal((200, d - 1))]
    dup = np.array([[2.5, 0.0, 0.0, 0.0]])
    K = np.vstack([others[:50], np.repeat(dup, m, axis=0), others[50:]])
    dup_ids = list(range(50, 50 + m))
    np.testing.assert_allclose(naive.leverage_svd(K)[dup_ids], 1.0 / m, rtol=1e-12)
    for eps, expect in ((1.0 / m, True), (1.0 / m * (1 - 1e-6), True), (1.0 / m * (1 + 1e-6), False)):
        if eps > 1:
            continue
        sk = ls.KeySketch(d, eps=eps, block_rows=16).update_many(K)
        U = sk.universal_set()
        assert set(dup_ids) <= set(U.ids.tolist()) if expect else not set(dup_ids) & set(U.ids.tolist())
        assert_matches_offline(U.ids, naive.leverage_svd(K), eps)
        hits = sk.heavy_entries(dup)
        got = set(hits.key_ids.tolist())
        assert got == (set(dup_ids) if expect else set())
        np.testing.assert_allclose(hits.values, 1.0 / m, rtol=VALUE_RTOL)


@pytest.mark.parametrize("seed", SEEDS)
def test_duplicated_random_keys_match_offline(seed):
    rng = np.random.default_rng(seed)
    base = heavy_tailed_keys(600, 6, seed=seed)
    K = np.vstack([base, base[rng.choice(600, 200)], base[:5], base[:5]])
    K = K[rng.permutation(len(K))]
    eps = 0.01
    tau = naive.leverage_svd(K)
    sk = ls.KeySketch(6, eps=eps, block_rows=64)
    for part in np.array_split(K, 7):
        sk.update_many(part)
    assert_matches_offline(sk.universal_set().ids, tau, eps)
    Q = rng.standard_normal((20, 6))
    assert_heavy_matches_dense(sk.heavy_entries(Q), naive.dense_heavy(Q, K, eps), eps)


# ---------------------------------------------------------------------------------------------- zero rows
def test_only_zero_rows():
    sk = ls.KeySketch(4, eps=0.1)
    _feed(sk, np.zeros((30, 4)), "rows")
    sk.update_many(np.zeros((10, 4)))
    assert sk.n == 40 and len(sk.universal_set()) == 0
    Q = np.random.default_rng(0).standard_normal((3, 4))
    hits = sk.heavy_entries(Q)
    assert len(hits) == 0 and hits.indptr.tolist() == [0, 0, 0, 0]
    np.testing.assert_array_equal(sk.normalizer(Q), 0.0)
    top = sk.top_k(Q, 2)
    assert (top.key_ids == -1).all() and np.isnan(top.values).all() and not top.certified.any()


@pytest.mark.parametrize("pattern", ["chunk", "rows", "generator"])
def test_zero_rows_mixed_in(pattern):
    rng = np.random.default_rng(7)
    K = heavy_tailed_keys(300, 5, seed=7)
    K[rng.choice(300, 60, replace=False)] = 0.0
    K[:3] = 0.0
    eps = 0.03
    tau = naive.leverage_svd(K)
    sk = _feed(ls.KeySketch(5, eps=eps, block_rows=32), K, pattern)
    U = sk.universal_set()
    assert_matches_offline(U.ids, tau, eps)
    assert not (np.abs(U.keys).sum(axis=1) == 0).any()
    Q = rng.standard_normal((15, 5))
    assert_heavy_matches_dense(sk.heavy_entries(Q), naive.dense_heavy(Q, K, eps), eps)


# ---------------------------------------------------------------------------------------------- rank-deficient
@pytest.mark.parametrize("rank", [1, 3, 7])
@pytest.mark.parametrize("block_rows", [None, 9])
def test_rank_deficient_keys_follow_pseudo_inverse(rank, block_rows):
    rng = np.random.default_rng(rank)
    n, d, eps = 800, 8, 0.02
    K = (rng.standard_normal((n, rank)) @ rng.standard_normal((rank, d))) * (1 + rng.pareto(2.0, (n, 1)))
    tau = naive.leverage_svd(K)
    assert tau.sum() == pytest.approx(rank, rel=1e-9)
    assert_no_ties(tau, eps)
    sk = ls.KeySketch(d, eps=eps, block_rows=block_rows)
    for part in np.array_split(K, 5):
        sk.update_many(part)
    U = sk.universal_set()
    assert_matches_offline(U.ids, tau, eps)
    np.testing.assert_allclose(U.scores, tau[U.ids], rtol=1e-7)
    Q = np.vstack([rng.standard_normal((20, d)), rng.standard_normal((5, rank)) @ rng.standard_normal((rank, d))])
    assert_heavy_matches_dense(sk.heavy_entries(Q), naive.dense_heavy(Q, K, eps), eps)


def test_row_outside_the_current_span_scores_one():
    """Rank-deficient prefix: a row with a new direction has tau = 1 (it alone spans that direction)."""
    rng = np.random.default_rng(8)
    d = 6
    plane = np.c_[rng.standard_normal((300, 2)), np.zeros((300, 4))]
    outlier = np.array([0.3, -0.2, 1e-3, 0.0, 0.0, 0.0])
    K = np.vstack([plane[:150], outlier, plane[150:]])
    sk = ls.KeySketch(d, eps=0.05, block_rows=64)
    for x in K[:151]:
        sk.update(x)
    sk.update_many(K[151:])
    U = sk.universal_set()
    assert 150 in U
    assert U.scores[U.ids.tolist().index(150)] == pytest.approx(1.0, rel=1e-9)
    assert_matches_offline(U.ids, naive.leverage_svd(K), 0.05)
    # the only key with an e3 component takes all of a query along e3
    hits = sk.heavy_entries(np.eye(d)[[2]])
    assert hits.key_ids.tolist() == [150] and hits.values[0] == pytest.approx(1.0, rel=VALUE_RTOL)


def _exact_scores(K: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Leverage scores of ``K[rows]`` in rational arithmetic (K^T K invertible; entries exact in float64)."""
    d = K.shape[1]
    G = [[sum(Fraction(x) * Fraction(y) for x, y in zip(K[:, a], K[:, b])) for b in range(d)] for a in range(d)]

    def solve(k: np.ndarray) -> list[Fraction]:
        M = [G[i][:] + [Fraction(k[i])] for i in range(d)]
        for c in range(d):
            p = next(r for r in range(c, d) if M[r][c] != 0)
            M[c], M[p] = M[p], M[c]
            for r in range(d):
                if r != c and M[r][c] != 0:
                    f = M[r][c] / M[c][c]
                    M[r] = [x - f * y for x, y in zip(M[r], M[c])]
        return [M[i][d] / M[i][i] for i in range(d)]

    return np.array([float(sum(Fraction(K[j, a]) * y for a, y in enumerate(solve(K[j])))) for j in rows])


@pytest.mark.parametrize("eps", [0.02, 0.5])
def test_small_keys_outside_the_span_of_huge_ones_keep_their_scores(eps):
    """10^4 keys of norm up to 2^30 along (3, 4, 0) and two of norm ~1 outside it: K^T K is far beyond the
    Cholesky path (the R factor holds it), and in the column-equilibrated frame the direction the small keys
    add to the first two columns has a singular value ~1e-12 of the largest.  Each small key alone completes
    the rank, so both have tau = 1.  A rank tolerance growing with the row count (1e4 * 2^-52) cut that
    direction: the two scored 0.45 and 0.55, and at eps = 0.5 the first was pruned and its entry lost."""
    rng = np.random.default_rng(0)
    n = 10_000
    s = rng.integers(1, 2**10, n) * 2.0**20
    K = np.c_[3 * s, 4 * s, np.zeros(n)]
    small = [6640, 7901]
    K[small] = [[0.375, 0.375, -0.22756586335563955], [1.0, 0.625, -0.25117801330188394]]
    assert np.linalg.cond(K) > 1e12
    np.testing.assert_allclose(ls.leverage_scores(K)[small], 1.0, rtol=1e-3)
    Q = np.array([[4.0, -3.0, 0.0], [0.0, 0.0, 1.0], [4.0, -3.0, 2.0]])  # <q, (3, 4, 0)> = 0 exactly
    dense = naive.dense_heavy(Q, K, eps)
    for block_rows in (None, 1024):
        sk = ls.KeySketch(3, eps=eps, block_rows=block_rows).update_many(K)
        sk.flush()
        U = sk.universal_set()
        assert set(small) <= set(U.ids.tolist())
        np.testing.assert_allclose(U.scores[np.searchsorted(U.ids, small)], 1.0, rtol=1e-3)
        hits = sk.heavy_entries(Q)
        assert hits.as_set() == set(dense)
        got = dict(zip(zip(hits.rows().tolist(), hits.key_ids.tolist()), hits.values.tolist()))
        # Z = ||R q||^2 carries the rounding of R's huge entries: ~2 d u ||R|| ||q|| / sqrt(Z) ~ 1e-6 here
        for e, v in dense.items():
            assert got[e] == pytest.approx(v, rel=1e-5)


def test_ill_conditioned_long_stream_prunes_no_key_of_the_universal_set():
    """As above with 10^5 huge keys and 50 small ones in general position (cond(K) ~ 2e11): every key
    whose exact (rational) score reaches eps stays, and every dense heavy entry is found, through the
    prunes of a long stream."""
    rng = np.random.default_rng(0)
    n_big, eps = 100_000, 0.02
    s = rng.integers(1, 2**10, n_big) * 2.0**20
    small = np.c_[np.round(rng.standard_normal((50, 2)) * 8) / 8, rng.standard_normal(50)]
    order = rng.permutation(n_big + 50)
    K = np.vstack([np.c_[3 * s, 4 * s, np.zeros(n_big)], small])[order]
    small_ids = np.flatnonzero(order >= n_big)
    tau = _exact_scores(K, small_ids)
    assert (tau >= eps * 1.01).sum() >= 10 and not (np.abs(tau / eps - 1) < 0.01).any()
    sk = ls.KeySketch(3, eps=eps, block_rows=2048)
    for part in np.array_split(K, 7):
        sk.update_many(part)
    U = set(sk.universal_set().ids.tolist())
    assert set(small_ids[tau >= eps].tolist()) <= U
    Q = np.array([[4.0, -3.0, 0.5], [4.0, -3.0, -2.0], [0.0, 0.0, 1.0]])
    assert set(naive.dense_heavy(Q, K, eps)) <= sk.heavy_entries(Q).as_set()


def test_key_along_a_direction_below_the_rank_tolerance_is_kept_with_score_one():
    """A key whose own direction has a singular value below the rank tolerance (10^4 keys of norm ~2^50 along
    (3, 4), one of norm 2^-8 along (-4, 3)): float64 cannot tell its score from the R factor, so it is
    scored 1, the bound of every leverage score (here also its exact score: it alone leaves the span),
    offline and in the sketch.  Scored by the pseudo-inverse alone it was ~1e-41 and pruned."""
    rng = np.random.default_rng(3)
    M = rng.integers(1, 2**10, 10_000) * 2.0**40
    K = np.insert(np.c_[3 * M, 4 * M], 5000, [-4 * 2.0**-10, 3 * 2.0**-10], axis=0)
    assert ls.leverage_scores(K)[5000] == 1.0
    assert ls.universal_set(K, eps=0.5).ids.tolist() == [5000]
    sk = ls.KeySketch(2, eps=0.5).update_many(K)
    sk.flush()
    U = sk.universal_set()
    assert U.ids.tolist() == [5000] and U.scores.tolist() == [1.0]


def test_rank_one_stream_folded_a_row_at_a_time_keeps_its_rank():
    """Folded one row per block (10^4 QR steps) an exactly rank-1 stream's R factor gathers rounding of
    ~1e-13 sigma_max in the direction that should be 0.  A tolerance that ignored the QR steps kept that
    direction: scores summed to ~4 (rank 1) and the universal set held ~7 times the exact one."""
    rng = np.random.default_rng(2)
    n, eps = 10_000, 1e-3
    a = rng.integers(-8, 9, n).astype(float)
    a[a == 0] = 1
    a *= 2.0 ** rng.integers(-9, 10, n)
    K = np.outer(a, [3.0, -2.0])  # exactly rank 1
    tau = a * a / (a @ a)  # exact: integers times powers of 2, sums below 2^53
    assert_no_ties(tau, eps)
    sk = ls.KeySketch(2, eps=eps, block_rows=1).update_many(K)
    sk.flush()
    assert sk._summary.scores(K).sum() == pytest.approx(1.0, rel=1e-9)
    assert_matches_offline(sk.universal_set().ids, tau, eps)
    assert_matches_offline(ls.universal_set(K, eps=eps).ids, tau, eps)


def test_key_wholly_along_a_cut_direction_next_to_a_kept_one_is_kept():
    """10^4 keys 2^40 (1, 1, 1, 1), one key along (1, -1, 0, 0) and one along (0, 0, 1, -1), each of score 1
    (it alone spans its direction).  In the equilibrated frame their directions are ~1e-13 and ~1e-14 of the
    largest: the second is cut, the first kept, and the gap between them is small beside the tolerance.  The
    second key lies wholly along the cut direction: it is scored 1 and kept (a rule bounding rounding's turn
    of the kept range by ``tol / gap`` alone gave up at this gap and scored it ~1e-8)."""
    K = np.tile(2.0**40 * np.ones(4), (10_002, 1))
    K[5000] = 24.0 * np.array([1.0, -1.0, 0.0, 0.0])
    K[-1] = 2.0 * np.array([0.0, 0.0, 1.0, -1.0])
    q = np.array([[0.0, 0.0, 1.0, -1.0]])  # dense: A = 1 on the last key
    assert ls.leverage_scores(K)[-1] == 1.0
    for block_rows in (None, 64):
        sk = ls.KeySketch(4, eps=0.5, block_rows=block_rows).update_many(K)
        sk.flush()
        assert sk._summary._get_factor()[4] is not None  # a direction was cut
        assert 10_001 in sk.universal_set()
        assert sk.heavy_entries(q).as_set() == {(0, 10_001)}


@pytest.mark.parametrize("rank_deficient", [False, True])
@pytest.mark.parametrize("tiny", [1e-20, 1e-68])
def test_key_alone_in_a_direction_at_a_tiny_scale_is_heavy(tiny, rank_deficient):
    """tau is invariant under scaling a column (docs/theory.md, "Proofs", 4): a key that alone
    carries direction e1 has tau = 1 however small its entry, and the query e1 sees A = 1 on it in
    the dense attention.  A rank tolerance relative to sigma_max over *all* columns would call it
    numerically zero and lose it."""
    d = 3 if rank_deficient else 2  # a zero column makes the keys rank-deficient (R-factor path)
    K = np.zeros((6, d))
    K[[0, 2, 3, 4, 5], 1] = [1.0, 2.0, -1.0, 0.5, 3.0]
    K[1, 0] = tiny
    q = np.eye(d)[[0]]
    assert naive.dense_heavy(q, K, 0.1) == {(0, 1): 1.0}
    np.testing.assert_allclose(ls.leverage_scores(K)[1], 1.0, rtol=1e-12)
    for block_rows in (None, 1):
        sk = ls.KeySketch(d, eps=0.1, block_rows=block_rows).update_many(K)
        assert 1 in sk.universal_set()
        hits = sk.heavy_entries(q)
        assert hits.as_set() == {(0, 1)} and hits.values[0] == pytest.approx(1.0, rel=VALUE_RTOL)
        assert sk.normalizer(q)[0] == pytest.approx(tiny**2, rel=1e-12)


def test_queries_orthogonal_to_every_key_have_no_entries():
    rng = np.random.default_rng(9)
    d = 6
    K = np.c_[rng.standard_normal((400, 3)) * (1 + rng.pareto(2, (400, 1))), np.zeros((400, 3))]
    sk = ls.KeySketch(d, eps=0.01).update_many(K)
    Q = np.c_[np.zeros((5, 3)), rng.standard_normal((5, 3))]
    hits = sk.heavy_entries(Q)
    assert len(hits) == 0 and hits.n_queries == 5
    np.testing.assert_array_equal(sk.normalizer(Q), 0.0)
    assert len(sk.heavy_entries(np.zeros((4, d)))) == 0
    assert not sk.top_k(Q, 1).certified.any()


# ---------------------------------------------------------------------------------------------- kappa 1e7
def _ill_conditioned(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """K = U diag(s) V^T with s logspaced 1 .. 1/kappa; tau_j = ||U_j||^2 exactly (independent of s)."""
    rng = np.random.default_rng(seed)
    U = np.linalg.qr(rng.standard_normal((n, d)) * (1 + rng.pareto(2.0, (n, 1))))[0]
    s = np.logspace(0, -np.log10(ILL_COND_KAPPA), d)
    V = naive.random_orthonormal(d, d, rng)
    return (U * s) @ V.T, (U**2).sum(axis=1)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("how", ["chunks", "rows", "shards"])
def test_kappa_1e7_loses_no_heavy_key(seed, how):
    n, d, eps = 3000, 12, 0.01
    K, tau = _ill_conditioned(n, d, seed)
    assert np.linalg.cond(K) == pytest.approx(ILL_COND_KAPPA, rel=1e-3)
    assert_no_ties(tau, eps, rtol=1e-5)
    if how == "chunks":
        sk = ls.KeySketch(d, eps=eps, block_rows=128)
        for part in np.array_split(K, 13):
            sk.update_many(part)
    elif how == "rows":
        sk = ls.KeySketch(d, eps=eps, block_rows=200)
        for x in K[:1000]:
            sk.update(x)
        sk.update_many(K[1000:])
    else:
        cuts = [0, 400, 1300, 2100, n]
        sk = ls.KeySketch.merge_all([ls.KeySketch(d, eps=eps).update_many(K[a:b], offset=a)
                                     for a, b in itertools.pairwise(cuts)][::-1])
    got = set(sk.universal_set().ids.tolist())
    lost = naive.offline_set(tau, eps) - got
    assert not lost, f"heavy keys lost: {sorted(lost)}"
    spurious = [j for j in got if tau[j] < eps * (1 - ILL_COND_SLACK)]
    assert not spurious, f"keys with tau < eps kept: {spurious}"
    Q = np.random.default_rng(seed + 10).standard_normal((20, d))
    A = naive.dense_attention(Q, K)
    hits = sk.heavy_entries(Q)
    got_hits = hits.as_set()
    rows, cols = np.nonzero(A >= eps * (1 + ILL_COND_SLACK))
    assert set(zip(rows.tolist(), cols.tolist())) <= got_hits
    assert all(A[i, j] >= eps * (1 - ILL_COND_SLACK) for i, j in got_hits)


# ---------------------------------------------------------------------------------------------- float32, scale
@pytest.mark.parametrize("pattern", ["chunk", "rows"])
def test_float32_input_equals_its_float64_upcast(pattern):
    K32 = heavy_tailed_keys(1500, 8, seed=4).astype(np.float32)
    Q = np.random.default_rng(4).standard_normal((10, 8))
    a = _feed(ls.KeySketch(8, eps=0.02, block_rows=100), K32, pattern)
    b = _feed(ls.KeySketch(8, eps=0.02, block_rows=100), K32.astype(np.float64), pattern)
    assert_same_state_as_upcast(a, b)
    ra, rb = answer(a, Q), answer(b, Q)
    assert ra[:2] == rb[:2]
    np.testing.assert_allclose(ra[2], rb[2], rtol=FLOAT32_RTOL)
    K64 = K32.astype(np.float64)
    assert_matches_offline(a.universal_set().ids, naive.leverage_svd(K64), 0.02)
    assert_heavy_matches_dense(a.heavy_entries(Q), naive.dense_heavy(Q, K64, 0.02), 0.02)


def test_float32_queries_and_integer_input():
    Kint = np.random.default_rng(6).integers(-5, 6, size=(500, 4))
    sk = ls.KeySketch(4, eps=0.05).update_many(Kint)
    ref = ls.KeySketch(4, eps=0.05).update_many(Kint.astype(np.float64))
    Q = np.random.default_rng(7).standard_normal((6, 4)).astype(np.float32)
    assert answer(sk, Q) == answer(ref, Q.astype(np.float64))


@pytest.mark.parametrize("scale", [1e150, 1e-150])
def test_scale_invariance_near_1e150(scale):
    """Attention for p = 2 is invariant under scaling the keys: keys with entries near 1e±150 give the same answer."""
    K = heavy_tailed_keys(2000, 8, seed=5)
    K = K / np.abs(K).max()
    eps = 0.02
    tau = naive.leverage_svd(K)
    Q = np.random.default_rng(5).standard_normal((15, 8))
    ref = ls.KeySketch(8, eps=eps, block_rows=256).update_many(K)
    sk = ls.KeySketch(8, eps=eps, block_rows=256)
    for part in np.array_split(K * scale, 5):
        sk.update_many(part)
    assert sk.universal_set().ids.tolist() == ref.universal_set().ids.tolist()
    assert_matches_offline(sk.universal_set().ids, tau, eps)
    np.testing.assert_allclose(sk.universal_set().scores, ref.universal_set().scores, rtol=1e-9)
    hits = sk.heavy_entries(Q)
    assert_heavy_matches_dense(hits, naive.dense_heavy(Q, K, eps), eps)
    np.testing.assert_allclose(sk.normalizer(Q) / scale**2, naive.dense_normalizer(Q, K), rtol=1e-9)
    # rescaled queries (their inner products with the keys stay representable) see the same entries
    assert sk.heavy_entries(Q / np.sqrt(scale)).as_set() == hits.as_set()


@pytest.mark.parametrize("block_rows", [16, 256])
def test_stream_switching_between_gram_and_r_factor_paths(block_rows):
    """Rank-one prefix (R-factor path), an ill-conditioned stretch, then well-spread keys (back to the Gram
    path), then zero rows and duplicates: one pass still gives exactly the offline set."""
    rng = np.random.default_rng(12)
    d, eps = 6, 0.01
    rank_one = np.outer(rng.standard_normal(300), rng.standard_normal(d))
    ill, _ = _ill_conditioned(600, d, seed=12)
    spread = heavy_tailed_keys(1500, d, seed=12)
    K = np.vstack([rank_one, ill, spread, np.zeros((20, d)), spread[:7]])
    tau = naive.leverage_svd(K)
    assert_no_ties(tau, eps)
    sk = ls.KeySketch(d, eps=eps, block_rows=block_rows)
    for part in np.array_split(K, 23):
        sk.update_many(part)
    assert_matches_offline(sk.universal_set().ids, tau, eps)
    Q = rng.standard_normal((25, d))
    assert_heavy_matches_dense(sk.heavy_entries(Q), naive.dense_heavy(Q, K, eps), eps)


@pytest.mark.parametrize("col_scale", [1e-150, 1e-158, 4.1e-159, 1e-162, 1e-200, 1e-300])
@pytest.mark.parametrize("block_rows", [None, 1, 7])
def test_column_whose_squares_are_subnormal(col_scale, block_rows):
    """A column of entries near 1e-158 has squares below the smallest normal float64 (about 2.2e-308), so
    its Gram entries carry few significant bits.  Scores are invariant under column scaling, so the answer
    must equal that of the unscaled keys (and no LinAlgError may escape)."""
    K = heavy_tailed_keys(200, 3, seed=13)
    eps = 0.02
    tau = naive.leverage_svd(K)
    assert_no_ties(tau, eps)
    Ks = K * np.array([1.0, col_scale, 1.0])
    sk = ls.KeySketch(3, eps=eps, block_rows=block_rows)
    for part in np.array_split(Ks, 4):
        sk.update_many(part)
    assert_matches_offline(sk.universal_set().ids, tau, eps)
    merged = ls.KeySketch(3, eps=eps).merge(ls.KeySketch(3, eps=eps, block_rows=1).update_many(Ks[:1]))
    merged.merge(ls.KeySketch(3, eps=eps).update_many(Ks[1:], offset=1))
    assert_matches_offline(merged.universal_set().ids, tau, eps)


@pytest.mark.parametrize("tiny", [1e-317, 1e-310, 1e-300])
def test_a_subnormal_column_hides_no_other_key(tiny):
    """Found by the stress fuzzer: one key whose only nonzero entry is subnormal sends the summary to its R
    factor with a subnormal column maximum; the factor divided by it overflowed, the other keys' scores became
    0 x inf = nan, and the fold dropped every pending row (no entry left for any query)."""
    K = np.array([[tiny, 0.0], [0.0, 1.0], [0.0, 3.0], [0.0, -2.0], [0.0, 1.0], [0.0, 5.0], [0.0, 4.0],
                  [0.0, 2.0], [0.0, 1.0]])
    Q = np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 1e-3]])
    for block_rows in (1, 4):
        sk = ls.KeySketch(2, eps=0.1, block_rows=block_rows)
        for k in K:
            sk.update(k)
        assert_heavy_matches_dense(sk.heavy_entries(Q), naive.dense_heavy(Q, K, 0.1), 0.1)
        assert sk.heavy_entries(Q[:1]).as_set() == {(0, 2), (0, 5), (0, 6)}


def test_single_key_with_a_subnormal_square():
    """Found by hypothesis: a one-row shard [1, 4.1e-159] made the Cholesky of the Gram matrix fail."""
    K = np.array([[1.0, 4.10104141e-159]])
    shard = ls.KeySketch(2, eps=0.02, block_rows=1).update_many(K, offset=0)
    for sk in (shard, ls.KeySketch(2, eps=0.02).merge(shard), ls.KeySketch.merge_all([shard])):
        U = sk.universal_set()
        assert U.ids.tolist() == [0] and U.scores[0] == pytest.approx(1.0, rel=1e-9)


def test_heavy_entry_value_with_a_subnormal_normaliser():
    """Keys near 1e-156 against unit queries: Z is subnormal.  (With numba's fastmath 'arcp', v / Z became
    v * (1 / Z) = inf.)"""
    K = np.array([[1.5e-156]])
    q = np.array([[1.0]])
    assert naive.dense_heavy(q, K, 1.0) == {(0, 0): 1.0}
    hits = ls.KeySketch(1, eps=1.0).update_many(K).heavy_entries(q)
    assert hits.as_set() == {(0, 0)} and hits.values[0] == pytest.approx(1.0, rel=VALUE_RTOL)
