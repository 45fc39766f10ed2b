"""Train a small vision transformer on scikit-learn's digits with full softmax and with LevAttention.

The paper's claim at small scale: a transformer *trained* with LevAttention (each head attends only to its
top-k keys by leverage score) keeps most of the accuracy of full softmax attention, and does much better
than a softmax-trained model evaluated with the same key selection.  The softmax-trained model is also
evaluated with ``selection="query_mean"`` (the keys the mean query weights most), the rule that keeps most
of a pretrained model's attention (docs/levattention-results.md).

Data: the 1797 bundled 8x8 digit images of scikit-learn (no download), 75 % / 25 % stratified split.
Model: every pixel is a token (a 3x3 convolution stem gives 64 pixel tokens, plus a class token = 65 keys per
head), 2 pre-norm transformer blocks, width 32, 4 heads of dimension 8, trained with AdamW on the CPU.

Install: ``pip install torch==2.13.0`` (first and alone), then ``pip install -e '.[torch]'`` (adds scikit-learn).

Run::

    python examples/train_digits_vit.py              # 4 models x 12 epochs, a few minutes on 2 cores
    python examples/train_digits_vit.py --quick      # 2 epochs, k = 8, a smoke run (also: LEVSTREAM_QUICK=1)
    python examples/train_digits_vit.py --out docs/  # also write levattention-vit.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _missing_dependency() -> str | None:
    for name in ("torch", "sklearn"):
        try:
            __import__(name)
        except ImportError:
            return name
    return None


def build_model(top_k, *, dim=32, heads=4, layers=2, tokens=65, classes=10):
    import torch
    from torch import nn

    from levstream.torch import LevSelfAttention

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.attn = LevSelfAttention(dim, heads, top_k=top_k)
            self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

        def forward(self, x):
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))

    class TinyViT(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(1, dim, kernel_size=3, padding=1)  # one token per pixel, with its 3x3 context
            self.cls = nn.Parameter(torch.zeros(1, 1, dim))
            self.pos = nn.Parameter(0.02 * torch.randn(1, tokens, dim))
            self.blocks = nn.ModuleList(Block() for _ in range(layers))
            self.norm = nn.LayerNorm(dim)
            self.head = nn.Linear(dim, classes)

        def set_top_k(self, k, selection="leverage"):
            for b in self.blocks:
                b.attn.top_k, b.attn.selection = k, selection

        def forward(self, images):  # images: (batch, 64) in [0, 1]
            x = self.stem(images.view(-1, 1, 8, 8)).flatten(2).transpose(1, 2)  # (batch, 64, dim)
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
            for b in self.blocks:
                x = b(x)
            return self.head(self.norm(x[:, 0]))

    return TinyViT()


def accuracy(model, X, y) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        return float((model(X).argmax(dim=1) == y).float().mean())


def train(top_k, data, epochs: int, seed: int = 0):
    import torch

    torch.manual_seed(seed)
    Xtr, ytr, Xte, yte = data
    model = build_model(top_k)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    steps = epochs * ((len(Xtr) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(Xtr), generator=gen).split(64):
            loss = torch.nn.functional.cross_entropy(model(Xtr[batch]), ytr[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model, accuracy(model, Xte, yte), time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 epochs, k = 8 only (smoke run)")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--ks", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--out", help="directory for levattention-vit.json")
    args = ap.parse_args(argv)
    missing = _missing_dependency()
    if missing:
        print(f"skipped: this example needs {missing!r} (pip install torch==2.13.0 scikit-learn).")
        return 0
    if args.quick or os.environ.get("LEVSTREAM_QUICK") == "1":
        args.epochs, args.ks = 2, [8]
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    digits = load_digits()
    Xtr, Xte, ytr, yte = train_test_split(digits.data / 16.0, digits.target, test_size=0.25, random_state=0,
                                          stratify=digits.target)
    data = (torch.tensor(Xtr, dtype=torch.float32), torch.tensor(ytr), torch.tensor(Xte, dtype=torch.float32),
            torch.tensor(yte))
    print(f"digits: {len(Xtr)} train / {len(Xte)} test images, 65 tokens per image, {args.epochs} epochs")
    full, acc_full, sec = train(None, data, args.epochs)
    rows = [{"attention": "full softmax (65 keys)", "k": None, "trained_with": "softmax", "accuracy": acc_full,
             "ratio": 1.0, "train_seconds": sec}]
    for k in args.ks:
        full.set_top_k(k)  # the softmax-trained model, evaluated with LevAttention
        acc = accuracy(full, data[2], data[3])
        rows.append({"attention": f"LevAttention k={k}", "k": k, "trained_with": "softmax", "accuracy": acc,
                     "ratio": acc / acc_full, "train_seconds": 0.0})
        full.set_top_k(k, "query_mean")  # the same model, keeping the keys the mean query weights most
        acc = accuracy(full, data[2], data[3])
        rows.append({"attention": f"query_mean k={k}", "k": k, "trained_with": "softmax", "accuracy": acc,
                     "ratio": acc / acc_full, "train_seconds": 0.0})
        _, acc, sec = train(k, data, args.epochs)
        rows.append({"attention": f"LevAttention k={k}", "k": k, "trained_with": "LevAttention", "accuracy": acc,
                     "ratio": acc / acc_full, "train_seconds": sec})
    full.set_top_k(None)
    print("| attention at test time | trained with | test accuracy | ratio to full softmax | train time (s) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['attention']} | {r['trained_with']} | {r['accuracy']:.3f} | {r['ratio']:.3f} | "
              f"{r['train_seconds']:.0f} |")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "levattention-vit.json"), "w") as fh:
            json.dump({"epochs": args.epochs, "rows": rows, "torch": torch.__version__}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
