"""One contract for every public sketch type, checked against the twin ``naive.NaiveStream``.

Sketch types: ``KeySketch`` with each normaliser summary (Gram p = 2; lifted p = 4 with
``exact=True``; the l_p coreset for p in {0.5, 1, 1.5, 3, 4}), ``MultiHeadKeySketch`` (2 heads) with
each of them, sketches restored from bytes, and sketches built by ``ls.build_sketch`` (thread pool)
and by ``levstream.dask.build_sketch``.

Checked for every one (docs/theory.md, "The guarantee"):

* no false negatives, in every mode: every dense entry ``>= eps`` is returned;
* exact modes (p = 2, p = 4 exact): no false positives outside the tie band, values and the
  normaliser to rounding, and for p = 2 the offline universal set;
* coreset modes: every returned entry has a true value ``>= eps (1 - delta)^2`` and lies in
  ``[lower, upper]``; the normaliser is within ``1 +- delta``;
* ``top_k``: values of the returned keys; certified rows are the true top-k;
* invariance to chunking, ``update`` vs ``update_many`` vs ``extend``, shard split and merge order;
* bytes round trip; bad input raises and leaves ``to_bytes()`` unchanged; a query changes nothing;
  an empty chunk is a no-op;
* values (``value_dim``, ``attend``) against the twin (last section).

Keys are heavy-tailed (conftest) with a *rare direction*: the last coordinate is zero except on a
few rows, so that every p, even p = 0.5, has heavy entries.  Queries: random rows, the rare
direction, key-aligned rows ``q = k_j`` and adversarial rows ``q = (K^T K)^-1 k_j`` for heavy and
for random j.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from conftest import NORMALIZER_RTOL, SCORE_RTOL, TIE_RTOL, VALUE_RTOL, heavy_tailed_keys
from naive import NaiveStream, leverage_svd

import levstream as ls

D = 5
N = 2400
EPS = 0.02
H = 2
BLOCK_ROWS = 256  # N is not a multiple: rows are left waiting in the input buffer
RARE_ROWS = 3
TOP_K = 3
CORESET_DELTA = 0.1  # the coreset's distortion, passed explicitly: the bounds below use it
CORESET_SEED = 7
CHUNK_CUTS = (1, 130, 131, 700, 1500, 2399)  # a single row, chunks within and across blocks

#: attend(Q).output against the dense output, relative to the row's scale max_c sum_j A_j |v_jc|
#: (the contract's 1e-10).  Belongs next to VALUE_RTOL in conftest.py.
OUTPUT_RTOL = 1e-10


@dataclass(frozen=True)
class Mode:
    """One normaliser summary: exponent, extra constructor options, whether answers are exact."""

    name: str
    p: float
    options: tuple[tuple[str, Any], ...]
    exact: bool

    def kwargs(self, shard: int = 0) -> dict[str, Any]:
        opts = dict(self.options)
        if "rng" in opts:  # shards of one stream draw from different seeds
            opts["rng"] += shard
        return opts


CORESET_OPTIONS = (("rng", CORESET_SEED), ("delta", CORESET_DELTA))
MODES = [
    Mode("gram-p2", 2.0, (), True),
    Mode("lifted-p4", 4.0, (("exact", True),), True),
    *[Mode(f"coreset-p{p:g}", p, CORESET_OPTIONS, False) for p in (0.5, 1.0, 1.5, 3.0, 4.0)],
]
GRAM = MODES[0]
MODE_PARAMS = [pytest.param(m, id=m.name) for m in MODES]
KINDS = ["KeySketch", "MultiHeadKeySketch"]


# ------------------------------------------------------------------------------------- data
def contract_keys(seed: int) -> np.ndarray:
    """Heavy-tailed keys whose last coordinate is non-zero on RARE_ROWS rows only."""
    K = heavy_tailed_keys(N, D, seed)
    rare = np.random.default_rng(seed).choice(N, RARE_ROWS, replace=False)
    K[np.setdiff1d(np.arange(N), rare), -1] = 0.0
    return K


def contract_queries(K: np.ndarray, seed: int) -> np.ndarray:
    """Random rows, the rare direction, key-aligned and adversarial rows (3 heavy, 2 random j)."""
    rng = np.random.default_rng(seed + 100)
    heavy = np.argsort(-leverage_svd(K))[:3]
    picked = np.concatenate([heavy, rng.choice(K.shape[0], 2, replace=False)])
    adversarial = np.linalg.solve(K.T @ K, K[picked].T).T  # maximises A_j (p = 2)
    return np.vstack([rng.standard_normal((4, D)), np.eye(D)[-1], K[picked], adversarial])


@pytest.fixture(scope="module")
def Ks() -> np.ndarray:
    """Keys of every head, shape (H, N, D); a KeySketch uses head 0."""
    return np.stack([contract_keys(seed) for seed in range(H)])


@pytest.fixture(scope="module")
def Qs(Ks) -> np.ndarray:
    return np.stack([contract_queries(K, h) for h, K in enumerate(Ks)])


def heads_of(kind: str, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """The data a sketch kind sees, always with a head axis (one head for a KeySketch)."""
    return arrays if kind == "MultiHeadKeySketch" else tuple(a[:1] for a in arrays)


def twins_of(Ks: np.ndarray, p: float) -> list[NaiveStream]:
    return [NaiveStream(D, p=p).update_many(K) for K in Ks]


# --------------------------------------------------------------------------- feeding a sketch
def type_of(kind: str) -> type:
    return ls.MultiHeadKeySketch if kind == "MultiHeadKeySketch" else ls.KeySketch


def new_sketch(kind: str, mode: Mode, shard: int = 0, dim: int = D) -> Any:
    head_axis = (H,) if kind == "MultiHeadKeySketch" else ()
    return type_of(kind)(*head_axis, dim, eps=EPS, p=mode.p, block_rows=BLOCK_ROWS,
                         **mode.kwargs(shard))


def is_multi(sk: Any) -> bool:
    return isinstance(sk, ls.MultiHeadKeySketch)


def arg(sk: Any, X: np.ndarray) -> np.ndarray:
    """Data with a head axis as ``sk`` takes it: whole for a multi-head sketch, else head 0."""
    return X if is_multi(sk) else X[0]


def feed(sk: Any, X: np.ndarray, **ids: Any) -> Any:
    return sk.update_many(arg(sk, X), **ids)


def feed_chunks(sk: Any, X: np.ndarray, cuts=CHUNK_CUTS) -> Any:
    for part in np.split(X, list(cuts), axis=1):
        feed(sk, part)
    return sk


def feed_rows(sk: Any, X: np.ndarray) -> Any:
    for x in X.swapaxes(0, 1):
        sk.update(arg(sk, x))
    return sk


def restored(sk: Any) -> Any:
    return type(sk).from_bytes(sk.to_bytes())


# ---------------------------------------------------------------------------- reading answers
def heavy(sk: Any, Qs: np.ndarray, eps: float | None = None) -> list:
    res = sk.heavy_entries(arg(sk, Qs), eps)
    return list(res) if is_multi(sk) else [res]


def normalizers(sk: Any, Qs: np.ndarray) -> np.ndarray:
    z = np.asarray(sk.normalizer(arg(sk, Qs)))
    return z if is_multi(sk) else z[None]


def top_ks(sk: Any, Qs: np.ndarray, k: int) -> list:
    res = sk.top_k(arg(sk, Qs), k)  # one TopK per head, like heavy_entries
    return list(res) if is_multi(sk) else [res]


def universal_sets(sk: Any) -> list:
    res = sk.universal_set()
    return list(res) if is_multi(sk) else [res]


def answers(sk: Any, Qs: np.ndarray) -> list[tuple]:
    """What a user observes, per head: universal set ids, heavy entries, values, normaliser."""
    out = []
    for U, hits, z in zip(universal_sets(sk), heavy(sk, Qs), normalizers(sk, Qs)):
        out.append((U.ids.tolist(), hits.indptr.tolist(), hits.key_ids.tolist(), hits.values, z))
    return out


def assert_same_answers(got: list[tuple], want: list[tuple], what: str) -> None:
    """Exact modes: identical universal sets and entries, values and normalisers to rounding."""
    for h, (g, w) in enumerate(zip(got, want)):
        assert g[0] == w[0], f"{what}: universal set of head {h} differs"
        assert g[1:3] == w[1:3], f"{what}: heavy entries of head {h} differ"
        np.testing.assert_allclose(g[3], w[3], rtol=VALUE_RTOL, err_msg=f"{what}: values {h}")
        np.testing.assert_allclose(g[4], w[4], rtol=NORMALIZER_RTOL, err_msg=f"{what}: Z {h}")


# ------------------------------------------------------------------------------ the twin check
def _columns(twin: NaiveStream, ids: np.ndarray) -> list[int]:
    column = {int(i): c for c, i in enumerate(twin.ids)}
    unknown = [int(i) for i in ids if int(i) not in column]
    assert not unknown, f"ids never fed were returned: {unknown[:5]}"
    return [column[int(i)] for i in ids]


def check_entries(hits: ls.HeavyEntries, twin: NaiveStream, Q: np.ndarray, eps: float, mode: Mode,
                  where: str) -> None:
    """``hits`` against the dense attention of the twin's keys: no entry >= eps missed; exact
    modes: nothing below eps outside the tie band, values to VALUE_RTOL; coreset modes: bounds."""
    A = twin.attention(Q)
    assert hits.n_queries == Q.shape[0], f"{where}: {hits.n_queries} rows for {Q.shape[0]} queries"
    for i, (keys, _) in enumerate(hits):
        assert np.all(np.diff(keys) > 0), f"{where}: key ids of query {i} not ascending and unique"
    rows = hits.rows()
    true = A[rows, _columns(twin, hits.key_ids)]
    got = set(zip(rows.tolist(), hits.key_ids.tolist()))
    dense = np.nonzero(A >= eps * (1 + TIE_RTOL))
    must = {(int(i), int(twin.ids[j])): float(A[i, j]) for i, j in zip(*dense)}
    missing = sorted(must.keys() - got)
    assert not missing, (f"{where}: {len(missing)} of {len(must)} dense entries >= eps missed, "
                         f"e.g. {[(e, must[e]) for e in missing[:5]]}")
    if mode.exact:
        low = true < eps * (1 - TIE_RTOL)
        assert not low.any(), (f"{where}: {int(low.sum())} entries returned below eps, e.g. "
                               f"{sorted(zip(rows[low].tolist(), hits.key_ids[low].tolist()))[:5]}")
        np.testing.assert_allclose(hits.values, true, rtol=VALUE_RTOL, err_msg=f"{where}: values")
        return
    floor = eps * (1 - CORESET_DELTA) ** 2 * (1 - TIE_RTOL)
    low = true < floor
    assert not low.any(), f"{where}: true values {true[low][:5]} < eps (1 - delta)^2 = {floor}"
    if hits.lower is not None:
        slack = 1 + VALUE_RTOL
        assert np.all(hits.lower <= true * slack), f"{where}: lower bound above the true value"
        assert np.all(true <= hits.upper * slack), f"{where}: upper bound below the true value"


def check_top_k(top: Any, twin: NaiveStream, Q: np.ndarray, k: int, eps: float, mode: Mode,
                where: str) -> None:
    """Values of the returned keys (exact, or within the coreset's distortion); a certified row is
    the true top-k; a row whose true k-th value is clearly >= eps is certified."""
    A = twin.attention(Q)
    _, want = twin.top_k(Q, k)
    shape = np.shape(top.key_ids)
    assert shape == (Q.shape[0], k), f"{where}: top-k ids of shape {shape}"
    for i in range(Q.shape[0]):
        ids, vals = np.asarray(top.key_ids[i]), np.asarray(top.values[i])
        live = ids >= 0
        assert np.unique(ids[live]).size == live.sum(), f"{where}: top-k row {i} repeats a key"
        assert np.all(np.diff(vals[live]) <= 0), f"{where}: top-k row {i} not in decreasing order"
        true = A[i, _columns(twin, ids[live])]
        if mode.exact:
            np.testing.assert_allclose(vals[live], true, rtol=VALUE_RTOL,
                                       err_msg=f"{where}: top-k values, row {i}")
        else:  # A~ = A Z / Z~ with Z~ within (1 +- delta) Z
            slack = 1 + VALUE_RTOL
            assert np.all(vals[live] * (1 - CORESET_DELTA) <= true * slack), f"{where}: row {i}"
            assert np.all(true <= vals[live] * (1 + CORESET_DELTA) * slack), f"{where}: row {i}"
        if top.certified[i]:  # the true top-k over all keys (compared by value: ties)
            np.testing.assert_allclose(np.sort(true)[::-1], want[i], rtol=VALUE_RTOL,
                                       err_msg=f"{where}: certified row {i} is not the true top-k")
        if want.shape[1] == k:
            kth = want[i, -1] * (1.0 if mode.exact else (1 - CORESET_DELTA) / (1 + CORESET_DELTA))
            assert top.certified[i] or kth < eps * (1 + TIE_RTOL), (
                f"{where}: row {i} not certified though its true k-th value {want[i, -1]} >= eps")


def assert_matches_twin(sk: Any, twins: list[NaiveStream], Qs: np.ndarray, mode: Mode,
                        what: str) -> None:
    """Every answer of ``sk`` (all heads) against the twin of each head; top-k last."""
    hits, Z, Us = heavy(sk, Qs), normalizers(sk, Qs), universal_sets(sk)
    assert len(hits) == len(Us) == Z.shape[0] == len(twins), f"{what}: one answer per head"
    assert sk.n == twins[0].n, f"{what}: n = {sk.n}, fed {twins[0].n}"
    for h, twin in enumerate(twins):
        where = f"{what}, head {h}"
        check_entries(hits[h], twin, Qs[h], EPS, mode, where)
        z = twin.normalizer(Qs[h])
        if mode.exact:
            np.testing.assert_allclose(Z[h], z, rtol=NORMALIZER_RTOL, err_msg=f"{where}: Z")
        else:
            assert np.all(np.abs(Z[h] - z) <= CORESET_DELTA * z), f"{where}: Z outside 1 +- delta"
        U = Us[h]
        assert np.all(np.diff(U.ids) > 0), f"{where}: universal set ids not ascending and unique"
        # the key of a heavy entry of any query has sensitivity >= eps
        needed = {k for (_, k) in twin.heavy_entries(Qs[h], EPS * (1 + TIE_RTOL))}
        outside = sorted(needed - set(U.ids.tolist()))
        assert not outside, f"{where}: keys of heavy entries outside the universal set: {outside}"
        if mode.p == 2.0:
            tau = twin.scores()
            must = set(twin.ids[tau >= EPS * (1 + TIE_RTOL)].tolist())
            may = set(twin.ids[tau >= EPS * (1 - TIE_RTOL)].tolist())
            got = set(U.ids.tolist())
            assert must <= got <= may, f"{where}: universal set differs from the offline set"
            np.testing.assert_allclose(U.scores, tau[_columns(twin, U.ids)], rtol=SCORE_RTOL,
                                       err_msg=f"{where}: leverage scores")
    tops = top_ks(sk, Qs, TOP_K)
    assert len(tops) == len(twins), f"{what}: one top-k answer per head"
    for h, twin in enumerate(twins):
        check_top_k(tops[h], twin, Qs[h], TOP_K, EPS, mode, f"{what}, head {h}")


def test_fixture_has_heavy_entries_in_every_mode_and_no_near_ties(Ks, Qs):
    """Guard: each mode has dense entries >= eps on each head and none within 1e-6 of eps, so
    that the "identical entries" comparisons below never hinge on rounding."""
    for mode in MODES:
        for h, twin in enumerate(twins_of(Ks, mode.p)):
            A = twin.attention(Qs[h])
            assert (A >= EPS).sum() >= 5, f"{mode.name}, head {h}: too few heavy entries"
            assert not np.any(np.abs(A - EPS) <= 1e-6 * EPS), f"{mode.name}, head {h}: near ties"


# ------------------------------------------------------------------------------- construction
def build(construction: str, kind: str, mode: Mode, Ks: np.ndarray) -> Any:
    """A sketch of all keys ``Ks`` (head axis in front), made the way ``construction`` says."""
    if construction == "stream":
        sk = feed_rows(new_sketch(kind, mode), Ks[:, :40])
        return feed_chunks(sk, Ks[:, 40:], [c - 40 for c in CHUNK_CUTS if c > 40])
    if construction == "bytes":  # restored mid-stream, fed on, restored again
        sk = restored(feed(new_sketch(kind, mode), Ks[:, :1111]))
        return restored(feed(sk, Ks[:, 1111:]))
    if construction == "build":
        return ls.build_sketch(Ks[0], eps=EPS, p=mode.p, n_jobs=2, chunk_rows=300,
                               block_rows=BLOCK_ROWS, **mode.kwargs())
    if construction == "dask":
        da = pytest.importorskip("dask.array", reason="dask is not installed (pip install dask)")
        import levstream.dask as lsd

        keys = da.from_array(Ks[0], chunks=((700, 1, 899, 800), D))
        return lsd.build_sketch(keys, eps=EPS, p=mode.p, split_every=2, scheduler="threads",
                                block_rows=BLOCK_ROWS, **mode.kwargs())
    raise AssertionError(construction)


CONSTRUCTIONS = [pytest.param("KeySketch", c, id=f"KeySketch-{c}")
                 for c in ("stream", "bytes", "build", "dask")]
CONSTRUCTIONS += [pytest.param("MultiHeadKeySketch", c, id=f"MultiHeadKeySketch-{c}")
                  for c in ("stream", "bytes")]


@pytest.mark.parametrize("mode", MODE_PARAMS)
@pytest.mark.parametrize("kind,construction", CONSTRUCTIONS)
def test_answers_match_the_brute_force_twin(kind, construction, mode, Ks, Qs):
    Ks, Qs = heads_of(kind, Ks, Qs)
    sk = build(construction, kind, mode, Ks)
    assert_matches_twin(sk, twins_of(Ks, mode.p), Qs, mode, f"{kind} ({construction}, {mode.name})")


# --------------------------------------------------------------------------------- invariance
def feeding_variants(kind: str, mode: Mode, Ks: np.ndarray) -> dict[str, Any]:
    """The same keys fed in different ways: chunkings, rows, extend, shards merged in any order."""
    out = {"one chunk": feed(new_sketch(kind, mode), Ks),
           "uneven chunks": feed_chunks(new_sketch(kind, mode), Ks),
           "rows then a chunk": feed(feed_rows(new_sketch(kind, mode), Ks[:, :300]), Ks[:, 300:])}
    sk = new_sketch(kind, mode)
    items = [arg(sk, x) for x in Ks[:, :20].swapaxes(0, 1)]
    items += [arg(sk, part) for part in np.split(Ks[:, 20:], [5, 600, 1900], axis=1)]
    out["extend rows and chunks"] = sk.extend(items)

    def shards() -> list[Any]:  # a running counter, explicit ids, offset=
        a = feed(new_sketch(kind, mode, shard=1), Ks[:, :800])
        b = feed(new_sketch(kind, mode, shard=2), Ks[:, 800:1700], ids=np.arange(800, 1700))
        c = feed(new_sketch(kind, mode, shard=3), Ks[:, 1700:], offset=1700)
        return [a, b, c]

    a, b, c = shards()
    out["shards a+b+c"] = a.merge(b).merge(c)
    a, b, c = shards()
    out["shards c+a+b"] = c.merge(a).merge(b)
    a, b, c = shards()
    out["empty + b + (c + a)"] = new_sketch(kind, mode).merge(b).merge(c.merge(a))
    if kind == "KeySketch":
        a, b, c = shards()
        out["merge_all(b, c, a)"] = ls.KeySketch.merge_all([b, c, a])
    return out


@pytest.mark.parametrize("mode", MODE_PARAMS)
@pytest.mark.parametrize("kind", KINDS)
def test_chunking_feeding_and_merge_order_do_not_change_answers(kind, mode, Ks, Qs):
    Ks, Qs = heads_of(kind, Ks, Qs)
    twins = twins_of(Ks, mode.p)
    reference = None
    for name, sk in feeding_variants(kind, mode, Ks).items():
        assert_matches_twin(sk, twins, Qs, mode, f"{kind} ({name}, {mode.name})")
        if mode.exact:  # coreset modes: each variant satisfies the bounds (checked above)
            reference = reference or answers(sk, Qs)
            assert_same_answers(answers(sk, Qs), reference, f"{kind} ({name}, {mode.name})")


@pytest.mark.parametrize("mode", MODE_PARAMS)
@pytest.mark.parametrize("kind", KINDS)
def test_bytes_round_trip_then_more_updates_answers_as_never_serialized(kind, mode, Ks, Qs):
    Ks, Qs = heads_of(kind, Ks, Qs)
    for cut in (1, 777, N - 1):
        never = feed(new_sketch(kind, mode), Ks[:, :cut])
        again = restored(never)
        assert again.to_bytes() == never.to_bytes(), f"cut {cut}: a restored sketch's bytes differ"
        for sk in (never, again):
            feed_chunks(sk, Ks[:, cut:], [c - cut for c in CHUNK_CUTS if c > cut])
        got, want = answers(again, Qs), answers(never, Qs)
        for h, (g, w) in enumerate(zip(got, want)):  # every mode: it continues identically
            assert g[:3] == w[:3], f"cut {cut}, head {h}: answers differ after the round trip"
            np.testing.assert_array_equal(g[3], w[3])
            np.testing.assert_array_equal(g[4], w[4])
        assert_matches_twin(again, twins_of(Ks, mode.p), Qs, mode, f"{kind} restored at {cut}")


# ----------------------------------------------------------------------- state: queries, errors
@pytest.mark.parametrize("mode", MODE_PARAMS)
@pytest.mark.parametrize("kind", KINDS)
def test_a_query_changes_nothing(kind, mode, Ks, Qs):
    """to_bytes() is identical before and after every query (rows wait in the input buffer);
    each query runs on its own restored copy, so that one query cannot hide another."""
    Ks, Qs = heads_of(kind, Ks, Qs)
    data = feed_chunks(new_sketch(kind, mode), Ks).to_bytes()
    queries = {
        "heavy_entries": lambda sk: sk.heavy_entries(arg(sk, Qs)),
        "heavy_entries(eps=0.1)": lambda sk: sk.heavy_entries(arg(sk, Qs), eps=0.1),
        "top_k": lambda sk: sk.top_k(arg(sk, Qs), TOP_K),
        "normalizer": lambda sk: sk.normalizer(arg(sk, Qs)),
        "universal_set": lambda sk: sk.universal_set(),
    }
    changed = []
    for name, query in queries.items():
        sk = type_of(kind).from_bytes(data)
        query(sk)
        if sk.to_bytes() != data:
            changed.append(name)
    assert not changed, f"{kind} ({mode.name}): these queries changed the sketch: {changed}"


def failed_expectations(sk: Any, calls: dict[str, tuple]) -> list[str]:
    """Run every ``(call, expected error)``; list those that did not raise it or changed the
    sketch's bytes."""
    problems = []
    for name, (call, error) in calls.items():
        before = sk.to_bytes()
        try:
            call()
            problems.append(f"{name}: accepted")
        except error:
            pass
        except Exception as exc:  # noqa: BLE001 -- reported with its type
            problems.append(f"{name}: raised {type(exc).__name__} ({exc}), expected {error}")
        if sk.to_bytes() != before:
            problems.append(f"{name}: changed the sketch")
    return problems


def bad_calls(sk: Any, kind: str, mode: Mode, Ks: np.ndarray, Qs: np.ndarray) -> dict:
    """Calls that must raise (with the exception type) on a sketch fed the first N // 2 keys."""
    X = Ks[:, N // 2:N // 2 + 10].copy()
    nan_chunk, inf_chunk, nan_row, nan_query = X.copy(), X.copy(), X[:, 0].copy(), Qs.copy()
    nan_chunk[:, 4, 2] = np.nan
    inf_chunk[:, 9, 0] = -np.inf
    nan_row[:, 1] = np.nan
    nan_query[:, 0, 3] = np.nan
    Q = arg(sk, Qs)
    clashing = feed(new_sketch(kind, mode), Ks[:, :5], offset=3)
    other_dim = new_sketch(kind, mode, dim=D + 1)

    def chunk(X: np.ndarray, **ids: Any) -> Any:
        return lambda: sk.update_many(arg(sk, X), **ids)

    return {
        "NaN row": (lambda: sk.update(arg(sk, nan_row)), ValueError),
        "NaN in a chunk": (chunk(nan_chunk), ValueError),
        "inf in a chunk": (chunk(inf_chunk), ValueError),
        "chunk of the wrong width": (chunk(X[..., :-1]), ValueError),
        "row of the wrong width": (lambda: sk.update(arg(sk, X[:, 0, :-1])), ValueError),
        "complex chunk": (chunk(X.astype(complex)), TypeError),
        "ids clash with fed keys": (chunk(X, ids=np.arange(5, 15)), ValueError),
        "offset clash with fed keys": (chunk(X, offset=N // 2 - 3), ValueError),
        "duplicate ids": (chunk(X, ids=np.r_[N + np.arange(9), N]), ValueError),
        "ids of the wrong length": (chunk(X, ids=N + np.arange(3)), ValueError),
        "negative ids": (chunk(X, ids=-1 - np.arange(10)), ValueError),
        "eps = 0": (lambda: sk.heavy_entries(Q, eps=0.0), ValueError),
        "eps > 1": (lambda: sk.heavy_entries(Q, eps=1.5), ValueError),
        "eps nan": (lambda: sk.heavy_entries(Q, eps=float("nan")), ValueError),
        "eps below the sketch's": (lambda: sk.heavy_entries(Q, eps=EPS / 2), ValueError),
        "query of the wrong width": (lambda: sk.heavy_entries(arg(sk, Qs[..., :-1])), ValueError),
        "NaN query": (lambda: sk.heavy_entries(arg(sk, nan_query)), ValueError),
        "top_k with k = 0": (lambda: sk.top_k(Q, 0), ValueError),
        "merge of another dim": (lambda: sk.merge(other_dim), ValueError),
        "merge of another type": (lambda: sk.merge(object()), TypeError),
        "merge of a sketch holding fed ids": (lambda: sk.merge(clashing), ValueError),
    }


@pytest.mark.parametrize("mode", MODE_PARAMS)
@pytest.mark.parametrize("kind", KINDS)
def test_bad_input_raises_and_leaves_the_sketch_unchanged(kind, mode, Ks, Qs):
    Ks, Qs = heads_of(kind, Ks, Qs)
    sk = feed_chunks(new_sketch(kind, mode), Ks[:, :N // 2], [7, 300])
    problems = failed_expectations(sk, bad_calls(sk, kind, mode, Ks, Qs))
    assert not problems, f"{kind} ({mode.name}):\n" + "\n".join(problems)
    twins = twins_of(Ks[:, :N // 2], mode.p)
    assert_matches_twin(sk, twins, Qs, mode, f"{kind} after the bad calls")


@pytest.mark.parametrize("mode", MODE_PARAMS)
@pytest.mark.parametrize("kind", KINDS)
def test_empty_chunks_are_no_ops(kind, mode, Ks, Qs):
    Ks, Qs = heads_of(kind, Ks, Qs)
    sk = feed_chunks(new_sketch(kind, mode), Ks[:, :1000], [300])
    empty = Ks[:, :0]
    before = sk.to_bytes()
    sk.update_many(arg(sk, empty))
    sk.update_many(arg(sk, empty), ids=np.zeros(0, dtype=np.int64))
    sk.update_many(arg(sk, empty), offset=0)
    assert sk.to_bytes() == before, "an empty chunk changed the sketch"
    with pytest.raises(ValueError):
        sk.update_many(arg(sk, np.zeros((Ks.shape[0], 0, D + 1))))
    assert sk.to_bytes() == before, "a rejected empty chunk changed the sketch"
    other = restored(sk)
    items = [empty, Ks[:, 1000], empty, Ks[:, 1001:1400], empty]
    sk.extend([arg(sk, item) for item in items])
    feed(feed_rows(other, Ks[:, 1000:1001]), Ks[:, 1001:1400])
    assert sk.to_bytes() == other.to_bytes(), "empty chunks in extend() changed the sketch"
    assert_matches_twin(sk, twins_of(Ks[:, :1400], mode.p), Qs, mode, f"{kind}, empty chunks")


@pytest.mark.parametrize("mode", [MODE_PARAMS[0], MODE_PARAMS[3]])
def test_builds_accept_empty_chunks(mode, Ks, Qs):
    K, Q = Ks[0], Qs[:1]
    twins = twins_of(Ks[:1], mode.p)
    parts = [K[:0], K[:700], K[700:700], K[700:], K[:0]]
    sk = ls.build_sketch(iter(parts), eps=EPS, p=mode.p, n_jobs=2, block_rows=BLOCK_ROWS,
                         **mode.kwargs())
    assert_matches_twin(sk, twins, Q, mode, "build_sketch with empty chunks")
    dask = pytest.importorskip("dask", reason="dask is not installed (pip install dask)")
    import levstream.dask as lsd

    delayed = [dask.delayed(np.array)(part) for part in parts]
    sk = lsd.build_sketch(delayed, eps=EPS, p=mode.p, scheduler="threads", block_rows=BLOCK_ROWS,
                          **mode.kwargs())
    assert_matches_twin(sk, twins, Q, mode, "Dask build with empty partitions")


# ------------------------------------------------------- levstream.testing.check_sketch_contract
def contract_inputs(kind: str, Ks: np.ndarray, Qs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keys and queries in the shapes ``check_sketch_contract`` takes for ``kind``."""
    Ks, Qs = heads_of(kind, Ks[:, :1500], Qs)
    return (Ks, Qs) if kind == "MultiHeadKeySketch" else (Ks[0], Qs[0])


@pytest.mark.parametrize("mode", MODE_PARAMS)
@pytest.mark.parametrize("kind", KINDS)
def test_check_sketch_contract_runs_on_every_sketch_type(kind, mode, Ks, Qs):
    K, Q = contract_inputs(kind, Ks, Qs)
    delta = None if mode.exact else CORESET_DELTA
    ls.testing.check_sketch_contract(lambda: new_sketch(kind, mode), K, Q, delta=delta)


@pytest.mark.parametrize("kind", KINDS)
def test_check_sketch_contract_catches_a_missed_heavy_entry(kind, Ks, Qs):
    """A sketch that answers the rare-direction query (row 4: it has heavy entries) with nothing."""

    class Blind(type_of(kind)):  # type: ignore[misc]
        def heavy_entries(self, Q, eps=None):
            Q = np.array(Q, dtype=np.float64)
            Q[..., 4, :] = 0.0
            return super().heavy_entries(Q, eps)

    K, Q = contract_inputs(kind, Ks, Qs)
    head_axis = (H,) if kind == "MultiHeadKeySketch" else ()
    with pytest.raises(AssertionError, match="missed"):
        ls.testing.check_sketch_contract(lambda: Blind(*head_axis, D, eps=EPS), K, Q)


# ---------------------------------------------------------------- values (value_dim, attend)
# The API of values travelling with keys: KeySketch(dim, eps=..., value_dim=..., exact_output=...),
# update(k, v), update_many(K, V, ids=None, offset=None), extend of (K, V) pairs, attend(Q,
# eps=None) -> AttentionResult(entries, heavy_output, captured_mass, output; output None unless
# exact_output); MultiHeadKeySketch the same with a head axis in front.  These tests fail (with a
# TypeError or AttributeError) while that API is missing.
DV = 3


@pytest.fixture(scope="module")
def Vs() -> np.ndarray:
    return np.random.default_rng(42).standard_normal((H, N, DV))


def value_sketch(kind: str, *, exact_output: bool = True, value_dim: int = DV) -> Any:
    head_axis = (H,) if kind == "MultiHeadKeySketch" else ()
    return type_of(kind)(*head_axis, D, eps=EPS, value_dim=value_dim, exact_output=exact_output,
                         block_rows=BLOCK_ROWS)


def value_twins(Ks: np.ndarray, Vs: np.ndarray) -> list[NaiveStream]:
    return [NaiveStream(D, value_dim=DV).update_many(K, V) for K, V in zip(Ks, Vs)]


def assert_sums_close(got: Any, A: np.ndarray, V: np.ndarray, rtol: float, what: str) -> None:
    """``got == A @ V`` to ``rtol`` times each row's scale ``max_c (A |V|)_c``."""
    want, scale = A @ V, (A @ np.abs(V)).max(axis=1, keepdims=True)
    err = np.abs(np.asarray(got, dtype=np.float64) - want)
    worst = float((err / np.where(scale > 0, scale, 1.0)).max()) if err.size else 0.0
    assert np.all(err <= rtol * scale), f"{what}: largest relative error {worst:.3g}"


def assert_attend_matches_twin(sk: Any, twins: list[NaiveStream], Qs: np.ndarray, what: str,
                               exact_output: bool = True) -> None:
    r = sk.attend(arg(sk, Qs))

    def per_head(x: Any) -> list:
        return list(x) if is_multi(sk) else [x]

    if exact_output:
        outputs = per_head(r.output)
    else:
        assert r.output is None, f"{what}: an output computed without exact_output"
    for h, (entries, heavy_out, mass) in enumerate(zip(per_head(r.entries),
                                                       per_head(r.heavy_output),
                                                       per_head(r.captured_mass))):
        where = f"{what}, head {h}"
        twin = twins[h]
        check_entries(entries, twin, Qs[h], EPS, GRAM, where)
        A = twin.attention(Qs[h])
        heavy_A = np.where(A >= EPS, A, 0.0)
        if exact_output:
            assert_sums_close(outputs[h], A, twin.V, OUTPUT_RTOL, f"{where}: output")
        assert_sums_close(heavy_out, heavy_A, twin.V, VALUE_RTOL, f"{where}: heavy_output")
        np.testing.assert_allclose(mass, heavy_A.sum(axis=1), rtol=VALUE_RTOL,
                                   err_msg=f"{where}: captured_mass")


@pytest.mark.parametrize("exact_output", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_attend_matches_the_twin(kind, exact_output, Ks, Qs, Vs):
    Ks, Qs, Vs = heads_of(kind, Ks, Qs, Vs)
    sk = value_sketch(kind, exact_output=exact_output)
    for x, v in zip(Ks[:, :40].swapaxes(0, 1), Vs[:, :40].swapaxes(0, 1)):
        sk.update(arg(sk, x), arg(sk, v))
    for a, b in zip((40, 41, 700, 1900), (41, 700, 1900, N)):
        sk.update_many(arg(sk, Ks[:, a:b]), arg(sk, Vs[:, a:b]))
    assert_attend_matches_twin(sk, value_twins(Ks, Vs), Qs, f"{kind} with values", exact_output)
    assert_matches_twin(sk, twins_of(Ks, 2.0), Qs, GRAM, f"{kind} with values")


@pytest.mark.parametrize("kind", KINDS)
def test_values_travel_through_extend_merges_and_bytes(kind, Ks, Qs, Vs):
    Ks, Qs, Vs = heads_of(kind, Ks, Qs, Vs)
    a, b, c = value_sketch(kind), value_sketch(kind), value_sketch(kind)
    a.update_many(arg(a, Ks[:, :900]), arg(a, Vs[:, :900]))
    b.update_many(arg(b, Ks[:, 900:1600]), arg(b, Vs[:, 900:1600]), ids=np.arange(900, 1600))
    c.update_many(arg(c, Ks[:, 1600:1601]), arg(c, Vs[:, 1600:1601]), offset=1600)
    c.extend([(arg(c, Ks[:, 1601:2000]), arg(c, Vs[:, 1601:2000])),
              (arg(c, Ks[:, 2000:]), arg(c, Vs[:, 2000:]))])
    merged = restored(b.merge(a)).merge(restored(c))
    assert_attend_matches_twin(merged, value_twins(Ks, Vs), Qs, f"{kind} with values, merged")


@pytest.mark.parametrize("kind", KINDS)
def test_bad_values_raise_and_leave_the_sketch_unchanged(kind, Ks, Qs, Vs):
    Ks, Qs, Vs = heads_of(kind, Ks, Qs, Vs)
    sk = value_sketch(kind)
    sk.update_many(arg(sk, Ks[:, :500]), arg(sk, Vs[:, :500]))
    X, V = Ks[:, 500:510], Vs[:, 500:510].copy()
    nan_V = V.copy()
    nan_V[:, 3, 1] = np.nan
    plain, other_dv = new_sketch(kind, GRAM), value_sketch(kind, value_dim=DV + 1)

    def chunk(X: np.ndarray, *V: np.ndarray) -> Any:
        return lambda: sk.update_many(arg(sk, X), *(arg(sk, v) for v in V))

    calls = {
        "values missing": (chunk(X), ValueError),
        "a row without its value": (lambda: sk.update(arg(sk, X[:, 0])), ValueError),
        "values of the wrong width": (chunk(X, V[..., :-1]), ValueError),
        "values for fewer rows": (chunk(X, V[:, :-1]), ValueError),
        "NaN value": (chunk(X, nan_V), ValueError),
        "merge without values": (lambda: sk.merge(plain), ValueError),
        "merge of another value_dim": (lambda: sk.merge(other_dv), ValueError),
        "attend with eps below the sketch's": (lambda: sk.attend(arg(sk, Qs), eps=EPS / 2),
                                               ValueError),
    }
    problems = failed_expectations(sk, calls)
    given = (lambda: plain.update_many(arg(plain, X), arg(plain, V)), (ValueError, TypeError))
    problems += failed_expectations(plain, {"values given to a sketch without value_dim": given})
    assert not problems, f"{kind}:\n" + "\n".join(problems)
    twins = value_twins(Ks[:, :500], Vs[:, :500])
    assert_attend_matches_twin(sk, twins, Qs, f"{kind} after the bad calls")


@pytest.mark.parametrize("kind", KINDS)
def test_attend_changes_nothing(kind, Ks, Qs, Vs):
    Ks, Qs, Vs = heads_of(kind, Ks, Qs, Vs)
    sk = value_sketch(kind)
    sk.update_many(arg(sk, Ks[:, :1000]), arg(sk, Vs[:, :1000]))  # rows wait in the buffer
    data = sk.to_bytes()
    for eps in (None, 0.1):
        sk = type_of(kind).from_bytes(data)
        sk.attend(arg(sk, Qs), eps=eps)
        assert sk.to_bytes() == data, f"attend(eps={eps}) changed the sketch"
