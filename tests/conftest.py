"""Shared seeds, tolerances, fixtures and comparison helpers for the levstream test-suite.

Every tolerance a test relies on is a named constant here, with the reason for its value.
"""

from __future__ import annotations

import numpy as np
import pytest

import levstream as ls

#: Fixed seeds (never a new random seed per run).
SEEDS = (0, 1, 2)

#: The tie rule (docs/theory.md, "The guarantee"): keys whose leverage score is within this relative distance of eps may go either way.
TIE_RTOL = 1e-9

#: For adversarial (hypothesis) inputs the tie band widens to what float64 can resolve: leverage scores of a
#: matrix with condition number kappa are accurate to about kappa * unit roundoff (times a small factor).
COND_TIE_RTOL = 1e-13

#: The guarantee: heavy-entry values equal the dense values to this relative tolerance.
VALUE_RTOL = 1e-9

#: Normaliser Z(q) = q^T G q against the directly summed squares (both rounding-limited, well-conditioned keys).
NORMALIZER_RTOL = 1e-9

#: Reported leverage scores against the SVD twin (well-conditioned keys).
SCORE_RTOL = 1e-9

#: For kappa(K) = 1e7 the scores are accurate to about kappa * unit roundoff; a key reported by the sketch
#: must have a true score at least eps * (1 - ILL_COND_SLACK) (no spurious keys further out).
ILL_COND_SLACK = 1e-6

#: Condition number of the ill-conditioned fixture (ISSUE #2: "keys with condition number up to 1e7").
ILL_COND_KAPPA = 1e7

#: float32 input is accumulated in float64, so a float32 chunk and its exact float64 upcast give bit-identical state.
FLOAT32_RTOL = 0.0

#: The default coreset accuracy of KeySketch (p other than 2, docs/general-p.md).  Whenever the
#: coreset normaliser is within (1 +- delta) of the true one, every dense entry >= eps is returned,
#: every returned entry has a true value >= eps (1 - delta)^2 and lies in [lower, upper].
CORESET_DELTA = 0.1

#: Proven sensitivity upper bounds against exact sensitivities from the enumerating twins of
#: tests/test_lewis.py: both are exact up to float64 rounding.
SENSITIVITY_RTOL = 1e-9

#: Peak traced allocations (tracemalloc) of a long stream phase against a short one of the same
#: sketch: only the allocator's handling of per-block temporaries may differ.
MEMORY_GROWTH_RTOL = 0.05

#: A sketch's nbytes against the bytes tracemalloc traces for it: the arrays it counts plus Python objects
#: (sketch, summary, store, id ranges) and NumPy array headers, a few kB in all.
NBYTES_TRACED_RTOL = 0.05

#: Rounding slack when a dense (true) value is compared with a coreset answer's lower/upper bounds:
#: both sides are float64 sums of |<q, k>|^p, accurate to far better than this.
BOUND_RTOL = 1e-9

#: levstream.torch in float32 against the same computation in float64 (NumPy or torch): float32 unit
#: roundoff 6e-8 times the few dozen operations behind each output of these small, well-conditioned
#: inputs (observed up to 2.4e-7 on outputs and leverage scores of size about 1).
TORCH_FLOAT32_RTOL = 1e-5
TORCH_FLOAT32_ATOL = 2e-6

#: levstream.torch in float64 against NumPy/torch float64 references (same arithmetic, other order).
TORCH_FLOAT64_RTOL = 1e-10
TORCH_FLOAT64_ATOL = 1e-12


def heavy_tailed_keys(n: int, d: int, seed: int, tail: float = 2.0) -> np.ndarray:
    """Gaussian rows with Pareto-distributed norms: a spread of leverage scores, a few clearly heavy keys."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)) * (1.0 + rng.pareto(tail, size=(n, 1)))


def assert_matches_offline(got_ids, tau: np.ndarray, eps: float, *, tie_rtol: float = TIE_RTOL) -> None:
    """``got_ids`` equals ``{j : tau_j >= eps}`` except for keys inside the documented tie band around eps."""
    got = set(np.asarray(got_ids).tolist())
    tau = np.asarray(tau)
    must = set(np.flatnonzero(tau >= eps * (1.0 + tie_rtol)).tolist())
    may = set(np.flatnonzero(tau >= eps * (1.0 - tie_rtol)).tolist())
    missing = sorted(must - got)
    extra = sorted(got - may)
    assert not missing, f"heavy keys missing from the universal set: {missing[:10]} (tau={tau[missing[:10]]})"
    assert not extra, f"keys reported with tau < eps: {extra[:10]} (tau={tau[[e for e in extra[:10] if e < tau.size]]})"


def assert_no_ties(tau: np.ndarray, eps: float, rtol: float = 1e-6) -> None:
    """Guard for fixtures meant to be tie-free: no score within ``rtol`` (relative) of the threshold."""
    near = np.flatnonzero(np.abs(np.asarray(tau) - eps) <= rtol * eps)
    assert near.size == 0, f"fixture has scores within {rtol:g} of eps at {near.tolist()}; pick another seed"


def assert_heavy_matches_dense(hits: ls.HeavyEntries, expected: dict, eps: float) -> None:
    """The entries of ``hits`` are exactly the dense entries >= eps (tie band excepted), values to VALUE_RTOL."""
    got = dict(zip(zip(hits.rows().tolist(), hits.key_ids.tolist()), hits.values.tolist()))
    must = {e for e, v in expected.items() if v >= eps * (1.0 + TIE_RTOL)}
    missing = must - got.keys()
    assert not missing, f"dense heavy entries missing: {sorted(missing)[:10]}"
    extra = {e for e in got.keys() - expected.keys() if got[e] >= eps * (1.0 + TIE_RTOL)}
    assert not extra, f"entries returned that are not dense-heavy: {sorted(extra)[:10]}"
    for e in got.keys() & expected.keys():
        assert got[e] == pytest.approx(expected[e], rel=VALUE_RTOL), f"value of entry {e}"
    for e in got.keys() - expected.keys():  # only tie-band entries may be returned beyond the dense set
        assert got[e] >= eps * (1.0 - TIE_RTOL), f"entry {e} returned with value {got[e]} < eps"


class Answer(tuple):
    """What :func:`answer` returns: ids and counts compare exactly, computed values to ``VALUE_RTOL``.

    Two sketches of the same keys with different histories (chunking, merges, rows still waiting in the input
    buffer) compute the same values by different roundings; the guarantee is values to ``VALUE_RTOL``."""

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, tuple) or len(other) != len(self):
            return False
        for mine, theirs in zip(self, other):
            if isinstance(mine, np.ndarray):
                if mine.shape != np.shape(theirs) or not np.allclose(mine, theirs, rtol=VALUE_RTOL, atol=0.0):
                    return False
            elif mine != theirs:
                return False
        return True

    __hash__ = tuple.__hash__


def answer(sk: ls.KeySketch, Q: np.ndarray) -> Answer:
    """Everything a user can observe of a sketch's state, for before/after comparisons."""
    U = sk.universal_set()
    hits = sk.heavy_entries(Q)
    return Answer((sk.n, U.ids.tolist(), np.array(U.scores), hits.indptr.tolist(), hits.key_ids.tolist(),
                   np.array(hits.values), np.array(sk.normalizer(Q))))


def assert_same_state_as_upcast(a: ls.KeySketch, b: ls.KeySketch) -> None:
    """``a`` (fed float32 keys) holds exactly the state of ``b`` (fed their float64 upcast): every serialized
    array equal, the key rows after widening (``a`` keeps them as float32, in format version 4), and a
    round trip through bytes keeps them float32."""
    from levstream import _serialize

    data = a.to_bytes()
    meta_a, arrays_a, version_a = _serialize.unpack(data)
    meta_b, arrays_b, _ = _serialize.unpack(b.to_bytes())
    assert meta_a == meta_b and arrays_a.keys() == arrays_b.keys()
    for name, arr in arrays_a.items():
        if name in ("cand_rows", "buf_rows"):
            assert arr.dtype == np.float32 and version_a == 4
            np.testing.assert_array_equal(arr.astype(np.float64), arrays_b[name])
        else:
            assert arr.dtype == arrays_b[name].dtype
            np.testing.assert_array_equal(arr, arrays_b[name])
    back = ls.KeySketch.from_bytes(data)
    assert back._store.keys.dtype == np.float32 and back.to_bytes() == data


@pytest.fixture(scope="session")
def keys() -> np.ndarray:
    """3000 x 8 heavy-tailed keys (the default fixture; tie-free at eps = 0.02)."""
    return heavy_tailed_keys(3000, 8, seed=0)


@pytest.fixture(scope="session")
def queries() -> np.ndarray:
    return np.random.default_rng(100).standard_normal((40, 8))
