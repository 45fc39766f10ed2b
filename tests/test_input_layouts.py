"""The arrays a live loop passes, in the forms users have them: a slice of a larger array (``K[:, t]`` of a
(d, T) array, ``X[:, t:t+1]`` of an (H, T, d) one), read-only arrays, float32 activations, and a (1, d) chunk
instead of a 1-D row.  Each takes the step path (issue 11, item 3) and must leave exactly the state the
canonical input (a C-contiguous float64 row fed by ``update``; a chunk fed by the general path with an
``offset``) leaves: the same bytes, and answers equal to brute force written here.  Bad input through these
paths gets the usual error, naming the argument the user passed, and changes nothing.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_heavy_matches_dense, heavy_tailed_keys
from naive import dense_heavy

import levstream as ls

D, DV, EPS = 6, 3, 0.05
H = 3
N = 700  # past several blocks of the test sketches (block_rows below)
BLOCK = 64


def _readonly(a: np.ndarray) -> np.ndarray:
    a = a.copy()
    a.flags.writeable = False
    return a


def _outputs(Q: np.ndarray, K: np.ndarray, V: np.ndarray) -> np.ndarray:
    W = (Q @ K.T) ** 2
    return W @ V / W.sum(axis=1, keepdims=True)


def _sketch(values: bool) -> ls.KeySketch:
    if values:
        return ls.KeySketch(D, eps=EPS, value_dim=DV, exact_output=True, block_rows=BLOCK)
    return ls.KeySketch(D, eps=EPS, block_rows=BLOCK)


def _feeds(K: np.ndarray, V: np.ndarray | None) -> dict:
    """Ways to feed row ``t`` of ``K`` (and ``V``): each a function of (sketch, t)."""
    KT, VT = np.ascontiguousarray(K.T), None if V is None else np.ascontiguousarray(V.T)

    def v_of(t: int, form: str):
        if V is None:
            return None
        return {
            "row": V[t],
            "column": VT[:, t],
            "readonly": _readonly(V[t]),
            "chunk": V[t : t + 1],
        }[form]

    return {
        "row": lambda sk, t: sk.update(K[t], v_of(t, "row")),
        "column of (d, T)": lambda sk, t: sk.update(KT[:, t], v_of(t, "column")),
        "read-only row": lambda sk, t: sk.update(_readonly(K[t]), v_of(t, "readonly")),
        "(1, d) chunk": lambda sk, t: sk.update_many(K[t : t + 1], v_of(t, "chunk")),
        "(1, d) chunk, strided": lambda sk, t: sk.update_many(
            KT[:, t : t + 1].T, None if V is None else VT[:, t : t + 1].T
        ),
        # the general path of update_many (an offset disables the step path): the reference of the bytes
        "(1, d) chunk with offset": lambda sk, t: sk.update_many(
            K[t : t + 1], v_of(t, "chunk"), offset=t
        ),
    }


@pytest.mark.parametrize("values", [False, True])
def test_row_layouts_leave_the_same_state_and_answers(values: bool) -> None:
    rng = np.random.default_rng(7)
    K = heavy_tailed_keys(N, D, seed=3)
    V = rng.standard_normal((N, DV)) if values else None
    Q = rng.standard_normal((5, D))
    QT = np.ascontiguousarray(Q.T)
    queries = {"rows": Q, "strided": QT.T, "read-only": _readonly(Q), "columns": QT[:, 1:3].T}
    states = {}
    for name, feed in _feeds(K, V).items():
        sk = _sketch(values)
        for t in range(N):
            feed(sk, t)
            if t % 97 == 0:  # queries in between, in every layout
                for qname, Qf in queries.items():
                    expected = dense_heavy(np.asarray(Qf), K[: t + 1], EPS)
                    assert_heavy_matches_dense(sk.heavy_entries(Qf), expected, EPS), (name, qname)
                if values:
                    got = sk.attend(queries["strided"]).output
                    np.testing.assert_allclose(got, _outputs(Q, K[: t + 1], V[: t + 1]), rtol=1e-10)
        states[name] = sk.to_bytes()
    reference = states["(1, d) chunk with offset"]
    for name, data in states.items():
        assert data == reference, name


def test_float32_rows_and_chunks_of_one_row_are_kept_as_float32_alike() -> None:
    K32 = heavy_tailed_keys(N, D, seed=4).astype(np.float32)
    Q32 = np.random.default_rng(8).standard_normal((4, D)).astype(np.float32)
    feeds = {
        "row": lambda sk, t: sk.update(K32[t]),
        "strided row": lambda sk, t: sk.update(np.ascontiguousarray(K32.T)[:, t]),
        "(1, d) chunk": lambda sk, t: sk.update_many(K32[t : t + 1]),
        "(1, d) chunk with offset": lambda sk, t: sk.update_many(K32[t : t + 1], offset=t),
    }
    states = {}
    for name, feed in feeds.items():
        sk = _sketch(False)
        for t in range(N):
            feed(sk, t)
        assert sk._store.keys.dtype == np.float32, name  # float32 in, float32 kept
        expected = dense_heavy(Q32.astype(np.float64), K32.astype(np.float64), EPS)
        assert_heavy_matches_dense(sk.heavy_entries(Q32), expected, EPS)
        states[name] = sk.to_bytes()
    assert len(set(states.values())) == 1


def test_bad_rows_through_the_step_paths_are_refused_naming_the_argument() -> None:
    K = heavy_tailed_keys(200, D, seed=5)
    V = np.random.default_rng(9).standard_normal((200, DV))
    sk = _sketch(True)
    for t in range(150):
        sk.update(K[t], V[t])
    before = sk.to_bytes()
    bad = K[150:151].copy()
    bad[0, 2] = np.nan
    cases = [
        (lambda: sk.update_many(bad, V[150:151]), "X must contain only finite values"),
        (lambda: sk.update(bad[0], V[150]), "x must contain only finite values"),
        (lambda: sk.update_many(K[150:151], V[150:152]), "one value row per key"),
        (lambda: sk.update_many(K[150:151]), "required"),
        (lambda: sk.update_many(K[150:151], V[150:151, :2]), "V must have 3 columns"),
        (lambda: sk.update_many(np.full((1, D), 1e200), V[150:151]), "overflow"),
        (
            lambda: sk.update_many(K[150:151], np.full((1, DV), np.inf)),
            "V must contain only finite values",
        ),
        (lambda: sk.update(K[150], V[150:151]), "v must be 1-D"),
        (
            lambda: sk.heavy_entries(np.full((1, D), np.nan, dtype=np.float32)),
            "Q must contain only finite",
        ),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
        assert sk.to_bytes() == before


def test_multihead_slices_and_float32_tokens_take_the_step_path_alike() -> None:
    T = 300
    K = np.stack(
        [heavy_tailed_keys(T, D, seed=20 + h) for h in range(H)]
    )  # (H, T, D): a model's layout
    Q = np.random.default_rng(11).standard_normal((H, T, D))
    K32 = K.astype(np.float32)
    feeds = {
        "contiguous (H, 1, d)": lambda mh, t: mh.update_many(np.ascontiguousarray(K[:, t : t + 1])),
        "slice X[:, t:t+1]": lambda mh, t: mh.update_many(K[:, t : t + 1]),
        "slice x[:, t]": lambda mh, t: mh.update(K[:, t]),
        "read-only token": lambda mh, t: mh.update(_readonly(K[:, t])),
        # the general path (an offset disables the step path): the reference of the bytes
        "with offset": lambda mh, t: mh.update_many(K[:, t : t + 1], offset=t),
    }
    states = {}
    for name, feed in feeds.items():
        mh = ls.MultiHeadKeySketch(H, D, eps=EPS)
        for t in range(T):
            feed(mh, t)
            if t % 37 == 0:
                got = mh.heavy_entries(Q[:, t : t + 1])  # a strided slice of the queries too
                for h in range(H):
                    expected = dense_heavy(Q[h, t : t + 1], K[h, : t + 1], EPS)
                    assert_heavy_matches_dense(got[h], expected, EPS)
        states[name] = mh.to_bytes()
    assert len(set(states.values())) == 1, {k: hash(v) for k, v in states.items()}
    # float32 tokens: a multi-head sketch holds float64 rows, so they leave the state of their float64 upcast
    up = ls.MultiHeadKeySketch(H, D, eps=EPS)
    f32 = ls.MultiHeadKeySketch(H, D, eps=EPS)
    for t in range(T):
        up.update_many(K32[:, t : t + 1].astype(np.float64))
        f32.update_many(K32[:, t : t + 1]) if t % 2 else f32.update(K32[:, t])
    got = f32.heavy_entries(Q[:, :4].astype(np.float32))
    want = up.heavy_entries(Q[:, :4].astype(np.float32).astype(np.float64))
    for a, b in zip(got, want):
        assert a.key_ids.tolist() == b.key_ids.tolist() and np.array_equal(a.values, b.values)
    assert f32.to_bytes() == up.to_bytes()


def test_decode_steps_take_slices_and_float32_rows_alike() -> None:
    """``prefill`` of one row (a decode step) with the row as a slice, read-only or float32: the state of the
    general path (an ``offset``) and outputs equal to dense attention."""
    rng = np.random.default_rng(12)
    K = heavy_tailed_keys(N, D, seed=6)
    V, Q = rng.standard_normal((N, DV)), rng.standard_normal((N, D))
    KT, VT, QT = (np.ascontiguousarray(A.T) for A in (K, V, Q))
    K32 = K.astype(np.float32)
    feeds = {
        "rows": lambda sk, t: sk.prefill(K[t : t + 1], V[t : t + 1], Q[t : t + 1]),
        "columns": lambda sk, t: sk.prefill(
            KT[:, t : t + 1].T, VT[:, t : t + 1].T, QT[:, t : t + 1].T
        ),
        "read-only": lambda sk, t: sk.prefill(
            _readonly(K[t : t + 1]), _readonly(V[t : t + 1]), _readonly(Q[t : t + 1])
        ),
        "with offset": lambda sk, t: sk.prefill(K[t : t + 1], V[t : t + 1], Q[t : t + 1], offset=t),
    }
    states = {}
    for name, feed in feeds.items():
        sk = _sketch(True)
        for t in range(N):
            out = feed(sk, t).output
            if t % 53 == 0:
                np.testing.assert_allclose(
                    out, _outputs(Q[t : t + 1], K[: t + 1], V[: t + 1]), rtol=1e-10
                )
        states[name] = sk.to_bytes()
    assert len(set(states.values())) == 1, name
    # float32 keys stay float32, as update and update_many keep them
    step, general = _sketch(True), _sketch(True)
    for t in range(N):
        step.prefill(K32[t : t + 1], V[t : t + 1], Q[t : t + 1].astype(np.float32))
        general.prefill(K32[t : t + 1], V[t : t + 1], Q[t : t + 1].astype(np.float32), offset=t)
    assert step._store.keys.dtype == np.float32 and step.to_bytes() == general.to_bytes()


def test_multihead_decode_steps_take_slices() -> None:
    T = 200
    K = np.stack([heavy_tailed_keys(T, D, seed=30 + h) for h in range(H)])
    rng = np.random.default_rng(13)
    V, Q = rng.standard_normal((H, T, DV)), rng.standard_normal((H, T, D))
    states = {}
    for name, layout in {
        "slices": lambda A, t: A[:, t : t + 1],
        "contiguous": lambda A, t: np.ascontiguousarray(A[:, t : t + 1]),
    }.items():
        mh = ls.MultiHeadKeySketch(H, D, eps=EPS, value_dim=DV, exact_output=True)
        for t in range(T):
            out = mh.prefill(layout(K, t), layout(V, t), layout(Q, t).astype(np.float32)).output
            if t % 41 == 0:
                for h in range(H):
                    q = Q[h, t : t + 1].astype(np.float32).astype(np.float64)
                    np.testing.assert_allclose(
                        out[h], _outputs(q, K[h, : t + 1], V[h, : t + 1]), rtol=1e-10
                    )
        states[name] = mh.to_bytes()
    assert states["slices"] == states["contiguous"]


def test_torch_tensors_are_held_as_the_arrays_they_hold() -> None:
    """A float32 tensor is float32 data: held as float32 whichever entry point takes it (update, update_many of
    one row or a chunk, extend, a decode step), as a float32 ndarray is; answers equal brute force."""
    torch = pytest.importorskip(
        "torch", reason="torch not installed (optional extra levstream[torch]; CI installs it)"
    )
    K32 = heavy_tailed_keys(300, D, seed=8).astype(np.float32)
    V = np.random.default_rng(15).standard_normal((300, DV))
    Q = np.random.default_rng(14).standard_normal((3, D))
    T = torch.from_numpy(K32)
    feeds = {
        "ndarray rows": lambda sk: [sk.update(K32[t], V[t]) for t in range(300)],
        "tensor rows": lambda sk: [sk.update(T[t], V[t]) for t in range(300)],
        "tensor (1, d) chunks": lambda sk: [
            sk.update_many(T[t : t + 1], V[t : t + 1]) for t in range(300)
        ],
        "tensor chunk": lambda sk: sk.update_many(T, V),
        "extend of tensor rows": lambda sk: sk.extend((T[t], V[t]) for t in range(300)),
        "decode steps of tensors": lambda sk: [
            sk.prefill(T[t : t + 1], V[t : t + 1], torch.from_numpy(Q[:1])) for t in range(300)
        ],
    }
    states = {}
    for name, feed in feeds.items():
        sk = _sketch(True)
        feed(sk)
        assert sk._store.keys.dtype == np.float32, name
        got = sk.heavy_entries(torch.from_numpy(Q.astype(np.float32)))
        want = dense_heavy(Q.astype(np.float32).astype(np.float64), K32.astype(np.float64), EPS)
        assert_heavy_matches_dense(got, want, EPS)
        states[name] = sk.universal_set().ids.tolist()
    assert len({repr(v) for v in states.values()}) == 1, states
    with pytest.raises(TypeError, match="real numeric array"):
        sk.update(torch.ones(D, requires_grad=True), V[0])


def test_gates_as_0d_arrays_and_tensors_and_value_messages() -> None:
    """A gate given as a 0-d array or tensor (a model's ``sigmoid`` of a scalar) is one number everywhere; a
    multi-head gate of the wrong shape names the shape the user gave; value errors name the value row."""
    torch = pytest.importorskip(
        "torch", reason="torch not installed (optional extra levstream[torch]; CI installs it)"
    )
    k, v = np.ones(D), np.ones(DV)
    reference = _sketch(True).update(k, v).update(k, v, gate=0.5).to_bytes()
    for gate in (np.array(0.5), torch.tensor(0.5, dtype=torch.float64), np.float32(0.5)):
        assert _sketch(True).update(k, v).update(k, v, gate=gate).to_bytes() == reference
        step = _sketch(True).update(k, v)
        step.prefill(k[None], v[None], k[None], gates=gate)
        assert step.to_bytes() == reference
    mh = ls.MultiHeadKeySketch(2, D, eps=EPS)
    with pytest.raises(ValueError, match=r"one per head: shape \(2,\); got shape \(1,\)"):
        mh.update(np.ones((2, D)), gate=np.array([0.5]))
    with pytest.raises(ValueError, match="head 1: gates must satisfy"):
        mh.update(np.ones((2, D)), gate=[0.5, np.nan])
    with pytest.raises(ValueError, match=r"got shape \(2, 2\)"):
        mh.update_many(np.ones((2, 1, D)), gates=np.ones((2, 2)))
    sk = _sketch(True)
    with pytest.raises(ValueError, match=r"length 3 \(the sketch's value_dim\)"):
        sk.update(k, np.ones(5))
    with pytest.raises(ValueError, match="rescale the values"):
        sk.update(k, np.array([1e200, 0.0, 0.0]))
    mhv = ls.MultiHeadKeySketch(2, D, eps=EPS, value_dim=DV, exact_output=True)
    with pytest.raises(ValueError, match="K must contain only finite values"):
        mhv.prefill(np.full((2, 1, D), np.nan), np.ones((2, 1, DV)), np.ones((2, 1, D)))
    assert sk.n == 0 and mhv.n == 0 and mh.n == 0


def test_empty_and_one_item_calls_are_cheap_no_ops_or_single_feeds() -> None:
    """An empty multi-head chunk leaves the tokens waiting in the step buffer where they are (it took the
    general path: every head synced and the live state rebuilt at the next query); ``extend`` of an iterable
    known to hold at most one item feeds it without the snapshot a longer one needs, and a rejected single
    item still changes nothing."""
    mh = ls.MultiHeadKeySketch(H, D, eps=EPS)
    for t in range(5):
        mh.update(np.ones((H, D)) * (t + 1))
    assert mh._nb == 5
    mh.update_many(np.zeros((H, 0, D)))
    assert mh._nb == 5  # still waiting in the step buffer
    before = mh.to_bytes()
    mh.extend([])
    assert mh.to_bytes() == before
    with pytest.raises(ValueError, match="item 0 rejected"):
        mh.extend([np.full((H, D), np.nan)])
    assert mh.to_bytes() == before
    mh.extend([np.ones((H, D))])
    assert mh.n == 6
    sk = _sketch(True)
    sk.extend([(np.ones(D), np.ones(DV))])
    data = sk.to_bytes()
    with pytest.raises(ValueError, match="item 0 rejected"):
        sk.extend([(np.full(D, np.nan), np.ones(DV))])
    with pytest.raises(ValueError, match="item 0 rejected"):
        sk.extend([(np.ones((3, D)), np.ones((2, DV)))])
    assert sk.to_bytes() == data and sk.n == 1
