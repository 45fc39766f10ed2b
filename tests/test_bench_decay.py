"""benchmarks/bench_decay.py (issue 13): the quick run completes with every answer equal to brute force and
reports every figure; its brute force agrees with the log-space twin of tests/naive.py; its checks catch a
wrong answer (a benchmark whose check cannot fail would report wrong speed-ups silently)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import naive
import numpy as np
import pytest

import levstream as ls

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_decay.py"
TIMEOUT_S = 240


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_decay", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_decay"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    del sys.modules["bench_decay"]


def test_quick_run_reports_every_figure_checked(tmp_path):
    out = tmp_path / "decay.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    assert proc.returncode == 0, f"bench_decay --quick failed:\n{proc.stdout}\n{proc.stderr}"
    assert "ok: every checked answer equals brute force" in proc.stdout
    report = json.loads(out.read_text())
    assert report["failures"] == []
    results = report["results"]
    assert set(results) == {"live", "decode", "heads", "bulk", "rss"}
    gates = {"no gates", "gate=1.0", "U[0.999,1]", "U[0.99,1]", "decay=0.999"}
    for name in ("live", "decode"):
        assert set(results[name]["per_gates"]) == gates
        for g, per in results[name]["per_gates"].items():
            assert per["check"]["ok"] and per["check"]["rows"] >= 1000, (name, g)
            assert per["check"]["entries"] > 0, f"{name} {g}: no heavy entry was checked"
            assert per["dense_check"]["ok"] and per["dense_check"]["rows"] >= 10, (name, g)
            for key in ("sketch_step_s", "speedup", "ratio_to_ungated"):
                assert len(per[key]["rounds"]) == 3 and per[key]["median"] > 0, (name, g, key)
            assert per["retained"] > 0 and per["universal_set"] > 0
    assert set(results["bulk"]["per_gates"]) == {"no gates", "gate=1.0", "U[0.9999,1]"}
    for g, per in results["bulk"]["per_gates"].items():
        assert per["check"]["ok"] and per["check"]["entries"] > 0 and per["check"]["same_in_every_round"], g
        assert per["ratio_to_ungated"]["median"] > 0
    heads = results["heads"]
    for kind in ("live", "decode"):
        per = heads[kind]
        for check in ("check", "single_check"):
            assert per[check]["ok"] and per[check]["rows"] >= 100 and per[check]["entries"] > 0, (kind, check)
        assert len(per["ratio"]["rounds"]) == 3 and per["ratio"]["median"] > 0, kind
        assert len(per["retained_per_head"]) == heads["n_heads"] == 12
    assert heads["decode"]["check"]["max_output_rel_err"] <= 1e-10
    rss = results["rss"]
    assert rss["check"]["ok"] and rss["check"]["entries"] > 0 and rss["ratio"] > 0
    assert all(x < 0 for x in rss["log_total_gate"]), "the RSS stream must be gated"
    for name, section in results.items():
        assert "load_start" in section["env"] and "numba" in section["env"]["threads"], name
    figures = [row[0] for row in report["summary"]]
    for what in ("live step", "decode step with values"):
        for g in gates - {"no gates"}:
            assert any(f.startswith(f"{what} {g} / without gates") for f in figures), (what, g)
            assert any(f.startswith(f"{what} {g} vs dense decayed attention") for f in figures), (what, g)
    assert any(f.startswith("bulk build U[0.9999,1] / without gates") for f in figures)
    assert any(f.startswith("12-head gated live step / single-head gated live step") for f in figures)
    assert any(f.startswith("12-head gated decode step with values / single-head") for f in figures)
    assert any(f.startswith("peak RSS streaming gated rows") for f in figures)
    targets = [row for row in report["summary"] if row[2] != "-"]
    assert all(row[3] in (True, False) for row in targets)


def decayed_twin(K, V, gates):
    return naive.DecayedStream(K.shape[1], value_dim=V.shape[1]).update_many(K, V, gates=gates)


@pytest.mark.parametrize("low", [0.999, 0.9, 0.3])
def test_brute_force_equals_the_log_space_twin(bench, low):
    """The blocked brute force against tests/naive.py's DecayedStream, row by row, with gates strong enough
    that the cumulative decay underflows float64 (low = 0.3 over 700 rows: e^-560 on average, less at times)."""
    rng = np.random.default_rng(7)
    n, d = 700, 5
    K = rng.standard_normal((n, d)) * rng.pareto(2.0, (n, 1))
    V, Q = rng.standard_normal((n, 3)), rng.standard_normal((40, d))
    gates = rng.uniform(low, 1.0, n)
    ends = np.sort(rng.integers(1, n + 1, size=40))
    eps = 0.02
    ref = bench.decayed_brute_force(Q, K, ends, bench.log_cumulative(gates, n), eps, V=V, key_block=64,
                                    query_block=7)
    twin = decayed_twin(K, V, gates)
    upto = ends - 1
    heavy = twin.heavy(Q, eps, upto=upto)
    rows = []
    for i in range(Q.shape[0]):
        ids = np.array(sorted(j for (r, j) in heavy if r == i), dtype=np.int64)
        rows.append((ids, np.array([heavy[(i, int(j))] for j in ids])))
    check = bench.compare_rows(rows, ref, eps)
    assert check["ok"] and check["entries"] == len(heavy), check
    assert bench.compare_outputs(twin.outputs(Q, upto=upto), ref)["ok"]


def test_weighted_leverage_equals_the_twin_and_the_sketch(bench):
    rng = np.random.default_rng(8)
    n, d, eps = 3000, 6, 0.02
    K = rng.standard_normal((n, d)) * rng.pareto(2.5, (n, 1))
    gates = rng.uniform(0.99, 1.0, n)
    chunks = np.array_split(K, 7)
    tau = bench.weighted_leverage(chunks, bench.log_cumulative(gates, n), block=256)
    twin = naive.DecayedStream(d).update_many(K, gates=gates)
    np.testing.assert_allclose(tau, twin.universal_scores(), rtol=1e-9, atol=1e-15)
    sk = ls.KeySketch(d, eps=eps)
    for X, g in zip(chunks, np.array_split(gates, 7)):
        sk.update_many(X, gates=g)
    check = bench.compare_universal(sk.universal_set(), tau, eps)
    assert check["ok"] and check["entries"] > 0, check


def test_checks_catch_a_wrong_universal_set(bench):
    rng = np.random.default_rng(9)
    n, d, eps = 2000, 4, 0.02
    K = rng.standard_normal((n, d))
    gates = rng.uniform(0.98, 1.0, n)
    sk = ls.KeySketch(d, eps=eps).update_many(K, gates=gates)
    tau = bench.weighted_leverage([K], bench.log_cumulative(gates, n))
    U = sk.universal_set()
    assert bench.compare_universal(U, tau, eps)["ok"]
    short = ls.UniversalSet(U.ids[1:], U.keys[1:], U.scores[1:], U.eps, U.p, U.n, U.margin)
    assert bench.compare_universal(short, tau, eps)["missed"] == 1
    wrong = ls.UniversalSet(U.ids, U.keys, U.scores * (1 + 1e-7), U.eps, U.p, U.n, U.margin)
    assert not bench.compare_universal(wrong, tau, eps)["ok"]
    # the ungated scores of the same keys are not the decayed ones
    assert not bench.compare_universal(U, bench.weighted_leverage([K], bench.log_cumulative(None, n)),
                                       eps)["ok"]


def test_a_wrong_decayed_answer_makes_the_run_fail(bench, monkeypatch, capsys):
    heavy_entries = ls.KeySketch.heavy_entries

    def drop_last_entry(self, Q, eps=None):  # a sketch that forgets loses one heavy entry per query
        he = heavy_entries(self, Q, eps)
        if not self.forgets or len(he) == 0:
            return he
        indptr = np.minimum(he.indptr, len(he) - 1)
        return ls.HeavyEntries(indptr, he.key_ids[:-1], he.values[:-1], he.eps)

    monkeypatch.setattr(ls.KeySketch, "heavy_entries", drop_last_entry)
    monkeypatch.setattr(bench, "warm_up", lambda *args: None)  # the quick live section alone
    monkeypatch.setattr(bench, "warm_gated", lambda *args: None)
    assert bench.main(["--quick", "--only", "live"]) == 1
    out = capsys.readouterr().out
    assert "CHECK FAILED live U[0.99,1] sketch" in out and "FAILED:" in out
    assert "CHECK FAILED live no gates" not in out
