"""Fault policies and epochs as hooks of the outer loop, on `FakeRunner`: no TensorFlow.

Rollback (`tapekit.faults.rollback`) reaches the engine only through the Runner protocol,
so the whole path (keep the good state, undo a bad loop, replay one step per loop, skip
the bad batch, record it) runs here in plain Python, as do stop requests and epochs.
"""

import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest

from tapekit import callbacks as callbacks_lib
from tapekit.errors import TapekitError, stop_of
from tapekit.faults.rollback import WINDOW, Rollback, median_losses
from tapekit.run.controller import Controller

from fake_runner import FakeRunner
from helpers import TESTS


class Rows(callbacks_lib.Callback):
    def __init__(self):
        self.loops, self.epochs = [], []

    def on_loop_end(self, step, logs):
        self.loops.append(step)

    def on_epoch_end(self, step, epoch):
        self.epochs.append((step, epoch))


class PlainWindow:
    """The loss window in plain Python (the engine's is checkpointed variables)."""

    def __init__(self, names):
        self.names, self.rows, self.added = list(names), [[] for _ in names], 0

    def count(self):
        return self.added

    def medians(self):
        return median_losses([row[-WINDOW:] for row in self.rows], self.added)

    def add(self, metrics):
        for row, name in zip(self.rows, self.names):
            row.append(metrics[name])
        self.added += 1


def rollback(runner, rolls_back=True, max_rollbacks=3, threshold=None, skipped=(),
             window=None, by_epochs=False):
    hook = Rollback(runner, rolls_back, max_rollbacks, threshold, skipped, by_epochs, window)
    hook.begin_fit()
    return hook


def train(runner, hook, callbacks=(), train_steps=40, steps_per_loop=10, **kwargs):
    return Controller(runner, callbacks, rollback=hook, **kwargs).train(train_steps,
                                                                        steps_per_loop)


def test_a_bad_loop_is_undone_replayed_step_by_step_and_its_batch_skipped(caplog):
    runner, rows = FakeRunner(poisoned={23}), Rows()
    history = train(runner, rollback(runner), [rows])
    # Loop 21-30 is bad: back to 20, then its steps one per loop; 23 is bad: back to 22,
    # and its batch is skipped (read, not trained on); no loop is recorded twice.
    assert runner.loops == [10, 10, 10] + [1] * 10 + [10]
    assert rows.loops == [10, 20, 21, 22, 24, 25, 26, 27, 28, 29, 30, 40]
    assert [row["step"] for row in history] == rows.loops
    assert runner.recorded == [(23, 23)] and runner.step == 40
    assert "rollback 1/3: non-finite loss in steps 21-30; went back to step 20" in caplog.text
    assert "replayed steps 21-30 one per loop; skipped: 23 (recorded in run.json" in caplog.text


def test_the_input_is_put_back_where_the_restored_state_is():
    runner = FakeRunner(poisoned={5})
    train(runner, rollback(runner), train_steps=10, steps_per_loop=10)
    # after the bad loop the state went back to 0 while the input was at 10: it was
    # repositioned, so every batch but the 5th was trained on exactly once
    assert runner.loops == [10] + [1] * 10 and runner.recorded == [(5, 5)]
    assert runner.input_at == 10 and runner.step == 10


def test_rollbacks_in_a_row_stop_with_one_line_naming_the_last_good_checkpoint():
    runner = FakeRunner(poisoned=set(range(11, 41)), latest="run/checkpoints/ckpt-10")
    with pytest.raises(TapekitError, match=r"after 1 rollbacks in a row \(--max_rollbacks\).*"
                                           r"the last good checkpoint is run/checkpoints/ckpt-10"):
        train(runner, rollback(runner, max_rollbacks=1))


def test_skipped_steps_are_read_not_trained_on_and_an_evaluation_due_in_them_is_made(caplog):
    caplog.set_level(logging.INFO)
    runner, rows = FakeRunner(), Rows()
    hook = rollback(runner, rolls_back=False, skipped=[(15, 22)])
    train(runner, hook, [rows], train_steps=30, eval_every_steps=20)
    assert runner.loops == [10, 4, 8] and rows.loops == [10, 14, 30]
    assert runner.input_at == 30  # the skipped batches were read
    assert runner.evaluations == [(22, None), (30, None)]
    assert "skipped steps 15-22 (read, not trained on)" in caplog.text


def test_data_that_ends_while_skipping_stops_training(caplog):
    runner = FakeRunner(data_size=18)
    train(runner, rollback(runner, rolls_back=False, skipped=[(15, 25)]), train_steps=30)
    assert runner.step == 18 and runner.status.stop_training
    assert "the training data ran out while skipping steps" in caplog.text


def test_a_loss_spike_is_rolled_back_like_a_nan():
    runner = FakeRunner()
    losses = iter([1.0] * 6 + [50.0] + [1.0] * 20)
    original = runner.run_train_loop

    def with_losses(num_steps):
        result = original(num_steps)
        return result._replace(metrics={"loss": next(losses)})

    runner.run_train_loop = with_losses
    hook = rollback(runner, threshold=10.0, window=PlainWindow(["loss"]))
    history = train(runner, hook, train_steps=80, steps_per_loop=10)
    assert runner.loops[:8] == [10, 10, 10, 10, 10, 10, 10, 1]  # the 7th loop was undone
    assert max(row["loss"] for row in history) == 1.0


def test_epochs_end_on_the_runners_pass_and_each_is_evaluated():
    runner, rows = FakeRunner(epoch_steps=25), Rows()
    history = Controller(runner, [rows], eval_every_steps=None).train(
        None, 10, train_epochs=2, eval_every_epochs=1)
    assert runner.loops == [10, 10, 10, 10, 10, 10]  # each loop stops at a pass's end
    assert [row["step"] for row in history] == [10, 20, 25, 35, 45, 50]
    assert [row["epoch"] for row in history] == [1, 1, 1, 2, 2, 2]
    assert rows.epochs == [(25, 1), (50, 2)] and runner.evaluations == [(25, None), (50, None)]


def test_an_exception_between_loops_stops_the_run_and_reaches_the_caller_as_itself():
    raised = ValueError("callback broke")

    class Fails(callbacks_lib.Callback):
        def on_loop_end(self, step, logs):
            if step == 20:
                raise raised

    runner = FakeRunner()
    with pytest.raises(ValueError) as error:
        Controller(runner, [Fails()]).train(40, 10)
    assert error.value is raised and runner.stopped == [("ValueError", 20)]  # saved first
    assert str(stop_of(error.value)) == "callback broke (raised between loops at step 20)"
    if sys.version_info >= (3, 11):
        assert error.value.__notes__ == [f"tapekit: {stop_of(error.value)}"]


def test_tapekits_own_error_between_loops_becomes_its_one_line():
    class Fails(callbacks_lib.Callback):
        def on_eval_end(self, step, logs):
            raise TapekitError("best_metric 'accuracy' is not among the evaluation's metrics")

    runner = FakeRunner()
    with pytest.raises(TapekitError, match=r"metrics \(raised between loops at step 20\)"):
        Controller(runner, [Fails()], eval_every_steps=20).train(40, 10)


def test_a_stop_requested_during_a_loop_reaches_the_runner_and_saves_nothing_twice():
    # In a child process, as a real SIGTERM: the watcher thread calls runner.request_stop.
    script = textwrap.dedent(f"""
        import json, os, signal, sys, time
        sys.modules["tensorflow"] = None  # none of this needs TensorFlow
        sys.path.insert(0, {TESTS!r})
        from fake_runner import FakeRunner
        from tapekit.run.controller import Controller

        def term_in_second(index, num_steps):
            if index == 1:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.2)  # the watcher thread acknowledges it during the loop

        runner = FakeRunner(script=term_in_second, poisoned=())
        Controller(runner).train(100, 10)
        print(json.dumps({{"requests": runner.stop_requests, "step": runner.step,
                          "preempted": runner.status.preempted}}))
    """)
    env = {**os.environ, "PYTHONPATH": os.path.dirname(TESTS)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout) == {"requests": [True], "step": 20, "preempted": True}
    assert "SIGTERM received: stopping at the next step" in result.stderr
