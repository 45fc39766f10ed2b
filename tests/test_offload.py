"""The product worker (levstream._offload): products equal to the lifted product computed here with NumPy, the
same sketch bit for bit as with the ingest helpers, slots reclaimed when their tickets are dropped, no worker with a
thread budget of 1, and processes that fork or exit with products in flight."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from conftest import heavy_tailed_keys

import levstream as ls
from levstream import _offload
from levstream._kernels.lift import feature_pairs

pytestmark = pytest.mark.skipif(
    _offload._semaphore_functions() is None,
    reason="the product worker needs glibc's semaphores (Linux)",
)


def lifted(X: np.ndarray) -> np.ndarray:
    """``phi(X)``: the products ``x_a x_b`` (a <= b), off-diagonal ones times sqrt(2), in the state's order."""
    d = X.shape[1]
    cols = [
        X[:, a] * X[:, b] * (1.0 if a == b else np.sqrt(2.0)) for a in range(d) for b in range(a, d)
    ]
    return np.stack(cols, axis=1)


def job(m: int, d: int, dv: int, seed: int):
    rng = np.random.default_rng(seed)
    X, V = rng.standard_normal((m, d)), rng.standard_normal((m, dv))
    ia, ib = feature_pairs(d)
    return X, V, ia, ib


def test_products_equal_the_lifted_product_and_slots_come_back():
    X, V, ia, ib = job(128, 7, 5, 0)
    D = ia.shape[0]
    want = lifted(X).T @ V
    gc.collect()  # (other tests' sketches may still hold slots: their products pending)
    tickets = []
    while (
        ticket := _offload.submit(X, V, ia, ib, 3, D)
    ) is not None:  # until every slot is in flight
        tickets.append(ticket)
        assert len(tickets) <= _offload.SLOTS
    assert len(tickets) >= 10
    for t in tickets[:10]:
        got = t.wait()
        assert got is not None
        assert np.allclose(got, want, rtol=1e-12, atol=1e-12 * np.abs(want).max())
    # tickets dropped without a wait: their slots come back once their jobs are done
    del tickets
    gc.collect()
    for _ in range(3 * _offload.SLOTS):
        t = _offload.submit(X, V, ia, ib, 3, D)
        assert t is not None
        assert np.allclose(t.wait(), want, rtol=1e-12, atol=1e-12 * np.abs(want).max())


def test_no_worker_on_a_budget_of_one_thread():
    X, V, ia, ib = job(16, 4, 3, 1)
    before = ls.get_num_threads()
    ls.set_num_threads(1)
    try:
        assert _offload.submit(X, V, ia, ib, 4, ia.shape[0]) is None
    finally:
        ls.set_num_threads(before)


def test_inputs_it_cannot_read_in_place_are_declined():
    X, V, ia, ib = job(16, 4, 3, 2)
    assert _offload.submit(np.asfortranarray(X), V, ia, ib, 4, ia.shape[0]) is None
    assert _offload.submit(X, V.astype(np.float32), ia, ib, 4, ia.shape[0]) is None


def decode(sk: ls.KeySketch, K: np.ndarray, V: np.ndarray, start: int, stop: int) -> list:
    return [sk.prefill(K[i][None], V[i][None], K[i][None]) for i in range(start, stop)]


def test_a_decode_loop_is_the_same_bit_for_bit_with_the_worker_or_the_helpers(monkeypatch):
    n, d, dv = 3000, 8, 4
    K = heavy_tailed_keys(n, d, seed=3)
    V = np.random.default_rng(3).standard_normal((n, dv))
    worker, helpers = (ls.KeySketch(d, eps=0.02, value_dim=dv, exact_output=True) for _ in range(2))
    for sk in (worker, helpers):
        sk.update_many(K[:1200], V[:1200])
    taken = _offload._get_worker().queued
    got = decode(worker, K, V, 1200, n)
    assert (
        _offload._get_worker().queued - taken >= (n - 1200) // 128 - 1
    )  # the worker took the products
    monkeypatch.setattr(_offload, "submit", lambda *args: None)
    want = decode(helpers, K, V, 1200, n)
    for a, b in zip(got, want):
        assert np.array_equal(a.output, b.output)
        assert np.array_equal(a.entries.key_ids, b.entries.key_ids)
    assert worker.to_bytes() == helpers.to_bytes()
    W = (K @ K[-1]) ** 2
    assert (
        np.abs(got[-1].output[0] - W @ V / W.sum()).max() <= 1e-10 * np.abs(W @ V / W.sum()).max()
    )


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX-only")
def test_a_child_forked_with_a_product_in_flight_computes_it_itself():
    n, d, dv = 2000, 6, 3
    K = heavy_tailed_keys(n, d, seed=4)
    V = np.random.default_rng(4).standard_normal((n, dv))
    sk = ls.KeySketch(d, eps=0.05, value_dim=dv, exact_output=True)
    sk.update_many(K[:1000], V[:1000])
    decode(sk, K, V, 1000, 1100)
    i = 1100
    while (
        sk._moments._pending is None or sk._moments._pending._ticket is None
    ):  # a product handed over
        decode(sk, K, V, i, i + 1)
        i += 1
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            signal.alarm(60)
            os.close(read)
            decode(sk, K, V, i, i + 300)  # settles the parent's product, and hands over its own
            os.write(write, sk.to_bytes())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    child = b""
    while chunk := os.read(read, 1 << 20):
        child += chunk
    os.close(read)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    decode(sk, K, V, i, i + 300)
    assert child == sk.to_bytes()


#: the start of the scripts below: a product's inputs at d = 64
PRELUDE = (
    "import numpy as np, levstream as ls\n"
    "from levstream import _offload\n"
    "from levstream._kernels.lift import feature_pairs\n"
    "X = np.random.default_rng(0).standard_normal((128, 64)); V = X.copy(); ia, ib = feature_pairs(64)\n"
)


def run_script(code: str) -> str:
    """Run ``PRELUDE + code`` in a fresh interpreter; its output (it must exit with 0)."""
    proc = subprocess.run(
        [sys.executable, "-c", PRELUDE + code],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_a_process_that_exits_with_products_in_flight_exits_cleanly():
    out = run_script(
        "tickets = [_offload.submit(X, V, ia, ib, 32, ia.shape[0]) for _ in range(20)]\n"
        "assert all(t is not None for t in tickets)\n"
        "print('submitted')\n"
    )
    assert "submitted" in out


def test_a_stopped_worker_leaves_its_products_to_whoever_waits():
    out = run_script(
        "tickets = [_offload.submit(X, V, ia, ib, 32, ia.shape[0]) for _ in range(40)]\n"
        "_offload._get_worker().stop()\n"
        "done = [t.wait() is not None for t in tickets]\n"
        "assert _offload.submit(X, V, ia, ib, 32, ia.shape[0]) is None\n"
        "K = np.random.default_rng(1).standard_normal((600, 8)); W = K[:, :4].copy()\n"
        "sk = ls.KeySketch(8, eps=0.05, value_dim=4, exact_output=True)\n"
        "sk.update_many(K[:300], W[:300])\n"
        "r = [sk.prefill(K[i][None], W[i][None], K[i][None]) for i in range(300, 600)][-1]\n"
        "w = (K @ K[-1]) ** 2\n"
        "assert np.allclose(r.output[0], w @ W / w.sum(), rtol=1e-10, atol=1e-12)\n"
        "print(sum(done), len(done))\n"
    )
    done, total = map(int, out.split())
    assert total == 40 and done >= 1
