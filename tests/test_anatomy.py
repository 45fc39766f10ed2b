"""benchmarks/anatomy.py: its exclusive timing adds up, its quick run times the parts it names, and it leaves the
library's functions as it found them."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "anatomy.py"


@pytest.fixture(scope="module")
def anatomy():
    spec = importlib.util.spec_from_file_location("anatomy", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["anatomy"] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules["anatomy"]


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


def test_time_in_a_wrapped_callee_counts_for_the_callee_only(anatomy, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(anatomy.time, "perf_counter", clock.perf_counter)
    parts = anatomy.Parts()

    def inner():
        clock.now += 3.0

    timed_inner = parts.wrap(inner, "inner")

    def outer():
        clock.now += 1.0
        timed_inner()
        clock.now += 2.0
        timed_inner()

    parts.wrap(outer, "outer")()
    assert parts.time == {"inner": 6.0, "outer": 3.0}


def test_a_round_splits_the_step_into_the_parts_and_the_rest(anatomy, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(anatomy.time, "perf_counter", clock.perf_counter)
    parts = anatomy.Parts()
    kernel = parts.wrap(lambda: setattr(clock, "now", clock.now + 2e-6), "kernel")

    def step(t):
        clock.now += 5e-6  # glue
        kernel()

    row = anatomy.timed_round(step, 0, 4, parts)
    assert row == pytest.approx({"kernel": 2.0, "other": 5.0, "step": 7.0})


def test_the_quick_run_times_every_workload_and_restores_the_library(anatomy, tmp_path):
    before = [
        (owner, name, owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name))
        for owner, name, _ in anatomy.PARTS
    ]
    out = tmp_path / "anatomy.json"
    assert anatomy.main(["--quick", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    heads = res["heads"]["parts_us"]
    assert heads["12 heads"]["query kernel"] > 0 and heads["12 heads"]["result objects"] > 0
    assert heads["1 head"]["query kernel"] > 0
    decode = res["decode"]["parts_us"]["decode"]
    assert decode["query kernel"] > 0 and decode["moment state: add row"] > 0
    gated = res["gated"]["parts_us"]
    assert gated["gated U[0.99,1]"]["weigh the row"] > 0
    assert gated["no gates"].get("weigh the row", 0.0) == 0.0
    for owner, name, fn in before:
        now = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        assert now is fn, f"{owner}.{name} still wrapped"


def test_installed_wraps_static_and_class_methods_and_undoes_a_partial_install(anatomy):
    class Owner:
        @staticmethod
        def s(x):
            return x + 1

        @classmethod
        def c(cls, x):
            return (cls, x)

    parts = anatomy.Parts()
    with parts.installed(((Owner, "s", "s"), (Owner, "c", "c"))):
        assert Owner().s(1) == 2 and Owner.s(1) == 2
        assert Owner.c(3) == (Owner, 3)
        assert isinstance(Owner.__dict__["s"], staticmethod)
    assert set(parts.time) == {"s", "c"}
    originals = dict(Owner.__dict__)
    with pytest.raises(KeyError), parts.installed(((Owner, "s", "s"), (Owner, "missing", "m"))):
        pass
    assert Owner.__dict__["s"] is originals["s"]
