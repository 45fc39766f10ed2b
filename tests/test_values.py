"""Values travelling with keys: exact outputs (p = 2 and exact p = 4), causal prefill and decode steps, heavy
outputs and captured mass, against dense attention computed here with plain NumPy."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import heavy_tailed_keys

import levstream as ls

#: Exact outputs against dense attention (float64; the issue's target is 1e-10), relative to the largest
#: output of the batch.
OUTPUT_RTOL = 1e-10

EPS = 0.02


def dense_outputs(Q: np.ndarray, K: np.ndarray, V: np.ndarray, p: float, eps: float):
    """``(output, heavy_output, captured_mass)`` of |x|^p attention of ``Q`` over all of ``K``."""
    W = np.abs(Q @ K.T) ** p
    A = W / W.sum(axis=1, keepdims=True)
    heavy = np.where(A >= eps, A, 0.0)
    return A @ V, heavy @ V, heavy.sum(axis=1)


def causal_outputs(Q: np.ndarray, K: np.ndarray, V: np.ndarray, start: int, p: float = 2.0) -> np.ndarray:
    """Row ``i`` of a chunk starting at key ``start`` sees keys ``0 .. start + i``."""
    out = []
    for i in range(Q.shape[0]):
        w = np.abs(K[: start + i + 1] @ Q[i]) ** p
        out.append(w @ V[: start + i + 1] / w.sum())
    return np.array(out)


def assert_close(got: np.ndarray, want: np.ndarray, rtol: float = OUTPUT_RTOL) -> None:
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= rtol * scale, np.abs(got - want).max() / scale


@pytest.fixture(scope="module")
def kv():
    K = heavy_tailed_keys(4000, 6, seed=3)
    V = np.random.default_rng(4).standard_normal((4000, 5))
    Q = np.random.default_rng(5).standard_normal((30, 6))
    return K, V, Q


@pytest.mark.parametrize("p, options", [(2.0, {}), (4.0, {"exact": True})])
def test_attend_outputs_equal_dense_attention(kv, p, options):
    K, V, Q = kv
    sk = ls.KeySketch(6, eps=EPS, p=p, value_dim=5, exact_output=True, block_rows=512, **options)
    sk.update_many(K[:2500], V[:2500])
    for i in range(2500, 2600):  # single rows wait in the buffers
        sk.update(K[i], V[i])
    sk.update_many(K[2600:], V[2600:])
    before = sk.to_bytes()
    r = sk.attend(Q)
    assert sk.to_bytes() == before, "attend changed the sketch"
    out, heavy, mass = dense_outputs(Q, K, V, p, EPS)
    assert_close(r.output, out)
    assert_close(r.heavy_output, heavy, 1e-9)
    np.testing.assert_allclose(r.captured_mass, mass, rtol=1e-9, atol=1e-12)
    restored = ls.KeySketch.from_bytes(sk.to_bytes())
    assert_close(restored.attend(Q).output, out)


@pytest.mark.parametrize("exact_output", [True, False])
def test_prefill_chunks_and_decode_steps_equal_dense_causal_attention(kv, exact_output):
    K, V, _ = kv
    Qc = np.random.default_rng(8).standard_normal((K.shape[0], 6))
    sk = ls.KeySketch(6, eps=EPS, value_dim=5, exact_output=exact_output, block_rows=256)
    got, start = [], 0
    for stop in (700, 701, 1500, 1530):  # chunks of 700, 1, 799 and 30 rows
        r = sk.prefill(K[start:stop], V[start:stop], Qc[start:stop])
        assert r.heavy_output.shape == (stop - start, 5) and sk.n == stop
        got.append((start, r))
        start = stop
    for i in range(1530, 1600):  # decode steps: chunks of one row
        got.append((i, sk.prefill(K[i:i + 1], V[i:i + 1], Qc[i:i + 1])))
    for start, r in got:
        m = r.heavy_output.shape[0]
        if exact_output:
            assert_close(r.output, causal_outputs(Qc[start:start + m], K, V, start))
            assert not r.output.flags.writeable
        else:
            assert r.output is None
        assert not (r.heavy_output.flags.writeable or r.captured_mass.flags.writeable)
        for i in range(m):  # heavy entries of each row: exactly the dense causal ones, with their output and mass
            w = (K[: start + i + 1] @ Qc[start + i]) ** 2
            a = w / w.sum()
            ids, vals = r.entries.row(i)
            assert ids.tolist() == np.flatnonzero(a >= EPS).tolist()
            np.testing.assert_allclose(vals, a[ids], rtol=1e-9)
            np.testing.assert_allclose(r.heavy_output[i], a[ids] @ V[ids], rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(r.captured_mass[i], a[ids].sum(), rtol=1e-9)


def test_multi_head_prefill_and_attend(kv):
    K, V, Q = kv
    H = 3
    Ks = np.stack([K[:1200] * (h + 1) + h for h in range(H)])
    Vs = np.stack([V[:1200] - h for h in range(H)])
    Qs = np.stack([Q[:20] + h for h in range(H)])
    mh = ls.MultiHeadKeySketch(H, 6, eps=EPS, value_dim=5, exact_output=True, block_rows=256)
    r = mh.prefill(Ks[:, :20], Vs[:, :20], Qs)
    for h in range(H):
        assert_close(r.output[h], causal_outputs(Qs[h], Ks[h], Vs[h], 0))
    mh.update_many(Ks[:, 20:], Vs[:, 20:])
    r = mh.attend(Qs)
    assert r.output.shape == (H, 20, 5) and r.captured_mass.shape == (H, 20) and len(r.entries) == H
    for h in range(H):
        out, heavy, mass = dense_outputs(Qs[h], Ks[h], Vs[h], 2.0, EPS)
        assert_close(r.output[h], out)
        assert_close(r.heavy_output[h], heavy, 1e-9)


def test_bad_values_change_nothing(kv):
    K, V, _ = kv
    sk = ls.KeySketch(6, eps=EPS, value_dim=5, exact_output=True).update_many(K[:100], V[:100])
    before = sk.to_bytes()
    bad = [
        (lambda: sk.update(K[100]), ValueError, "value row of length 5 is required"),
        (lambda: sk.update(K[100], V[100, :4]), ValueError, "v must have length 5"),
        (lambda: sk.update(K[100], np.full(5, np.nan)), ValueError, "finite"),
        (lambda: sk.update_many(K[100:110]), ValueError, r"V \(one value row per key"),
        (lambda: sk.update_many(K[100:110], V[100:109]), ValueError, "one value row per key"),
        (lambda: sk.update_many(K[100:110], V[100:110, :3]), ValueError, "5 columns"),
        (lambda: sk.prefill(K[100:110], V[100:110], K[100:109]), ValueError, "one query per key"),
        (lambda: sk.extend([(K[100:110], V[100:110]), (K[110:120], V[110:119])]), ValueError, "item 1 rejected"),
    ]
    for call, exc, match in bad:
        with pytest.raises(exc, match=match):
            call()
        assert sk.to_bytes() == before
    keys_only = ls.KeySketch(6, eps=EPS)
    with pytest.raises(ValueError, match="keeps no values"):
        keys_only.update(K[0], V[0])
    with pytest.raises(ValueError, match="attend needs value rows"):
        keys_only.update_many(K[:10]).attend(K[:2])


def test_exact_output_needs_an_exact_normaliser():
    with pytest.raises(ValueError, match="exact_output=True is available for p = 2 and for p = 4"):
        ls.KeySketch(4, eps=0.1, p=3, value_dim=2, exact_output=True)
    with pytest.raises(ValueError, match="exact_output=True needs value rows"):
        ls.KeySketch(4, eps=0.1, exact_output=True)
    with pytest.raises(ValueError, match="memory_budget"):
        ls.KeySketch(16, eps=0.1, p=4, exact=True, value_dim=64, exact_output=True, memory_budget=2**20)


def test_values_merge_exactly_and_keys_only_sketches_cost_nothing_more(kv):
    K, V, Q = kv
    a = ls.KeySketch(6, eps=EPS, value_dim=5, exact_output=True).update_many(K[:1800], V[:1800])
    b = ls.KeySketch(6, eps=EPS, value_dim=5, exact_output=True).update_many(K[1800:], V[1800:], offset=1800)
    out, heavy, _ = dense_outputs(Q, K, V, 2.0, EPS)
    merged = a.copy().merge(b)
    assert_close(merged.attend(Q).output, out)
    assert_close(merged.attend(Q).heavy_output, heavy, 1e-9)
    with pytest.raises(ValueError, match="value_dim, exact_output"):
        a.copy().merge(ls.KeySketch(6, eps=EPS).update_many(K[:10], offset=5000))
    plain = ls.KeySketch(6, eps=EPS).update_many(K)
    with_values = ls.KeySketch(6, eps=EPS, value_dim=5).update_many(K, V)
    assert plain.num_retained == with_values.num_retained
    assert plain.to_bytes() != with_values.to_bytes()  # values are carried ...
    assert ls.KeySketch.from_bytes(plain.to_bytes()).value_dim is None  # ... only when asked for


def test_empty_prefill_is_a_no_op(kv):
    K, V, _ = kv
    sk = ls.KeySketch(6, eps=EPS, value_dim=5, exact_output=True).update_many(K[:50], V[:50])
    mh = ls.MultiHeadKeySketch(2, 6, eps=EPS, value_dim=5, exact_output=True)
    mh.update_many(np.stack([K[:50]] * 2), np.stack([V[:50]] * 2))
    for sketch, shape in ((sk, (0,)), (mh, (2, 0))):
        before = sketch.to_bytes()
        r = sketch.prefill(np.zeros((*shape, 6)), np.zeros((*shape, 5)), np.zeros((*shape, 6)))
        assert r.output.shape == (*shape, 5) and r.captured_mass.shape == shape
        assert sketch.to_bytes() == before
    assert sk.update_many(np.zeros((0, 6)), np.zeros((0, 5)), ids=[]).to_bytes() == sk.to_bytes()
