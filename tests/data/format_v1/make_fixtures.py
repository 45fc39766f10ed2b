"""Writes the format-version-1 sketch fixtures (run once, with levstream 0.1.0 at commit 79a43f9).

The fixtures are committed; tests/test_format_compat.py loads them with the current code and checks the answers
against brute force over the same keys, which it regenerates from the seeds below.  Never regenerate the
fixtures with a newer levstream: their point is that bytes written by 0.1.0 keep loading.
"""

from pathlib import Path

import numpy as np

import levstream as ls

HERE = Path(__file__).parent


def keys(n, d, seed):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)) * (1.0 + rng.pareto(2.0, size=(n, 1)))


def main():
    K = keys(3000, 6, 0)
    ls.KeySketch(6, eps=0.02, block_rows=512).update_many(K[:2900]).update_many(K[2900:]).save(HERE / "p2.lsk")
    ls.KeySketch(6, eps=0.02, p=3, rng=5).update_many(K).save(HERE / "p3_coreset.lsk")
    K4 = keys(2000, 4, 1)
    ls.KeySketch(4, eps=0.05, p=4, exact=True, block_rows=256).update_many(K4).save(HERE / "p4_exact.lsk")
    KH = np.stack([keys(1500, 5, 10 + h) for h in range(3)])
    ls.MultiHeadKeySketch(3, 5, eps=0.05, block_rows=256).update_many(KH).save(HERE / "multihead_p2.lsk")



def record_answers():
    """Answers of 0.1.0 on fixed queries (the compatibility test also checks them against brute force)."""
    Q = np.random.default_rng(99).standard_normal((20, 6))
    out = {}
    for name in ("p2", "p3_coreset"):
        hits = ls.load(HERE / f"{name}.lsk").heavy_entries(Q)
        out[f"{name}.indptr"], out[f"{name}.key_ids"], out[f"{name}.values"] = hits.indptr, hits.key_ids, hits.values
    hits = ls.load(HERE / "p4_exact.lsk").heavy_entries(Q[:, :4])
    out["p4_exact.indptr"], out["p4_exact.key_ids"], out["p4_exact.values"] = hits.indptr, hits.key_ids, hits.values
    mh = ls.MultiHeadKeySketch.from_bytes((HERE / "multihead_p2.lsk").read_bytes())
    for h, hits in enumerate(mh.heavy_entries(np.stack([Q[:, :5]] * 3))):
        out[f"multihead_p2.{h}.indptr"], out[f"multihead_p2.{h}.key_ids"] = hits.indptr, hits.key_ids
        out[f"multihead_p2.{h}.values"] = hits.values
    np.savez(HERE / "answers_0.1.0.npz", **out)


if __name__ == "__main__":
    main()
    record_answers()
