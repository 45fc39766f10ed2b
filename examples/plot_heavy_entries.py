"""Plot where the heavy attention entries are: they all sit on the few keys of the universal set.

Needs matplotlib (``pip install matplotlib``); without it the script says so and exits.

    python examples/plot_heavy_entries.py                      # writes heavy_entries.png
    python examples/plot_heavy_entries.py out.png 20000        # output path, number of keys
"""

import sys

try:
    import matplotlib
except ImportError:
    print("plot_heavy_entries.py needs matplotlib: pip install matplotlib", file=sys.stderr)
    sys.exit(0)

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import levstream as ls  # noqa: E402
from levstream.synthetic import attention_like_keys, attention_like_queries  # noqa: E402

out = sys.argv[1] if len(sys.argv) > 1 else "heavy_entries.png"
n = int(sys.argv[2]) if len(sys.argv) > 2 else 100_000
dim, eps = 32, 0.02

sketch = ls.KeySketch(dim, eps=eps)
sketch.extend(attention_like_keys(n, dim, seed=3, chunk_rows=8192))
U = sketch.universal_set()
Q = attention_like_queries(300, dim, seed=4, key_seed=3)
hits = sketch.heavy_entries(Q)

# the dense attention of one query, for the right-hand panel (keys regenerated: fine at this size)
K = np.concatenate(list(attention_like_keys(n, dim, seed=3, chunk_rows=8192)))
q = int(np.argmax(np.diff(hits.indptr)))  # the query with the most heavy entries
a = (K @ Q[q]) ** 2
a /= a.sum()
assert set(np.flatnonzero(a >= eps).tolist()) == set(hits.row(q)[0].tolist())

fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
left.vlines(U.ids, -0.5, Q.shape[0] - 0.5, color="0.85", lw=0.6, label=f"universal set: {len(U)} of {n:,} keys")
points = left.scatter(hits.key_ids, hits.rows(), c=hits.values, s=10, cmap="viridis",
                      norm=matplotlib.colors.LogNorm(vmin=eps, vmax=max(hits.values.max(), 2 * eps)))
fig.colorbar(points, ax=left, label="attention A[i, j]")
left.set(xlim=(0, n), ylim=(-0.5, Q.shape[0] - 0.5), xlabel="key id j", ylabel="query i",
         title=f"All {len(hits):,} entries A >= {eps} of {Q.shape[0]} queries")
left.legend(loc="upper right", framealpha=0.9)

order = np.arange(n)
right.semilogy(order, np.maximum(a, 1e-12), ",", color="0.5")
heavy_ids, heavy_vals = hits.row(q)
right.semilogy(heavy_ids, heavy_vals, "o", color="#c44e52", label=f"its {heavy_ids.size} heavy entries, from the sketch")
right.axhline(eps, color="#c44e52", lw=1, ls="--", label=f"eps = {eps}")
right.set(xlim=(0, n), ylim=(1e-9, 1), xlabel="key id j", ylabel="A[q, j]",
          title=f"Query {q}: dense attention over all {n:,} keys")
right.legend(loc="lower right")
fig.savefig(out, dpi=110)
print(f"wrote {out}: {len(hits):,} heavy entries, all on the {len(U)} keys of the universal set")
