"""`benchmarks/bench.py` cannot print an impossible figure: noisy ones are measured again, then
shown as noisy and left out of ratios and targets. Logic only, on a fake clock: no timing is
measured or asserted."""

import importlib.util
import os
import statistics
import types

import pytest

from helpers import TESTS

_spec = importlib.util.spec_from_file_location(
    "bench", os.path.join(os.path.dirname(TESTS), "benchmarks", "bench.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


class FakeClock:
    """The benchmark's clock, advanced only by the fake workloads' `sleep`: what a fake
    step costs is exact, so no test depends on how busy the machine is."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=fake.perf_counter))
    return fake


def test_a_negative_or_spread_out_cost_is_retried_then_reported_as_noisy(monkeypatch, capsys, clock):
    calls = {"steady": [], "broken": []}

    def steady(work):
        def run(steps):
            calls["steady"].append(steps)
            clock.sleep(steps * 0.002)
        return run

    def broken(work):  # the longer run takes less time: a negative marginal cost
        def run(steps):
            calls["broken"].append(steps)
            clock.sleep(0.05 if steps in (5, 20, 80) else 0.0)
        return run

    monkeypatch.setattr(bench, "APPROACHES", {"steady": steady, "broken": broken})
    monkeypatch.setattr(bench, "STEP_COUNTS", {"steady": ((5, 15),) * 2, "broken": ((5, 15),) * 2})
    times = bench.measure(types.SimpleNamespace(name="seed fake"), repeats=3, quick=False)
    assert times["steady"] > 0 and times["broken"] is None
    assert sorted(set(calls["broken"])) == [5, 15, 20, 60]  # measured again with 4× the steps
    assert set(calls["steady"]) == {5, 15}  # not compared with it by a target: left alone
    assert "measuring again with 20/60 steps" in capsys.readouterr().out
    assert bench.ratios("seed fake", {"tapekit": None, "graph+data": 10.0}) == {}


def test_the_unreachable_eager_target_is_gone():
    checks = bench.check_targets("seed MLP", {"eager / tapekit_memory": 90.0,
                                              "tapekit_memory / graph+memory": 1.0})
    assert all("eager" not in target for target, _, _ in checks)


def test_targets_are_the_hand_written_limit_on_both_paths_and_keras_fit_like_for_like():
    r = {"tapekit / graph+data": 1.04, "tapekit_memory / graph+memory": 1.06,
         "keras_fit / tapekit": 0.9, "keras_fit / tapekit_xla": 1.3}
    without_xla = {t: (v, ok) for t, v, ok in bench.check_targets("seed GAN", r)}
    assert without_xla["tf.data: tapekit ≤ 1.05 × the hand-written loop"] == (1.04, True)
    assert without_xla["in memory: tapekit ≤ 1.05 × the hand-written loop"] == (1.06, False)
    assert without_xla["tapekit faster than Keras fit on the same pipeline (both without XLA)"] \
        == (0.9, False)
    with_xla = {t: ok for t, _, ok in bench.check_targets("seed GAN", r, keras_xla=True)}
    assert with_xla["tapekit faster than Keras fit on the same pipeline (both with XLA)"]
    assert len(with_xla) == 3


def test_the_readme_block_is_rewritten_from_the_report_and_nothing_else(tmp_path):
    report = {"machine": "Test CPU, 2 cores, no GPU, Linux", "tensorflow": "2.x", "keras": "3.x",
              "repeats": 5, "startup_s": {"gan": {"plain": 2.5, "tapekit": 3.0}},
              "workloads": {"seed GAN": {
                  "us_per_step": {"graph+data": 200.0, "tapekit": 205.0, "keras_fit": None},
                  "ratios": {"tapekit / graph+data": 1.025}, "keras_xla": False,
                  "targets": [{"target": "t", "value": 1.025, "holds": True}]}}}
    readme = tmp_path / "README.md"
    readme.write_text(f"# intro\n\n{bench.README_START}\nold table\n{bench.README_END}\n\n# after\n")
    bench.write_readme(str(readme), report)
    text = readme.read_text()
    assert text.startswith("# intro\n\n") and text.endswith("\n\n# after\n")
    assert "old table" not in text and "Test CPU, 2 cores" in text
    assert "| seed GAN | – | – | 200 | – | noisy | 205 | – |" in text
    assert "| seed GAN | 1.02 | noisy | noisy | 1 of 3 (2 not judged: noisy) |" in text
    assert "| gan | 2.50 | 3.00 | +0.50 |" in text
    assert "no XLA here" in text
    readme.write_text("no markers")
    with pytest.raises(SystemExit, match="no <!-- bench:start -->"):
        bench.write_readme(str(readme), report)


def test_start_up_reads_the_end_of_step_one_from_tapekit_train_s_log():
    log = ("I1128 12:23:53.150000 1398 cli.py:100] building\n"
           "I1128 12:23:53.239692 1398 callbacks.py:254] step 1/1: loss=7.3001, steps_per_sec=0.6\n")
    assert bench.startup.STEP_ONE.search(log).groups() == ("12", "23", "53.239692")


def test_ratios_pair_the_repeats_taken_side_by_side():
    times = {"tapekit": 110.0, "graph+data": 100.0, "keras_fit": 150.0}
    passes = {"tapekit": {0: [100.0, 120.0, 300.0]}, "graph+data": {0: [100.0, 100.0, 280.0]},
              "keras_fit": {1: [150.0, 150.0, 150.0]}}
    r = bench.ratios("seed fake", times, passes)
    assert r["tapekit / graph+data"] == sorted([1.0, 1.2, 300 / 280])[1]  # median of pairs
    assert r["keras_fit / tapekit"] == 150.0 / 110.0  # no pass in common: medians


def test_a_noisy_compared_column_is_measured_again_with_the_columns_it_is_compared_with(
        monkeypatch, clock):
    calls = {"tapekit": [], "keras_fit": [], "eager": []}

    def approach(name, noisy):
        def make(work):
            def run(steps):
                calls[name].append(steps)
                clock.sleep(0.05 if noisy and steps == 5 else steps * 0.001)
            return run
        return make

    monkeypatch.setattr(bench, "APPROACHES", {"tapekit": approach("tapekit", False),
                                              "keras_fit": approach("keras_fit", True),
                                              "eager": approach("eager", False)})
    monkeypatch.setattr(bench, "STEP_COUNTS", {n: ((5, 15),) * 2 for n in calls})
    passes = {}
    times = bench.measure(types.SimpleNamespace(name="seed fake"), repeats=3, quick=False,
                          passes=passes)
    assert 20 in calls["tapekit"] and 20 in calls["keras_fit"]  # one pass, 4x the steps
    assert 20 not in calls["eager"]  # not compared by a target: left alone
    assert set(passes["tapekit"]) == {0, 1} and set(passes["keras_fit"]) == {1}
    assert set(passes["eager"]) == {0}
    assert times["keras_fit"] > 0 and times["tapekit"] > 0
    r = bench.ratios("seed fake", times, passes)
    assert r["keras_fit / tapekit"] == statistics.median(
        k / t for k, t in zip(passes["keras_fit"][1], passes["tapekit"][1]))


def test_loop_ops_counts_the_ops_of_a_loop_body():
    spec = importlib.util.spec_from_file_location(
        "loop_ops", os.path.join(os.path.dirname(TESTS), "benchmarks", "loop_ops.py"))
    loop_ops = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loop_ops)
    tf = loop_ops.tf

    @tf.function
    def loop(n):
        total = tf.constant(0.0)
        for i in tf.range(n):
            total += tf.math.sqrt(tf.cast(i, tf.float32))
        return total

    counts = loop_ops.body_ops(loop.get_concrete_function(tf.constant(3)).graph)
    assert counts["Sqrt"] == 1 and counts["AddV2"] >= 1


def test_each_compared_approach_is_measured_on_its_median_instance(monkeypatch, capsys, clock):
    built = {"tapekit": [], "eager": []}
    speeds = [1.0, 3.0, 0.5, 1.2, 1.1]  # a slow instance, a fast one, three typical ones

    def approach(name):
        def make(work):
            delay = 0.001 * speeds[len(built[name]) % len(speeds)]
            built[name].append(delay)

            def run(steps):
                clock.sleep(steps * delay)
            return run
        return make

    monkeypatch.setattr(bench, "APPROACHES", {"tapekit": approach("tapekit"),
                                              "eager": approach("eager")})
    monkeypatch.setattr(bench, "STEP_COUNTS", {"tapekit": ((5, 15),) * 2, "eager": ((5, 15),) * 2})
    probes = {}
    times = bench.measure(types.SimpleNamespace(name="seed fake"), repeats=3, quick=False,
                          instances=5, probes=probes)
    assert len(built["tapekit"]) == 5 and len(built["eager"]) == 1  # eager: compared by no target
    assert len(probes["tapekit"]) == 5 and "eager" not in probes
    figures = probes["tapekit"]
    assert figures[1] > 2 * figures[0] and figures[2] < 0.7 * figures[0]  # probes tell them apart
    assert times["tapekit"] == pytest.approx(1100.0)  # the median instance (1.1 ms a step)
    assert "seed fake / tapekit: instances probed at" in capsys.readouterr().out


def test_keras_fit_is_timed_inside_one_call_over_whole_executions():
    work = next(w for w in bench.workloads(quick=True) if w.name.startswith("seed linear"))
    run = bench.keras_fit(work)
    run(100)  # warm-up: one execution of 100 steps
    us = run.steady_us(300)  # executions of 100 steps: 1 untimed + 3 timed
    assert us > 0 and len(run.clock.ends) == 4  # one time per execution
    assert int(run.model.optimizer.iterations) == 100 + 400


def test_figures_and_ratios_are_medians_over_processes_and_noisy_in_most_is_left_out():
    def process(tapekit, hand, keras):
        times = {"tapekit": tapekit, "graph+data": hand, "keras_fit": keras}
        return {"us_per_step": times, "ratios": bench.ratios("seed fake", times)}

    result = bench.combine([process(120.0, 100.0, None), process(95.0, 100.0, None),
                            process(100.0, 100.0, 130.0)])
    assert result["us_per_step"]["tapekit"] == 100.0 and result["us_per_step"]["keras_fit"] is None
    assert result["ratios"]["tapekit / graph+data"] == 1.0  # the median of 1.2, 0.95 and 1.0
    assert "keras_fit / tapekit" not in result["ratios"]  # trusted in one process of three
    assert len(result["processes"]) == 3


def test_the_readme_names_each_merge_that_still_holds_rows_and_its_machine():
    entry = {"us_per_step": {"graph+data": 200.0, "tapekit": 205.0},
             "ratios": {"tapekit / graph+data": 1.025}, "keras_xla": False, "targets": []}
    merge = {"tensorflow": "2.x", "keras": "3.x", "repeats": 7, "instances": 3}
    report = {"machine": "Test CPU", "tensorflow": "2.x", "keras": "3.x", "repeats": 5,
              "workloads": {"A": entry, "B": entry},
              "merged": [dict(merge, workloads=["A", "B"], machine="Test CPU"),
                         dict(merge, workloads=["B"], machine="Other CPU")]}
    text = bench.readme_section(report)
    later = [line for line in text.splitlines() if line.startswith("Measured later")]
    assert len(later) == 2
    assert later[0].startswith("Measured later, in a `bench.py --merge` run on the same machine")
    assert later[0].endswith("): A.")  # B's rows are the later merge's
    assert later[1].startswith("Measured later, in a `bench.py --merge` run on Other CPU (")
    assert later[1].endswith("): B.") and "7 interleaved repeats" in later[1]
    report["merged"][1]["workloads"] = ["A", "B"]  # every row measured again: one note
    assert bench.readme_section(report).count("Measured later") == 1
