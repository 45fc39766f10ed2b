"""A character-level language model with p = 2 power attention, decoded from levstream states.

Each head of the power-attention model weighs the earlier tokens by the square of the query-key
inner product, ``w_ij = <q_i, k_j>^2`` for ``j <= i``, and outputs
``o_i = sum_j w_ij v_j / sum_j w_ij`` (no softmax and no scale: the ratio does not depend on the
scale of q or k).  Rotary position encoding is applied to q and k, so the model runs at any context
length.  A softmax model of the same size is trained for the same number of steps on the same
batches from the same seed, for an honest comparison of validation bits per character.

A third model adds a learned gate per head and token (gated power attention, issue 13):
``g_t = sigmoid(w_h . x_t + b_h)`` from the attention input ``x_t`` of each layer (weights zero and
biases spreading the heads' first gates over 0.95 ... 0.99), and the gate of row t multiplies
everything before it, so key j's weight for query t is ``c_j(t) <q_t, k_j>^2`` with
``c_j(t) = g_{j+1} ... g_t``, normalised over ``j <= t``.  Training computes it in parallel with
``log c_j(t) = L_t - L_j``, L the cumulative sum of log-gates; decoding passes the gates to
``prefill(K, V, Q, gates=G)``.  The example lists, per head, the earlier tokens that stay heavy,
their age and the head's mean gate: strongly gated heads keep only recent tokens.

Decoding keeps one ``levstream.MultiHeadKeySketch(H, d, p=2, value_dim=d, exact_output=True)`` per
layer instead of a KV cache: the prompt goes in with ``prefill`` (causal chunks), every new token as
a chunk of one row.  The script checks that the logits of the power and the gated model equal the
full causal forward of the same model in float64, measures (power model) tokens per second and memory against a dense NumPy KV cache at contexts
up to 10^5 tokens, reports the bits per character when each head keeps only its heavy entries (the
attention weights ``>= eps``, found from levstream's universal set) and lists, for a few generated
tokens, the earlier tokens that are heavy for each head.

Data: the docstrings of a fixed list of Python standard-library modules (always there) plus, for
training only, the licence texts in /usr/share/common-licenses when present; characters outside
printable ASCII become "?".  Nothing is downloaded.  Validation text: every tenth docstring.

Install: ``pip install torch==2.13.0`` (first and alone), then ``pip install -e '.[torch]'``.

Run::

    python examples/power_lm.py               # 3 models of 2 layers x 4 heads, decode timings
    python examples/power_lm.py --no-speed    # the same without the decode timings
    python examples/power_lm.py --no-gated    # power and softmax models only (as before issue 13)
    python examples/power_lm.py --models gated --no-speed   # train and decode one model only
    python examples/power_lm.py --quick       # tiny models, small contexts: a smoke run (< 1 min)
    python examples/power_lm.py --out DIR     # also write DIR/power-lm.json with every figure,
                                              # the weights (power-lm-model.npz, power-lm-gated-
                                              # model.npz) and the decode traces (*-trace.npz)
    python examples/power_lm.py --model DIR/power-lm-model.npz   # decode a saved model again
    python examples/power_lm.py --gated-model DIR/power-lm-gated-model.npz   # a saved gated one

``--quick`` is implied by the environment variable ``LEVSTREAM_QUICK=1``.  The exit status is 1 when
the logits of a levstream decode differ from the full forward by more than ``LOGITS_RTOL``.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import importlib
import inspect
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import numpy as np

#: Standard-library modules whose docstrings make the corpus (a fixed order: the corpus is the same
#: for a given Python version).  Modules missing from a minimal build are skipped and listed.
_MODULE_NAMES = """
abc argparse ast asyncio.base_events asyncio.events asyncio.streams asyncio.tasks base64 bdb
binascii bisect builtins bz2 calendar cmath cmd code codecs collections collections.abc colorsys
concurrent.futures configparser contextlib contextvars copy copyreg csv dataclasses datetime
decimal difflib dis doctest email.message email.parser email.utils enum errno fileinput filecmp
fnmatch fractions ftplib functools gc getopt gettext glob graphlib gzip hashlib heapq hmac html
html.parser http.client http.cookiejar http.server imaplib importlib inspect io ipaddress
itertools json json.decoder json.encoder keyword linecache locale logging logging.config
logging.handlers lzma mailbox marshal math mimetypes mmap multiprocessing.connection
multiprocessing.pool netrc numbers operator optparse os os.path pathlib pdb pickle pickletools
pkgutil platform plistlib poplib posixpath pprint profile pstats queue quopri random re reprlib
runpy sched secrets select selectors shelve shlex shutil signal smtplib socket socketserver
sqlite3 ssl stat statistics string stringprep struct subprocess symtable sys sysconfig tabnanny
tarfile tempfile textwrap threading time timeit token tokenize trace traceback tracemalloc types
typing unicodedata unittest unittest.mock urllib.parse urllib.request urllib.robotparser uuid
warnings wave weakref xml.dom.minidom xml.etree.ElementTree xml.sax zipapp zipfile zipimport zlib
zoneinfo"""
STDLIB_MODULES = tuple(_MODULE_NAMES.split())
LICENSE_DIR = "/usr/share/common-licenses"

#: Vocabulary: newline and printable ASCII; any other character becomes "?".
VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))
_CODE = np.full(0x110000, VOCAB.index("?"), dtype=np.uint8)
_CODE[[ord(c) for c in VOCAB]] = np.arange(len(VOCAB), dtype=np.uint8)

#: Logits of the levstream decode must equal the float64 full forward to this relative difference.
LOGITS_RTOL = 1e-6


@dataclass
class Config:
    dim: int = 128
    heads: int = 4
    layers: int = 2
    context: int = 256  # training window
    batch: int = 16
    steps: int = 500
    lr: float = 3e-3
    rope_base: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


QUICK = Config(dim=32, heads=2, layers=2, context=64, batch=16, steps=40)


# ------------------------------------------------------------------------------------------ corpus
def stdlib_documents() -> tuple[list[str], list[str]]:
    """Docstrings of STDLIB_MODULES and their public classes, methods and functions, in order.

    Each docstring is kept once (the first time it is seen).
    """
    docs: list[str] = []
    seen: set[str] = set()
    missing = []

    def add(obj) -> None:
        doc = inspect.getdoc(obj)
        if doc and doc not in seen:
            seen.add(doc)
            docs.append(doc)

    for name in STDLIB_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            missing.append(name)
            continue
        add(mod)
        for attr, obj in sorted(vars(mod).items()):
            # only what the module defines (builtins defines everything it holds)
            defined_here = name == "builtins" or getattr(obj, "__module__", None) == name
            if attr.startswith("_") or not defined_here:
                continue
            if inspect.isclass(obj):
                add(obj)
                for meth_name, meth in sorted(vars(obj).items()):
                    if not meth_name.startswith("_") and inspect.isroutine(meth):
                        add(meth)
            elif inspect.isroutine(obj):
                add(obj)
    return docs, missing


def license_documents() -> list[str]:
    texts = []
    for path in sorted(glob.glob(os.path.join(LICENSE_DIR, "*"))):
        if os.path.isfile(path):
            with open(path, encoding="utf-8", errors="replace") as fh:
                texts.append(fh.read())
    return texts


def encode(text: str) -> np.ndarray:
    return _CODE[np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)]


def decode_text(tokens) -> str:
    return "".join(VOCAB[int(t)] for t in tokens)


def build_corpus(use_licenses: bool) -> dict:
    """Train / validation token arrays.  Validation: every tenth docstring (never licence text)."""
    docs, missing = stdlib_documents()
    val_docs = docs[9::10]
    train_docs = [d for i, d in enumerate(docs) if i % 10 != 9]
    licenses = license_documents() if use_licenses else []
    train = "".join(d + "\n\n" for d in train_docs + licenses)
    val = "".join(d + "\n\n" for d in val_docs)
    return {
        "train": encode(train), "val": encode(val),
        "info": {"python": sys.version.split()[0], "stdlib_docstrings": len(docs),
                 "missing_modules": missing, "license_files": len(licenses),
                 "train_chars": len(train), "val_chars": len(val),
                 "sha256_train": hashlib.sha256(train.encode()).hexdigest()[:16],
                 "sha256_val": hashlib.sha256(val.encode()).hexdigest()[:16]},
    }


# ------------------------------------------------------------------------------------- torch model
def rope_tables(positions: np.ndarray, head_dim: int, base: float) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin of the rotary angles, (len(positions), head_dim // 2), float64 for any position."""
    inv_freq = base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = np.asarray(positions, dtype=np.float64)[:, None] * inv_freq[None, :]
    return np.cos(angles), np.sin(angles)


def gate_init(heads: int) -> list[float]:
    """Initial gate of each head of the gated model (weights zero): spread over 0.95 ... 0.99."""
    return np.linspace(0.95, 0.99, heads).tolist() if heads > 1 else [0.97]


def build_model(cfg: Config, attention: str):
    """The torch model: ``attention`` is "power" (p = 2), "gated" (p = 2 with a learned gate per
    head and token, decayed as in gated linear attention) or "softmax"."""
    import torch
    from torch import nn

    half = cfg.head_dim // 2

    def rotate(x, cos, sin):  # x: (..., T, head_dim); the halves of each head rotate as pairs
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(cfg.dim), nn.LayerNorm(cfg.dim)
            self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
            self.proj = nn.Linear(cfg.dim, cfg.dim)
            self.fc1, self.fc2 = nn.Linear(cfg.dim, 4 * cfg.dim), nn.Linear(4 * cfg.dim, cfg.dim)
            if attention == "gated":  # one gate per head and token: log g = logsigmoid(w_h.x + b_h)
                self.gate = nn.Linear(cfg.dim, cfg.heads)
                nn.init.zeros_(self.gate.weight)
                with torch.no_grad():
                    self.gate.bias.copy_(torch.logit(torch.tensor(gate_init(cfg.heads))))

        def attend(self, x, cos, sin):
            B, T, _ = x.shape
            q, k, v = self.qkv(x).view(B, T, 3, cfg.heads, cfg.head_dim).permute(2, 0, 3, 1, 4)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
            if attention == "softmax":
                o = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            elif attention == "power":  # p = 2 power attention: w_ij = <q_i, k_j>^2 for j <= i
                w = torch.tril((q @ k.transpose(-1, -2)) ** 2)
                o = (w @ v) / w.sum(dim=-1, keepdim=True)
            else:  # gated: w_ij = c_j(i) <q_i, k_j>^2, log c_j(i) = L_i - L_j, L = cumsum(log g)
                L = nn.functional.logsigmoid(self.gate(x)).transpose(1, 2).cumsum(dim=-1)
                causal = torch.ones(T, T, dtype=torch.bool).tril()
                log_c = (L[..., :, None] - L[..., None, :]).masked_fill(~causal, -math.inf)
                w = (q @ k.transpose(-1, -2)) ** 2 * torch.exp(log_c)
                o = (w @ v) / w.sum(dim=-1, keepdim=True)
            return self.proj(o.transpose(1, 2).reshape(B, T, cfg.dim))

        def forward(self, x, cos, sin):
            x = x + self.attend(self.ln1(x), cos, sin)
            gelu = nn.functional.gelu(self.fc1(self.ln2(x)), approximate="tanh")
            return x + self.fc2(gelu)

    class CharLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(len(VOCAB), cfg.dim)
            self.blocks = nn.ModuleList(Block() for _ in range(cfg.layers))
            self.ln_f = nn.LayerNorm(cfg.dim)
            self.head = nn.Linear(cfg.dim, len(VOCAB))

        def forward(self, idx):  # (B, T) int64 -> logits (B, T, vocab)
            cos, sin = rope_tables(np.arange(idx.shape[1]), cfg.head_dim, cfg.rope_base)
            dtype = self.head.weight.dtype
            cos, sin = torch.tensor(cos, dtype=dtype), torch.tensor(sin, dtype=dtype)
            x = self.emb(idx)
            for block in self.blocks:
                x = block(x, cos, sin)
            return self.head(self.ln_f(x))

    return CharLM()


def batch_starts(n_tokens: int, cfg: Config, seed: int) -> np.ndarray:
    """Window starts of every training batch: one array, so both models see the same data order."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_tokens - cfg.context - 1, size=(cfg.steps, cfg.batch))


def train(cfg: Config, attention: str, train_tokens: np.ndarray, starts: np.ndarray, seed: int):
    import torch

    torch.manual_seed(seed)
    model = build_model(cfg, attention)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.99))
    warmup = max(1, cfg.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.45 * (1.0 + math.cos(math.pi * min(1.0, s / cfg.steps)))))
    data = torch.from_numpy(train_tokens.astype(np.int64))
    offsets = torch.arange(cfg.context + 1)
    losses = []
    t0 = time.perf_counter()
    model.train()
    for step in range(cfg.steps):
        window = data[torch.from_numpy(starts[step])[:, None] + offsets]
        logits = model(window[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, len(VOCAB)),
                                                 window[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    seconds = time.perf_counter() - t0
    model.eval()
    return model, seconds, losses


def bits_per_char(model, tokens: np.ndarray, context: int, max_chars: int) -> float:
    """Mean next-character loss in bits over non-overlapping windows of the training length."""
    import torch

    n_win = min(max_chars, len(tokens) - 1) // context
    idx = torch.from_numpy(tokens[: n_win * context + 1].astype(np.int64))
    x, y = idx[:-1].view(n_win, context), idx[1:].view(n_win, context)
    total = 0.0
    with torch.no_grad():
        for i in range(0, n_win, 32):
            logits = model(x[i:i + 32]).double()
            total += float(torch.nn.functional.cross_entropy(
                logits.reshape(-1, len(VOCAB)), y[i:i + 32].reshape(-1), reduction="sum"))
    return total / (n_win * context) / math.log(2)


def full_forward_float64(model, tokens: np.ndarray) -> np.ndarray:
    """Logits of the whole sequence by the torch model in float64 (the quadratic causal forward)."""
    import copy

    import torch

    m64 = copy.deepcopy(model).double()
    with torch.no_grad():
        return m64(torch.from_numpy(tokens.astype(np.int64))[None])[0].numpy()


# ------------------------------------------------------------------------------------- NumPy model
class NumpyLM:
    """The trained power model in float64 NumPy, one causal chunk at a time; attention is pluggable.

    ``attend(layer, K, V, Q)`` gets the chunk's rotated keys, values and queries as (H, c, d) arrays
    and returns the attention output (H, c, d) of every head: a dense KV cache or levstream states.
    A gated model (weights ``blocks.*.gate.*``) calls ``attend(layer, K, V, Q, G)`` with the gates
    ``G`` (H, c) of the chunk's rows, in (0, 1].
    """

    def __init__(self, weights: dict, cfg: Config):
        self.w = {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}
        self.cfg = cfg
        self.gated = "blocks.0.gate.weight" in self.w

    @classmethod
    def from_torch(cls, model, cfg: Config) -> NumpyLM:
        return cls({k: v.detach().double().numpy() for k, v in model.state_dict().items()}, cfg)

    @staticmethod
    def _layer_norm(x, w, b):
        mu = x.mean(axis=-1, keepdims=True)
        var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-5) * w + b

    def _rotate(self, x, cos, sin):
        half = self.cfg.head_dim // 2
        x1, x2 = x[..., :half], x[..., half:]
        return np.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)

    def forward(self, tokens: np.ndarray, start: int, attend) -> np.ndarray:
        """Logits (c, vocab) of the chunk ``tokens`` at positions ``start, ..., start + c - 1``."""
        cfg, w = self.cfg, self.w
        c, H, d = len(tokens), cfg.heads, cfg.head_dim
        cos, sin = rope_tables(np.arange(start, start + c), d, cfg.rope_base)
        x = w["emb.weight"][tokens]
        for layer in range(cfg.layers):
            p = f"blocks.{layer}."
            h = self._layer_norm(x, w[p + "ln1.weight"], w[p + "ln1.bias"])
            q, k, v = (h @ w[p + "qkv.weight"].T).reshape(c, 3, H, d).transpose(1, 2, 0, 3)
            q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
            kvq = [np.ascontiguousarray(a) for a in (k, v, q)]
            if self.gated:  # g = sigmoid(z) = exp(-log(1 + exp(-z))), (c, H) -> (H, c)
                z = h @ w[p + "gate.weight"].T + w[p + "gate.bias"]
                kvq.append(np.ascontiguousarray(np.exp(-np.logaddexp(0.0, -z)).T))
            o = attend(layer, *kvq)
            o = o.transpose(1, 0, 2).reshape(c, cfg.dim)
            x = x + o @ w[p + "proj.weight"].T + w[p + "proj.bias"]
            h = self._layer_norm(x, w[p + "ln2.weight"], w[p + "ln2.bias"])
            h = h @ w[p + "fc1.weight"].T + w[p + "fc1.bias"]
            h = 0.5 * h * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h ** 3)))
            x = x + h @ w[p + "fc2.weight"].T + w[p + "fc2.bias"]
        x = self._layer_norm(x, w["ln_f.weight"], w["ln_f.bias"])
        return x @ w["head.weight"].T + w["head.bias"]


class DenseCache:
    """Dense NumPy KV cache: every rotated key and value kept; p = 2 attention over all of them.

    With gates (a gated model), the cache also keeps ``L``, the running sum of the log-gates of each
    head, and weighs key j for query i by ``exp(L_i - L_j) <q_i, k_j>^2``: the decayed attention.
    """

    def __init__(self, cfg: Config, capacity: int):
        shape = (cfg.layers, cfg.heads, capacity, cfg.head_dim)
        self.K, self.V = np.empty(shape), np.empty(shape)
        self.L = np.zeros((cfg.layers, cfg.heads, capacity))
        self.n = [0] * cfg.layers

    @property
    def nbytes(self) -> int:  # the filled part (the arrays are allocated for the whole run)
        filled = max(self.n)
        return 2 * self.K[:, :, :filled].nbytes

    def attend(self, layer: int, K, V, Q, G=None) -> np.ndarray:
        n, c = self.n[layer], K.shape[1]
        self.K[layer, :, n:n + c], self.V[layer, :, n:n + c] = K, V
        if G is not None:
            last = self.L[layer, :, n - 1:n] if n else 0.0
            self.L[layer, :, n:n + c] = last + np.cumsum(np.log(G), axis=1)
        self.n[layer] = n + c
        Ks, Vs, Ls = self.K[layer, :, :n + c], self.V[layer, :, :n + c], self.L[layer, :, :n + c]
        out = np.empty_like(Q)
        for i in range(0, c, 64):  # query blocks bound the (H, 64, n) weight matrix
            w = (Q[:, i:i + 64] @ Ks[:, :n + i + 64].transpose(0, 2, 1)) ** 2
            rows = np.arange(i, min(i + 64, c))
            causal = np.arange(w.shape[2])[None, :] <= (n + rows)[:, None]
            if G is not None:  # decay exp(L_i - L_j) <= 1 on and below the diagonal
                log_c = Ls[:, n + rows, None] - Ls[:, None, :n + i + 64]
                w *= np.exp(np.where(causal, log_c, -np.inf))
            else:
                w[:, rows - i] *= causal
            out[:, i:i + 64] = (w @ Vs[:, :n + i + 64]) / w.sum(axis=2, keepdims=True)
        return out

    def fill(self, layer: int, K_rows: np.ndarray, V_rows: np.ndarray) -> None:
        """Append keys and values given as (c, H, d) rows (as the levstream child writes them)."""
        n, c = self.n[layer], K_rows.shape[0]
        self.K[layer, :, n:n + c] = K_rows.transpose(1, 0, 2)
        self.V[layer, :, n:n + c] = V_rows.transpose(1, 0, 2)
        self.n[layer] = n + c


def levstream_values_api() -> bool:
    """True when levstream has the values API (value_dim, exact_output, prefill)."""
    try:
        import levstream as ls

        ls.MultiHeadKeySketch(1, 2, eps=0.5, value_dim=2, exact_output=True)
    except (ImportError, TypeError, AttributeError):
        return False
    return True


def levstream_gates_api() -> bool:
    """True when levstream's multi-head prefill takes per-row gates (issue 13)."""
    import levstream as ls

    try:
        mh = ls.MultiHeadKeySketch(1, 2, eps=0.5, value_dim=2, exact_output=True)
        mh.prefill(np.ones((1, 1, 2)), np.ones((1, 1, 2)), np.ones((1, 1, 2)),
                   gates=np.full((1, 1), 0.5))
    except TypeError:
        return False
    return True


class LevstreamStates:
    """One levstream state per layer instead of a KV cache: every levstream call of the example.

    ``mode`` picks the attention output used downstream: ``"exact"`` (``r.output``), ``"heavy"``
    (``r.heavy_output``: only the weights >= eps, with the exact normaliser) or ``"heavy_renorm"``
    (``r.heavy_output / r.captured_mass``: the heavy entries renormalised to sum to one).
    ``block_rows`` (None: levstream's default) bounds the rows a state buffers before folding them.
    A gated model's gates ``G`` (H, c) go to ``prefill(K, V, Q, gates=G)``.  With ``trace=True`` the
    state also keeps a copy of every key, query and gate it was given (``self.trace``: per layer,
    lists of (H, c, d), (H, c, d) and (H, c) arrays), for checks against brute force.
    """

    def __init__(self, cfg: Config, eps: float, mode: str = "exact", *, keep=None,
                 block_rows: int | None = None, trace: bool = False):
        import levstream as ls

        options = {} if block_rows is None else {"block_rows": block_rows}
        self.sketches = [ls.MultiHeadKeySketch(cfg.heads, cfg.head_dim, eps=eps, p=2,
                                               value_dim=cfg.head_dim, exact_output=True, **options)
                         for _ in range(cfg.layers)]
        self.mode, self.keep = mode, keep  # keep(layer, result) sees every result
        self.trace = [{"K": [], "Q": [], "G": []} for _ in range(cfg.layers)] if trace else None

    @property
    def nbytes(self) -> int:
        return sum(mh.nbytes for mh in self.sketches)

    def attend(self, layer: int, K, V, Q, G=None) -> np.ndarray:
        if self.trace is not None:
            t = self.trace[layer]
            t["K"].append(K.copy())
            t["Q"].append(Q.copy())
            t["G"].append(np.ones(K.shape[:2]) if G is None else G.copy())
        if G is None:
            r = self.sketches[layer].prefill(K, V, Q)
        else:
            r = self.sketches[layer].prefill(K, V, Q, gates=G)
        if self.keep is not None:
            self.keep(layer, r)
        if self.mode == "exact":
            return r.output
        if self.mode == "heavy":
            return r.heavy_output
        mass = r.captured_mass[..., None]
        return np.divide(r.heavy_output, mass, out=np.zeros_like(r.heavy_output), where=mass > 0)


# ---------------------------------------------------------------------------------------- decoding
def row_rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    """max over rows of max|a - b| / max|b|: the relative difference of each logit vector."""
    a, b = np.atleast_2d(a), np.atleast_2d(b)
    return float(np.max(np.max(np.abs(a - b), axis=1) / np.max(np.abs(b), axis=1)))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def generate(lm: NumpyLM, attend, prompt: np.ndarray, n_new: int, *, chunk: int, rng=None,
             forced=None, temperature: float = 0.8, after_step=None):
    """Prefill ``prompt`` in causal chunks, then feed ``n_new`` tokens one at a time.

    Returns the tokens (prompt and new) and the logits of every position.  New tokens are sampled
    from the logits (``rng``) unless ``forced`` gives them; ``after_step(step, position)`` runs
    after each step.
    """
    logits = [lm.forward(prompt[i:i + chunk], i, attend) for i in range(0, len(prompt), chunk)]
    tokens, last = list(prompt), logits[-1][-1]
    for step in range(n_new):
        if forced is not None:
            tok = int(forced[step])
        else:
            prob = np.exp(log_softmax(last / temperature))
            tok = int(rng.choice(len(VOCAB), p=prob / prob.sum()))
        tokens.append(tok)
        last = lm.forward(np.array([tok]), len(tokens) - 1, attend)[0]
        logits.append(last[None])
        if after_step is not None:
            after_step(step, len(tokens) - 1)
    return np.array(tokens), np.concatenate(logits)


def heavy_tokens(result, tokens: np.ndarray, position: int, gates: np.ndarray,
                 top: int = 8) -> list[dict]:
    """Per head: the earlier tokens with attention weight >= eps for the one query of ``result``
    (at ``position``), their age (``position`` minus theirs), and the head's gates so far (``gates``
    (H, position + 1): mean, and the gate of this token; all 1 for an ungated model)."""
    heads = []
    for h, entries in enumerate(result.entries):
        ids, vals = np.asarray(entries.key_ids), np.asarray(entries.values)
        order = np.argsort(-vals, kind="stable")
        heads.append({"head": h, "n_heavy": int(ids.size),
                      "captured_mass": float(np.asarray(result.captured_mass)[h, 0]),
                      "mean_gate": float(gates[h].mean()), "gate": float(gates[h, -1]),
                      "ids": ids.tolist(), "weights": vals.tolist(),
                      "top": [{"position": int(ids[i]), "age": position - int(ids[i]),
                               "char": VOCAB[int(tokens[ids[i]])], "weight": float(vals[i])}
                              for i in order[:top]]})
    return heads


def forgetting(steps: list, G: np.ndarray, eps: float) -> list[dict]:
    """Per layer and head, over the generated tokens: the head's gates and the ages of its heavy
    earlier tokens.  ``steps``: (position, {layer: result}) of every generated token; ``G``: the
    gates (layers, H, n) of every position (ones for an ungated model)."""
    rows = []
    for layer in range(G.shape[0]):
        for h in range(G.shape[1]):
            ages, n_heavy, mass = [], [], []
            for position, res in steps:
                e = res[layer].entries[h]
                ages.extend(position - np.asarray(e.key_ids))
                n_heavy.append(len(e.key_ids))
                mass.append(float(np.asarray(res[layer].captured_mass)[h, 0]))
            log_g = np.log(G[layer, h])
            ages = np.array(ages, dtype=np.int64)
            rows.append({"layer": layer, "head": h, "mean_gate": float(G[layer, h].mean()),
                         "min_gate": float(G[layer, h].min()),
                         # tokens for the decay to halve, at the head's mean log-gate
                         "half_life": float(math.log(2) / -log_g.mean()) if log_g.mean() < 0
                         else math.inf,
                         "heavy_per_token": float(np.mean(n_heavy)),
                         "captured_mass": float(np.mean(mass)),
                         "median_age": float(np.median(ages)) if ages.size else None,
                         "p90_age": float(np.percentile(ages, 90)) if ages.size else None,
                         "max_age": int(ages.max()) if ages.size else None,
                         "eps": eps})
    return rows


def decode_check(model, lm: NumpyLM, cfg: Config, prompt: np.ndarray, args) -> dict:
    """Generate with levstream states, feed the same tokens to a dense cache, compare both with
    the full causal forward of the torch model in float64.

    ``out["trace"]`` holds the keys, queries and gates the levstream states were given (layers, H,
    n, ...) and the tokens: the caller writes them next to the JSON, for brute-force checks.
    """
    chunk = max(1, len(prompt) // 2)  # the prompt goes in as two causal chunks
    kept: dict = {}
    states = LevstreamStates(cfg, args.eps, keep=kept.__setitem__, block_rows=args.block_rows,
                             trace=True)
    show = sorted({0, args.generate // 2, args.generate - 1})
    steps: list = []

    def after_step(step, position):
        steps.append((position, dict(kept)))

    tokens, lev_logits = generate(lm, states.attend, prompt, args.generate, chunk=chunk,
                                  rng=np.random.default_rng(args.seed), after_step=after_step)
    dense = DenseCache(cfg, len(tokens))
    _, dense_logits = generate(lm, dense.attend, prompt, args.generate, chunk=chunk,
                               forced=tokens[len(prompt):])
    full = full_forward_float64(model, tokens)
    trace = {key: np.stack([np.concatenate(t[key], axis=1) for t in states.trace])
             for key in ("K", "Q", "G")}
    P = len(prompt)  # positions from P on were fed one token at a time
    out = {"model": "gated" if lm.gated else "power", "prompt_chars": P,
           "generated": args.generate, "prefill_chunk": chunk,
           "eps": args.eps, "temperature": 0.8, "text": decode_text(tokens[P:]),
           "levstream_vs_full": {"generated": row_rel_diff(lev_logits[P:], full[P:]),
                                 "prompt": row_rel_diff(lev_logits[:P], full[:P])},
           "dense_cache_vs_full": {"generated": row_rel_diff(dense_logits[P:], full[P:]),
                                   "prompt": row_rel_diff(dense_logits[:P], full[:P])}}
    out["passed"] = bool(max(out["levstream_vs_full"].values()) <= LOGITS_RTOL)
    out["heavy_tokens"] = [
        {"step": step, "position": position, "token": VOCAB[int(tokens[position])],
         "context": decode_text(tokens[max(0, position - 40):position + 1]),
         "layers": [{"layer": layer,
                     "heads": heavy_tokens(res[layer], tokens, position,
                                           trace["G"][layer, :, :position + 1])}
                    for layer in range(cfg.layers)]}
        for step, (position, res) in enumerate(steps) if step in show]
    out["forgetting"] = forgetting(steps, trace["G"], args.eps)
    out["trace"] = {**trace, "tokens": tokens}
    return out


# -------------------------------------------------------------------------------------- heavy-only
def stream_bits(lm: NumpyLM, tokens: np.ndarray, window: int, make_attend) -> float:
    """Bits per character over consecutive windows, each from a fresh state (causal chunks)."""
    bits, count, chunk = 0.0, 0, min(256, window)
    for w0 in range(0, len(tokens) - window, window):
        seg, attend = tokens[w0:w0 + window + 1], make_attend()
        for i in range(0, window, chunk):
            lp = log_softmax(lm.forward(seg[i:i + chunk], i, attend))
            target = seg[i + 1:i + chunk + 1]
            bits -= float(lp[np.arange(len(target)), target].sum()) / math.log(2)
            count += len(target)
    return bits / count


def heavy_only_eval(lm: NumpyLM, cfg: Config, val: np.ndarray, chars: int) -> dict:
    """Validation bits per character: exact outputs vs each head keeping only its heavy entries.

    Windows of the training length, each from a fresh state; also the exact outputs over windows
    four times longer (the model runs at any length, but was trained on one).
    """
    window = cfg.context
    tokens = val[:chars + 1]
    out: dict = {"window": window, "chars": chars, "dense_cache_exact_bpc": stream_bits(
        lm, tokens, window, lambda: DenseCache(cfg, window).attend)}
    out["exact_bpc_4x_window"] = stream_bits(lm, tokens, 4 * window,
                                             lambda: LevstreamStates(cfg, 0.05).attend)
    out["by_eps"] = []
    for eps in (0.01, 0.05):
        row: dict = {"eps": eps}
        mass, n_heavy, n_rows = np.zeros((cfg.layers, cfg.heads)), np.zeros(cfg.layers), [0]

        def keep(layer, r, mass=mass, n_heavy=n_heavy, n_rows=n_rows):
            mass[layer] += np.asarray(r.captured_mass).sum(axis=1)
            n_heavy[layer] += sum(len(e.key_ids) for e in r.entries)
            n_rows[0] += r.output.shape[1] if layer == 0 else 0

        row["exact_bpc"] = stream_bits(lm, tokens, window, lambda eps=eps, keep=keep:
                                       LevstreamStates(cfg, eps, keep=keep).attend)
        row["captured_mass_mean"] = (mass / n_rows[0]).round(4).tolist()  # [layer][head]
        row["heavy_entries_per_query_head"] = (n_heavy / n_rows[0] / cfg.heads).round(2).tolist()
        for mode in ("heavy_renorm", "heavy"):
            row[f"{mode}_bpc"] = stream_bits(lm, tokens, window, lambda eps=eps, mode=mode:
                                             LevstreamStates(cfg, eps, mode).attend)
        out["by_eps"].append(row)
    return out


# ----------------------------------------------------------------------------------- speed, memory
def _rss_bytes(field: str = "VmRSS") -> int | None:
    """Current (VmRSS) or peak (VmHWM) resident set of this process, from /proc (Linux; else None).

    The benchmark child restarts the peak after its warm-up (``/proc/self/clear_refs``).

    Not ``ru_maxrss``: Linux carries it over from the parent through fork and exec, so a child of a
    process that holds torch would report the parent's size.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def thread_env(threads: int) -> dict[str, str]:
    """Environment capping BLAS, OpenMP and numba threads of a child process at ``threads``."""
    names = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")
    return dict.fromkeys(names, str(threads))


def bench_child(spec_path: str) -> None:
    """One (method, context) measurement in a fresh process, so that its peak RSS is its own.

    ``levstream``: prefill the context in chunks into the states, writing the rotated keys and
    values of every layer to files on the way (plain writes: page cache, not this process's RSS).
    ``dense``: read those files into a KV cache.  Both then decode the same greedy steps.
    """
    with open(spec_path) as fh:
        spec = json.load(fh)
    data = np.load(spec["weights"])
    cfg = Config(**json.loads(str(data["config"])))
    lm = NumpyLM({k[2:]: data[k] for k in data.files if k.startswith("w:")}, cfg)
    n, steps, method = spec["n"], spec["steps"], spec["method"]
    context = data["context"][:n + 1]
    kv_files = [(spec["kv"] + f".{layer}.k", spec["kv"] + f".{layer}.v")
                for layer in range(cfg.layers)]
    peak_state = [0]
    # warm-up on a throw-away state: numba loads or compiles its kernels (the fold and prune ones
    # need a few blocks of rows), BLAS starts
    w = min(len(data["context"]) - 8, 4 * (spec["block_rows"] or 1024))
    if method == "levstream":
        warm = LevstreamStates(cfg, spec["eps"], block_rows=spec["block_rows"])
    else:
        warm = DenseCache(cfg, w + 8)
    generate(lm, warm.attend, data["context"][:w], 8, chunk=spec["chunk"], forced=context[:8])
    del warm
    rss_start = _rss_bytes()
    try:  # Linux >= 4.0: restart the peak (VmHWM) here, so that it covers prefill and decode only
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass
    t0 = time.perf_counter()
    if method == "levstream":
        state = LevstreamStates(cfg, spec["eps"], block_rows=spec["block_rows"])
        with contextlib.ExitStack() as stack:
            files = [[stack.enter_context(open(f, "wb")) for f in pair] for pair in kv_files]

            def prefill_attend(layer, K, V, Q):
                files[layer][0].write(K.transpose(1, 0, 2).tobytes())
                files[layer][1].write(V.transpose(1, 0, 2).tobytes())
                return state.attend(layer, K, V, Q)

            for i in range(0, n, spec["chunk"]):
                lm.forward(context[i:min(i + spec["chunk"], n)], i, prefill_attend)
                peak_state[0] = max(peak_state[0], state.nbytes)
        step_attend = state.attend
    else:
        state = DenseCache(cfg, n + steps)
        rows = 8192
        for layer, (fk, fv) in enumerate(kv_files):
            with open(fk, "rb") as hk, open(fv, "rb") as hv:
                for i in range(0, n, rows):
                    c = min(rows, n - i) * cfg.heads * cfg.head_dim
                    shape = (-1, cfg.heads, cfg.head_dim)
                    state.fill(layer, np.fromfile(hk, count=c).reshape(shape),
                               np.fromfile(hv, count=c).reshape(shape))
        step_attend = state.attend
    prefill_s = time.perf_counter() - t0
    attn_s = [0.0]

    def timed_attend(layer, K, V, Q):
        t = time.perf_counter()
        o = step_attend(layer, K, V, Q)
        attn_s[0] += time.perf_counter() - t
        return o

    logits, tok, step_s = [], int(context[n]), []
    for s in range(steps):  # greedy decoding from the next corpus character: same tokens for both
        t0 = time.perf_counter()
        logits.append(lm.forward(np.array([tok]), n + s, timed_attend)[0])
        tok = int(np.argmax(logits[-1]))
        step_s.append(time.perf_counter() - t0)
        if method == "levstream":
            peak_state[0] = max(peak_state[0], state.nbytes)
    decode_s = float(np.sum(step_s))
    np.save(spec["logits"], np.array(logits))
    result = {"method": method, "context": n, "steps": steps,
              "block_rows": spec["block_rows"] if method == "levstream" else None,
              "prefill_seconds": prefill_s, "decode_seconds": decode_s,
              "tokens_per_second": steps / decode_s,
              # the median step is less sensitive to other processes on a shared machine
              "median_step_ms": 1e3 * float(np.median(step_s)),
              "attention_ms_per_token": 1e3 * attn_s[0] / steps,
              "state_bytes": int(state.nbytes),
              "peak_state_bytes": int(peak_state[0] if method == "levstream" else state.nbytes),
              "rss_start_bytes": rss_start, "rss_end_bytes": _rss_bytes(),
              "peak_rss_bytes": _rss_bytes("VmHWM")}
    with open(spec["result"], "w") as fh:
        json.dump(result, fh)


def speed_and_memory(lm: NumpyLM, cfg: Config, context: np.ndarray, args) -> list[dict]:
    """Decode ``args.decode_steps`` tokens after each context: levstream states (one run per eps of
    ``args.bench_eps``) vs the dense cache."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "weights.npz")
        np.savez(weights, config=json.dumps(asdict(cfg)), context=context[:max(args.contexts) + 1],
                 **{f"w:{k}": v for k, v in lm.w.items()})
        for n in args.contexts:
            got, logits = [], []
            # levstream first: it writes the keys and values the dense cache reads
            for method, eps in [*(("levstream", e) for e in args.bench_eps), ("dense", None)]:
                spec = {"weights": weights, "n": n, "steps": args.decode_steps, "chunk": 1024,
                        "method": method, "eps": eps, "block_rows": args.block_rows,
                        "kv": os.path.join(tmp, f"kv-{n}"),
                        "result": os.path.join(tmp, f"{method}-{eps}-{n}.json"),
                        "logits": os.path.join(tmp, f"{method}-{eps}-{n}.npy")}
                spec_path = os.path.join(tmp, f"spec-{method}-{eps}-{n}.json")
                with open(spec_path, "w") as fh:
                    json.dump(spec, fh)
                proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--bench-child",
                                       spec_path], capture_output=True, text=True, check=False,
                                      env={**os.environ, **thread_env(args.threads)})
                if proc.returncode != 0:
                    raise RuntimeError(f"benchmark child {method} n={n} failed:\n{proc.stderr}")
                with open(spec["result"]) as fh:
                    got.append(json.load(fh))
                got[-1]["eps"] = eps
                logits.append(np.load(spec["logits"]))
            for path in glob.glob(os.path.join(tmp, f"kv-{n}.*")):
                os.remove(path)
            # the same greedy steps: every levstream run vs the dense cache (dense row: the worst)
            diffs = [row_rel_diff(lg, logits[-1]) for lg in logits[:-1]]
            for r, diff in zip(got, [*diffs, max(diffs)]):
                r["logits_rel_diff_vs_other"] = diff
            for r in got:
                rows.append(r)
                name = "dense" if r["eps"] is None else f"eps={r['eps']}"
                print(f"  context {n:>7,} {name:>9}: {r['tokens_per_second']:8.1f} tokens/s,"
                      f" state {r['state_bytes'] / 2**20:8.2f} MiB, peak RSS "
                      f"{r['peak_rss_bytes'] / 2**20:7.1f} MiB", flush=True)
    return rows


# -------------------------------------------------------------------------------------------- main
def _mib(x) -> str:
    return "-" if x is None else f"{x / 2**20:.2f}"


def report_decode_check(dc: dict) -> None:
    for name, key in (("levstream states", "levstream_vs_full"),
                      ("dense NumPy KV cache", "dense_cache_vs_full")):
        print(f"{name:>20}: generated positions {dc[key]['generated']:.2e}, "
              f"prompt {dc[key]['prompt']:.2e}")
    print(f"check: levstream decode == full forward (<= {LOGITS_RTOL:g}): "
          f"{'PASSED' if dc['passed'] else 'FAILED'}")
    print(f"sample ({dc['generated']} characters after a {dc['prompt_chars']}-character prompt):"
          f" {dc['text']!r}")


def report_heavy_only(ho: dict) -> None:
    print(f"exact outputs: {ho['dense_cache_exact_bpc']:.3f} bits/char (dense cache); windows of "
          f"{4 * ho['window']}: {ho['exact_bpc_4x_window']:.3f}")
    print("| eps | exact | heavy renormalised | heavy alone | captured mass (per layer, mean over "
          "heads) | heavy entries per query and head |")
    print("|---|---|---|---|---|---|")
    for row in ho["by_eps"]:
        mass = ", ".join(f"{np.mean(m):.3f}" for m in row["captured_mass_mean"])
        print(f"| {row['eps']} | {row['exact_bpc']:.3f} | {row['heavy_renorm_bpc']:.3f} | "
              f"{row['heavy_bpc']:.3f} | {mass} | {row['heavy_entries_per_query_head']} |")


def report_heavy_tokens(dc: dict, gated: bool) -> None:
    for shown in dc["heavy_tokens"]:
        print(f"\nheavy earlier tokens for generated position {shown['position']} "
              f"({shown['token']!r} after ...{shown['context'][-30:-1]!r}), weight >= {dc['eps']}"
              + (" (position:char age weight)" if gated else "") + ":")
        for layer in shown["layers"]:
            for head in layer["heads"]:
                if gated:
                    top = ", ".join(f"{e['position']}:{e['char']!r} {e['age']} {e['weight']:.2f}"
                                    for e in head["top"][:6])
                    gate = f", mean gate {head['mean_gate']:.3f}"
                else:
                    top = ", ".join(f"{e['position']}:{e['char']!r} {e['weight']:.2f}"
                                    for e in head["top"][:6])
                    gate = ""
                print(f"  layer {layer['layer']} head {head['head']}: {head['n_heavy']} heavy, "
                      f"mass {head['captured_mass']:.2f}{gate}: {top}")


def report_forgetting(res: dict) -> None:
    print("| model | layer | head | mean gate | min gate | half-life (tokens) | heavy per token "
          "| captured mass | median age | 90th pct age | max age |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for kind, part in (("power", res), ("gated", res.get("gated", {}))):
        for r in part.get("decode_check", {}).get("forgetting", []):
            half = "inf" if math.isinf(r["half_life"]) else f"{r['half_life']:.1f}"
            ages = ["-" if r[k] is None else f"{r[k]:.0f}"
                    for k in ("median_age", "p90_age", "max_age")]
            print(f"| {kind} | {r['layer']} | {r['head']} | {r['mean_gate']:.3f} | "
                  f"{r['min_gate']:.3f} | {half} | {r['heavy_per_token']:.1f} | "
                  f"{r['captured_mass']:.2f} | {' | '.join(ages)} |")


def report(res: dict) -> None:
    tr = res["training"]
    if tr:
        print("\n## Validation bits per character (same size, steps, batches and seed)")
        print("| attention | val bits/char | last train loss (bits/char) | parameters "
              "| train time (s) |")
        print("|---|---|---|---|---|")
    else:
        print("\n(models loaded from files: no training figures)")
    for kind in tr:
        t = tr[kind]
        print(f"| {kind} | {t['val_bpc']:.3f} | {t['final_train_bits']:.3f} | {t['parameters']:,} "
              f"| {t['seconds']:.0f} |")
    if "decode_check" in res:
        print("\n## Decoding: logits vs the full causal forward in float64 (max relative "
              "difference)")
        report_decode_check(res["decode_check"])
    if "speed_memory" in res:
        print(f"\n## Decode speed and memory ({res['decode_steps']} greedy steps after the "
              f"context, {res['threads_after_training']} thread(s), "
              f"block_rows={res['block_rows']})")
        print("| context | decoder | tokens/s | median ms/token | attention ms/token "
              "| state or cache (MiB) "
              "| peak RSS (MiB) | peak RSS - RSS before prefill (MiB) | prefill (s) "
              "| logits vs dense |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in res["speed_memory"]:
            name = "dense cache" if r["eps"] is None else f"levstream eps={r['eps']}"
            print(f"| {r['context']:,} | {name} | {r['tokens_per_second']:.1f} | "
                  f"{r['median_step_ms']:.2f} | "
                  f"{r['attention_ms_per_token']:.2f} | {_mib(r['state_bytes'])} | "
                  f"{_mib(r['peak_rss_bytes'])} | "
                  f"{_mib(r['peak_rss_bytes'] - r['rss_start_bytes'])} | "
                  f"{r['prefill_seconds']:.1f} | {r['logits_rel_diff_vs_other']:.1e} |")
    if "heavy_only" in res:
        ho = res["heavy_only"]
        print(f"\n## Heavy entries only ({ho['chars']:,} validation characters, fresh state every "
              f"{ho['window']})")
        report_heavy_only(ho)
        report_heavy_tokens(res["decode_check"], gated=False)
    if "gated" in res:
        g = res["gated"]
        print("\n## Gated model: levstream states with gates, logits vs the full gated forward in "
              "float64")
        report_decode_check(g["decode_check"])
        print(f"\n## Gated model: heavy entries only ({g['heavy_only']['chars']:,} validation "
              f"characters, fresh state every {g['heavy_only']['window']})")
        report_heavy_only(g["heavy_only"])
        report_heavy_tokens(g["decode_check"], gated=True)
    if "decode_check" in res or "gated" in res:
        eps = (res.get("decode_check") or res["gated"]["decode_check"])["eps"]
        print(f"\n## Forgetting: gates and the age of the heavy (>= {eps}) earlier tokens, over "
              "the generated tokens")
        report_forgetting(res)


def load_model(path: str, kind: str):
    """A model saved by an earlier ``--out`` (power-lm-model.npz or power-lm-gated-model.npz)."""
    import torch

    saved = np.load(path)
    cfg = Config(**json.loads(str(saved["config"])))
    model = build_model(cfg, kind)
    model.load_state_dict({k[2:]: torch.from_numpy(saved[k]) for k in saved.files
                           if k.startswith("w:")})
    model.eval()
    return cfg, model


def save_model(path: str, lm: NumpyLM) -> None:
    np.savez(path, config=json.dumps(asdict(lm.cfg)), **{f"w:{k}": v for k, v in lm.w.items()})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny models, small contexts (smoke run)")
    ap.add_argument("--out", help="directory for power-lm.json, the models' weights "
                                  "(power-lm-model.npz, power-lm-gated-model.npz) and the decode "
                                  "traces (power-lm-trace.npz, power-lm-gated-trace.npz)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, help="training steps (default 500; quick 40)")
    ap.add_argument("--eps", type=float, default=0.01,
                    help="eps of the decoding states of the logits check and heavy tokens")
    ap.add_argument("--bench-eps", type=float, nargs="+",
                    help="eps of the timed decoding states (default 0.01 0.05; quick 0.01)")
    ap.add_argument("--block-rows", type=int, default=1024,
                    help="rows a decoding state buffers before folding them (0: levstream's "
                         "default, sized for bulk builds); bounds the state's memory")
    ap.add_argument("--contexts", type=int, nargs="+", help="decode contexts (default 1e3 1e4 1e5)")
    ap.add_argument("--decode-steps", type=int, help="timed decode steps (default 200; quick 50)")
    ap.add_argument("--threads", type=int, default=1,
                    help="BLAS/OpenMP/numba threads for everything after training (default 1)")
    ap.add_argument("--no-licenses", action="store_true", help=f"do not train on {LICENSE_DIR}")
    ap.add_argument("--no-gated", action="store_true",
                    help="no gated model (train and decode the power and softmax models only)")
    ap.add_argument("--models", nargs="+", choices=("power", "softmax", "gated"),
                    default=["power", "softmax", "gated"],
                    help="models to train (default all three; same batches and seed each)")
    ap.add_argument("--no-speed", action="store_true",
                    help="skip the decode speed and memory measurements (the longest part)")
    ap.add_argument("--model", help="power-lm-model.npz of an earlier --out: decode that model "
                                    "(no training)")
    ap.add_argument("--gated-model", help="power-lm-gated-model.npz of an earlier --out: decode "
                                          "that gated model (no training)")
    ap.add_argument("--bench-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.bench_child:
        bench_child(args.bench_child)
        return 0
    try:
        import torch
    except ImportError:
        print("skipped: this example needs 'torch' (pip install torch==2.13.0).")
        return 0
    if not levstream_values_api():
        print("this example needs levstream's values API (value_dim, exact_output, prefill)",
              file=sys.stderr)
        return 1
    if args.no_gated:
        args.models = [m for m in args.models if m != "gated"]
    uses_gates = args.gated_model or ("gated" in args.models and not args.model)
    if uses_gates and not levstream_gates_api():
        print("the gated model needs levstream's gates (prefill(K, V, Q, gates=G)); run with "
              "--no-gated for the others", file=sys.stderr)
        return 1
    quick = args.quick or os.environ.get("LEVSTREAM_QUICK") == "1"
    cfg = QUICK if quick else Config()
    cfg.steps = args.steps or cfg.steps
    args.block_rows = args.block_rows or None
    args.contexts = args.contexts or ([4000, 16000] if quick else [1000, 10_000, 100_000])
    args.decode_steps = args.decode_steps or (50 if quick else 200)
    args.bench_eps = args.bench_eps or ([0.01] if quick else [0.01, 0.05])
    args.prompt, args.generate = (64, 24) if quick else (256, 200)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    res: dict = {"command": " ".join(["python", "examples/power_lm.py", *(argv or sys.argv[1:])]),
                 "config": asdict(cfg), "quick": quick, "seed": args.seed, "eps": args.eps,
                 "bench_eps": args.bench_eps,
                 "block_rows": args.block_rows, "threads_after_training": args.threads,
                 "decode_steps": args.decode_steps, "torch": torch.__version__,
                 "numpy": np.__version__}

    corpus = build_corpus(not args.no_licenses)
    info = res["corpus"] = corpus["info"]
    print(f"corpus: {info['train_chars']:,} train / {info['val_chars']:,} validation characters "
          f"({info['stdlib_docstrings']} docstrings, {info['license_files']} licence files), "
          f"vocabulary {len(VOCAB)}")
    starts = batch_starts(len(corpus["train"]), cfg, args.seed)
    res["training"] = {}
    models = {}
    # saved models: no training (and no softmax model)
    for kind, path in (("power", args.model), ("gated", args.gated_model)):
        if path:
            cfg, models[kind] = load_model(path, kind)
            res["config"], res[f"{kind}_model_file"] = asdict(cfg), path
    kinds = [k for k in ("power", "softmax", "gated") if k in args.models]
    for kind in () if models else kinds:
        model, seconds, losses = train(cfg, kind, corpus["train"], starts, args.seed)
        models[kind] = model
        res["training"][kind] = {
            "seconds": seconds, "final_train_bits": float(np.mean(losses[-20:])) / math.log(2),
            "val_bpc": bits_per_char(model, corpus["val"], cfg.context, 4096 if quick else 65536),
            "parameters": sum(p.numel() for p in model.parameters())}
        print(f"trained {kind:>7}: {cfg.steps} steps in {seconds:.0f} s, validation "
              f"{res['training'][kind]['val_bpc']:.3f} bits/char", flush=True)

    # Decoding is one small step after another: on a shared 2-core machine, spare BLAS and OpenMP
    # threads cost more than they give (measured: levstream steps 25x slower at default threads).
    from threadpoolctl import threadpool_info, threadpool_limits

    import levstream as ls

    threadpool_limits(args.threads)
    ls.set_num_threads(args.threads)
    res["thread_pools_after_training"] = [
        {k: i.get(k) for k in ("internal_api", "num_threads")} for i in threadpool_info()]
    prompt = corpus["val"][:args.prompt]
    heavy_chars = 1024 if quick else 8192
    traces, lms = {}, {}
    for kind in ("power", "gated"):
        if kind not in models:
            continue
        lm = lms[kind] = NumpyLM.from_torch(models[kind], cfg)
        part = res if kind == "power" else res.setdefault("gated", {})
        part["decode_check"] = decode_check(models[kind], lm, cfg, prompt, args)
        traces[kind] = part["decode_check"].pop("trace")
        part["heavy_only"] = heavy_only_eval(lm, cfg, corpus["val"], heavy_chars)
        print(f"{kind} model: decode check and heavy-only evaluation done", flush=True)
    if "power" in lms and not args.no_speed:
        print("timing the decode (a fresh process per context and method)", flush=True)
        res["speed_memory"] = speed_and_memory(lms["power"], cfg, corpus["train"], args)
    report(res)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "power-lm.json"), "w") as fh:
            json.dump(res, fh, indent=1)
        for kind, lm in lms.items():
            name = "power-lm" if kind == "power" else "power-lm-gated"
            save_model(os.path.join(args.out, f"{name}-model.npz"), lm)
            np.savez(os.path.join(args.out, f"{name}-trace.npz"), **traces[kind])
    checks = [part["decode_check"]["passed"] for part in (res, res.get("gated", {}))
              if "decode_check" in part]
    return 0 if all(checks) else 1


if __name__ == "__main__":
    sys.exit(main())
