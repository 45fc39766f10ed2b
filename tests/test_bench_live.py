"""benchmarks/bench_live.py: the quick run completes with every answer equal to brute force, and its
checks catch a wrong answer (a benchmark whose check cannot fail would report wrong speed-ups
silently)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import levstream as ls

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_live.py"
TIMEOUT_S = 240


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_live", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_live"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    del sys.modules["bench_live"]


def naive_causal(Q, K, ends, eps, V=None):
    """Row t: every (key, A) with A >= eps over K[:ends[t]], and the output, one row at a time."""
    rows, outs = [], []
    for t in range(Q.shape[0]):
        w = (K[: ends[t]] @ Q[t]) ** 2
        A = w / w.sum()
        ids = np.flatnonzero(A >= eps)
        rows.append((ids, A[ids]))
        if V is not None:
            outs.append(A @ V[: ends[t]])
    return rows, (np.array(outs) if V is not None else None)


def test_quick_run_checks_every_section(tmp_path):
    out = tmp_path / "live.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    assert proc.returncode == 0, f"bench_live --quick failed:\n{proc.stdout}\n{proc.stderr}"
    assert "ok: every checked answer equals brute force" in proc.stdout
    report = json.loads(out.read_text())
    assert report["failures"] == []
    results = report["results"]
    assert set(results) == {"live", "filtered", "forms", "heads", "bulk", "decode", "short", "prefill", "gemm",
                            "rss"}
    for name in ("live", "decode"):
        for per_n in results[name]["per_n"].values():
            assert per_n["check"]["ok"] and per_n["check"]["rows"] >= 1000
            assert per_n["check"]["entries"] > 0, "no heavy entry was checked"
            assert per_n["dense_check"]["ok"]
    assert results["filtered"]["empty_steps"] > 0 and results["filtered"]["dense_check"]["ok"]
    for case in results["short"]["cases"].values():  # one head and several, every prompt length
        assert case["check"]["ok"] and case["check"]["rows"] >= 2 * case["heads"] * case["steps_checked"]
        assert "max_heavy_output_rel_err" in case["check"]  # heavy outputs and captured mass checked too
    assert {c["heads"] for c in results["short"]["cases"].values()} == {1, 4}
    for name in ("filtered", "forms", "heads", "bulk", "prefill", "gemm", "rss"):
        assert results[name]["check"]["ok"] and results[name]["check"]["entries"] > 0
    for name, form in results["forms"]["forms"].items():  # every form checked against brute force
        assert form["check"]["ok"] and form["check"]["rows"] >= 1000, name
    assert "max_output_rel_err" in results["forms"]["check"]  # the forms with values: outputs checked too
    for name, section in results.items():
        assert "load_start" in section["env"] and "numba" in section["env"]["threads"], name
    assert len(report["summary"]) >= 9


def test_brute_force_equals_the_row_by_row_answer(bench):
    rng = np.random.default_rng(0)
    K = rng.standard_normal((700, 5)) * rng.pareto(2.0, (700, 1))
    V, Q = rng.standard_normal((700, 3)), rng.standard_normal((40, 5))
    ends = np.sort(rng.integers(1, 701, size=40))
    ref = bench.brute_force(Q, K, ends, 0.02, V=V, key_block=64, query_block=7)
    rows, outs = naive_causal(Q, K, ends, 0.02, V)
    assert bench.compare_rows(rows, ref, 0.02)["ok"]
    assert bench.compare_rows(rows, ref, 0.02)["entries"] == sum(len(i) for i, _ in rows)
    assert bench.compare_outputs(outs, ref)["ok"]


def test_checks_catch_missed_spurious_and_wrong_values(bench):
    rng = np.random.default_rng(1)
    K, V = rng.standard_normal((300, 4)), rng.standard_normal((300, 2))
    Q = rng.standard_normal((10, 4))
    ends = np.full(10, 300)
    ref = bench.brute_force(Q, K, ends, 0.01, V=V)
    rows, outs = naive_causal(Q, K, ends, 0.01, V)
    t = next(i for i, (ids, _) in enumerate(rows) if len(ids) > 1)
    ids, vals = rows[t]
    missed = list(rows)
    missed[t] = (ids[1:], vals[1:])
    assert bench.compare_rows(missed, ref, 0.01)["missed"] == 1
    extra = list(rows)
    light = np.setdiff1d(np.arange(300), ids)[0]
    extra[t] = (np.append(ids, light), np.append(vals, 0.5))
    assert bench.compare_rows(extra, ref, 0.01)["spurious"] == 1
    wrong = list(rows)
    wrong[t] = (ids, vals * (1 + 1e-7))
    assert not bench.compare_rows(wrong, ref, 0.01)["ok"]
    bad = outs.copy()
    bad[t, 0] += 1e-8 * np.abs(bad[t]).max()
    assert not bench.compare_outputs(bad, ref)["ok"]


def test_a_wrong_live_answer_makes_the_run_fail(bench, monkeypatch, capsys):
    heavy_entries = ls.KeySketch.heavy_entries

    def drop_last_entry(self, Q, eps=None):  # a sketch that loses one heavy entry per query
        he = heavy_entries(self, Q, eps)
        if len(he) == 0:
            return he
        indptr = np.minimum(he.indptr, len(he) - 1)
        return ls.HeavyEntries(indptr, he.key_ids[:-1], he.values[:-1], he.eps)

    monkeypatch.setattr(ls.KeySketch, "heavy_entries", drop_last_entry)
    assert bench.main(["--quick", "--only", "live"]) == 1
    out = capsys.readouterr().out
    assert "CHECK FAILED live" in out and "FAILED:" in out


def demo_args() -> argparse.Namespace:
    """The parsed flags of a small ``levstream demo`` run."""
    return argparse.Namespace(n=20_000, dim=16, eps=0.01, p=2.0, seed=0, shards=2, queries=50,
                              check=50, plot=None, quiet=True)


def test_demo_prints_a_checked_live_step_line(capsys):
    from levstream._demo import run_demo

    assert run_demo(demo_args())
    out = capsys.readouterr().out
    # (a small n on a busy host may give a ratio below 10, printed with a decimal, or even "slower")
    line = r"live step vs dense\s+[\d.]+ us vs [\d.]+ m?s\s+\([\d,.]+x (?:faster|slower); update\+query\)"
    assert re.search(line, out), out
    assert "ok: every heavy entry found" in out


def test_demo_fails_when_a_live_step_answer_differs(monkeypatch, capsys):
    from levstream._demo import run_demo

    heavy_entries = ls.KeySketch.heavy_entries

    def drop_from_one_query(self, Q, eps=None):  # only the live steps ask about one query
        he = heavy_entries(self, Q, eps)
        if np.shape(Q)[0] != 1 or len(he) == 0:
            return he
        indptr = np.minimum(he.indptr, len(he) - 1)
        return ls.HeavyEntries(indptr, he.key_ids[:-1], he.values[:-1], he.eps)

    monkeypatch.setattr(ls.KeySketch, "heavy_entries", drop_from_one_query)
    assert not run_demo(demo_args())
    out = capsys.readouterr().out
    assert "FAILED: the live step's heavy entries differ from brute force" in out
