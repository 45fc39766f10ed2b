"""KeySketch for p != 2: exact p = 4 (lifted Gram) and the l_p coreset mode (issue #4)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import heavy_tailed_keys

import levstream as ls

#: Seeds of the probabilistic (coreset) tests: recall must be 1.0 on every one of them.
CORESET_SEEDS = (0, 1, 2, 3, 4)


def naive_lift(X: np.ndarray) -> np.ndarray:
    """phi(x) = (x_a x_b)_{a<=b}, off-diagonals times sqrt(2), by explicit loops."""
    d = X.shape[1]
    cols = []
    for a in range(d):
        for b in range(a, d):
            cols.append(X[:, a] * X[:, b] * (1.0 if a == b else np.sqrt(2.0)))
    return np.stack(cols, axis=1)


def dense_values(Q: np.ndarray, K: np.ndarray, p: float) -> np.ndarray:
    B = np.abs(Q @ K.T) ** p
    return B / B.sum(axis=1, keepdims=True)


# ------------------------------------------------------------------------------------------- exact p = 4
def test_p4_exact_universal_set_and_queries() -> None:
    K = heavy_tailed_keys(4000, 4, seed=3)
    Q = np.vstack([np.random.default_rng(5).standard_normal((20, 4)), K[:10]])
    eps = 0.02
    sk = ls.KeySketch(4, eps=eps, p=4, exact=True)
    for part in np.array_split(K, 9):
        sk.update_many(part)
    Phi = naive_lift(K)
    tau = np.einsum("ij,jk,ik->i", Phi, np.linalg.pinv(Phi.T @ Phi), Phi)
    assert sk.universal_set().ids.tolist() == np.flatnonzero(tau >= eps).tolist()
    A = dense_values(Q, K, 4.0)
    hits = sk.heavy_entries(Q)
    assert hits.as_set() == set(zip(*map(list, np.nonzero(A >= eps))))
    np.testing.assert_allclose(hits.values, A[hits.rows(), hits.key_ids], rtol=1e-9)
    assert hits.lower is None
    np.testing.assert_allclose(sk.normalizer(Q), (np.abs(Q @ K.T) ** 4).sum(axis=1), rtol=1e-9)
    # the lifted scores bound the p = 4 sensitivities, so every key-aligned query's heavy key is kept
    assert len(sk.universal_set()) <= 2 * 10 / eps


def test_p4_exact_contract() -> None:
    K = heavy_tailed_keys(1500, 3, seed=4)
    Q = np.vstack([np.random.default_rng(6).standard_normal((10, 3)), K[:5]])
    ls.testing.check_sketch_contract(lambda: ls.KeySketch(3, eps=0.05, p=4, exact=True, block_rows=256), K, Q)


def test_p4_exact_refuses_beyond_memory_budget() -> None:
    with pytest.raises(ValueError, match="memory_budget"):
        ls.KeySketch(64, eps=0.1, p=4, exact=True, memory_budget=2**20)
    ls.KeySketch(8, eps=0.1, p=4, exact=True, memory_budget=2**20)  # D = 36 fits
    with pytest.raises(ValueError, match="exact=True is available for p = 2 and p = 4"):
        ls.KeySketch(4, eps=0.1, p=3, exact=True)


def test_merge_refuses_different_summaries() -> None:
    a = ls.KeySketch(3, eps=0.1, p=4, exact=True)
    b = ls.KeySketch(3, eps=0.1, p=4)
    with pytest.raises(ValueError, match="normaliser summaries"):
        a.merge(b)


# --------------------------------------------------------------------------------------------- coreset
def _adversarial_queries(K: np.ndarray, seed: int, m: int = 60) -> np.ndarray:
    """Half random directions, half queries aligned with individual keys (each makes its key heavy)."""
    rng = np.random.default_rng(seed + 1000)
    norms = np.linalg.norm(K, axis=1)
    top = np.argsort(-norms)[: m // 4]
    rand_keys = rng.choice(K.shape[0], m // 4, replace=False)
    return np.vstack([rng.standard_normal((m // 2, K.shape[1])), K[top], K[rand_keys]])


@pytest.mark.parametrize("p", (0.5, 1.0, 1.5, 3.0, 4.0))
@pytest.mark.parametrize("seed", CORESET_SEEDS)
def test_coreset_recall_and_precision(p: float, seed: int) -> None:
    d, eps = 5, 0.02
    K = heavy_tailed_keys(30_000, d, seed=seed)
    Q = _adversarial_queries(K, seed)
    sk = ls.KeySketch(d, eps=eps, p=p, rng=seed, block_rows=4096)
    for part in np.array_split(K, 5):
        sk.update_many(part)
    A = dense_values(Q, K, p)
    hits = sk.heavy_entries(Q)
    got = hits.as_set()
    truth = set(zip(*map(list, np.nonzero(A >= eps))))
    assert truth <= got, f"missed heavy entries: {sorted(truth - got)[:5]}"
    delta = sk.normalizer_summary.delta
    true_vals = A[hits.rows(), hits.key_ids]
    assert (true_vals >= eps * (1 - delta) ** 2).all()
    assert (hits.lower <= true_vals * (1 + 1e-12)).all() and (true_vals <= hits.upper * (1 + 1e-12)).all()
    # memory independent of n: coreset rows bounded by its capacity, candidates by the sketch's capacity
    assert sk.normalizer_summary.num_rows <= sk.normalizer_summary.capacity
    assert sk.num_retained <= sk.capacity + sk._block_rows


def test_coreset_universal_set_contains_self_heavy_keys() -> None:
    # the query q = k_j makes key j as heavy as it can be made by its own direction: every key with
    # A_jj >= eps must be a candidate (its sensitivity is at least A_jj)
    K = heavy_tailed_keys(6000, 4, seed=9)
    eps = 0.05
    sk = ls.KeySketch(4, eps=eps, p=1.0, rng=0).update_many(K)
    U = set(sk.universal_set().ids.tolist())
    self_heavy = [j for j in range(K.shape[0])
                  if abs(K[j] @ K[j]) / np.abs(K @ K[j]).sum() >= eps]
    assert self_heavy and set(self_heavy) <= U


def test_coreset_sketch_bytes_roundtrip_continues_identically() -> None:
    K = heavy_tailed_keys(20_000, 4, seed=2)
    Q = _adversarial_queries(K, 2, m=20)
    a = ls.KeySketch(4, eps=0.05, p=1.0, rng=7, block_rows=2048).update_many(K[:9000])
    b = ls.KeySketch.from_bytes(a.to_bytes())
    a.update_many(K[9000:])
    b.update_many(K[9000:])
    np.testing.assert_array_equal(a.normalizer(Q), b.normalizer(Q))
    assert a.universal_set().ids.tolist() == b.universal_set().ids.tolist()
    # same seed, same blocks: reproducible; a different seed gives a different coreset
    c = ls.KeySketch(4, eps=0.05, p=1.0, rng=7, block_rows=2048).update_many(K)
    np.testing.assert_array_equal(a.normalizer(Q), c.normalizer(Q))
    e = ls.KeySketch(4, eps=0.05, p=1.0, rng=8, block_rows=2048).update_many(K)
    assert not np.array_equal(a.normalizer(Q), e.normalizer(Q))


@pytest.mark.parametrize("seed", CORESET_SEEDS[:3])
def test_coreset_shard_merge_recall(seed: int) -> None:
    d, eps, p = 4, 0.03, 1.0
    K = heavy_tailed_keys(24_000, d, seed=seed)
    Q = _adversarial_queries(K, seed, m=40)
    seeds = np.random.SeedSequence(seed).spawn(4)
    shards = [ls.KeySketch(d, eps=eps, p=p, rng=s, block_rows=2048).update_many(part, offset=i * 6000)
              for i, (s, part) in enumerate(zip(seeds, np.split(K, 4)))]
    merged = ls.KeySketch.merge_all(shards)
    assert merged.n == K.shape[0]
    A = dense_values(Q, K, p)
    truth = set(zip(*map(list, np.nonzero(A >= eps))))
    assert truth <= merged.heavy_entries(Q).as_set()
    z = merged.normalizer(Q)
    assert np.abs(z / (np.abs(Q @ K.T) ** p).sum(axis=1) - 1).max() < merged.normalizer_summary.delta


def test_coreset_sketch_chunking_and_row_updates_are_invariant() -> None:
    # blocks are formed by the sketch's buffer, so with one seed the sampling sees the same blocks
    K = heavy_tailed_keys(9000, 3, seed=6)
    Q = _adversarial_queries(K, 6, m=12)

    def answer(sk: ls.KeySketch) -> tuple:
        return (sk.universal_set().ids.tolist(), sorted(sk.heavy_entries(Q).as_set()), sk.normalizer(Q).tolist())

    ref = answer(ls.KeySketch(3, eps=0.05, p=1.5, rng=3, block_rows=1024).update_many(K))
    chunked = ls.KeySketch(3, eps=0.05, p=1.5, rng=3, block_rows=1024)
    for part in np.array_split(K, [5, 700, 701, 4000]):
        chunked.update_many(part)
    assert answer(chunked) == ref
    rows = ls.KeySketch(3, eps=0.05, p=1.5, rng=3, block_rows=1024)
    for x in K[:1500]:
        rows.update(x)
    rows.update_many(K[1500:])
    assert answer(rows) == ref


@pytest.mark.parametrize("p", (1.0, 3.0))
@pytest.mark.parametrize("seed", CORESET_SEEDS)
def test_coreset_tight_construction(p: float, seed: int) -> None:
    # tight example (docs/theory.md, "Proofs", 2): d orthogonal directions, each repeated m times,
    # hidden in a stream of small noise keys; the query along a direction makes each copy carry
    # A ~ 1/m
    d, m = 4, 20
    rng = np.random.default_rng(seed)
    K = np.vstack([np.repeat(np.eye(d), m, axis=0) * 10.0, rng.standard_normal((20_000, d)) * 1e-3])
    K = K[rng.permutation(K.shape[0])]
    Q = np.vstack([np.eye(d), rng.standard_normal((6, d))])
    eps = 0.045
    sk = ls.KeySketch(d, eps=eps, p=p, rng=seed, block_rows=2048).update_many(K)
    A = dense_values(Q, K, p)
    truth = set(zip(*map(list, np.nonzero(A >= eps))))
    assert len(truth) >= d * m  # every copy is heavy for its direction
    assert truth <= sk.heavy_entries(Q).as_set()


@pytest.mark.parametrize("p", (6.0, 10.0))
def test_coreset_large_p_keeps_dominant_keys(p: float) -> None:
    # c_p = d^(p/2-1) is huge here; the default oversampling must still keep keys that dominate a query
    d, eps = 5, 0.02
    K = heavy_tailed_keys(30_000, d, seed=0)
    Q = _adversarial_queries(K, 0)
    sk = ls.KeySketch(d, eps=eps, p=p, rng=0, block_rows=4096).update_many(K)
    A = dense_values(Q, K, p)
    assert set(zip(*map(list, np.nonzero(A >= eps)))) <= sk.heavy_entries(Q).as_set()
    z = (np.abs(Q @ K.T) ** p).sum(axis=1)
    assert np.abs(sk.normalizer(Q) / z - 1).max() < sk.normalizer_summary.delta


def test_coreset_queries_are_scale_free_without_overflow() -> None:
    # A is invariant under scaling keys; |x|^20 of keys scaled by 1e14 overflows and by 1e-20 underflows
    # float64 unless queries are rescaled (docs/theory.md, "General p", proof 15)
    K = heavy_tailed_keys(3000, 4, seed=0)
    Q = np.vstack([K[:5], np.random.default_rng(0).standard_normal((5, 4))])
    A = dense_values(Q, K, 20.0)
    truth = set(zip(*map(list, np.nonzero(A >= 0.05))))
    answers = []
    for scale in (1.0, 1e14, 1e-20):
        sk = ls.KeySketch(4, eps=0.05, p=20.0, rng=0).update_many(K * scale)
        hits = sk.heavy_entries(Q)
        assert truth <= hits.as_set() and np.isfinite(hits.values).all()
        answers.append((sorted(hits.as_set()), sk.top_k(Q, 3).key_ids.tolist()))
    assert answers[0] == answers[1] == answers[2]


@pytest.mark.parametrize("kappa", (1e4, 1e8))
def test_coreset_ill_conditioned_keys(kappa: float) -> None:
    # column scales spanning kappa: the Lewis form has condition number ~kappa^2; forming and
    # eigendecomposing it dropped the smallest direction (a missed heavy entry at kappa = 1e7 before)
    d, eps, p = 5, 0.02, 3.0
    cols = np.logspace(0, -np.log10(kappa), d)
    K = heavy_tailed_keys(40_000, d, seed=0) * cols
    rng = np.random.default_rng(0)
    Q = np.vstack([rng.standard_normal((20, d)) / cols, K[rng.choice(K.shape[0], 20)]])
    sk = ls.KeySketch(d, eps=eps, p=p, rng=0, block_rows=4096).update_many(K)
    A = dense_values(Q, K, p)
    assert set(zip(*map(list, np.nonzero(A >= eps)))) <= sk.heavy_entries(Q).as_set()
    assert sk.normalizer_summary.form_rank == d  # the smallest direction is kept (it was dropped at 1e7)


def test_coreset_top_k_certification_accounts_for_delta() -> None:
    K = heavy_tailed_keys(20_000, 4, seed=5)
    Q = _adversarial_queries(K, 5, m=40)
    sk = ls.KeySketch(4, eps=0.02, p=3.0, rng=5).update_many(K)
    top = sk.top_k(Q, 1)
    delta = sk.normalizer_summary.delta
    np.testing.assert_array_equal(top.certified, top.values[:, 0] * (1 - delta) >= 0.02)
    A = dense_values(Q, K, 3.0)
    for i in np.flatnonzero(top.certified):  # a certified row is the true top-1 over all keys
        assert top.key_ids[i, 0] == int(np.argmax(A[i]))


def test_coreset_zero_keys_are_never_candidates() -> None:
    # zero keys have sensitivity 0; before any nonzero key arrives they must not pile up as candidates
    sk = ls.KeySketch(3, eps=0.02, p=1.0, rng=0, block_rows=512)
    for _ in range(10):
        sk.update_many(np.zeros((1000, 3)))
    assert len(sk.universal_set()) == 0 and sk.num_retained <= 512
    K = heavy_tailed_keys(3000, 3, seed=1)
    sk.update_many(K, offset=10_000)
    Q = _adversarial_queries(K, 1, m=12)
    truth = {(i, j + 10_000) for i, j in zip(*np.nonzero(dense_values(Q, K, 1.0) >= 0.02))}
    assert truth and truth <= sk.heavy_entries(Q).as_set()
    assert sk.normalizer_summary.scores(np.zeros((2, 3))).tolist() == [0.0, 0.0]
