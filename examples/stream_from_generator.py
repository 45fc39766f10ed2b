"""Stream keys from a generator into a KeySketch, then ask for every heavy attention entry of new queries.

The keys are never held together: the generator yields chunks (here synthetic attention-like keys; in real
use, keys read from disk, a database or a model's KV cache), the sketch keeps only the Gram matrix and the
few keys that can ever be heavy.  At the end we check the answer against brute force on a few queries,
regenerating the keys chunk by chunk.

    python examples/stream_from_generator.py            # 500,000 keys, a few seconds
    python examples/stream_from_generator.py 20000      # any number of keys
"""

import sys

import numpy as np

import levstream as ls
from levstream.synthetic import attention_like_keys, attention_like_queries

n = int(sys.argv[1]) if len(sys.argv) > 1 else 500_000
dim, eps = 64, 0.01


def key_chunks():
    """Any iterable of 2-D chunks (or single rows) works; this one yields 16,384 rows at a time."""
    yield from attention_like_keys(n, dim, seed=7, chunk_rows=16_384)


sketch = ls.KeySketch(dim, eps=eps)
sketch.extend(key_chunks(), progress=True)  # one pass, a tqdm bar on stderr
U = sketch.universal_set()
print(f"streamed {sketch.n:,} keys of width {dim}: the sketch holds {sketch.nbytes / 1e6:,.1f} MB "
      f"(serialized: {len(sketch.to_bytes()) / 1e3:,.0f} kB) instead of {n * dim * 8 / 1e6:,.0f} MB of keys")
print(f"universal set: {len(U)} keys can ever carry an attention entry >= {eps} (bound d/eps = {U.size_bound:,.0f})")

Q = attention_like_queries(500, dim, seed=8, key_seed=7)
hits = sketch.heavy_entries(Q)
busiest = int(np.argmax(np.diff(hits.indptr)))
keys_i, weights_i = hits.row(busiest)
print(f"{len(hits):,} heavy entries for {Q.shape[0]} queries; query {busiest} attends heavily to keys "
      f"{keys_i.tolist()} with weights {np.round(weights_i, 4).tolist()}")

# Brute force on 20 queries: A = (q.k)^2 / sum over ALL keys, computed chunk by chunk.
sample = Q[:20]
B = np.concatenate([(sample @ X.T) ** 2 for X in key_chunks()], axis=1)
A = B / B.sum(axis=1, keepdims=True)
truth = {(int(i), int(j)) for i, j in zip(*np.nonzero(A >= eps))}
found = {(i, k) for i, k in hits.as_set() if i < 20}
assert found == truth, "the sketch must return exactly the dense heavy entries"
print(f"check: the {len(truth)} heavy entries of 20 queries equal brute force over all {n:,} keys")
