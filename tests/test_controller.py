"""The outer loop (`tapekit.run.controller`) on a fake engine: plain Python, no TensorFlow.

The fake runner (`tests/fake_runner.py`) reports scripted `LoopResult`s; these tests check
loop lengths, the evaluation cadence, stopping (callbacks, data running out, SIGTERM,
Ctrl-C, another worker's vote), the non-finite stop before anything records a loop, and
the order of tapekit's default callbacks. Fault policies and epochs: test_fault_hooks.py.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import types

import pytest

from tapekit import callbacks as callbacks_lib
from tapekit.errors import TapekitError
from tapekit.run import controller as controller_lib
from tapekit.run.controller import Controller
from tapekit.run.runner import LoopResult

from fake_runner import FakeRunner
from helpers import TESTS

REPO = os.path.dirname(TESTS)


class FakeTrainer:
    """What callbacks see as `self.trainer`: `stop_training` maps to the runner's status."""

    def __init__(self, runner):
        self._runner = runner

    @property
    def stop_training(self):
        return self._runner.status.stop_training

    @stop_training.setter
    def stop_training(self, value):
        self._runner.status.stop_training = value


class Recorder(callbacks_lib.Callback):
    def __init__(self):
        self.calls = []

    def on_train_begin(self, step):
        self.calls.append(("begin", step))

    def on_loop_end(self, step, logs):
        self.calls.append(("loop", step))

    def on_eval_end(self, step, logs):
        self.calls.append(("eval", step))

    def on_train_end(self, step, logs):
        self.calls.append(("end", step))


def controller(runner, callbacks=(), **kwargs):
    return Controller(runner, callbacks, trainer=FakeTrainer(runner), **kwargs)


def test_loops_are_clamped_to_train_steps_and_resume_from_the_runners_step():
    runner = FakeRunner(step=250)
    history = controller(runner).train(train_steps=1000, steps_per_loop=300)
    assert runner.loops == [300, 300, 150]
    assert [h["step"] for h in history] == [550, 850, 1000]
    assert history[-1]["loss"] == pytest.approx(1e-3)
    assert history[0]["examples_per_sec"] == pytest.approx(history[0]["steps_per_sec"] * 10)
    assert controller(runner).train(train_steps=1000, steps_per_loop=300) == []  # already there


def test_evaluation_after_each_loop_passing_a_multiple_and_at_the_end():
    runner, recorder = FakeRunner(), Recorder()
    controller(runner, [recorder], eval_every_steps=250, eval_steps=7).train(1000, 100)
    assert runner.evaluations == [(300, 7), (500, 7), (800, 7), (1000, 7)]
    assert [c for c in recorder.calls if c[0] != "loop"] == [
        ("begin", 0), ("eval", 300), ("eval", 500), ("eval", 800), ("eval", 1000), ("end", 1000)]


def test_a_callback_stops_training_after_its_loop_and_evaluation_still_runs():
    class StopAt(callbacks_lib.Callback):
        def on_loop_end(self, step, logs):
            if step == 30:
                self.trainer.stop_training = True

    runner = FakeRunner()
    history = controller(runner, [StopAt()], eval_every_steps=100).train(100, 10)
    assert [h["step"] for h in history] == [10, 20, 30]
    assert runner.evaluations == [(30, None)]
    assert runner.status.stop_training and not runner.status.preempted


def test_input_that_runs_out_stops_training_with_what_ran(caplog):
    def short(index, num_steps):
        return LoopResult({"loss": 1.0}, 4 if index == 1 else num_steps, 0, None, None)

    runner = FakeRunner(script=short)
    history = controller(runner).train(100, 10)
    assert runner.loops == [10, 10] and [h["step"] for h in history] == [10, 14]
    assert "the training data ran out: 4 of this loop's 10 steps ran" in caplog.text


def test_a_non_finite_loop_stops_before_any_callback_records_it():
    def bad_third(index, num_steps):
        if index == 2:
            return LoopResult({"loss": float("nan")}, num_steps, 1, 6, "loss")
        return None

    recorder = Recorder()
    runner = FakeRunner(script=bad_third, latest="run/checkpoints/ckpt-20")
    with pytest.raises(TapekitError) as error:
        controller(runner, [recorder]).train(100, 10)
    assert str(error.value).startswith("non-finite loss at step 27; training stopped")
    assert "the last good checkpoint run/checkpoints/ckpt-20 is kept" in str(error.value)
    assert recorder.calls == [("begin", 0), ("loop", 10), ("loop", 20)]


def test_skip_step_warns_and_reports_how_many_steps_were_skipped(caplog):
    def two_bad(index, num_steps):
        if index == 0:
            return LoopResult({"loss": 0.3}, num_steps, 2, 4, "loss")
        return None

    history = controller(FakeRunner(script=two_bad), nan_policy="skip_step").train(20, 10)
    assert history[0]["nonfinite_steps"] == 2 and "nonfinite_steps" not in history[1]
    assert "2 step(s) with non-finite values were skipped (first: loss at step 5)" in caplog.text


@pytest.mark.parametrize("signum, flag", [(signal.SIGTERM, "preempted"),
                                          (signal.SIGINT, "interrupted")],
                         ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_a_loop_stops_after_it_without_evaluating(signum, flag):
    # In a child process: a signal sent to pytest's own process would reach the test runner.
    script = textwrap.dedent(f"""
        import json, os, signal, sys
        sys.path.insert(0, {TESTS!r})
        from fake_runner import FakeRunner
        from test_controller import Recorder, controller
        previous = signal.getsignal({int(signum)})

        def signal_in_second(index, num_steps):
            if index == 1:
                os.kill(os.getpid(), {int(signum)})

        recorder = Recorder()
        runner = FakeRunner(script=signal_in_second, latest="run/checkpoints/ckpt-20")
        controller(runner, [recorder], eval_every_steps=20).train(100, 10)
        print(json.dumps({{"loops": runner.loops, "evaluations": runner.evaluations,
                          "flag": runner.status.{flag}, "stop": runner.status.stop_training,
                          "last_call": recorder.calls[-1], "requests": runner.stop_requests,
                          "handler_put_back": signal.getsignal({int(signum)}) is previous}}))
    """)
    env = {**os.environ, "PYTHONPATH": REPO}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout) == {"loops": [10, 10], "evaluations": [], "flag": True,
                                         "stop": True, "last_call": ["end", 20],
                                         "requests": [True],  # the loop was asked to stop
                                         "handler_put_back": True}
    assert f"{flag} at step 20, checkpoint run/checkpoints/ckpt-20 saved" in result.stderr


def test_another_workers_signal_stops_every_worker_at_the_same_step():
    runner = FakeRunner(votes=lambda flag, step: flag or step == 30)
    history = controller(runner).train(100, 10)
    assert [h["step"] for h in history] == [10, 20, 30] and runner.status.preempted


def test_default_callbacks_are_progress_then_records_then_checkpoints(tmp_path):
    options = types.SimpleNamespace(progress="log", sample_every_steps=None,
                                    checkpoint_every_steps=50, checkpoint_every_secs=None,
                                    loggers=("tensorboard", "jsonl", "csv"))
    checkpointer = object()
    found = controller_lib.default_callbacks(FakeRunner(), options, 100, None, checkpointer)
    assert [type(c).__name__ for c in found] == ["LogProgress", "SaveCheckpoints"]
    assert found[1].checkpointer is checkpointer and found[1].every_steps == 50
    options.progress, options.sample_every_steps = "none", 10
    found = controller_lib.default_callbacks(FakeRunner(), options, 100, str(tmp_path), None)
    assert [type(c).__name__ for c in found] == ["TensorBoard", "HParams", "MetricsFile",
                                                 "CsvLogger", "SampleImages"]


class FakeCheckpointer:
    def __init__(self):
        self.saved = []
        self.waited_after = []  # the saves made when each wait came

    def save(self, step):
        self.saved.append(step)

    def wait(self):  # (an async save in flight is finished here)
        self.waited_after.append(list(self.saved))


def test_checkpoints_by_steps_by_time_and_at_the_end(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(callbacks_lib.save_checkpoints.time, "monotonic", lambda: clock[0])
    checkpointer, votes = FakeCheckpointer(), []

    def vote(overdue):
        votes.append(overdue)
        return overdue

    def tick(index, num_steps):
        clock[0] += 40.0  # each loop takes 40 s

    saver = callbacks_lib.SaveCheckpoints(checkpointer, every_steps=50, every_secs=70, vote=vote)
    controller(FakeRunner(script=tick), [saver]).train(train_steps=130, steps_per_loop=20)
    # 40: 80 s since the start; 60 and 100: past a multiple of 50; 130: 80 s after 100.
    assert checkpointer.saved == [40, 60, 100, 130]
    assert checkpointer.waited_after == [[40, 60, 100, 130]]  # once, after the last save
    # Workers vote only at loop ends where no save is due by steps.
    assert votes == [False, True, False, False, True]


def test_time_checkpoints_are_voted_on_so_workers_save_together():
    checkpointer = FakeCheckpointer()
    runner = FakeRunner()
    # This worker's clock says "not yet"; another worker's says it is time at step 30.
    saver = callbacks_lib.SaveCheckpoints(checkpointer, every_steps=None, every_secs=1000,
                                          vote=lambda overdue: overdue or runner.step == 30)
    controller(runner, [saver]).train(train_steps=50, steps_per_loop=10)
    assert checkpointer.saved == [30, 50]


def test_the_controller_and_callbacks_import_and_run_without_tensorflow():
    script = textwrap.dedent(f"""
        import sys
        sys.modules["tensorflow"] = None  # any import of TensorFlow now fails
        sys.modules["keras"] = None
        sys.path.insert(0, {TESTS!r})
        from fake_runner import FakeRunner
        from test_controller import Recorder, controller
        recorder = Recorder()
        history = controller(FakeRunner(), [recorder], eval_every_steps=20).train(40, 10)
        print(len(history), recorder.calls[-1])
    """)
    env = {**os.environ, "PYTHONPATH": REPO}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "4 ('end', 40)"


# ---------------------------------------------------------------------- the end of a fit


class Saver:
    """A checkpointer that notes each save (and the final wait) in a shared journal."""

    def __init__(self, journal, fail=False):
        self.journal, self.fail = journal, fail

    def save(self, step):
        if self.fail:
            raise OSError("disk full")
        time.sleep(0.05)
        self.journal.append(("save", step))

    def wait(self):
        self.journal.append(("wait",))


class Journal(callbacks_lib.Callback):
    """Notes its hooks in a shared journal, with the run.json stop records seen at the end."""

    def __init__(self, journal, runner, fail_on_begin=False):
        self.journal, self.runner, self.fail_on_begin = journal, runner, fail_on_begin

    def on_train_begin(self, step):
        if self.fail_on_begin:
            raise ValueError("a bad callback")

    def on_loop_stats(self, step, stats):
        self.journal.append(("stats", step, stats["time/checkpoint_secs"] >= 0.05))

    def on_train_end(self, step, logs):
        self.journal.append(("end", step, len(self.runner.stop_records)))

    def on_exception(self, step, error):
        self.journal.append(("exception", type(error).__name__))


def test_at_the_end_the_final_save_comes_first_then_the_stats_row_then_the_loggers():
    journal, runner = [], FakeRunner()
    saver = callbacks_lib.SaveCheckpoints(Saver(journal), None)
    controller(runner, [Journal(journal, runner), saver]).train(20, 10)
    assert journal == [("stats", 10, False), ("save", 20), ("wait",), ("stats", 20, True),
                       ("end", 20, 0)]


def test_a_max_time_stop_is_in_run_json_before_the_loggers_end(monkeypatch):
    journal = []

    def slow_loop(index, steps):
        monkeypatch.setattr(controller_lib.TimeBudget, "check", lambda self: True)  # used up

    runner = FakeRunner(script=slow_loop)
    controller(runner, [Journal(journal, runner)]).train(100, 10, max_time=3600)
    assert runner.status.stopped_by_time and journal[-1] == ("end", 10, 1)


def test_a_budget_used_up_after_the_last_step_stops_nothing(monkeypatch):
    runner = FakeRunner(step=0)
    monkeypatch.setattr(controller_lib.TimeBudget, "check", lambda self: True)  # always used up
    controller(runner, eval_every_steps=10).train(10, 10, max_time=3600)
    assert not runner.status.stopped_by_time and runner.stop_records == []
    assert [step for step, _ in runner.evaluations] == [10]  # the last evaluation ran


def test_an_exception_in_on_train_begin_or_the_final_save_tells_each_callback_once():
    journal, runner = [], FakeRunner()
    with pytest.raises(ValueError, match="a bad callback"):
        controller(runner, [Journal(journal, runner), Journal(journal, runner, fail_on_begin=True)]
                   ).train(20, 10)
    assert journal == [("exception", "ValueError")] * 2 and runner.loops == []
    journal, runner = [], FakeRunner()
    saver = callbacks_lib.SaveCheckpoints(Saver(journal, fail=True), None)
    with pytest.raises(OSError, match="disk full"):
        controller(runner, [Journal(journal, runner), saver]).train(20, 10)
    assert journal[-1] == ("exception", "OSError") and journal.count(("exception", "OSError")) == 1
    assert ("end", 20, 0) not in journal  # the loggers' end never came: they were told of the error
