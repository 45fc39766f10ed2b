"""The live scan of one head (``levstream._kernels.live.heavy_p2``) and its norm bound.

A query reads the candidates by descending norm and stops at the first one whose norm shows
``||q|| ||k|| < sqrt(cut)``; the rows fed since the last fold are scanned whole.  Rows are placed at
``<q, k>^2 = cut (1 +- delta)`` down to ``delta = 1e-12``, with every norm from tiny to huge, and the answer must
be exactly the float64 scan's (brute force over all rows, computed here with NumPy).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_heavy_matches_dense

from levstream._kernels.live import heavy_p2, int8_rows, scan_norms


def rows_at_the_cut(rng: np.random.Generator, q: np.ndarray, cut: float) -> tuple[np.ndarray, list]:
    """Rows with ``<q, k>^2 = cut (1 +- delta)`` for delta from 1e-12 to 1e-3, each with an orthogonal part of
    size 1e-3, 1 and 1e3 (norms from just above ``sqrt(cut) / ||q||`` to far above), tiny and huge rows, and a
    row whose unit components underflow float32; and whether each is at or above the cut (None: whatever the
    float64 scan says)."""
    d = q.shape[0]
    qn = q / np.linalg.norm(q)
    rows, above = [], []
    for delta in (1e-12, 1e-10, 1e-8, 1e-6, 1e-5, 1e-4, 1e-3):
        for sign in (1.0, -1.0):
            target = np.sqrt(cut * (1.0 + sign * delta))  # <q, k> = target
            r = rng.standard_normal(d)
            r -= (r @ qn) * qn  # orthogonal to q
            for size in (1.0, 1e-3, 1e3):
                rows.append(qn * target / np.linalg.norm(q) + size * r)
                above.append(sign > 0)
    for scale in (1e-160, 1e140):  # tiny and huge rows: below/above every cut
        rows.append(rng.standard_normal(d) * scale)
        above.append(scale > 1.0)
    tiny = np.zeros(d)
    tiny[0], tiny[1] = 1e-50, 1.0  # unit components that underflow float32
    rows.append(tiny * 1e3)
    above.append(None)
    return np.array(rows), above


def test_scan_norms_never_understate():
    K = np.array([[3.0, 4.0], [1e-200, 0.0], [0.0, 0.0], [1e160, 1e160]])
    norms = scan_norms(K)
    assert norms[0] == 5.0
    assert np.isinf(norms[1:]).all()  # squares that underflow or overflow: never skipped
    K32 = np.random.default_rng(3).standard_normal((200, 64)).astype(np.float32)
    wide = np.sqrt((K32.astype(np.float64) ** 2).sum(axis=1))
    got = scan_norms(K32)
    assert got.dtype == np.float64  # float32 rows are summed in float64, within the bound's 1e-9 margin
    np.testing.assert_allclose(got, wide, rtol=1e-13)


@pytest.mark.parametrize("in_candidates", [1.0, 0.5, 0.0])
@pytest.mark.parametrize("ids_rising", [True, False])
@pytest.mark.parametrize("extra_norms", ["int8", True, False])
@pytest.mark.parametrize("own_rows", [0, 2])
def test_scan_by_norm_is_the_float64_scan(in_candidates, ids_rising, extra_norms, own_rows):
    """Candidates by descending norm (the scan stops early) and unordered rows after them (with their norms, then
    the short ones are skipped, and with their int8 rows too -- the candidates' as well -- then those the int8
    bound rules out; or without either), and rows outside ``G`` (a decode step's own key: their terms join ``Z``): exactly the rows at or
    above the cut, values to rounding, ids ascending whatever the order of the rows."""
    rng = np.random.default_rng(31)
    d, thresh = 16, 0.01
    for trial in range(4):
        A = rng.standard_normal((3 * d, d)) * rng.uniform(0.1, 10.0)
        G = A.T @ A
        Q = rng.standard_normal((2, d)) * 10.0 ** rng.uniform(-3, 3)
        own = rng.standard_normal((own_rows, d)) * rng.uniform(0.1, 10.0)
        z = np.einsum("ij,jk,ik->i", Q, G, Q) + ((Q @ own.T) ** 2).sum(axis=1)
        placed, above = rows_at_the_cut(rng, Q[0], thresh * z[0])
        K0 = np.vstack([placed, rng.standard_normal((40, d)) * 10.0 ** rng.uniform(-2, 2, (40, 1))])
        n = K0.shape[0]
        shuffle = rng.permutation(n)
        c = int(in_candidates * n)
        norms = scan_norms(K0[shuffle[:c]])
        order = np.argsort(-norms, kind="stable")
        perm = np.concatenate([shuffle[:c][order], shuffle[c:]])  # scan position -> row of K0
        K = np.vstack([K0[perm], own])
        all_ids = np.arange(n + own_rows) * 3 + 7
        ids = all_ids if ids_rising else all_ids[::-1].copy()
        Ke = np.ascontiguousarray(K[c:n])
        Ke8, we, _ = int8_rows(Ke) if extra_norms == "int8" else (np.zeros((0, 0), np.int8), np.zeros(0), None)
        Kc = np.ascontiguousarray(K[:c])
        K8, wk, _ = int8_rows(Kc) if extra_norms == "int8" else (np.zeros((0, 0), np.int8), np.zeros(0), None)
        ints, floats = heavy_p2(
            Q, G, Kc, norms[order], K8, wk, ids[:c], Ke,
            scan_norms(Ke) if extra_norms else np.zeros(0), Ke8, we, ids[c:n], own.reshape(own_rows, d),
            ids[n:], thresh)
        indptr, zz = ints[:3], floats[:2]
        total = indptr[2]
        key_ids, pos, vals = ints[3:3 + total], ints[3 + total:], floats[2:]
        assert pos.shape == key_ids.shape == vals.shape == (total,)
        np.testing.assert_allclose(zz, z, rtol=1e-12)
        for i in range(2):
            a, b = indptr[i], indptr[i + 1]
            dots = (K @ Q[i]) ** 2
            exact = np.flatnonzero(dots >= thresh * zz[i])  # the float64 scan over every row
            got = pos[a:b]
            assert sorted(got.tolist()) == exact.tolist(), (trial, i)
            if i == 0:  # the rows placed at the cut of query 0 are on the side they were placed
                where = np.argsort(perm)
                for j, above_cut in enumerate(above):
                    if above_cut is not None:
                        assert (where[j] in exact) == above_cut, (trial, j)
            assert (np.diff(key_ids[a:b]) > 0).all()
            np.testing.assert_array_equal(key_ids[a:b], np.sort(ids[got]))
            np.testing.assert_allclose(vals[a:b], dots[got] / zz[i], rtol=1e-12)


def test_ill_conditioned_pending_rows_fall_back_to_the_summary_and_the_rows():
    """Keys [1.8e8, 2.4e8] and [1, 0] still pending and the query [0.8, -0.6], orthogonal to the first: ``q^T G q``
    from the live Gram matrix loses every digit (it gave Z = 0 and no entries; found by a stress test).  The
    live kernels see that its rounding bound is not small against it and every path answers from the summary
    and the pending rows instead: the second key holds all the attention."""
    import levstream as ls

    K = np.array([[0.6 * 3e8, 0.8 * 3e8], [1.0, 0.0]])
    V = np.array([[5.0], [1.0]])
    q = np.array([[0.8, -0.6]])
    dots = (K.astype(np.longdouble) @ q[0].astype(np.longdouble)) ** 2
    A = (dots / dots.sum()).astype(float)
    assert A[1] > 1 - 1e-15 and abs(float(dots.sum()) - 0.64) < 1e-15

    def check(hits, what):
        np.testing.assert_array_equal(hits.key_ids, [1], err_msg=what)
        np.testing.assert_allclose(hits.values, [A[1]], rtol=1e-12, err_msg=what)

    sk = ls.KeySketch(2, eps=0.1, value_dim=1, exact_output=True)
    sk.update_many(K, V)
    check(sk.heavy_entries(q), "heavy_entries")
    np.testing.assert_allclose(sk.normalizer(q), [0.64], rtol=1e-12)
    res = sk.attend(q)
    check(res.entries, "attend")
    np.testing.assert_allclose(res.output, [[A @ V[:, 0]]], rtol=1e-12)
    assert sk.top_k(q, 1).key_ids.tolist() == [[1]]
    gated = ls.KeySketch(2, eps=0.1).update_many(K, gates=np.array([1.0, 0.5]))
    check(gated.heavy_entries(q), "gated")
    step = ls.KeySketch(2, eps=0.1, value_dim=1, exact_output=True)
    step.update(K[0], V[0])
    r = step.prefill(K[1:], V[1:], q)
    check(r.entries, "decode step")
    np.testing.assert_allclose(r.output, [[A @ V[:, 0]]], rtol=1e-12)
    np.testing.assert_allclose(r.captured_mass, [A[1]], rtol=1e-12)
    mh = ls.MultiHeadKeySketch(2, 2, eps=0.1, value_dim=1, exact_output=True)
    for t in range(2):
        mh.update(np.stack([K[t], K[t]]), np.stack([V[t], V[t]]))
    for h, hits in enumerate(mh.heavy_entries(np.stack([q, q]))):
        check(hits, f"multi-head {h}")
    out = mh.attend(np.stack([q, q]))
    np.testing.assert_allclose(out.output[:, 0, 0], [A @ V[:, 0]] * 2, rtol=1e-12)


def test_the_scanned_arrays_keep_their_types_across_a_flush():
    """The view a query reads right after a flush (no pending row: the plain view) hands the kernels arrays of
    the same numba types as the live view does (a read-only placeholder is another type, and cost a second
    compilation, 25-35 ms, on the first step after the first flush)."""
    import numba

    import levstream as ls
    from levstream import _query

    rng = np.random.default_rng(3)
    sk = ls.KeySketch(6, eps=0.1, value_dim=2, exact_output=True, block_rows=64)
    seen = set()
    for t in range(200):
        k, v, q = rng.standard_normal((1, 6)), rng.standard_normal((1, 2)), rng.standard_normal((1, 6))
        sk.prefill(k, v, q)
        with sk._lock:
            view = sk._view()
            plain = sk._store.n == sk._pending_from
            seen.add((plain, tuple(str(numba.typeof(a)) for a in _query.scan_arrays(view))))
    assert {plain for plain, _ in seen} == {True, False}  # both kinds of view were read
    assert len({types for _, types in seen}) == 1, seen


def test_live_and_decode_loops_load_no_kernel_after_their_first_steps():
    """Once a live loop's or a decode loop's first steps are done, later steps load or compile no kernel, whatever
    happens on the way: rows kept by the live cache, refreshes, moment folds, flushes, strided or read-only
    rows.  Run in a fresh process,
    where every kernel is loaded (from numba's cache, or compiled) at its first call: the first kept row used to
    load the int8 kernel in the middle of the loop (the demo's live step on a fresh install reported at ~2 ms),
    and a decode loop's first full moment buffer the fold's kernels (~10 ms from the cache, ~0.7 s compiled)."""
    import subprocess
    import sys

    code = """
import importlib, pkgutil
import numpy as np, levstream as ls
import levstream._kernels as kernels
modules = [importlib.import_module("levstream._kernels." + m.name) for m in pkgutil.iter_modules(kernels.__path__)]
def loaded():
    return sum(len(f.overloads) for m in modules for f in vars(m).values() if hasattr(f, "overloads"))
rng = np.random.default_rng(0)
d, dv = 8, 3
live = ls.KeySketch(d, eps=0.05, block_rows=1024)
decode = ls.KeySketch(d, eps=0.05, value_dim=dv, exact_output=True, block_rows=1024)
live.update_many(rng.standard_normal((3072, d)))  # whole blocks: nothing pending
decode.update_many(rng.standard_normal((3072, d)), rng.standard_normal((3072, dv)))
for t in range(3):  # short rows: the cache keeps none of them
    live.update(rng.standard_normal(d) * 1e-3)
    live.heavy_entries(rng.standard_normal((1, d)))
    decode.prefill(rng.standard_normal((1, d)) * 1e-3, rng.standard_normal((1, dv)), rng.standard_normal((1, d)))
before = loaded()
kept = live._live.rows.n + decode._live.rows.n
assert kept == 0
strided = np.asfortranarray(rng.standard_normal((1500, d)))  # its rows are strided
frozen = rng.standard_normal((1500, d))
frozen.flags.writeable = False
for t in range(1500):  # past moment folds (every 128 rows), a flush (1024) and refreshes
    long = 50.0 if t % 10 == 0 else 1.0  # long rows: kept by the cache
    live.update(strided[t] if t % 7 == 1 else frozen[t] if t % 7 == 2 else rng.standard_normal(d) * long)
    live.heavy_entries(rng.standard_normal((1, d)))
    decode.prefill(rng.standard_normal((1, d)) * long, rng.standard_normal((1, dv)), rng.standard_normal((1, d)))
print(before, loaded(), live._live.rows.n + decode._live.rows.n)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, after, kept = map(int, out.stdout.split())
    assert kept > 0, "no row was kept: the test does not exercise the kept-row path"
    assert after == before, f"{after - before} kernel version(s) loaded during the loops"


@pytest.mark.parametrize("shuffled", [False, True])
def test_entries_come_in_id_order_however_many_a_query_has(shuffled):
    """The scans read the candidates by descending norm, so a query's entries come out of id order and are sorted
    (by insertion for a few, ``argsort`` beyond ``_INSERTION_SORT_MAX``).  Keys nearly along one direction, with
    norms rising, falling or shuffled against their ids: thresholds from the sketch's ``eps`` up give queries
    from ~60 entries down to none, on one head (``heavy_p2``), on many heads (``heavy_p2_stacked``) and in a
    decode step; each row's ids must be strictly ascending and the entries those of brute force."""
    from naive import dense_heavy

    import levstream as ls
    from levstream._kernels.live import _INSERTION_SORT_MAX

    rng = np.random.default_rng(7)
    d, n, heads = 4, 70, 3
    scales = np.linspace(0.5, 2.0, n)
    along = np.zeros(d)
    along[0] = 1.0
    K = np.empty((heads, n, d))
    for h in range(heads):
        s = rng.permutation(scales) if shuffled else (scales if h % 2 else scales[::-1])
        K[h] = s[:, None] * (along + 0.01 * rng.standard_normal((n, d)))
    q = along + 0.001 * rng.standard_normal(d)
    # small blocks: the keys are folded into the candidates (read by norm) rather than waiting (read by id)
    one = ls.KeySketch(d, eps=0.002, block_rows=16)
    many = ls.MultiHeadKeySketch(heads, d, eps=0.002, block_rows=16)
    decode = ls.KeySketch(d, eps=0.002, value_dim=1, exact_output=True, block_rows=16)
    for j in range(n - 1):
        one.update(K[0, j])
        many.update_many(K[:, j : j + 1])
        decode.prefill(K[0, j : j + 1], np.ones((1, 1)), rng.standard_normal((1, d)))
    counts = set()
    for eps in np.geomspace(0.002, 0.2, 25):
        got = {
            "one": one.heavy_entries(q[None], eps),
            **{f"head {h}": hits for h, hits in enumerate(many.heavy_entries(np.tile(q, (heads, 1, 1)), eps))},
        }
        for name, hits in got.items():
            h = int(name.split()[1]) if name.startswith("head") else 0
            ids = hits.key_ids.tolist()
            assert ids == sorted(set(ids)), (name, eps, ids)
            assert_heavy_matches_dense(hits, dense_heavy(q[None], K[h, : n - 1], eps), eps)
            counts.add(len(ids))
    step = decode.prefill(K[0, n - 1 :], np.ones((1, 1)), q[None])
    ids = step.entries.key_ids.tolist()
    assert ids == sorted(set(ids)) and len(ids) > _INSERTION_SORT_MAX
    assert_heavy_matches_dense(step.entries, dense_heavy(q[None], K[0], 0.002), 0.002)
    assert max(counts) > 3 * _INSERTION_SORT_MAX and 0 in counts and len(counts) > 15, sorted(counts)
