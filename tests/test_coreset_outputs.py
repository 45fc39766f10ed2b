"""Heavy-only outputs of coreset sketches (general p): bounds against dense attention.

With an approximate normaliser ``Z~`` the heavy entries carry the coreset values ``A~`` and, per entry, the
interval ``A~ (1 -+ delta)``.  ``attend`` and ``prefill`` report ``captured_mass`` and ``heavy_output`` with ``A~``
and the bounds on the *true* mass and output of the returned entries; they must hold whenever ``Z~`` is within
``(1 +- delta)`` of the dense ``Z`` (checked per query here, against plain NumPy).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import heavy_tailed_keys

import levstream as ls


def dense(Q: np.ndarray, K: np.ndarray, p: float) -> np.ndarray:
    W = np.abs(Q @ K.T) ** p
    return W / W.sum(axis=1, keepdims=True)


def check_bounds(result, A: np.ndarray, V: np.ndarray, z_ok: np.ndarray, eps: float) -> int:
    """Every true heavy entry returned; true mass/output of the returned entries within the bounds (queries
    whose coreset normaliser is within delta); returns the number of queries checked."""
    entries = result.entries
    lo_m, hi_m = result.captured_mass_bounds
    lo_o, hi_o = result.heavy_output_bounds
    checked = 0
    for i in range(A.shape[0]):
        ids, vals = entries.row(i)
        # the reported sums are those of the coreset values
        np.testing.assert_allclose(result.captured_mass[i], vals.sum(), rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(result.heavy_output[i], vals @ V[ids], rtol=1e-9, atol=1e-12)
        if not z_ok[i]:
            continue
        checked += 1
        assert set(np.flatnonzero(A[i] >= eps).tolist()) <= set(ids.tolist()), f"query {i}: heavy entry missing"
        true_mass = A[i, ids].sum()
        true_out = A[i, ids] @ V[ids]
        tol = 1e-12 * max(1.0, np.abs(true_out).max(initial=0.0))
        assert lo_m[i] - 1e-12 <= true_mass <= hi_m[i] + 1e-12, f"query {i}: mass {true_mass} outside bounds"
        assert np.all(lo_o[i] - tol <= true_out) and np.all(true_out <= hi_o[i] + tol), f"query {i}: output"
    return checked


@pytest.mark.parametrize("p", [1.0, 3.0])
def test_attend_bounds_hold_against_dense(p):
    rng = np.random.default_rng(int(p * 10))
    n, d, dv, eps = 40_000, 6, 3, 0.05
    K = heavy_tailed_keys(n, d, seed=int(p * 10))
    V = rng.standard_normal((n, dv))
    sk = ls.KeySketch(d, eps=eps, p=p, value_dim=dv, rng=1)
    for a in range(0, n, 7000):
        sk.update_many(K[a : a + 7000], V[a : a + 7000])
    Q = np.vstack([rng.standard_normal((30, d)), K[rng.choice(n, 10, replace=False)]])
    result = sk.attend(Q)
    A = dense(Q, K, p)
    Z = (np.abs(Q @ K.T) ** p).sum(axis=1)
    delta = sk.normalizer_summary.distortion
    z_ok = np.abs(sk.normalizer(Q) - Z) <= delta * Z
    assert z_ok.mean() >= 0.9  # the coreset's normaliser is within delta for (nearly) every query
    assert np.abs(sk.normalizer(Q) / Z - 1).max() > 1e-4  # and it is a sample, not every key
    assert check_bounds(result, A, V, z_ok, eps) >= 36


def test_prefill_bounds_hold_against_dense_causal_attention():
    rng = np.random.default_rng(5)
    n, c, d, dv, eps, p = 30_000, 40, 5, 2, 0.05, 3.0
    K = heavy_tailed_keys(n + c, d, seed=5)
    V = rng.standard_normal((n + c, dv))
    sk = ls.KeySketch(d, eps=eps, p=p, value_dim=dv, rng=2).update_many(K[:n], V[:n]).flush()
    assert sk.num_retained < n  # the earlier keys are summarised by a sample
    Q = rng.standard_normal((c, d))
    before = sk.copy()
    result = sk.prefill(K[n:], V[n:], Q)
    A = np.zeros((c, n + c))
    z_ok = np.zeros(c, dtype=bool)
    delta = before.normalizer_summary.distortion
    for i in range(c):
        W = np.abs(K[: n + i + 1] @ Q[i]) ** p
        A[i, : n + i + 1] = W / W.sum()
        # the chunk's own keys are summed exactly; only the earlier keys' part of Z comes from the coreset
        z_held = before.normalizer(Q[i : i + 1])[0]
        z_true_held = W[:n].sum()
        z_ok[i] = abs(z_held - z_true_held) <= delta * z_true_held
    assert z_ok.mean() >= 0.9
    assert check_bounds(result, A, V, z_ok, eps) >= 36


def test_exact_normalisers_have_no_bounds():
    rng = np.random.default_rng(0)
    K, V = rng.standard_normal((200, 4)), rng.standard_normal((200, 2))
    r = ls.KeySketch(4, eps=0.1, value_dim=2).update_many(K, V).attend(rng.standard_normal((3, 4)))
    assert r.captured_mass_bounds is None and r.heavy_output_bounds is None
