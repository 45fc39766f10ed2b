"""Plot how a decaying stream's universal set shrinks to the recent keys as the gate gets stronger.

For each constant gate ``gamma`` a sketch streams the same keys (``decay=gamma``); the figure shows the size of
its universal set and the age of its keys (rows since they arrived: median and oldest) against ``1 - gamma``,
next to the effective window ``1 / (1 - gamma)``.  Every universal set is checked against the offline leverage
scores of the weighted keys ``sqrt(gamma^age) k`` (brute force over the last rows whose weight is not
negligible).

Needs matplotlib (``pip install matplotlib``); without it the script says so and exits.

    python examples/plot_forgetting.py                          # writes forgetting.png (d = 64, 2*10^5 keys)
    python examples/plot_forgetting.py out.png 20000            # output path, number of keys
"""

import sys

try:
    import matplotlib
except ImportError:
    print("plot_forgetting.py needs matplotlib: pip install matplotlib", file=sys.stderr)
    sys.exit(0)

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import levstream as ls  # noqa: E402
from levstream.synthetic import attention_like_keys  # noqa: E402

out = sys.argv[1] if len(sys.argv) > 1 else "forgetting.png"
n = int(sys.argv[2]) if len(sys.argv) > 2 else 200_000
dim, eps = 64, 0.01

K = np.concatenate(list(attention_like_keys(n, dim, seed=5, chunk_rows=8192)))
one_minus = np.array([1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3])
sizes, median_age, oldest = [], [], []
for gap in one_minus:
    gamma = 1.0 - gap
    sketch = ls.KeySketch(dim, eps=eps, decay=gamma)
    for chunk in np.array_split(K, max(1, n // 8192)):
        sketch.update_many(chunk)
    U = sketch.universal_set()
    age = n - 1 - U.ids
    # brute force: leverage of the weighted keys; weights below 1e-40 of the newest are far below eps
    window = min(n, int(np.ceil(92.0 / -np.log(gamma))) + 1)
    W = K[n - window :] * np.sqrt(gamma ** np.arange(window - 1, -1, -1))[:, None]
    Qf, _ = np.linalg.qr(W)
    tau = np.einsum("ij,ij->i", Qf, Qf)
    expected = np.flatnonzero(tau >= eps) + (n - window)
    if not np.array_equal(np.sort(U.ids), expected):
        raise SystemExit(f"gate {gamma}: universal set differs from brute force")
    sizes.append(len(U))
    median_age.append(float(np.median(age)) if len(U) else np.nan)
    oldest.append(int(age.max()) if len(U) else np.nan)
    print(f"gate {gamma:.4f}: |U| = {len(U):5d}, median age {median_age[-1]:8.0f}, oldest {oldest[-1]}")

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
ax1.loglog(one_minus, sizes, "o-", label="|U| (decayed stream)")
ax1.axhline(dim / eps, color="grey", ls=":", label=f"bound d / eps = {dim / eps:.0f}")
ax1.set_xlabel("1 - gate")
ax1.set_ylabel("keys in the universal set")
ax1.legend()
ax2.loglog(one_minus, oldest, "o-", label="oldest key in U")
ax2.loglog(one_minus, median_age, "s-", label="median age in U")
ax2.loglog(one_minus, 1.0 / one_minus, "k:", label="1 / (1 - gate)")
ax2.set_xlabel("1 - gate")
ax2.set_ylabel("age (rows since arrival)")
ax2.legend()
fig.suptitle(f"{n:,} keys, d = {dim}, eps = {eps}: the universal set is the recent past")
fig.tight_layout()
fig.savefig(out, dpi=110)
print(f"checked against brute force; wrote {out}")
