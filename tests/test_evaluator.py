"""`tapekit.run.evaluator` and best/: an evaluator process beside training, best checkpoints, modes."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

import tapekit
from tapekit.checkpoint import checkpointing
from tapekit.trainers import RegressionTrainer

from helpers import TESTS, run_cli, start_cli
from small_trainers import Unshuffled


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_an_evaluator_process_evaluates_every_checkpoint_of_a_training_process(tmp_path, cli_env):
    model_dir = tmp_path / "run"
    common = ["--trainer=resumable:Regression", "--model=mlp", "--train_steps=600",
              "--steps_per_loop=100", f"--model_dir={model_dir}", "--progress=log"]
    # The trainer waits for each checkpoint's evaluation before the next save deletes it
    # (max_checkpoints_to_keep=1), so the evaluator sees every one however slow it is.
    trainer = start_cli(common + ["--checkpoint_every_steps=100", "--max_checkpoints_to_keep=1",
                                  "--wait_for_evaluation"], cli_env, cwd=TESTS)
    try:  # the evaluator: this process, beside the training one
        evaluator = run_cli(common + ["--mode=continuous_evaluate", "--eval_timeout_secs=120",
                                      "--best_metric=loss"], cli_env, cwd=TESTS)
        _, train_err = trainer.communicate(timeout=300)
    finally:
        trainer.kill()
        trainer.wait()
    assert trainer.returncode == 0, train_err[-2000:]
    assert evaluator.returncode == 0, evaluator.stderr[-2000:]

    evaluated = _rows(model_dir / "eval_metrics.jsonl")
    assert [row["step"] for row in evaluated] == [100, 200, 300, 400, 500, 600]
    assert all(row["split"] == "eval" and np.isfinite(row["loss"]) for row in evaluated)
    # The training process evaluated nothing; the evaluator kept best/ and left checkpoints/ alone.
    assert {row["split"] for row in _rows(model_dir / "metrics.jsonl")} == {"train", "stats"}
    best = json.loads((model_dir / "best" / "best.json").read_text())
    assert best["value"] == min(row["loss"] for row in evaluated)
    assert evaluated[-1]["best_loss"] == best["value"]
    assert tf.train.latest_checkpoint(model_dir / "best").endswith(f"ckpt-{best['step']}")
    assert sorted(os.listdir(model_dir / "checkpoints")) == [
        "checkpoint", "ckpt-600.data-00000-of-00001", "ckpt-600.index"]


@pytest.mark.parametrize("deleted", ["before_its_restore", "during_its_restore"])
def test_a_checkpoint_deleted_under_the_evaluator_is_skipped(deleted, tmp_path, monkeypatch,
                                                            caplog):
    """The real `tf.train.checkpoints_iterator` over a real trainer's checkpoints. The trainer
    runs when the evaluator checks a checkpoint: at ckpt-10 it saves ckpt-20; at ckpt-20 it
    saves ckpt-30 and ckpt-40, and max_checkpoints_to_keep=2 deletes ckpt-20 after the
    iterator yielded it, before the evaluator checks that it exists or just after."""
    trainer = RegressionTrainer(model="mlp", model_dir=str(tmp_path), checkpoint_every_steps=10,
                                max_checkpoints_to_keep=2, progress="none")
    trainer.fit(train_steps=10, steps_per_loop=10)
    losses = {10: trainer.evaluate()["loss"]}  # the trainer's own evaluations, by step
    real_check = checkpointing.check_restorable

    def train_on_to(steps):
        trainer.fit(train_steps=steps, steps_per_loop=10)
        losses[steps] = trainer.evaluate()["loss"]

    def check_restorable(path):
        step = checkpointing.step_of(path)
        if step == 10:
            train_on_to(20)
        if step == 20 and deleted == "before_its_restore":
            train_on_to(40)
        real_check(path)  # raises when ckpt-20.index is gone
        if step == 20 and deleted == "during_its_restore":
            train_on_to(40)

    monkeypatch.setattr(checkpointing, "check_restorable", check_restorable)
    evaluator = RegressionTrainer(model="mlp", model_dir=str(tmp_path), progress="none")
    with caplog.at_level("WARNING"):
        count = evaluator.evaluate_checkpoints(until_step=40, timeout_secs=60)

    rows = _rows(tmp_path / "eval_metrics.jsonl")
    assert count == 2 and [row["step"] for row in rows] == [10, 40]
    assert [row["loss"] for row in rows] == pytest.approx([losses[10], losses[40]], rel=1e-6)
    assert losses[40] < losses[10] / 2  # ckpt-40 is not ckpt-10 again: the two are told apart
    assert (f"checkpoint {tmp_path / 'checkpoints' / 'ckpt-20'} was deleted before it could be "
            "evaluated") in caplog.text
    assert not (tmp_path / "checkpoints" / "ckpt-20.index").exists()


def test_the_evaluator_exits_after_its_timeout_without_a_new_checkpoint(tmp_path):
    RegressionTrainer(model_dir=str(tmp_path), progress="none").fit(train_steps=10, steps_per_loop=10)
    evaluator = RegressionTrainer(model_dir=str(tmp_path), progress="none")
    assert evaluator.evaluate_checkpoints(until_step=1000, timeout_secs=1) == 1


def test_best_checkpoint_and_model_follow_the_best_evaluation(tmp_path):
    trainer = RegressionTrainer(model="mlp", model_dir=str(tmp_path), best_metric="loss",
                                max_checkpoints_to_keep=1, checkpoint_every_steps=20,
                                progress="none")
    trainer.fit(train_steps=100, steps_per_loop=20, eval_every_steps=20)
    evals = [row for row in _rows(tmp_path / "metrics.jsonl") if row["split"] == "eval"]
    best_row = min(evals, key=lambda row: row["loss"])
    best = json.loads((tmp_path / "best" / "best.json").read_text())
    assert (best["step"], best["value"]) == (best_row["step"], best_row["loss"])
    assert evals[-1]["best_loss"] == best["value"] and evals[-1]["best_step"] == best["step"]
    assert tf.train.latest_checkpoint(tmp_path / "best").endswith(f"ckpt-{best['step']}")
    assert os.path.exists(tmp_path / "best" / "saved_model" / "saved_model.pb")
    # best/ survives max_checkpoints_to_keep=1, and restores to the best evaluation.
    restored = RegressionTrainer(model="mlp", progress="none")
    restored.restore(tf.train.latest_checkpoint(tmp_path / "best"))
    assert restored.evaluate()["loss"] == pytest.approx(best["value"], rel=1e-5)


class _Scripted(Unshuffled):
    """Evaluation reports one value under each name in `metric_names`, scripted by the step:
    at steps 10, 20, ..., 60 it is 3, 5, 9, 4, 1, 6 (highest at 30, lowest at 50)."""

    def __init__(self, metric_names=("score",), **kwargs):
        super().__init__(**kwargs)
        self.metric_names = tuple(metric_names)

    def eval_step(self, batch):
        value = tf.gather(tf.constant([0.0, 3.0, 5.0, 9.0, 4.0, 1.0, 6.0]),
                          self.global_step // 10)
        return {name: value for name in self.metric_names}


@pytest.mark.parametrize("metric, mode, best_step", [
    ("score", "max", 30), ("score", "min", 50),
    # auto: max for names with acc, auc, precision or recall in them, else min
    ("loss", "auto", 50), ("val_accuracy", "auto", 30), ("recall", "auto", 30)])
def test_best_mode_decides_which_evaluation_best_keeps(tmp_path, metric, mode, best_step):
    trainer = _Scripted(metric_names=[metric], model_dir=str(tmp_path), best_metric=metric,
                        best_mode=mode, progress="none")
    trainer.fit(train_steps=60, steps_per_loop=10, eval_every_steps=10, eval_steps=1)
    evals = [row for row in _rows(tmp_path / "metrics.jsonl") if row["split"] == "eval"]
    assert [row[metric] for row in evals] == [3.0, 5.0, 9.0, 4.0, 1.0, 6.0]
    best = json.loads((tmp_path / "best" / "best.json").read_text())
    assert (best["step"], best["value"]) == (best_step, {30: 9.0, 50: 1.0}[best_step])
    assert evals[-1][f"best_{metric}"] == best["value"] and evals[-1]["best_step"] == best_step
    path = tf.train.latest_checkpoint(tmp_path / "best")
    assert path.endswith(f"ckpt-{best_step}")
    # The checkpoint holds the trainer at that step (not the last one).
    assert _Scripted(metric_names=[metric]).restore(path) == best_step


def test_the_best_mode_flag_reaches_best(tmp_path, cli_env):
    model_dir = tmp_path / "run"
    result = run_cli(["--trainer=regression", "--mode=train_and_evaluate", "--train_steps=60",
                      "--steps_per_loop=10", "--checkpoint_every_steps=20", "--best_metric=loss",
                      "--best_mode=max", f"--model_dir={model_dir}"], cli_env)
    assert result.returncode == 0, result.stderr[-2000:]
    evals = [row for row in _rows(model_dir / "metrics.jsonl") if row["split"] == "eval"]
    assert [row["step"] for row in evals] == [20, 40, 60] and evals[0]["loss"] > evals[1]["loss"]
    # The loss falls as the line is learned: the "best" under max is the first evaluation.
    best = json.loads((model_dir / "best" / "best.json").read_text())
    assert (best["step"], best["value"]) == (20, max(row["loss"] for row in evals))
    assert tf.train.latest_checkpoint(model_dir / "best").endswith("ckpt-20")


def test_a_best_metric_the_evaluation_does_not_report_is_refused_before_training(tmp_path):
    trainer = RegressionTrainer(model_dir=str(tmp_path), best_metric="accuracy", progress="none")
    with pytest.raises(tapekit.TapekitError, match="best_metric='accuracy' is not a metric of the "
                                                   "evaluation, which reports: loss"):
        trainer.fit(train_steps=20, steps_per_loop=10, eval_every_steps=10)
    assert trainer.current_step == 0 and not (tmp_path / "checkpoints").exists()


def test_evaluate_mode_evaluates_the_latest_checkpoint_once(tmp_path, cli_env):
    model_dir = tmp_path / "run"
    flags = ["--trainer=regression", "--train_steps=50", "--steps_per_loop=25",
             f"--model_dir={model_dir}"]
    assert run_cli(flags, cli_env).returncode == 0
    result = run_cli(flags + ["--mode=evaluate"], cli_env)
    assert result.returncode == 0, result.stderr[-2000:]
    (row,) = _rows(model_dir / "eval_metrics.jsonl")
    assert row["step"] == 50 and row["loss"] < 0.05
    nothing = run_cli(["--trainer=regression", "--mode=evaluate", f"--model_dir={tmp_path / 'new'}"],
                      cli_env)
    assert nothing.returncode == 2 and "nothing to evaluate" in nothing.stderr


def test_train_and_evaluate_evaluates_at_each_checkpoint_and_records_the_best(tmp_path, cli_env):
    from test_summaries import read_events
    model_dir = tmp_path / "run"
    result = run_cli(["--trainer=regression", "--mode=train_and_evaluate", "--train_steps=60",
                      "--steps_per_loop=10", "--checkpoint_every_steps=20", "--best_metric=loss",
                      f"--model_dir={model_dir}"], cli_env)
    assert result.returncode == 0, result.stderr[-2000:]
    evals = [row for row in _rows(model_dir / "metrics.jsonl") if row["split"] == "eval"]
    assert [row["step"] for row in evals] == [20, 40, 60]
    events = read_events(model_dir / "summaries" / "eval")
    best = json.loads((model_dir / "best" / "best.json").read_text())
    assert tf.make_ndarray(events[("best_loss", 60)].tensor) == np.float32(best["value"])
    assert tf.make_ndarray(events[("best_step", 60)].tensor) == best["step"]
