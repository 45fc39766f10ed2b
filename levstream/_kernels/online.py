"""Online ridge-leverage row sampling (Cohen–Musco–Pachocki), the sequential inner loop."""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(nogil=True, cache=True)
def online_ridge_sample(X, Minv, factor, uniforms):  # pragma: no cover - compiled
    """Decide row by row whether to keep each row of ``X``; updates ``Minv = (G~ + ridge I)^-1`` in place.

    Row ``t`` has online ridge leverage ``l = u / (1 + u)``, ``u = x^T Minv x`` (Sherman–Morrison: the score
    against ``G~ + x x^T + ridge I``), and is kept with probability ``p = min(1, factor * l)`` when
    ``uniforms[t] < p``; a kept row enters the sample as ``x / sqrt(p)``, so ``Minv`` is updated with
    ``x x^T / p``.  Returns ``(kept_indices, probabilities)``.
    """
    n, d = X.shape
    kept = np.empty(n, dtype=np.int64)
    probs = np.empty(n, dtype=np.float64)
    k = 0
    y = np.empty(d)
    for t in range(n):
        u = 0.0
        for a in range(d):
            acc = 0.0
            for b in range(d):
                acc += Minv[a, b] * X[t, b]
            y[a] = acc
            u += acc * X[t, a]
        lev = u / (1.0 + u)
        prob = min(1.0, factor * lev)
        if uniforms[t] < prob:
            # Minv <- Minv - (y y^T / prob) / (1 + u / prob)
            c = 1.0 / (prob + u)
            for a in range(d):
                for b in range(d):
                    Minv[a, b] -= c * y[a] * y[b]
            kept[k] = t
            probs[k] = prob
            k += 1
    return kept[:k], probs[:k]
