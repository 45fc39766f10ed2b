"""Smoke test of examples/power_lm.py: a p = 2 power-attention LM decoded from levstream states.

The example trains two tiny models, decodes the power model with one ``MultiHeadKeySketch`` per
layer and with a dense NumPy KV cache, and compares both with the full causal forward of the torch
model in float64.  This test reads the JSON it writes and checks the figures against the values
issue's requirements and against each other: the dense cache is an independent NumPy path, the
torch forward a third one, and attention weights obey identities (they sum to one, so at most
1/eps of them are >= eps) that no code path is trusted for.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "power_lm.py"
TIMEOUT_S = 180  # --quick takes ~25 s alone; the machine is shared

#: Logits of the levstream decode vs the float64 full causal forward (the values issue's bound).
LOGITS_RTOL = 1e-6
#: Exact-output bits per character from levstream vs from the dense cache on the same text: both
#: are float64 evaluations of the same model, so they agree to rounding.
BPC_RTOL = 1e-9
#: Attention weights and masses are float64 sums of terms in [0, 1]: rounding slack on "<= 1".
MASS_SLACK = 1e-12
#: Peak state bytes of the levstream decoder at the largest vs the smallest quick context (4x
#: apart): once the context exceeds one block of rows plus the candidate capacity, the state
#: oscillates between the retained keys and that bound whatever the context (the cache grows 4x).
STATE_GROWTH = 1.5


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    pytest.importorskip("torch", reason="the power LM example needs the extra levstream[torch]")
    out = tmp_path_factory.mktemp("power_lm")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], cwd=out,
                          capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    assert proc.returncode == 0, f"power_lm.py failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads((out / "power-lm.json").read_text()), proc.stdout


def test_logits_equal_the_full_forward(result):
    res, stdout = result
    check = res["decode_check"]
    assert check["passed"] and "PASSED" in stdout
    for path in ("levstream_vs_full", "dense_cache_vs_full"):
        for part in ("prompt", "generated"):
            assert 0.0 <= check[path][part] <= LOGITS_RTOL, (path, part, check[path][part])
    assert len(check["text"]) == check["generated"] > 0


def test_bits_per_char_sane(result):
    res, _ = result
    for kind in ("power", "softmax"):
        bpc = res["training"][kind]["val_bpc"]
        assert math.isfinite(bpc) and 0.5 < bpc < 8.0, (kind, bpc)  # uniform over 96 chars: 6.6
    heavy = res["heavy_only"]
    assert [row["eps"] for row in heavy["by_eps"]] == [0.01, 0.05]
    for row in heavy["by_eps"]:
        assert row["exact_bpc"] == pytest.approx(heavy["dense_cache_exact_bpc"], rel=BPC_RTOL)
        for key in ("heavy_bpc", "heavy_renorm_bpc"):
            assert math.isfinite(row[key]) and 0.5 < row[key] < 16.0, (key, row)
        for layer_mass in row["captured_mass_mean"]:
            assert all(0.0 <= m <= 1.0 + MASS_SLACK for m in layer_mass), row
        # weights sum to one: at most 1/eps of them are >= eps
        assert all(0 < k <= 1 / row["eps"] for k in row["heavy_entries_per_query_head"]), row
    # the same exact model: the entries >= 0.05 are among those >= 0.01, so they carry less mass
    small, large = heavy["by_eps"]
    for m_small, m_large in zip(small["captured_mass_mean"], large["captured_mass_mean"]):
        assert all(a >= b - MASS_SLACK for a, b in zip(m_small, m_large)), (m_small, m_large)


def test_state_flat_cache_linear(result):
    res, _ = result
    rows = res["speed_memory"]
    lev = sorted((r["context"], r["peak_state_bytes"]) for r in rows if r["method"] == "levstream")
    dense = sorted((r["context"], r["state_bytes"]) for r in rows if r["method"] == "dense")
    assert len(lev) >= 2 and [n for n, _ in lev] == [n for n, _ in dense]
    assert lev[-1][1] <= STATE_GROWTH * lev[0][1], lev
    # the cache holds every key and value of every layer and head: bytes proportional to tokens
    cfg, steps = res["config"], rows[0]["steps"]
    for n, nbytes in dense:
        assert nbytes == 2 * 8 * cfg["layers"] * cfg["dim"] * (n + steps), (n, nbytes)
    assert dense[-1][1] > lev[-1][1]
    for r in rows:
        assert r["tokens_per_second"] > 0 and r["peak_rss_bytes"] > 0
        assert r["logits_rel_diff_vs_other"] <= LOGITS_RTOL  # the same greedy steps, both ways


def test_heavy_tokens_listed(result):
    res, stdout = result
    cfg, eps = res["config"], res["decode_check"]["eps"]
    shown = res["decode_check"]["heavy_tokens"]
    assert len(shown) == 3 and "heavy earlier tokens for generated position" in stdout
    for item in shown:
        assert [layer["layer"] for layer in item["layers"]] == list(range(cfg["layers"]))
        for layer in item["layers"]:
            assert [h["head"] for h in layer["heads"]] == list(range(cfg["heads"]))
            for head in layer["heads"]:
                weights = [e["weight"] for e in head["top"]]
                assert 0 < head["n_heavy"] <= 1 / eps
                assert len(head["top"]) == min(8, head["n_heavy"])
                assert weights == sorted(weights, reverse=True)
                assert all(eps <= w <= 1.0 + MASS_SLACK for w in weights), weights
                assert sum(weights) <= head["captured_mass"] + MASS_SLACK <= 1.0 + 2 * MASS_SLACK
                # causal: only this position and earlier ones can carry attention
                assert all(0 <= e["position"] <= item["position"] for e in head["top"])
