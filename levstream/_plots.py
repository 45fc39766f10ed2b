"""The figure of ``levstream demo --plot`` (matplotlib, imported only here, Agg backend)."""

from __future__ import annotations

import argparse

import numpy as np

#: Key counts of the query-time panel (each measured in the same run, sketch and dense side by side).
QUERY_PANEL_SIZES = (10_000, 30_000, 100_000, 300_000)


def demo_figure(
    args: argparse.Namespace,
    scores: np.ndarray,
    title: str,
    n_universal: int,
    n: int,
    sketch_s_per_query: float,
    dense_s_per_query: float,
) -> None:
    """Distribution of ``scores`` (leverage scores of all keys) with the eps line, and query time vs n."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ._bench import measure

    m = args.queries
    points = [
        measure(size, args.dim, args.eps, args.p, m, args.seed, repeat=1)
        for size in QUERY_PANEL_SIZES
        if size < n
    ]
    sizes = [pt.n for pt in points] + [n]
    sketch_t = [pt.query_s / m for pt in points] + [sketch_s_per_query]
    dense_t = [pt.dense_s / m for pt in points] + [dense_s_per_query]

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    positive = scores[scores > 0]
    bins = np.logspace(np.log10(positive.min()), np.log10(max(positive.max(), args.eps) * 1.05), 80)
    left.hist(positive, bins=bins, color="#4c72b0")
    left.axvline(
        args.eps,
        color="#c44e52",
        lw=2,
        label=f"eps = {args.eps:g}: {n_universal:,} keys at or above",
    )
    left.set(
        xscale="log",
        yscale="log",
        xlabel="score of key j (an upper bound on any attention A[i, j])",
        ylabel="number of keys",
        title=title,
    )
    left.legend(loc="upper right")

    right.loglog(sizes, dense_t, "o-", color="#c44e52", label="dense NumPy (Q @ K.T, all keys)")
    right.loglog(sizes, sketch_t, "o-", color="#4c72b0", label="levstream sketch (heavy_entries)")
    for size, t, u in zip(sizes, sketch_t, [pt.universal for pt in points] + [n_universal]):
        right.annotate(
            f"|U|={u:,}",
            (size, t),
            textcoords="offset points",
            xytext=(0, -14),
            ha="center",
            fontsize=8,
            color="#4c72b0",
        )
    right.set(
        xlabel="number of keys n",
        ylabel="seconds per query",
        title=f"Query time, {m:,} queries, d = {args.dim}, eps = {args.eps:g}",
    )
    right.set_xlim(min(sizes) / 1.5, max(sizes) * 1.5)  # room for the |U| labels
    right.grid(True, which="both", alpha=0.3)
    right.legend(loc="upper left")
    fig.savefig(args.plot, dpi=110)
    plt.close(fig)
