"""Where the time of a live step goes: the steps of the open speed targets taken apart (a diagnostic, not a benchmark).

Workloads (d = 64, eps = 0.01, default threads; the steps of ``bench_live.py`` and ``bench_decay.py``):

* ``heads``: a 12-head step (``MultiHeadKeySketch.update_many`` of (H, 1, d) + ``heavy_entries`` of (H, 1, d))
  and the single-head step (``KeySketch.update`` + ``heavy_entries``) at n = 10^5 (issue 11: ratio <= 4);
* ``decode``: a decode step with values and exact outputs (``KeySketch.prefill`` of one row) at n = 10^5
  (issue 12: >= 100x dense);
* ``gated``: ``update(k, gate=g)`` with ``g`` uniform in [0.99, 1] + ``heavy_entries``, and the same stream
  without gates, at n = 10^5 (issue 13: ratio <= 1.2).

Every step is timed whole, and the library functions it goes through are timed *exclusively*: a wrapper around
each function listed in ``PARTS`` (time spent in a wrapped function called from another one counts for the
callee only), so the parts and ``other`` (the glue: validation, locks, ids, result objects not listed) add up to
the step.  The wrappers cost about 0.5 us per call (1-3 calls a step: 1-2% of a step, counted in the parts).
Rounds of steps alternate between the workloads of a section; each figure is the median over the rounds, in
microseconds per step.

In the same process, a few *floors*: what the step's unavoidable work costs at this machine's speed, measured
on the step's own data.

* ``int8 products``: the float32 products of a unit query with int8 rows alone (no test between them), on the
  rows a step of that workload reads, times the rows it reads per step: the scan without its bookkeeping;
* ``S read``: ``phi(q) @ S`` by NumPy (BLAS ``dgemv``) on the decode stream's moment state, in a loop (the state
  is then as close to the core as it gets): the exact output's numerator at memory speed;
* ``q^T G q``: the normaliser of one query per head from the live Gram matrices (one compiled call).

The answers are not checked here (``bench_live.py`` and ``bench_decay.py`` check every step of the same
workloads against brute force); the parts are.  Run::

    python benchmarks/anatomy.py                      # n = 10^5 (a few minutes)
    python benchmarks/anatomy.py --quick              # n = 5000 (seconds: the smoke test)
    python benchmarks/anatomy.py --only heads --out anatomy.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numba
import numpy as np

import levstream as ls
import levstream.moments as _moments
import levstream.multihead as _multihead
import levstream.sketch as _sketch
from levstream import _query
from levstream._threads import describe_threads
from levstream.synthetic import attention_like_queries

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_decay import NONE, STEP_GATES, make_stream
from bench_live import heads_workload, keys, values

#: The functions timed exclusively: (owner, attribute, label).  A module-level function is wrapped where the
#: step's code looks it up (the module that imported it).
PARTS: tuple[tuple[Any, str, str], ...] = (
    (_multihead, "heavy_p2_stacked", "query kernel"),
    (_multihead.MultiHeadKeySketch, "_head_entries", "result objects"),
    (_multihead.MultiHeadKeySketch, "_absorb", "absorb buffered tokens"),
    (_multihead.MultiHeadKeySketch, "_hand_over", "hand-over to heads"),
    (_multihead._Live, "build", "live state rebuild"),
    (_multihead._Live, "add_store_rows", "live state rebuild"),
    (_query, "heavy_p2", "query kernel"),
    # a decode step's one compiled call also writes its row to the moment buffer and appends it to the store and
    # the live cache (all but the steps that settle or hand over a product, which add it by add_row and append)
    (_query, "decode_and_take", "query kernel"),
    (_sketch.KeySketch, "_ingest", "block fold"),
    (_sketch._LiveRows, "add", "live cache: waiting rows"),
    (_sketch._LiveRows, "append", "live cache: append"),
    (_sketch._LiveRows, "refresh", "live cache: refresh"),
    (_sketch.KeySketch, "_plan_row", "weigh the row"),
    (_moments.MomentState, "add_row", "moment state: add row"),
    (_moments.MomentState, "took_buffered_row", "moment state: add row"),
    (_sketch._LiveRows, "appended", "live cache: append"),
    (_moments._PendingFold, "__init__", "moment state: start product"),
    (_moments.MomentState, "settle", "moment state: settle product"),
)


class Parts:
    """Exclusive time per label of the wrapped functions (a stack of the calls in progress)."""

    def __init__(self) -> None:
        self.time: dict[str, float] = defaultdict(float)
        self._stack: list[list[float]] = []  # [time spent in wrapped callees] per call in progress

    def wrap(self, fn: Callable[..., Any], label: str) -> Callable[..., Any]:
        parts = self

        def timed(*args: Any, **kwargs: Any) -> Any:
            parts._stack.append([0.0])
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent = time.perf_counter() - t0
                inner = parts._stack.pop()[0]
                parts.time[label] += spent - inner
                if parts._stack:
                    parts._stack[-1][0] += spent

        return timed

    @contextmanager
    def installed(self, parts: tuple[tuple[Any, str, str], ...] = PARTS) -> Iterator[None]:
        """Every function of ``parts`` wrapped for the ``with`` block (classmethods and staticmethods as such);
        each one wrapped so far is put back on the way out, however the block or the wrapping ends."""
        saved = []
        try:
            for owner, name, label in parts:
                fn = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
                if isinstance(fn, (classmethod, staticmethod)):
                    wrapped: Any = type(fn)(self.wrap(fn.__func__, label))
                else:
                    wrapped = self.wrap(fn, label)
                setattr(owner, name, wrapped)
                saved.append((owner, name, fn))
            yield
        finally:
            for owner, name, fn in reversed(saved):
                setattr(owner, name, fn)


def timed_round(step: Callable[[int], Any], lo: int, hi: int, parts: Parts) -> dict[str, float]:
    """Steps ``lo..hi-1``: us per step, whole and per part (``other``: the rest)."""
    parts.time.clear()
    t0 = time.perf_counter()
    for t in range(lo, hi):
        step(t)
    total = time.perf_counter() - t0
    out = {label: 1e6 * s / (hi - lo) for label, s in parts.time.items()}
    out["other"] = 1e6 * total / (hi - lo) - sum(out.values())
    out["step"] = 1e6 * total / (hi - lo)
    return out


def alternate(
    workloads: dict[str, Callable[[int], Any]], warm: int, rounds: int, per_round: int, parts: Parts
) -> dict[str, dict[str, float]]:
    """Warm steps, then ``rounds`` rounds of ``per_round`` steps of every workload (each leads in turn); the
    median over the rounds of every part of every workload."""
    for step in workloads.values():
        for t in range(warm):
            step(t)
    seen: dict[str, list[dict[str, float]]] = defaultdict(list)
    names = list(workloads)
    with parts.installed():
        for r in range(rounds):
            lo = warm + r * per_round
            for name in names[r % len(names) :] + names[: r % len(names)]:
                seen[name].append(timed_round(workloads[name], lo, lo + per_round, parts))
    out = {}
    for name, rows in seen.items():
        labels = sorted({k for row in rows for k in row}, key=lambda k: (k in ("other", "step"), k))
        out[name] = {k: float(np.median([row.get(k, 0.0) for row in rows])) for k in labels}
    return out


# ---------------------------------------------------------------------- floors
@numba.njit(nogil=True, cache=True, fastmath={"nsz", "contract", "reassoc"})
def _int8_products(q32, K8, m, out):  # pragma: no cover - compiled
    d = K8.shape[1]
    for j in range(m):
        acc = np.float32(0.0)
        for a in range(d):
            acc += q32[a] * np.float32(K8[j, a])
        out[j] = acc


@numba.njit(nogil=True, cache=True, fastmath={"nsz", "contract", "reassoc"})
def _quadratics(Q, LG):  # pragma: no cover - compiled
    """``q_h^T G_h q_h`` of one query per head."""
    H, d = Q.shape
    out = np.empty(H)
    for h in range(H):
        acc = 0.0
        for a in range(d):
            row = 0.0
            for b in range(d):
                row += LG[h, a, b] * Q[h, b]
            acc += Q[h, a] * row
        out[h] = acc
    return out


def per_call(fn: Callable[[], Any], reps: int) -> float:
    """Median over 5 runs of ``reps`` calls: seconds per call."""
    fn()
    runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        runs.append((time.perf_counter() - t0) / reps)
    return float(np.median(runs))


def int8_rate(K8: np.ndarray) -> float:
    """Seconds per int8 row of the products alone (the rows of ``K8``, repeated to at least 4096 rows)."""
    K8 = np.ascontiguousarray(np.tile(K8, (-(-4096 // max(K8.shape[0], 1)), 1)))
    q32 = np.random.default_rng(0).standard_normal(K8.shape[1]).astype(np.float32)
    out = np.empty(K8.shape[0], dtype=np.float32)
    return per_call(lambda: _int8_products(q32, K8, K8.shape[0], out), 200) / K8.shape[0]


def rows_passing_norm(norms: np.ndarray, G: np.ndarray, Q: np.ndarray, eps: float) -> float:
    """Mean over the queries ``Q`` of the rows whose norm bound ``||q|| ||k|| >= sqrt(eps q^T G q)`` lets them
    reach the threshold: the rows a scan reads (``norms``: of the rows scanned, ``G`` their Gram matrix)."""
    z = np.einsum("ij,jk,ik->i", Q, G, Q)
    lim = np.sqrt(eps * np.maximum(z, 0.0)) / np.linalg.norm(Q, axis=1)
    return float(np.mean([(norms >= x).sum() for x in lim]))


# ---------------------------------------------------------------------- workloads
def section_heads(n: int, T: int, d: int, eps: float, H: int, sizes: dict) -> dict:
    _, _, tokens, queries, mh, one = heads_workload(n, T, d, eps, H)
    kept: list[Any] = []  # results are kept, as the benchmark keeps them to check them

    def many(t: int) -> None:
        mh.update_many(tokens[t][:, None, :])
        kept.append(mh.heavy_entries(queries[t]))

    def single(t: int) -> None:  # head 0's tokens and queries
        one.update(tokens[t, 0])
        kept.append(one.heavy_entries(queries[t, 0]))

    parts = alternate({f"{H} heads": many, "1 head": single}, **sizes, parts=Parts())
    # floors, on the state the steps left
    live = mh._live_state(1)
    assert live is not None
    Qs = queries[-200:, :, 0, :]
    rows = sum(
        rows_passing_norm(
            np.concatenate([live.nk[h, : live.nc[h]], live.nke[h, : live.ne[h]]]),
            live.LG[h],
            Qs[:, h],
            eps,
        )
        for h in range(H)
    )
    rate = int8_rate(np.concatenate([live.Kc8[0, : live.nc[0]], live.Ke8[0, : live.ne[0]]]))
    Q1 = np.ascontiguousarray(Qs[0])
    quad = per_call(lambda: _quadratics(Q1, live.LG), 2000)
    return {
        "n": n,
        "parts_us": parts,
        "ratio": parts[f"{H} heads"]["step"] / parts["1 head"]["step"],
        "floors_us": {
            "int8 products of the rows read (all heads)": 1e6 * rows * rate,
            "rows read per step (all heads)": rows,
            "int8 products ns per row": 1e9 * rate,
            "q^T G q of every head (one compiled call)": 1e6 * quad,
        },
    }


def section_decode(n: int, T: int, d: int, eps: float, dv: int, sizes: dict) -> dict:
    K, V = keys(n + T, d, seed=0), values(n + T, dv, seed=0)
    Q = attention_like_queries(T, d, seed=2, key_seed=0)
    sk = ls.KeySketch(d, eps=eps, value_dim=dv, exact_output=True)
    for a in range(0, n, 65536):
        sk.update_many(K[a : min(n, a + 65536)], V[a : min(n, a + 65536)])
    kept: list[Any] = []

    def step(t: int) -> None:
        m = n + t
        kept.append(sk.prefill(K[m][None], V[m][None], Q[t][None]))

    parts = alternate({"decode": step}, **sizes, parts=Parts())
    moments = sk._moments
    assert moments is not None
    S = moments.query_arrays()[0]
    phi = np.random.default_rng(1).standard_normal(S.shape[0])
    s_read = per_call(lambda: phi @ S, 500) if S.shape[0] else 0.0
    return {
        "n": n,
        "parts_us": parts,
        "floors_us": {"S read (NumPy dgemv of the moment state, in a loop)": 1e6 * s_read},
        "S_bytes": int(S.nbytes),
    }


def section_gated(n: int, T: int, d: int, eps: float, sizes: dict) -> dict:
    # the streams of bench_decay.py's live figure (its keys, gates and seed)
    uniform = next(g for g in STEP_GATES if g.name == "U[0.99,1]")
    gated, plain = (make_stream(g, n, T, d, eps, None, seed=11) for g in (uniform, NONE))
    Q = attention_like_queries(T, d, seed=1, key_seed=0)
    kept: list[Any] = []

    def gated_step(t: int) -> None:
        gated.sketch.update(gated.K[n + t], gate=gated.g[n + t])
        kept.append(gated.sketch.heavy_entries(Q[t][None]))

    def plain_step(t: int) -> None:
        plain.sketch.update(plain.K[n + t])
        kept.append(plain.sketch.heavy_entries(Q[t][None]))

    parts = alternate(
        {"gated U[0.99,1]": gated_step, "no gates": plain_step}, **sizes, parts=Parts()
    )
    out: dict[str, Any] = {
        "n": n,
        "parts_us": parts,
        "ratio": parts["gated U[0.99,1]"]["step"] / parts["no gates"]["step"],
        "floors_us": {},
    }
    for name, sk in (("gated U[0.99,1]", gated.sketch), ("no gates", plain.sketch)):
        with sk._lock:
            scan = sk._view().scan or _query.scan_arrays(sk._view())
        # heavy_p2's arrays: G, the candidates K (norms, int8 rows, scales, ids), the rows fed since the last fold
        # that a query scans Ke (norms, int8 rows, scales, ids)
        held = [a for a in (scan[3], scan[8]) if a.shape[0]]
        rows = scan[1].shape[0] + scan[6].shape[0]
        out["floors_us"][f"{name}: rows a query may scan"] = rows
        if held:
            rate = int8_rate(np.concatenate(held))
            out["floors_us"][f"{name}: int8 products of all of them"] = 1e6 * rows * rate
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="heads,decode,gated")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    d, eps, dv = 64, 0.01, 64
    n = 5000 if args.quick else 100_000
    sizes = (
        {"warm": 100, "rounds": 3, "per_round": 100}
        if args.quick
        else {"warm": 500, "rounds": 8, "per_round": 500}
    )
    T = sizes["warm"] + sizes["rounds"] * sizes["per_round"]
    only = args.only.split(",")
    print(f"# python benchmarks/anatomy.py {' '.join(argv or sys.argv[1:])}".rstrip(), flush=True)
    print(f"# {describe_threads()}", flush=True)
    res: dict[str, Any] = {}
    if "heads" in only:
        res["heads"] = section_heads(n, T, d, eps, 12, sizes)
    if "decode" in only:
        res["decode"] = section_decode(n, T, d, eps, dv, sizes)
    if "gated" in only:
        res["gated"] = section_gated(n, T, d, eps, sizes)
    for name, sec in res.items():
        print(f"\n## {name}, n = {sec['n']}: us per step (median of {sizes['rounds']} rounds)\n")
        cols = list(sec["parts_us"])
        labels = sorted(
            {k for c in cols for k in sec["parts_us"][c]},
            key=lambda k: (k in ("other", "step"), k == "step", k),
        )
        print("| part | " + " | ".join(cols) + " |")
        print("|---|" + "---|" * len(cols))
        for label in labels:
            print(
                f"| {label} | "
                + " | ".join(f"{sec['parts_us'][c].get(label, 0.0):.1f}" for c in cols)
                + " |"
            )
        if "ratio" in sec:
            print(f"\nratio of the steps: {sec['ratio']:.2f}")
        for label, v in sec["floors_us"].items():
            print(f"floor: {label}: {v:.1f}")
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
