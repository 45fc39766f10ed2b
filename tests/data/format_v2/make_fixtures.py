"""Writes the format-version-2 sketch fixtures: sketches with values (run once, with levstream 0.2.0; the
commit is in ``answers_0.2.0.npz`` under ``written_by``).

The fixtures are committed; tests/test_format_compat.py loads them with the current code and checks the answers
against the ones recorded here and against brute force over the same keys and values, which it regenerates
from the seeds below.  Never regenerate the fixtures with a newer levstream: their point is that bytes written
by 0.2.0 keep loading.  Each fixture stops mid-stream (rows in the input buffer and, with exact outputs, in the
moment state's row buffer), so the restored sketches carry every part of the state.
"""

import subprocess
from pathlib import Path

import numpy as np

import levstream as ls

HERE = Path(__file__).parent

#: The queries of :func:`record_answers` (the first ``dim`` columns for each fixture).
QUERIES = np.random.default_rng(99).standard_normal((20, 6))


def keys(n, d, seed):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)) * (1.0 + rng.pareto(2.0, size=(n, 1)))


def values(n, dv, seed):
    return np.random.default_rng(seed).standard_normal((n, dv))


def feed(sk, K, V, singles):
    """``update_many`` of all but the last ``singles`` rows, then ``update`` of each of those."""
    m = K.shape[-2] - singles
    sk.update_many(K[..., :m, :], V[..., :m, :])
    for t in range(m, K.shape[-2]):
        sk.update(K[..., t, :], V[..., t, :])
    return sk


def main():
    K, V = keys(3000, 6, 0), values(3000, 3, 20)
    feed(ls.KeySketch(6, eps=0.02, value_dim=3, block_rows=512), K, V, 7).save(HERE / "p2_values.lsk")
    feed(ls.KeySketch(6, eps=0.02, value_dim=3, exact_output=True, block_rows=512), K, V, 10).save(
        HERE / "p2_exact_output.lsk")
    feed(ls.KeySketch(6, eps=0.02, p=3, rng=5, value_dim=3), K, V, 3).save(HERE / "p3_coreset_values.lsk")
    K4, V4 = keys(2000, 4, 1), values(2000, 2, 21)
    feed(ls.KeySketch(4, eps=0.05, p=4, exact=True, value_dim=2, exact_output=True, block_rows=256), K4, V4,
         9).save(HERE / "p4_exact_output.lsk")
    KH = np.stack([keys(1500, 5, 10 + h) for h in range(3)])
    VH = np.stack([values(1500, 2, 30 + h) for h in range(3)])
    mh = feed(ls.MultiHeadKeySketch(3, 5, eps=0.05, value_dim=2, exact_output=True, block_rows=256), KH, VH, 6)
    (HERE / "multihead_values.lsk").write_bytes(mh.to_bytes())


def _record(out, prefix, r):
    """The arrays of one ``AttentionResult`` (one head)."""
    e = r.entries
    out[f"{prefix}.indptr"], out[f"{prefix}.key_ids"], out[f"{prefix}.values"] = e.indptr, e.key_ids, e.values
    if e.lower is not None:
        out[f"{prefix}.lower"], out[f"{prefix}.upper"] = e.lower, e.upper
    out[f"{prefix}.heavy_output"], out[f"{prefix}.captured_mass"] = r.heavy_output, r.captured_mass
    if r.output is not None:
        out[f"{prefix}.output"] = r.output
    for name in ("captured_mass_bounds", "heavy_output_bounds"):
        bounds = getattr(r, name)
        if bounds is not None:
            out[f"{prefix}.{name}.lower"], out[f"{prefix}.{name}.upper"] = bounds


def record_answers():
    """Answers of 0.2.0 (``attend``) on fixed queries, as restored and after ``flush()``."""
    out = {}
    for name, d in (("p2_values", 6), ("p2_exact_output", 6), ("p3_coreset_values", 6), ("p4_exact_output", 4)):
        _record(out, f"{name}.restored", ls.load(HERE / f"{name}.lsk").attend(QUERIES[:, :d]))
        _record(out, f"{name}.settled", ls.load(HERE / f"{name}.lsk").flush().attend(QUERIES[:, :d]))
    Q = np.stack([QUERIES[:, :5]] * 3)
    for how in ("restored", "settled"):
        mh = ls.MultiHeadKeySketch.from_bytes((HERE / "multihead_values.lsk").read_bytes())
        if how == "settled":
            mh.flush()
        r = mh.attend(Q)
        for h in range(3):
            head = type(r)(r.entries[h], r.heavy_output[h], r.captured_mass[h], r.output[h])
            _record(out, f"multihead_values.{how}.{h}", head)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True).stdout.strip()
    out["written_by"] = np.array(f"levstream {ls.__version__} at {commit}")
    np.savez(HERE / f"answers_{ls.__version__}.npz", **out)


if __name__ == "__main__":
    main()
    record_answers()
