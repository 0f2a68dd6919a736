"""Where a loop's time and memory go (`on_loop_stats` rows), and `--max_time`: a budget that
stops at the next step, saves, exits 0, records why, and is fresh again on resume."""

import json
import threading
import time

import pytest
import tensorflow as tf

import tapekit
from tapekit.callbacks import Callback
from tapekit.callbacks.save_checkpoints import SaveCheckpoints
from tapekit.run import accounting
from tapekit.run.controller import Controller
from tapekit.run.time_budget import TimeBudget

from fake_runner import FakeRunner
from helpers import TESTS, run_cli
from small_trainers import Unshuffled

TIME_PARTS = ["time/callbacks_secs", "time/checkpoint_secs", "time/eval_secs", "time/loop_secs",
              "time/other_secs", "time/train_secs"]


class SlowSteps(Unshuffled):
    """Unshuffled's y = 2x, repeated without end, each step SLEEP seconds slower on purpose."""

    SLEEP = 0.02

    def train_dataset(self, input_context):
        data = tf.data.Dataset.from_tensor_slices(self.arrays).repeat()
        return tapekit.per_replica_batches(data, input_context, self.global_batch_size)

    def train_step(self, batch):
        metrics = super().train_step(batch)
        slept = tf.ensure_shape(
            tf.py_function(lambda: time.sleep(self.SLEEP) or 0.0, [], tf.float32), [])
        return {"loss": metrics["loss"] + 0.0 * slept}


class Recorded(Callback):
    """Keeps each `on_loop_stats` row, with the time it came."""

    def __init__(self):
        self.rows, self.times = [], []

    def on_loop_stats(self, step, stats):
        self.times.append(time.perf_counter())
        self.rows.append({"step": step, **stats})


class SlowRunner(FakeRunner):
    """A fake whose loops take `loop_secs` and evaluations `eval_secs`."""

    def __init__(self, loop_secs=0.0, eval_secs=0.0, **kwargs):
        super().__init__(script=lambda index, steps: time.sleep(loop_secs), **kwargs)
        self.eval_secs = eval_secs

    def evaluate(self, steps):
        time.sleep(self.eval_secs)
        return super().evaluate(steps)


class SlowCheckpointer:
    def __init__(self, secs):
        self.secs, self.saved = secs, []

    def save(self, step):
        time.sleep(self.secs)
        self.saved.append(step)

    def wait(self):
        pass


# ---------------------------------------------------------------------- the stats, on the fake


def test_each_loop_gets_a_row_whose_parts_add_up_to_its_wall_time():
    runner = SlowRunner(loop_secs=0.1, eval_secs=0.05, step=0)
    recorded = Recorded()
    checkpointer = SlowCheckpointer(0.03)
    controller = Controller(runner, [recorded, SaveCheckpoints(checkpointer, 10)],
                            eval_every_steps=10)
    controller.train(20, 5)
    rows = recorded.rows
    assert [row["step"] for row in rows] == [5, 10, 15, 20] and checkpointer.saved == [10, 20]
    for row in rows:
        assert sorted(key for key in row if key.startswith("time/")) == TIME_PARTS
        assert all(row[key] >= 0 for key in TIME_PARTS)
        parts = sum(row[key] for key in TIME_PARTS if key != "time/loop_secs")
        assert parts == pytest.approx(row["time/loop_secs"], abs=1e-9)
        assert row["time/train_secs"] >= 0.1  # the loop's sleep (no upper bound: a loaded host)
        saved_and_evaluated = row["step"] in (10, 20)
        assert (row["time/eval_secs"] >= 0.05) if saved_and_evaluated else (
            row["time/eval_secs"] == 0)
        assert (row["time/checkpoint_secs"] >= 0.03) == saved_and_evaluated
        assert row["memory/host_rss_bytes"] > 10_000_000
        assert row["memory/host_peak_rss_bytes"] >= row["memory/host_rss_bytes"]
        assert row["memory/GPU_0/current_bytes"] == 1000 * row["step"]  # the fake's reading
        assert "time/input_wait_secs" not in row  # nothing read outside the compiled loop
    # A row runs from its loop's start to the next's: the loops' rows tile the time between
    # the first row and the last, so they add up to it (the clocks are read a few
    # microseconds apart; a loop counted twice would add a tenth of a second or more).
    assert sum(row["time/loop_secs"] for row in rows[1:]) == pytest.approx(
        recorded.times[-1] - recorded.times[0], abs=0.01)


def test_the_clock_reports_input_wait_only_when_it_measured_some():
    clock = accounting.LoopClock()
    clock.restart()
    assert "time/input_wait_secs" not in clock.stats()
    with clock.timing("input_wait"):
        time.sleep(0.01)
    stats = clock.stats()
    assert stats["time/input_wait_secs"] >= 0.01 and stats["time/loop_secs"] >= 0.01


def test_device_memory_is_named_per_device_and_skips_the_cpu():
    assert accounting.memory_keys("GPU:1", {"current": 7, "peak": 9}) == {
        "memory/GPU_1/current_bytes": 7, "memory/GPU_1/peak_bytes": 9}
    # Real TensorFlow: this machine has no GPU, and a CPU's reading (zeros) is not reported.
    assert accounting.device_memory() == {}
    assert accounting.device_memory(["/device:CPU:0"]) == {}


# ---------------------------------------------------------------------- the budget, on the fake


def test_the_watcher_stops_once_the_budget_less_the_save_is_used_and_never_after_its_fit():
    stops = []
    budget = TimeBudget(0.5)
    assert budget.reserve == pytest.approx(0.05)  # a tenth until a save is measured
    with budget.watching(lambda: stops.append(time.monotonic())):
        budget.saw_save(0.2)  # a save measured: the deadline moves closer
        assert budget.reserve == 0.2
        time.sleep(0.45)
    assert len(stops) == 1 and stops[0] - budget.started >= 0.3  # not before 0.5 - 0.2
    assert budget.expired
    late = TimeBudget(0.2)
    with late.watching(lambda: stops.append("late")):
        pass
    time.sleep(0.3)
    assert len(stops) == 1 and not late.expired  # a budget ends with its fit


def test_a_budget_used_up_stops_between_loops_skipping_the_evaluation_and_records_it():
    runner = SlowRunner(loop_secs=0.1, step=0)  # the fake's loops cannot stop mid-way
    controller = Controller(runner, [], eval_every_steps=5)
    history = controller.train(1000, 5, max_time=0.35)
    assert runner.status.stopped_by_time and not runner.status.preempted
    stopped = history[-1]["step"]
    assert 5 <= stopped <= 20 and runner.stop_requests[-1] is True
    assert [step for step, _ in runner.evaluations] == list(range(5, stopped, 5))  # not at the stop
    (record,) = runner.stop_records
    assert record["reason"] == "max_time" and record["step"] == stopped
    assert record["budget_secs"] == 0.35 and record["used_secs"] >= 0.3


def test_a_budget_used_up_during_an_evaluation_stops_before_the_next_loop():
    runner = SlowRunner(eval_secs=0.4, step=0)
    controller = Controller(runner, [], eval_every_steps=5)
    controller.train(1000, 5, max_time=0.3)
    assert runner.loops == [5] and runner.status.stopped_by_time
    assert runner.stop_records[0]["step"] == 5


# ---------------------------------------------------------------------- real runs


def test_a_real_run_writes_stats_rows_and_time_scalars(tmp_path):
    trainer = SlowSteps(model_dir=str(tmp_path), progress="none", checkpoint_every_steps=10)
    trainer.SLEEP = 0.0
    trainer.fit(train_steps=20, steps_per_loop=5)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    stats = [row for row in rows if row["split"] == "stats"]
    assert [row["step"] for row in stats] == [5, 10, 15, 20]
    for row in stats:
        assert {*TIME_PARTS, "memory/host_rss_bytes", "memory/host_peak_rss_bytes"} == (
            set(row) - {"split", "step"})  # on CPU: host memory only
        assert sum(row[key] for key in TIME_PARTS if key != "time/loop_secs") == pytest.approx(
            row["time/loop_secs"])
    saving = [row["time/checkpoint_secs"] for row in stats if row["step"] in (10, 20)]
    not_saving = [row["time/checkpoint_secs"] for row in stats if row["step"] in (5, 15)]
    assert min(saving) > 5 * max(not_saving)  # a real save takes time
    tags = set()
    for path in (tmp_path / "summaries" / "train").glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            tags.update((value.tag, event.step) for value in event.summary.value)
    assert {("time/train_secs", 5), ("time/checkpoint_secs", 20),
            ("memory/host_rss_bytes", 20)} <= tags


def test_max_time_stops_mid_loop_saves_exits_zero_and_a_resume_gets_a_fresh_budget(tmp_path,
                                                                                 cli_env):
    model_dir = tmp_path / "run"
    args = ["--trainer=test_time_budget:SlowSteps", "--train_steps=100000",
            "--steps_per_loop=100000", "--max_time=3s", "--progress=log",
            f"--model_dir={model_dir}"]
    started = time.monotonic()
    first = run_cli(args, cli_env, cwd=TESTS)
    assert first.returncode == 0, first.stderr[-3000:]
    assert time.monotonic() - started < 20
    record = json.loads((model_dir / "run.json").read_text())
    (stop,) = record["stopped"]
    step = stop["step"]
    assert stop["reason"] == "max_time" and stop["budget_secs"] == 3.0
    # By the watcher, at a step, once 3 s less the reserve were used (recorded before the
    # end); the upper bound is generous slack for a loaded machine, not a promise.
    assert 10 < step < 100000 and stop["reserve_secs"] >= 0.3
    assert 3.0 - stop["reserve_secs"] - 0.002 <= stop["used_secs"] < 3.0 + 5.0
    assert tf.train.latest_checkpoint(str(model_dir / "checkpoints")).endswith(f"ckpt-{step}")
    assert f"max_time (3 s) used up: stopped at step {step}, checkpoint" in first.stderr
    assert f"step {step}/100000: loss=" in first.stderr and "time/" not in first.stderr  # not shown
    resumed = run_cli(args, cli_env, cwd=TESTS)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {step}" in resumed.stderr  # resumed where it stopped
    record = json.loads((model_dir / "run.json").read_text())
    first_stop, second_stop = record["stopped"]
    assert second_stop["step"] > step + 10  # a fresh budget
    assert 3.0 - second_stop["reserve_secs"] - 0.002 <= second_stop["used_secs"] < 8.0


def test_a_bad_max_time_is_one_line_before_anything_is_written(tmp_path, cli_env):
    model_dir = tmp_path / "run"
    result = run_cli(["--trainer=test_time_budget:SlowSteps", "--train_steps=10",
                      "--max_time=abc", f"--model_dir={model_dir}"], cli_env, cwd=TESTS)
    assert result.returncode != 0 and not model_dir.exists()  # refused while parsing flags
    assert ("flag --max_time=abc: max_time must be a duration such as 3h50m, 90m, 45s, 1.5h, "
            "02:30:00 or a number of seconds; got 'abc'.") in result.stderr  # absl's bad-flag line


def test_each_fit_call_gets_a_fresh_budget_and_no_watcher_outlives_it():
    trainer = SlowSteps(progress="none")  # no model_dir: it just stops
    history = trainer.fit(train_steps=100000, steps_per_loop=100000, max_time="1.5s")
    first = trainer.current_step
    # The 1.5 s include building and tracing: on a loaded machine few steps may fit.
    assert trainer.stopped_by_time and 0 < first < 100000 and history[-1]["step"] == first
    trainer.fit(train_steps=100000, steps_per_loop=100000, max_time=1.5)
    assert trainer.stopped_by_time and trainer.current_step > first
    trainer.SLEEP = 0.0
    trainer.fit(train_steps=trainer.current_step + 5, steps_per_loop=5, max_time=60)
    assert not trainer.stopped_by_time
    assert not [thread for thread in threading.enumerate() if thread.name == "tapekit-max-time"]


def test_the_reserve_counts_the_trainers_last_end_and_an_overrun_is_said(caplog):
    runner, other = SlowRunner(step=0), SlowRunner(step=0)
    # The end of this fit: the final save, 0.2 s (the budget's first reserve is 0.1 s).
    Controller(runner, [SaveCheckpoints(SlowCheckpointer(0.2), None)]).train(5, 5, max_time=1.0)
    assert TimeBudget.of(1.0, runner).reserve >= 0.2  # the same trainer's next fit keeps it
    assert TimeBudget.of(1.0, other).reserve == pytest.approx(0.1)  # not another's
    budget = TimeBudget.of(1.0, other)
    with caplog.at_level("WARNING", logger="absl"):
        budget.saw_end(0.5, stopped=True)
    assert "took 0.5 s, more than the 0.1 s kept for it: the budget overran by about 0.4 s" in caplog.text
