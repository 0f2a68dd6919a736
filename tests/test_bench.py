"""`benchmarks/bench.py` cannot print an impossible figure: noisy ones are measured again, then
shown as noisy and left out of ratios and targets. (Logic only; no timing is asserted.)"""

import importlib.util
import os
import time
import types

from helpers import TESTS

_spec = importlib.util.spec_from_file_location(
    "bench", os.path.join(os.path.dirname(TESTS), "benchmarks", "bench.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_a_negative_or_spread_out_cost_is_retried_then_reported_as_noisy(monkeypatch, capsys):
    calls = {"steady": [], "broken": []}

    def steady(work):
        def run(steps):
            calls["steady"].append(steps)
            time.sleep(steps * 0.002)
        return run

    def broken(work):  # the longer run takes less time: a negative marginal cost
        def run(steps):
            calls["broken"].append(steps)
            time.sleep(0.05 if steps in (5, 20, 80) else 0.0)
        return run

    monkeypatch.setattr(bench, "APPROACHES", {"steady": steady, "broken": broken})
    monkeypatch.setattr(bench, "STEP_COUNTS", {"steady": ((5, 15),) * 2, "broken": ((5, 15),) * 2})
    times = bench.measure(types.SimpleNamespace(name="seed fake"), repeats=3, quick=False)
    assert times["steady"] > 0 and times["broken"] is None
    assert sorted(set(calls["broken"])) == [5, 15, 20, 60, 80, 240]  # two retries, 4× the steps
    assert "measuring again with 20/60 steps" in capsys.readouterr().out
    assert bench.ratios("seed fake", {"tapekit": None, "graph+data": 10.0}) == {}


def test_the_unreachable_eager_target_is_gone():
    checks = bench.check_targets("seed MLP", {"eager / tapekit_memory": 90.0,
                                              "tapekit_memory / graph+memory": 1.0})
    assert all("eager" not in target for target, _, _ in checks)
