"""The decode step's fast path (``KeySketch._decode_plain``: one float64 row of keys, values and a query when
nothing but taking the row is due) against the general path it short-cuts: the same answers and the same sketch,
bit for bit, over streams that fold blocks, prune, grow, refresh the live cache and hand the moment buffer over;
outputs against dense causal attention computed here; and the inputs it must not take (bad rows, float32 rows,
a stream that forgets) going to the general path, with its errors and nothing changed."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import heavy_tailed_keys

import levstream as ls


def general_only(sk: ls.KeySketch) -> ls.KeySketch:
    """``sk`` with the fast path switched off (an instance attribute shadows the method)."""
    sk._decode_plain = lambda K, V, Q: None  # type: ignore[method-assign]
    return sk


@pytest.fixture
def fast_calls(monkeypatch):
    """Counts of the fast path's answers (``taken``) and refusals (``declined``) in the test."""
    calls = {"taken": 0, "declined": 0}
    original = ls.KeySketch._decode_plain

    def counted(self, K, V, Q):
        result = original(self, K, V, Q)
        calls["taken" if result is not None else "declined"] += 1
        return result

    monkeypatch.setattr(ls.KeySketch, "_decode_plain", counted)
    return calls


def same_result(a: ls.AttentionResult, b: ls.AttentionResult) -> None:
    for name in ("indptr", "key_ids", "values"):
        assert np.array_equal(getattr(a.entries, name), getattr(b.entries, name)), name
    assert np.array_equal(a.heavy_output, b.heavy_output)
    assert np.array_equal(a.captured_mass, b.captured_mass)
    assert (a.output is None) == (b.output is None)
    if a.output is not None:
        assert np.array_equal(a.output, b.output)


def live_cache_state(sk: ls.KeySketch) -> tuple | None:
    """What the live cache has done (derived data, not in ``to_bytes``): the rows it accounts for and scans, and
    its refreshes."""
    live = sk._live
    return None if live is None else (live.upto, live.rows.n, live.rows_mark, live.refresh_due)


def dense_causal_output(K: np.ndarray, V: np.ndarray, q: np.ndarray) -> np.ndarray:
    w = (K @ q) ** 2
    return w @ V / w.sum()


@pytest.mark.parametrize(
    "d, dv, eps, exact_output, prefix, block_rows",
    [
        (6, 5, 0.02, True, 3000, 256),  # long stream: moment buffer hand-overs and settles
        (8, 3, 0.05, True, 40, 64),  # short stream: the moment record, then the buffer
        (5, 4, 0.1, False, 500, 128),  # values without exact outputs
        (16, 16, 0.01, True, 1500, 512),
        (6, 5, 0.02, True, 100, None),  # one long live cache: it refreshes as G grows
    ],
)
def test_fast_path_equals_general_path_bit_for_bit(
    fast_calls, d, dv, eps, exact_output, prefix, block_rows
):
    rng = np.random.default_rng(d * 100 + dv)
    n = prefix + 1400
    K = heavy_tailed_keys(n, d, seed=d)
    V = rng.standard_normal((n, dv))
    Q = rng.standard_normal((n, d))
    options = {"eps": eps, "value_dim": dv, "exact_output": exact_output}
    if block_rows is not None:
        options["block_rows"] = block_rows
    fast, slow = ls.KeySketch(d, **options), general_only(ls.KeySketch(d, **options))
    for sk in (fast, slow):
        sk.update_many(K[:prefix], V[:prefix])
    fed, fed_v = (
        K.copy(),
        V.copy(),
    )  # the rows as the sketches hold them (float32 steps round theirs)
    for i in range(prefix, n):
        k, v, q = K[i][None], V[i][None], Q[i][None]
        if i % 211 == 0:  # a chunk between steps (the general path's ingest)
            for sk in (fast, slow):
                sk.update_many(K[i : i + 1], V[i : i + 1])
            continue
        if i % 97 == 0:  # a float32 step: taken by the general path in both
            k, v, q = k.astype(np.float32), v.astype(np.float32), q.astype(np.float32)
            fed[i], fed_v[i] = k[0], v[0]
        if i % 53 == 0:  # queries between steps build and drop views
            same_result(fast.attend(Q[i - 3 : i]), slow.attend(Q[i - 3 : i]))
        got, want = fast.prefill(k, v, q), slow.prefill(k, v, q)
        same_result(got, want)
        if exact_output and i % 101 == 0:
            out = dense_causal_output(fed[: i + 1], fed_v[: i + 1], q[0].astype(np.float64))
            assert np.abs(got.output[0] - out).max() <= 1e-10 * np.abs(out).max()
        assert live_cache_state(fast) == live_cache_state(slow)
        if i % 400 == 0:
            assert fast.to_bytes() == slow.to_bytes()
    assert fast.to_bytes() == slow.to_bytes()
    assert fast.n == slow.n == n
    # the fast path answered most steps (it declines 2 in 128 with exact outputs, and the others above)
    assert fast_calls["taken"] > 0.8 * (n - prefix), fast_calls


def decode_ready(
    d: int = 6, dv: int = 4, n: int = 2000
) -> tuple[ls.KeySketch, np.ndarray, np.ndarray]:
    """A sketch in the middle of a decode loop (its live cache current), with keys and values to feed."""
    K = heavy_tailed_keys(n + 10, d, seed=9)
    V = np.random.default_rng(9).standard_normal((n + 10, dv))
    sk = ls.KeySketch(d, eps=0.05, value_dim=dv, exact_output=True)
    sk.update_many(K[:n], V[:n])
    for i in range(n, n + 5):
        sk.prefill(K[i][None], V[i][None], K[i][None])
    return sk, K[n + 5 :], V[n + 5 :]


@pytest.mark.parametrize(
    "bad, match",
    [
        ("nan key", "finite"),
        ("inf value", "finite"),
        ("nan query", "finite"),
        ("overflowing key", "overflow"),
        ("moment overflow", "moment state cannot hold"),
        ("wide value", "4 columns"),
    ],
)
def test_bad_step_rows_are_refused_by_the_general_path_and_change_nothing(fast_calls, bad, match):
    sk, K, V = decode_ready()
    k, v, q = K[:1].copy(), V[:1].copy(), K[1:2].copy()
    if bad == "nan key":
        k[0, 2] = np.nan
    elif bad == "inf value":
        v[0, 1] = np.inf
    elif bad == "nan query":
        q[0, 0] = np.nan
    elif bad == "overflowing key":
        k[0, 0] = 1e200  # its square overflows float64
    elif bad == "moment overflow":
        k[0, :] = 1e100  # finite squares, but ||k||^2 max|v| is not
        v[0, :] = 1e150
    else:
        v = np.zeros((1, V.shape[1] + 1))
    before, taken = sk.to_bytes(), fast_calls["taken"]
    with pytest.raises(ValueError, match=match):
        sk.prefill(k, v, q)
    assert sk.to_bytes() == before
    assert fast_calls["taken"] == taken
    # and the stream goes on by the fast path
    sk.prefill(K[:1], V[:1], K[1:2])
    assert fast_calls["taken"] == taken + 1


def test_explicit_ids_between_steps_and_forgetting_streams(fast_calls):
    n, d, dv = 2000, 6, 4
    K = heavy_tailed_keys(n + 10, d, seed=9)
    V = np.random.default_rng(9).standard_normal((n + 10, dv))
    fast, slow = (ls.KeySketch(d, eps=0.05, value_dim=dv, exact_output=True) for _ in range(2))
    general_only(slow)
    for sk in (fast, slow):
        sk.update_many(K[:n], V[:n])
        sk.update_many(K[n : n + 2], V[n : n + 2], ids=np.array([10**6, 10**6 + 7]))
    taken = fast_calls["taken"]
    for i in range(n + 2, n + 8):  # the steps' ids continue after the largest id seen
        k, v = K[i][None], V[i][None]
        got = fast.prefill(k, v, k)
        same_result(got, slow.prefill(k, v, k))
        assert got.entries.key_ids.max() <= 10**6 + 8 + i - (n + 2)
    assert fast_calls["taken"] > taken
    assert fast.to_bytes() == slow.to_bytes()
    assert fast.universal_set().ids.max() <= 10**6 + 13
    # a stream that has forgotten weighs every row: the general way
    gated = ls.KeySketch(d, eps=0.05, value_dim=dv, exact_output=True)
    gated.update_many(K[:4], V[:4])
    gated.prefill(K[4][None], V[4][None], K[4][None], gates=0.5)
    taken = fast_calls["taken"]
    gated.prefill(K[5][None], V[5][None], K[5][None])
    assert fast_calls["taken"] == taken
