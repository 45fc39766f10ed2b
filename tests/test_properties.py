"""hypothesis properties: any chunking, feeding mix and shard split gives the offline universal set; every dense
entry >= eps is returned.  Inputs are small integer matrices (exact ties, duplicates, zero rows and rank
deficiency are common) or arbitrary floats, times per-row and per-column scales (1e-30 .. 1e25).
Longer streams (up to 300 rows, blocks of 1-4 rows) put chunks of more than 64 blocks through the
sketch, with positional, offset, gapped or random unique key ids."""

from __future__ import annotations

import pickle

import naive
import numpy as np
from conftest import COND_TIE_RTOL, TIE_RTOL, VALUE_RTOL, assert_matches_offline
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import levstream as ls

PROPERTY_SETTINGS = settings(deadline=None, max_examples=50, derandomize=True,
                             suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
EPS_CHOICES = [0.02, 0.05, 0.1, 1 / 6, 0.25, 1 / 3, 0.5, 1.0]


INT_ENTRIES = st.integers(-3, 3)
FLOAT_ENTRIES = st.floats(-1e3, 1e3, allow_subnormal=False, width=64)


@st.composite
def key_matrices(draw, max_rows: int = 60, max_dim: int = 5, entries=INT_ENTRIES):
    d = draw(st.integers(1, max_dim))
    n = draw(st.integers(1, max_rows))
    entries = draw(st.lists(entries, min_size=n * d, max_size=n * d))
    scales = draw(st.lists(st.sampled_from([1.0, 0.5, 2.0, 10.0, 1e-3]), min_size=n, max_size=n))
    # scores are invariant under column scaling: columns of very different magnitude must not matter
    col_scales = draw(st.lists(st.sampled_from([1.0, 1.0, 1e-30, 1e25]), min_size=d, max_size=d))
    return np.array(entries, dtype=np.float64).reshape(n, d) * np.array(scales)[:, None] * np.array(col_scales)


@st.composite
def long_key_matrices(draw, max_rows: int = 300, max_dim: int = 4):
    """Up to 300 rows (often 200+), drawn from a hypothesis-chosen seed: listing every entry would
    exceed hypothesis' buffer.  Integer entries (ties, duplicates), heavy-tailed floats, exact low
    rank (integer factors) or a few repeated rows, times per-row and per-column scales."""
    d = draw(st.integers(1, max_dim), label="dim")
    n = draw(st.one_of(st.integers(1, 40), st.integers(200, max_rows), st.integers(261, max_rows)),
             label="rows")
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1), label="matrix seed"))
    kind = draw(st.sampled_from(["int", "float", "low rank", "repeated rows"]), label="kind")
    if kind == "int":
        K = rng.integers(-3, 4, (n, d)).astype(np.float64)
    elif kind == "float":
        K = rng.standard_normal((n, d)) * (1.0 + rng.pareto(1.5, (n, 1)))
    elif kind == "low rank":  # exact in float64: small integer factors
        r = int(rng.integers(1, d + 1))
        K = (rng.integers(-2, 3, (n, r)) @ rng.integers(-2, 3, (r, d))).astype(np.float64)
    else:
        distinct = max(1, n // 10)
        K = rng.integers(-2, 3, (distinct, d)).astype(np.float64)[rng.integers(0, distinct, n)]
    rows = rng.choice([1.0, 0.5, 2.0, 10.0, 1e-3], size=n)
    col_scales = st.lists(st.sampled_from([1.0, 1.0, 1e-30, 1e25]), min_size=d, max_size=d)
    cols = np.array(draw(col_scales, label="column scales"))
    return K * rows[:, None] * cols


def _ids(draw, n: int) -> np.ndarray:
    """Global ids of n rows: positional, shifted by an offset, evenly gapped, or random unique (in
    stream order or shuffled)."""
    kinds = ["positional", "offset", "gapped", "random sorted", "random"]
    kind = draw(st.sampled_from(kinds), label="ids")
    if kind == "positional":
        event("ids: positional")
        return np.arange(n, dtype=np.int64)
    event(f"ids: {kind}")
    start = draw(st.integers(0, 10**12), label="first id")
    if kind == "offset":
        return start + np.arange(n, dtype=np.int64)
    if kind == "gapped":
        return start + draw(st.integers(2, 10**6), label="gap") * np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1), label="ids seed"))
    ids = rng.choice(10**12, size=n, replace=False).astype(np.int64)
    return np.sort(ids) if kind == "random sorted" else ids


def _positions(got_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Row positions of reported ids; every reported id must be one that was fed."""
    where = {int(k): j for j, k in enumerate(ids)}
    unknown = [int(k) for k in got_ids if int(k) not in where]
    assert not unknown, f"ids reported that were never fed: {unknown[:10]}"
    return np.array([where[int(k)] for k in got_ids], dtype=np.int64)


def _feed_with_ids(sk: ls.KeySketch, part: np.ndarray, part_ids: np.ndarray) -> None:
    """Contiguous ids go in as ``offset=`` (half the time), any others as ``ids=``."""
    contiguous = part_ids.size and np.array_equal(part_ids, part_ids[0] + np.arange(part_ids.size))
    if contiguous and part_ids[0] % 2:
        sk.update_many(part, offset=int(part_ids[0]))
    else:
        sk.update_many(part, ids=part_ids)


def _dense_attention_bounds(Q: np.ndarray, K: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bounds on every dense entry ``A[i, j] = <q_i, k_j>^2 / Z(q_i)`` valid for any float64
    evaluation order: each inner product is off by at most ``e = 2 d u sum_m |q_m k_jm|``, and a
    normaliser from a Gram matrix by at most ``4 d^2 u sum_l (sum_m |q_m k_lm|)^2``.  A query nearly
    orthogonal to every key after cancellation (columns scaled by 1e25 next to 1e-30) gets the
    bounds [0, inf]: no float64 method can resolve its entries."""
    d, u = K.shape[1], np.finfo(np.float64).eps
    dots, S = Q @ K.T, np.abs(Q) @ np.abs(K).T
    e = 2 * d * u * S
    B = dots**2
    dB = 2 * np.abs(dots) * e + e**2
    Z = B.sum(axis=1, keepdims=True)
    dZ = 4 * d * d * u * (S**2).sum(axis=1, keepdims=True) + dB.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):  # Z = 0: a zero query, or zero keys
        lower = np.where(Z > 0, np.maximum(B - dB, 0.0) / (Z + dZ), 0.0)
        upper = np.where(Z > dZ, (B + dB) / (Z - dZ), np.inf)
    return lower, upper


def _tie_rtol(K: np.ndarray) -> float:
    """The documented tie band (docs/theory.md, "The guarantee"), widened to the accuracy any float64 method has on this K (about kappa * u,
    kappa of the column-equilibrated K, which governs the accuracy of scale-invariant scores)."""
    col_max = np.abs(K).max(axis=0)
    s = np.linalg.svd(K[:, col_max > 0] / col_max[col_max > 0], compute_uv=False)
    s = s[s > max(K.shape) * np.finfo(float).eps * (s[0] if s.size else 0.0)]
    kappa = float(s[0] / s[-1]) if s.size else 1.0
    return max(TIE_RTOL, COND_TIE_RTOL * kappa)


def _cuts(draw, n: int, max_parts: int) -> list[int]:
    if n < 2:
        return []
    return sorted(draw(st.sets(st.integers(1, n - 1), max_size=max_parts - 1)))


def _feed(sk: ls.KeySketch, part: np.ndarray, how: int, **ids) -> None:
    if ids or how == 0:
        sk.update_many(part, **ids)
    elif how == 1:
        for x in part:
            sk.update(x)
    else:
        sk.extend(x if i % 2 else x[None, :] for i, x in enumerate(part))


@PROPERTY_SETTINGS
@given(K=st.one_of(key_matrices(), key_matrices(entries=FLOAT_ENTRIES)), eps=st.sampled_from(EPS_CHOICES),
       data=st.data())
def test_any_chunking_and_feeding_mix_gives_the_offline_set(K, eps, data):
    block_rows = data.draw(st.integers(1, 16), label="block_rows")
    sk = ls.KeySketch(K.shape[1], eps=eps, block_rows=block_rows)
    for part in np.split(K, _cuts(data.draw, len(K), 6)):
        _feed(sk, part, data.draw(st.integers(0, 2), label="how"))
    assert sk.n == len(K)
    assert_matches_offline(sk.universal_set().ids, naive.leverage_svd(K), eps, tie_rtol=_tie_rtol(K))


@PROPERTY_SETTINGS
@given(K=long_key_matrices(), eps=st.sampled_from(EPS_CHOICES), data=st.data())
def test_chunks_of_over_64_blocks_with_any_ids_give_the_offline_set_and_heavy_entries(K, eps, data):
    """Blocks of 1-4 rows and a first chunk of more than 64 blocks whenever n >= 65 block_rows
    (always for n >= 200); the rest in a few chunks, all numbered by the drawn ids."""
    n, d = K.shape
    # blocks of at most 4 rows, and few enough of them that n > 64 blocks whenever n >= 200
    block_rows = data.draw(st.integers(1, min(4, n // 65) if n >= 65 else 4), label="block_rows")
    ids = _ids(data.draw, n)
    first = data.draw(st.integers(min(n, 65 * block_rows), n), label="first chunk rows")
    cuts = [first] + [c for c in _cuts(data.draw, n, 4) if c > first] if first < n else []
    event(f"a chunk of more than 64 blocks: {first // block_rows > 64}")
    sk = ls.KeySketch(d, eps=eps, block_rows=block_rows)
    start = 0
    for stop in [*cuts, n]:
        _feed_with_ids(sk, K[start:stop], ids[start:stop])
        start = stop
    assert sk.n == n
    tau, tol = naive.leverage_svd(K), _tie_rtol(K)
    assert_matches_offline(_positions(sk.universal_set().ids, ids), tau, eps, tie_rtol=tol)
    # heavy entries of random and key-aligned queries, reported under the fed ids
    rng = np.random.default_rng(n)
    Q = np.vstack([rng.integers(-3, 4, (3, d)), K[rng.integers(0, n, 3)]]).astype(np.float64)
    hits = sk.heavy_entries(Q)
    got = set(zip(hits.rows().tolist(), _positions(hits.key_ids, ids).tolist()))
    lower, upper = _dense_attention_bounds(Q, K)
    event(f"a dense entry is surely >= eps: {bool((lower >= eps * (1 + tol)).any())}")
    for i, j in zip(*np.nonzero(lower >= eps * (1 + tol))):
        assert (int(i), int(j)) in got, f"dense A[{i}, {j}] >= {lower[i, j]} >= {eps} not returned"
    for i, j in got:
        assert upper[i, j] >= eps * (1 - tol), f"returned A[{i}, {j}] <= {upper[i, j]} < {eps}"


@PROPERTY_SETTINGS
@given(K=st.one_of(key_matrices(), key_matrices(entries=FLOAT_ENTRIES)), eps=st.sampled_from(EPS_CHOICES),
       data=st.data())
def test_any_shard_split_and_merge_order_gives_the_offline_set(K, eps, data):
    cuts = _cuts(data.draw, len(K), 5)
    ids = _ids(data.draw, len(K))
    shards, start = [], 0
    for part in np.split(K, cuts):
        sk = ls.KeySketch(K.shape[1], eps=eps, block_rows=data.draw(st.integers(1, 16), label="block_rows"))
        _feed_with_ids(sk, part, ids[start:start + len(part)])
        shards.append(sk)
        start += len(part)
    order = data.draw(st.permutations(range(len(shards))), label="merge order")
    if data.draw(st.booleans(), label="balanced tree"):
        merged = ls.KeySketch.merge_all([shards[i] for i in order])
    else:
        merged = ls.KeySketch(K.shape[1], eps=eps)  # starting from an empty sketch
        for i in order:
            merged.merge(shards[i])
    assert merged.n == len(K)
    assert_matches_offline(_positions(merged.universal_set().ids, ids), naive.leverage_svd(K), eps,
                           tie_rtol=_tie_rtol(K))


@PROPERTY_SETTINGS
@given(K=key_matrices(), eps=st.sampled_from(EPS_CHOICES), data=st.data())
def test_every_dense_entry_at_least_eps_is_returned(K, eps, data):
    d = K.shape[1]
    m = data.draw(st.integers(1, 6), label="queries")
    Q = np.array(data.draw(st.lists(st.integers(-3, 3), min_size=m * d, max_size=m * d), label="Q"),
                 dtype=np.float64).reshape(m, d)
    sk = ls.KeySketch(d, eps=eps, block_rows=data.draw(st.integers(1, 16), label="block_rows"))
    for part in np.split(K, _cuts(data.draw, len(K), 4)):
        sk.update_many(part)
    q_eps = data.draw(st.sampled_from([e for e in EPS_CHOICES if e >= eps]), label="query eps")
    hits = sk.heavy_entries(Q, eps=q_eps)
    got = dict(zip(zip(hits.rows().tolist(), hits.key_ids.tolist()), hits.values.tolist()))
    A = naive.dense_attention(Q, K)
    tol = _tie_rtol(K)
    for i, j in zip(*np.nonzero(A >= q_eps * (1 + tol))):
        assert (int(i), int(j)) in got, f"dense entry A[{i}, {j}] = {A[i, j]} >= {q_eps} not returned"
    for (i, j), v in got.items():
        assert A[i, j] >= q_eps * (1 - tol), f"returned A[{i}, {j}] = {A[i, j]} < {q_eps}"
        assert abs(v - A[i, j]) <= max(VALUE_RTOL, tol) * A[i, j]


@PROPERTY_SETTINGS
@given(K=st.one_of(key_matrices(), key_matrices(entries=FLOAT_ENTRIES)), eps=st.sampled_from(EPS_CHOICES),
       data=st.data())
def test_interleaved_updates_round_trips_copies_queries_and_merges(K, eps, data):
    """A random program over the public API (feed, serialize and restore, copy, query, merge a side shard)
    ends with the offline set of every key fed, and every intermediate query answers for its prefix."""
    d = K.shape[1]
    sk = ls.KeySketch(d, eps=eps, block_rows=data.draw(st.integers(1, 16), label="block_rows"))
    pos = 0
    for part in np.split(K, _cuts(data.draw, len(K), 6)):
        op = data.draw(st.sampled_from(["feed", "bytes", "pickle", "copy", "query", "side shard"]), label="op")
        if op == "bytes":
            sk = ls.KeySketch.from_bytes(sk.to_bytes())
        elif op == "pickle":
            sk = pickle.loads(pickle.dumps(sk))
        elif op == "copy":
            sk = sk.copy()
        elif op == "query" and pos:
            assert_matches_offline(sk.universal_set().ids, naive.leverage_svd(K[:pos]), eps,
                                   tie_rtol=_tie_rtol(K[:pos]))
        if op == "side shard":
            sk.merge(ls.KeySketch(d, eps=eps).update_many(part, offset=pos))
        else:
            _feed(sk, part, data.draw(st.integers(0, 2), label="how"))
        pos += len(part)
    assert sk.n == len(K)
    assert_matches_offline(sk.universal_set().ids, naive.leverage_svd(K), eps, tie_rtol=_tie_rtol(K))
