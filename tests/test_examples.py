"""The example trainers in examples/: run through tapekit-train, and the WGAN-GP penalty."""

import json
import math
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO
from helpers import run_cli

if REPO not in sys.path:  # examples/ is a package of the repository, not installed
    sys.path.insert(0, REPO)

from examples.custom_loss_classifier import FocalLossClassifier, focal_loss  # noqa: E402
from examples.wgan_gp import WGANGPTrainer  # noqa: E402


def _records(model_dir):
    rows = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if row["split"] != "stats"]  # train and eval


def _all_finite(record):
    return all(math.isfinite(value) for value in record.values() if isinstance(value, float))


def test_wgan_gp_runs_from_the_command_line(tmp_path, cli_env):
    model_dir = tmp_path / "wgan"
    result = run_cli(["--trainer=examples.wgan_gp:WGANGPTrainer", "--train_steps=40",
                      "--steps_per_loop=20", "--critic_steps=3", f"--model_dir={model_dir}"],
                     cli_env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    records = _records(model_dir)
    assert [r["step"] for r in records] == [20, 40]
    for record in records:
        assert {"critic_loss", "gradient_penalty", "wasserstein_estimate",
                "generator_loss"} <= set(record)
        assert _all_finite(record), record
    assert "modes covered" in result.stdout


def test_focal_loss_classifier_runs_from_the_command_line_with_evaluation(tmp_path, cli_env):
    model_dir = tmp_path / "classifier"
    result = run_cli(["--trainer=examples.custom_loss_classifier:FocalLossClassifier",
                      "--train_steps=60", "--steps_per_loop=30", "--eval_every_steps=30",
                      "--eval_steps=5", f"--model_dir={model_dir}"], cli_env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    records = _records(model_dir)
    assert [(r["split"], r["step"]) for r in records] == [
        ("train", 30), ("eval", 30), ("train", 60), ("eval", 60)]
    for record in records:
        assert _all_finite(record), record
        assert 0.0 <= record["accuracy"] <= 1.0 and record["loss"] > 0.0
    assert "on held-out points" in result.stdout


def test_wgan_gp_penalty_is_computed_and_enters_the_critic_loss():
    trainer = WGANGPTrainer(critic_steps=1, seed=4)
    first = trainer.fit(train_steps=1, steps_per_loop=1)[0]
    assert math.isfinite(first["gradient_penalty"]) and first["gradient_penalty"] > 0.0
    # One critic step: its loss is −(D(real) − D(fake)) + λ·penalty, on the same weights.
    assert first["critic_loss"] == pytest.approx(
        -first["wasserstein_estimate"] + 10.0 * first["gradient_penalty"], rel=1e-5, abs=1e-6)
    # And it is trained on: without the penalty, the critic moves differently.
    unpenalized = WGANGPTrainer(critic_steps=1, seed=4, gradient_penalty_weight=0.0)
    unpenalized.fit(train_steps=1, steps_per_loop=1)
    assert not all(np.allclose(a.numpy(), b.numpy()) for a, b in zip(
        trainer.critic.trainable_variables, unpenalized.critic.trainable_variables))


def test_wgan_gp_gives_the_same_metrics_on_one_and_two_replicas():
    histories = []
    for strategy, replicas in (("default", 1), ("mirrored", 2)):
        trainer = WGANGPTrainer(strategy=strategy, cpu_replicas=replicas, seed=1)
        histories.append(trainer.fit(train_steps=4, steps_per_loop=4)[-1])
        assert trainer.train_loop_trace_count == 1
    for name in ("critic_loss", "gradient_penalty", "wasserstein_estimate", "generator_loss"):
        assert histories[1][name] == pytest.approx(histories[0][name], rel=1e-4, abs=1e-6), name


def test_focal_loss_is_cross_entropy_at_gamma_zero_and_smaller_for_easy_points():
    labels = tf.constant([0, 1, 1])
    logits = tf.constant([[4.0, -4.0], [0.0, 0.0], [3.0, 1.0]])
    cross_entropy = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    np.testing.assert_allclose(focal_loss(labels, logits, 0.0), cross_entropy, rtol=1e-6)
    focal = focal_loss(labels, logits, 2.0).numpy()
    # The reference in float64 (float32 log-softmax of a confident point keeps ~3 digits).
    logits64 = logits.numpy().astype(np.float64)
    log_p = logits64 - np.log(np.exp(logits64).sum(axis=1, keepdims=True))
    log_p_true = log_p[np.arange(3), labels.numpy()]
    np.testing.assert_allclose(focal, -(1 - np.exp(log_p_true)) ** 2 * log_p_true, rtol=1e-3)
    assert focal[0] < 1e-3 * cross_entropy[0]  # a confident correct point barely counts


def test_focal_loss_classifier_learns_the_spirals():
    trainer = FocalLossClassifier(seed=0)
    trainer.fit(train_steps=600, steps_per_loop=300)
    evaluation = trainer.evaluate(steps=10)
    assert evaluation["accuracy"] > 0.9


def test_shapes_classifier_runs_from_the_command_line_and_reports_its_metrics(tmp_path, cli_env):
    result = run_cli(["--trainer=examples.shapes_classifier:ShapesClassifier",
                      "--train_steps=60", "--steps_per_loop=20", "--eval_every_steps=60",
                      f"--model_dir={tmp_path}", "--progress=log"], cli_env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    (evaluation,) = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in train] == [20, 40, 60]
    assert {"loss", "accuracy", "train_accuracy"} <= set(train[-1])
    assert evaluation["eval_accuracy"] == pytest.approx(evaluation["accuracy"], abs=1e-6)
    assert "Held-out accuracy: " in result.stdout
