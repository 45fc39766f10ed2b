"""Query a sketch and inspect the answer: HeavyEntries (CSR like faiss range_search) and certified top-k.

    python examples/query_heavy_entries.py           # 200,000 keys
    python examples/query_heavy_entries.py 20000
"""

import sys

import numpy as np

import levstream as ls

n = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
dim, eps = 16, 0.02
rng = np.random.default_rng(0)
K = rng.standard_normal((n, dim)) * (1.0 + rng.pareto(2.0, size=(n, 1)))  # heavy-tailed key norms
Q = rng.standard_normal((8, dim))

sketch = ls.KeySketch(dim, eps=eps).update_many(K)
hits = sketch.heavy_entries(Q)  # every A[i, j] >= eps, A = (q_i . k_j)^2 / sum_l (q_i . k_l)^2
print(repr(hits))

# CSR arrays: entries of query i are key_ids[indptr[i]:indptr[i+1]], ascending, with their attention values
print("indptr :", hits.indptr.tolist())
print("key_ids:", hits.key_ids.tolist())
print("values :", np.round(hits.values, 4).tolist())
print("rows() :", hits.rows().tolist(), " <- the query row of every entry (expanded indptr)")

# one row, or iterate over all query rows
keys_3, values_3 = hits.row(3)
print(f"query 3: keys {keys_3.tolist()} values {np.round(values_3, 4).tolist()}")
for i, (keys_i, values_i) in enumerate(hits):
    if len(keys_i):
        print(f"  query {i}: strongest key {keys_i[np.argmax(values_i)]} with A = {values_i.max():.4f}")

# as a SciPy sparse matrix of shape (queries, n): sparse algebra, e.g. total heavy mass per query
A_heavy = hits.to_scipy(n_keys=n)
print(f"scipy: {A_heavy.shape}, nnz = {A_heavy.nnz}, heavy mass per query = "
      f"{np.round(np.asarray(A_heavy.sum(axis=1)).ravel(), 3).tolist()}")

# a higher threshold is answered by the same sketch (a lower one needs a sketch built with it)
print(f"entries >= 0.1: {len(sketch.heavy_entries(Q, eps=0.1))}")

# top-k among the universal set; `certified` is true when the k-th value is >= eps: every key outside
# the universal set has A < eps, so the row is then provably the true top-k over all n keys
top = sketch.top_k(Q, k=3)
print(repr(top))
for i in range(len(top)):
    print(f"  query {i}: top-3 keys {top.key_ids[i].tolist()} values {np.round(top.values[i], 4).tolist()} "
          f"certified={bool(top.certified[i])}")

# check against the dense attention over all keys
A = (Q @ K.T) ** 2
A /= A.sum(axis=1, keepdims=True)
assert hits.as_set() == {(int(i), int(j)) for i, j in zip(*np.nonzero(A >= eps))}
np.testing.assert_allclose(hits.values, A[hits.rows(), hits.key_ids], rtol=1e-9)
for i in np.flatnonzero(top.certified):
    assert set(top.key_ids[i].tolist()) == set(np.argsort(-A[i])[:3].tolist())
print("check: heavy entries, values and certified top-k rows equal the dense attention")
