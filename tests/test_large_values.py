"""Keys, queries and values near the top of float64's range: valid rows are taken and answered exactly; rows the
sketch cannot represent are refused with a clear error and change nothing.

* A key is valid when its own squares fit float64 (|x| up to ~1e154), however many such keys are fed together:
  a Gram matrix that overflows makes the summary keep an R factor.  ``update`` and ``update_many`` agree on that.
* A query whose squares overflow is refused (its weights would overflow ``Z``), by single- and multi-head sketches
  alike.
* With exact outputs, a key and value whose moment-state terms ``k_a k_b v_c`` overflow are refused.

Every answer is checked against brute force computed in a safe scale."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import VALUE_RTOL

import levstream as ls

BIG = 8e153  # squares 6.4e307: finite; three of them overflow


# ---------------------------------------------------------------------------------------------- queries
def test_a_query_whose_squares_overflow_is_refused_by_every_call_and_changes_nothing():
    """(It once got no entries, no mass and a zero output from a single-head sketch, silently, where the
    multi-head sketch refused it.)"""
    rng = np.random.default_rng(1)
    d = 4
    K, V = rng.standard_normal((30, d)), rng.standard_normal((30, 2))
    sk = ls.KeySketch(d, eps=0.1, value_dim=2, exact_output=True).update_many(K, V)
    mh = ls.MultiHeadKeySketch(1, d, eps=0.1, value_dim=2, exact_output=True).update_many(K[None], V[None])
    q = rng.standard_normal((1, d)) * 1e160
    before, before_mh = sk.to_bytes(), mh.to_bytes()
    for call in (
        lambda: sk.heavy_entries(q),
        lambda: sk.attend(q),
        lambda: sk.top_k(q, 2),
        lambda: sk.normalizer(q),
        lambda: sk.prefill(K[:1], V[:1], q),
        lambda: sk.prefill(np.vstack([K[:1], K[:1]]), V[:2], np.vstack([q, q])),
        lambda: mh.heavy_entries(q[None]),
        lambda: mh.attend(q[None]),
    ):
        with pytest.raises(ValueError, match="Q has values so large that their squares overflow"):
            call()
    assert sk.to_bytes() == before and mh.to_bytes() == before_mh
    # queries that are large but whose squares fit are answered, exactly
    q = q / 1e160 * 1e150
    w = (K @ q[0] / 1e150) ** 2
    np.testing.assert_allclose(sk.attend(q).output[0], w @ V / w.sum(), rtol=VALUE_RTOL)


# ---------------------------------------------------------------------------------------------- keys
def test_a_query_over_keys_whose_gram_matrix_overflows_gets_its_entries():
    """Keys whose Gram matrix overflows (R factor): ``Z`` of a query along them, and its entries (it once got
    ``Z = 0`` and no entries: the rounding floor ``sum_a q_a^2 G_aa`` overflowed with ``G_aa``)."""
    K = np.array([[1e154, 0.0], [1e154, 0.0], [0.0, 1.0]])
    for flush in (False, True):
        sk = ls.KeySketch(2, eps=0.1, block_rows=1)
        for k in K:
            sk.update(k)
        if flush:
            sk.flush()
        q = np.array([[1e-100, 0.0]])
        np.testing.assert_allclose(sk.normalizer(q), [2e108], rtol=VALUE_RTOL)
        hits = sk.heavy_entries(q)
        assert hits.key_ids.tolist() == [0, 1]
        np.testing.assert_allclose(hits.values, [0.5, 0.5], rtol=VALUE_RTOL)


def _fed(how: str, rows: np.ndarray, block_rows: int) -> ls.KeySketch:
    sk = ls.KeySketch(2, eps=0.1, block_rows=block_rows)
    if how == "update":
        for r in rows:
            sk.update(r)
    elif how == "one chunk":
        sk.update_many(rows)
    else:  # row by row, as one-row chunks
        for r in rows:
            sk.update_many(r[None])
    return sk


@pytest.mark.parametrize("block_rows", [1, 2, 4, 5])
def test_keys_whose_sum_of_squares_overflows_are_taken_however_fed(block_rows):
    """Each row's squares fit; three rows' do not.  ``update``, one-row chunks and one chunk all take them, to the
    same bytes (one-row chunks were refused once the block they completed overflowed, naming a value not in
    the chunk), and every query gets the dense entries."""
    rows = np.array([[BIG, 0.0], [BIG, 0.0], [BIG, 0.0], [0.0, 1.0], [0.0, 2.0]])
    got = {how: _fed(how, rows, block_rows) for how in ("update", "one-row chunks", "one chunk")}
    assert len({sk.to_bytes() for sk in got.values()}) == 1
    q = np.array([[1e-10, 1e-10]])  # Z = 1.9e288 (a query of [1, 1] would have a Z beyond float64)
    w = (rows / BIG @ q[0]) ** 2  # dense weights in a safe scale
    for sk in got.values():
        assert sk.n == 5
        hits = sk.heavy_entries(q)
        want = np.flatnonzero(w / w.sum() >= 0.1)
        assert hits.key_ids.tolist() == want.tolist()
        np.testing.assert_allclose(hits.values, (w / w.sum())[want], rtol=VALUE_RTOL)


def test_a_key_whose_own_squares_overflow_is_still_refused_and_changes_nothing():
    sk = _fed("update", np.array([[BIG, 0.0], [0.0, 1.0]]), 4)
    before = sk.to_bytes()
    for bad in (np.array([[1e155, 1e155]]), np.array([[0.0, 1.0], [2e154, 0.0]])):
        with pytest.raises(ValueError, match="squares overflow float64"):
            sk.update_many(bad)
        with pytest.raises(ValueError, match="squares overflow float64"):
            sk.update(bad[-1])
    assert sk.to_bytes() == before


def test_multi_head_tokens_whose_sum_of_squares_overflows_leave_every_call_working():
    """Tokens taken by the step path reach the heads later; once their block overflowed there, every later call
    that handed tokens over raised (``to_bytes`` too) and queries lost their entries."""
    rows = np.array([[BIG, 0.0], [BIG, 0.0], [BIG, 0.0], [0.0, 1.0], [0.0, 1.0]])
    mh = ls.MultiHeadKeySketch(1, 2, eps=0.1, block_rows=4)
    for r in rows:
        mh.update(r[None])
    single = _fed("update", rows, 4)
    q = np.full((1, 1, 2), 1e-10)
    assert mh.heavy_entries(q)[0].key_ids.tolist() == single.heavy_entries(q[0]).key_ids.tolist() == [0, 1, 2]
    np.testing.assert_allclose(mh.normalizer(q)[0], single.normalizer(q[0]), rtol=VALUE_RTOL)
    assert mh.top_k(q, 1)[0].key_ids.size == 1
    assert mh.heads[0].to_bytes() == single.to_bytes()
    ls.MultiHeadKeySketch.from_bytes(mh.to_bytes())


# ---------------------------------------------------------------------------------------------- values
def _exact(d=3, dv=2, **kw) -> ls.KeySketch:
    return ls.KeySketch(d, eps=0.1, value_dim=dv, exact_output=True, **kw)


def test_keys_and_values_whose_moment_terms_overflow_are_refused_and_change_nothing():
    """``k`` of 1e150 (squares fit) and ``v`` of 1e10: the moment state's terms ``k_a k_b v_c`` would be ~1e310
    (the state once took them, and every output along ``k`` became inf).  Every way of feeding them refuses them
    and changes nothing; the same key with a value of 1e-10 is taken and answered exactly."""
    rng = np.random.default_rng(0)
    K, V = rng.standard_normal((6, 3)), rng.standard_normal((6, 2))
    k, v = np.array([1e150, 2e150, -1e150]), np.array([1e10, -3e10])
    sk = _exact().update_many(K, V)
    gated = _exact().update_many(K, V, gates=np.full(6, 0.9))
    mh = ls.MultiHeadKeySketch(2, 3, eps=0.1, value_dim=2, exact_output=True).update_many(
        np.stack([K, K]), np.stack([V, V])
    )
    before = [s.to_bytes() for s in (sk, gated, mh)]
    K2, V2 = np.vstack([K[:1], k]), np.vstack([V[:1], v])
    for call in (
        lambda: sk.update(k, v),
        lambda: sk.update_many(K2, V2),
        lambda: sk.prefill(k[None], v[None], K[:1]),  # a decode step
        lambda: sk.prefill(K2, V2, K2),
        lambda: gated.update(k, v, gate=0.9),
        lambda: gated.update_many(K2, V2, gates=[0.9, 0.9]),
        lambda: gated.prefill(K2, V2, K2, gates=[0.9, 0.9]),
        lambda: mh.update(np.stack([K[0], k]), np.stack([V[0], v])),  # the step path: head 1's token
        lambda: mh.update_many(np.stack([K2, K2]), np.stack([V2, V2])),
        lambda: mh.prefill(np.stack([K2, K2]), np.stack([V2, V2]), np.stack([K2, K2])),
        lambda: mh.prefill(np.stack([k, k])[:, None], np.stack([v, v])[:, None], np.ones((2, 1, 3))),
    ):
        with pytest.raises(ValueError, match="moment state cannot hold"):
            call()
    assert [s.to_bytes() for s in (sk, gated, mh)] == before
    # the same key with a small value: taken, and the exact output is the dense one
    small = np.array([1e-10, 3e-10])
    sk.update(k, small)
    Q = np.array([[1.0, 0.5, 0.2], [1.0, -1.0, -1.0]])
    Kall, Vall = np.vstack([K, k]), np.vstack([V, small])
    W = (Q @ (Kall / 1e150).T) ** 2  # dense weights in a safe scale
    np.testing.assert_allclose(sk.attend(Q).output, (W @ Vall) / W.sum(axis=1, keepdims=True), rtol=1e-9)


def test_a_refused_value_leaves_a_float32_store_as_it_was_and_answers_no_query(recwarn):
    """Keys fed as float32 are held as float32; a float64 row whose value the moment state refuses (``update``, and
    the decode step, ``prefill`` of one row) used to widen the store to float64 before the refusal (the bytes of
    the sketch changed), and the decode step answered its query first (overflow warnings).  Now nothing changes and
    no warning is raised."""
    rng = np.random.default_rng(3)
    sk = _exact(4).update_many(rng.standard_normal((20, 4)).astype(np.float32), rng.standard_normal((20, 2)))
    while sk._store.n < sk._store.capacity:  # a full store: the row's room would be made by widening it
        sk.update(rng.standard_normal(4).astype(np.float32), rng.standard_normal(2))
    assert sk._store.keys.dtype == np.float32
    before = sk.to_bytes()
    k, v = np.full(4, 1e150), np.full(2, 1e10)
    for call in (lambda: sk.update(k, v), lambda: sk.prefill(k[None], v[None], k[None])):
        with pytest.raises(ValueError, match="moment state cannot hold"):
            call()
        assert sk._store.keys.dtype == np.float32
        assert sk.to_bytes() == before
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


# ---------------------------------------------------------------------------------------------- huge queries
@pytest.mark.parametrize("settled", [False, True])
@pytest.mark.parametrize("m", [1, 20])
def test_a_huge_query_whose_weights_fit_gets_its_entries(settled, m):
    """``q`` of 1e150 over keys of 1e4: ``Z = 4e300`` fits, though ``q_a^2 G_aa`` does not; the rounding floor once
    overflowed and set ``Z`` to 0 (no entries) once the sketch had settled."""
    K = np.array([[1e4, 1e4], [1.0, -1.0]])
    sk = ls.KeySketch(2, eps=0.1).update_many(K)
    if settled:
        sk.flush()
    Q = np.tile([[1e150, -1e150]], (m, 1))
    np.testing.assert_allclose(sk.normalizer(Q), np.full(m, 4e300), rtol=VALUE_RTOL)
    hits = sk.heavy_entries(Q)
    assert hits.as_set() == {(i, 1) for i in range(m)}
    np.testing.assert_allclose(hits.values, 1.0, rtol=VALUE_RTOL)
    assert sk.top_k(Q, 1).key_ids[:, 0].tolist() == [1] * m


@pytest.mark.parametrize("settled", [False, True])
@pytest.mark.parametrize("m", [1, 20])
def test_queries_whose_weights_sum_beyond_float64_are_refused(settled, m):
    """``q`` of 1e152 over a key of 1e4: ``<q, k>^2 = 1e312``.  Entries came back with nan values, or none, and
    ``top_k`` gave 0 or nan; such queries are refused with an error that says so, and nothing changes.  The
    normaliser itself is reported as inf."""
    K = np.array([[1e4, 0.0], [0.0, 1.0]])
    V = np.eye(2)
    sk = ls.KeySketch(2, eps=0.1, value_dim=2, exact_output=True).update_many(K, V)
    if settled:
        sk.flush()
    before = sk.to_bytes()
    Q = np.tile([[1e152, 1e152]], (m, 1))
    for call in (
        lambda: sk.heavy_entries(Q),
        lambda: sk.top_k(Q, 1),
        lambda: sk.attend(Q),
        lambda: sk.prefill(K[:m] if m == 1 else np.tile(K[:1], (m, 1)), np.tile(V[:1], (m, 1)), Q),
    ):
        with pytest.raises(ValueError, match="sum beyond float64's range"):
            call()
    assert sk.to_bytes() == before
    assert np.isinf(sk.normalizer(Q)).all()
    mh = ls.MultiHeadKeySketch(1, 2, eps=0.1).update_many(K[None])
    with pytest.raises(ValueError, match="sum beyond float64's range"):
        mh.heavy_entries(Q[None])


def test_queries_with_a_subnormal_normaliser_keep_their_entries_and_outputs():
    """Queries of 1e-160 over unit keys (Z ~ 1e-320, subnormal): a causal chunk still reports the entries of
    brute force and finite outputs, and a query whose component orthogonal to every key is 1e150 gets output 1
    (a rescaling of the query would have overflowed it: found in review, never shipped)."""
    K = np.array([[1.0, 0.0], [0.0, 1.0]])
    V = np.array([[1.0], [2.0]])
    sk = ls.KeySketch(2, eps=0.1, value_dim=1, exact_output=True)
    r = sk.prefill(K, V, np.ones((2, 2)) * 1e-160)
    assert [r.entries.row(i)[0].tolist() for i in range(2)] == [[0], [0, 1]]
    np.testing.assert_allclose(r.entries.values, [1.0, 0.5, 0.5], rtol=1e-12)
    np.testing.assert_allclose(r.output[:, 0], [1.0, 1.5], rtol=1e-12)
    one = ls.KeySketch(2, eps=0.1, value_dim=1, exact_output=True)
    one.update_many(np.array([[0.0, 1.0]] * 3), np.ones((3, 1)))
    q = np.array([[1e150, 1e-160]])
    for res in (one.attend(q), one.attend(np.vstack([q] * 3))):
        np.testing.assert_allclose(res.output[:, 0], 1.0, rtol=1e-12)
