"""Smoke test of examples/power_lm.py: a p = 2 power-attention LM decoded from levstream states.

The example trains three tiny models (p = 2 power attention, the same with a learned gate per head
and token, softmax), decodes the power and the gated model with one ``MultiHeadKeySketch`` per
layer and with a dense NumPy KV cache, and compares both with the full causal forward of the torch
model in float64.  This test reads the JSON it writes and checks the figures against the values
and decay issues' requirements and against each other: the dense cache is an independent NumPy
path, the torch forward a third one, and attention weights obey identities (they sum to one, so at
most 1/eps of them are >= eps) that no code path is trusted for.  The heavy tokens the example
lists (from levstream's entries) are recomputed here by brute-force (decayed) attention over the
keys, queries and gates the levstream states were given (the traces the example writes).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "power_lm.py"
TIMEOUT_S = 600  # --quick takes ~35 s alone (three models); 3+ min when the machine is loaded

#: Logits of the levstream decode vs the float64 full causal forward (the values issue's bound).
LOGITS_RTOL = 1e-6
#: Exact-output bits per character from levstream vs from the dense cache on the same text: both
#: are float64 evaluations of the same model, so they agree to rounding.
BPC_RTOL = 1e-9
#: Attention weights and masses are float64 sums of terms in [0, 1]: rounding slack on "<= 1".
MASS_SLACK = 1e-12
#: Heavy-entry weights and masses from levstream vs brute force over the same keys (decay issue).
ENTRY_RTOL = 1e-9
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
    return json.loads((out / "power-lm.json").read_text()), proc.stdout, out


def _part(res: dict, model: str) -> dict:
    return res if model == "power" else res["gated"]


@pytest.mark.parametrize("model", ["power", "gated"])
def test_logits_equal_the_full_forward(result, model):
    res, stdout, _ = result
    check = _part(res, model)["decode_check"]
    assert check["model"] == model
    assert check["passed"] and stdout.count("PASSED") == 2
    for path in ("levstream_vs_full", "dense_cache_vs_full"):
        for part in ("prompt", "generated"):
            assert 0.0 <= check[path][part] <= LOGITS_RTOL, (path, part, check[path][part])
    assert len(check["text"]) == check["generated"] > 0


def test_bits_per_char_sane(result):
    res, _, _ = result
    assert list(res["training"]) == ["power", "softmax", "gated"]
    for kind in ("power", "softmax", "gated"):
        bpc = res["training"][kind]["val_bpc"]
        assert math.isfinite(bpc) and 0.5 < bpc < 8.0, (kind, bpc)  # uniform over 96 chars: 6.6
    # the same model plus one gate per head and layer: H (dim + 1) parameters per layer
    cfg = res["config"]
    extra = res["training"]["gated"]["parameters"] - res["training"]["power"]["parameters"]
    assert extra == cfg["layers"] * cfg["heads"] * (cfg["dim"] + 1)
    assert res["training"]["softmax"]["parameters"] == res["training"]["power"]["parameters"]


@pytest.mark.parametrize("model", ["power", "gated"])
def test_heavy_only_sane(result, model):
    res, _, _ = result
    heavy = _part(res, model)["heavy_only"]
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
    res, _, _ = result
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


@pytest.mark.parametrize("model", ["power", "gated"])
def test_heavy_tokens_listed(result, model):
    res, stdout, _ = result
    check = _part(res, model)["decode_check"]
    cfg, eps = res["config"], check["eps"]
    shown = check["heavy_tokens"]
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


#: The example's vocabulary (newline and printable ASCII), rebuilt here.
VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))


def _char(token) -> str:
    return VOCAB[int(token)]


def _trace(out: Path, model: str) -> dict:
    name = "power-lm" if model == "power" else "power-lm-gated"
    with np.load(out / f"{name}-trace.npz") as data:
        return {k: data[k] for k in data.files}


def _decayed_attention(K, Q, G, t: int) -> np.ndarray:
    """Brute force: the weights of query t over keys 0..t, ``c_j(t) <q_t, k_j>^2`` normalised,
    with ``c_j(t) = g_{j+1} ... g_t`` multiplied out in a loop (no cumulative sums)."""
    c = np.ones(t + 1)
    for j in range(t - 1, -1, -1):
        c[j] = c[j + 1] * G[j + 1]
    w = c * (K[: t + 1] @ Q[t]) ** 2
    return w / w.sum()


def _heavy(A: np.ndarray, eps: float) -> tuple[set, set]:
    """Keys surely >= eps and keys within rounding of eps (either answer is right for those)."""
    sure = set(np.flatnonzero(A >= eps * (1 + ENTRY_RTOL)).tolist())
    edge = set(np.flatnonzero(np.abs(A - eps) <= eps * ENTRY_RTOL).tolist())
    return sure, edge


@pytest.mark.parametrize("model", ["power", "gated"])
def test_heavy_tokens_equal_brute_force(result, model):
    """Every listed heavy token, its weight, age and the head's mean gate, against brute-force
    (decayed) attention over the keys, queries and gates the levstream states were given."""
    res, _, out = result
    check = _part(res, model)["decode_check"]
    tr, eps = _trace(out, model), check["eps"]
    layers, heads, n, _ = tr["K"].shape
    assert tr["Q"].shape == tr["K"].shape and tr["G"].shape == (layers, heads, n)
    assert n == len(tr["tokens"]) == check["prompt_chars"] + check["generated"]
    if model == "power":
        assert np.all(tr["G"] == 1.0)
    else:  # learned gates in (0, 1], and they do decay
        assert np.all((tr["G"] > 0) & (tr["G"] <= 1)) and tr["G"].min() < 0.999
    for item in check["heavy_tokens"]:
        t = item["position"]
        assert item["token"] == _char(tr["tokens"][t])
        for layer in item["layers"]:
            li = layer["layer"]
            for head in layer["heads"]:
                h = head["head"]
                A = _decayed_attention(tr["K"][li, h], tr["Q"][li, h], tr["G"][li, h], t)
                sure, edge = _heavy(A, eps)
                ids = set(head["ids"])
                assert sure <= ids <= sure | edge, (model, t, li, h)
                assert head["n_heavy"] == len(ids) == len(head["ids"])
                np.testing.assert_allclose(head["weights"], A[head["ids"]], rtol=ENTRY_RTOL)
                assert head["captured_mass"] == pytest.approx(A[head["ids"]].sum(),
                                                              rel=ENTRY_RTOL)
                assert head["mean_gate"] == pytest.approx(tr["G"][li, h, :t + 1].mean(),
                                                          rel=1e-12)
                for e in head["top"]:
                    assert e["age"] == t - e["position"] >= 0
                    assert e["weight"] == pytest.approx(A[e["position"]], rel=ENTRY_RTOL)
                    assert e["char"] == _char(tr["tokens"][e["position"]])


@pytest.mark.parametrize("model", ["power", "gated"])
def test_forgetting_table_equals_brute_force(result, model):
    """The per-head summary over every generated token (heavy tokens per step, their ages, mean
    gate, half-life) recomputed from brute-force decayed attention."""
    res, _, out = result
    check = _part(res, model)["decode_check"]
    tr, eps = _trace(out, model), check["eps"]
    layers, heads, n, _ = tr["K"].shape
    rows = {(r["layer"], r["head"]): r for r in check["forgetting"]}
    assert sorted(rows) == [(li, h) for li in range(layers) for h in range(heads)]
    for (li, h), row in rows.items():
        G = tr["G"][li, h]
        ages, counts, edges = [], [], 0
        for t in range(check["prompt_chars"], n):
            A = _decayed_attention(tr["K"][li, h], tr["Q"][li, h], G, t)
            sure, edge = _heavy(A, eps)
            edges += len(edge)
            ages.extend(t - j for j in sure | edge)
            counts.append(len(sure | edge))
        assert row["mean_gate"] == pytest.approx(G.mean(), rel=1e-12)
        assert row["min_gate"] == G.min()
        mean_log = np.log(G).mean()
        assert (row["half_life"] == math.inf) if mean_log == 0 else (
            row["half_life"] == pytest.approx(math.log(2) / -mean_log, rel=1e-9))
        if edges == 0:  # no weight within rounding of eps: the summary is determined exactly
            assert row["heavy_per_token"] == pytest.approx(np.mean(counts), rel=1e-12)
            assert row["max_age"] == max(ages)
            assert row["median_age"] == float(np.median(ages))
        assert 0.0 < row["captured_mass"] <= 1.0 + MASS_SLACK
