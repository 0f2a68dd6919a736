"""Checkpoints, exact resume, preemption, the NaN guard, updates, evaluation, bad input."""

import json
import os
import signal
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import tapekit
from helpers import start_cli, wait_for
from tapekit.callbacks import EarlyStopping
from tapekit.models import MLP
from tapekit.trainers import GANTrainer, RegressionTrainer

TESTS = os.path.dirname(os.path.abspath(__file__))


def _run(args, env, timeout=240):
    return subprocess.run([sys.executable, "-m", "tapekit.trainers"] + args, cwd=TESTS, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _start(args, env):
    return start_cli(args, env, cwd=TESTS)


def _reported(stdout):
    line = next(l for l in stdout.splitlines() if l.startswith("WEIGHTS "))
    return json.loads(line[len("WEIGHTS "):])


# ------------------------------------------------------------------ exact resume after SIGKILL


@pytest.mark.parametrize("trainer", ["resumable:Regression", "resumable:GAN"])
def test_sigkill_then_resume_is_bitwise_equal_to_an_uninterrupted_run(trainer, tmp_path, cli_env):
    # 35 steps is mid-epoch for both (1000 examples / 100 per step; 1024 / 64).
    common = [f"--trainer={trainer}", "--deterministic", "--seed=5", "--train_steps=120",
              "--steps_per_loop=5", "--checkpoint_every_steps=35"]
    whole = _run(common + [f"--model_dir={tmp_path / 'whole'}"], cli_env)
    assert whole.returncode == 0, whole.stderr[-3000:]

    model_dir = tmp_path / "killed"
    process = _start(common + [f"--model_dir={model_dir}", "--sleep_per_loop=0.25"], cli_env)
    try:
        # the manager's state file names ckpt-35 once that checkpoint is complete
        wait_for(model_dir / "checkpoints" / "checkpoint", process, containing="ckpt-35")
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    resumed = _run(common + [f"--model_dir={model_dir}"], cli_env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from checkpoint" in resumed.stderr
    assert "at step 120" not in resumed.stderr.split("resumed from checkpoint")[1].splitlines()[0]
    assert _reported(resumed.stdout) == _reported(whole.stdout)  # every float, bit for bit


def test_resume_under_mirrored_replays_the_input_exactly(tmp_path):
    """Distributed iterators cannot be checkpointed; the input is skipped to the saved step."""
    whole = GANTrainer(strategy="mirrored", cpu_replicas=2, seed=2)
    whole.fit(train_steps=40, steps_per_loop=10)
    first = GANTrainer(strategy="mirrored", cpu_replicas=2, seed=2, model_dir=str(tmp_path))
    first.fit(train_steps=25, steps_per_loop=5)
    second = GANTrainer(strategy="mirrored", cpu_replicas=2, seed=2, model_dir=str(tmp_path))
    second.fit(train_steps=40, steps_per_loop=5)
    assert second.current_step == 40
    for a, b in zip(whole.gan.trainable_variables, second.gan.trainable_variables):
        np.testing.assert_array_equal(b.numpy(), a.numpy())


# ------------------------------------------------------------------ preemption


def test_sigterm_finishes_the_loop_saves_and_exits_zero_then_resumes(tmp_path, cli_env):
    model_dir = tmp_path / "run"
    args = ["--trainer=resumable:Regression", "--train_steps=2000", "--steps_per_loop=10",
            f"--model_dir={model_dir}"]
    process = _start(args + ["--sleep_per_loop=0.1"], cli_env)
    try:
        wait_for(model_dir / "metrics.jsonl", process)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 0, stderr[-3000:]
    step = int(stderr.split("preempted at step ")[1].split(",")[0])
    assert 0 < step < 2000 and step % 10 == 0
    assert f"preempted at step {step}, checkpoint saved" in stderr
    assert (model_dir / "checkpoints" / f"ckpt-{step}.index").exists()
    resumed = _run(args + ["--train_steps=" + str(step + 20)], cli_env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from checkpoint {model_dir / 'checkpoints' / f'ckpt-{step}'} at step {step}" in resumed.stderr
    assert _reported(resumed.stdout)["step"] == step + 20


# ------------------------------------------------------------------ the NaN guard


class Unshuffled(tapekit.Trainer):
    """y = 2x on 1000 rows in order; rows from `nan_from` on have y = NaN."""

    default_global_batch_size = 100

    def __init__(self, nan_from=None, **kwargs):
        super().__init__(**kwargs)
        x = np.linspace(-1, 1, 1000, dtype=np.float32).reshape(-1, 1)
        y = 2 * x
        if nan_from is not None:
            y[nan_from:] = np.nan
        self.arrays = (x, y)

    def build(self):
        self.model = keras.layers.Dense(1, name="dense")
        self.optimizer = keras.optimizers.SGD(self.learning_rate)

    def train_dataset(self, input_context):
        return tapekit.per_replica_batches(tf.data.Dataset.from_tensor_slices(self.arrays),
                                           input_context, self.global_batch_size)

    def train_step(self, batch):
        x, y = batch
        with tf.GradientTape() as tape:
            loss = self.compute_loss(tf.square(y - self.model(x)))
        self.apply_gradients(tape, loss, self.model, self.optimizer)
        return {"loss": loss}


def test_nan_from_the_data_stops_at_the_loop_end_and_keeps_the_last_good_checkpoint(tmp_path):
    trainer = Unshuffled(nan_from=750, model_dir=str(tmp_path), checkpoint_every_steps=5)
    with pytest.raises(tapekit.TapekitError) as raised:
        trainer.fit(train_steps=20, steps_per_loop=5)
    message = str(raised.value)
    assert "non-finite loss at step 8" in message  # rows 700-799 are step 8's batch
    assert "ckpt-5 is kept" in message
    assert tf.train.latest_checkpoint(tmp_path / "checkpoints").endswith("ckpt-5")
    assert not (tmp_path / "checkpoints" / "ckpt-10.index").exists()
    steps = [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [5]
    saved = tf.train.load_variable(str(tmp_path / "checkpoints" / "ckpt-5"),
                                   "model/_kernel/.ATTRIBUTES/VARIABLE_VALUE")
    assert np.all(np.isfinite(saved))


def test_nan_policy_skip_step_does_not_apply_bad_updates():
    trainer = Unshuffled(nan_from=750, nan_policy="skip_step")
    history = trainer.fit(train_steps=20, steps_per_loop=10)
    assert trainer.current_step == 20
    assert all(np.isfinite(v.numpy()).all() for v in trainer.model.trainable_variables)
    assert history[0]["nonfinite_steps"] == 3.0  # steps 8, 9, 10 hold the NaN rows
    assert np.isfinite(history[0]["loss"])
    assert int(trainer.optimizer.iterations.numpy()) == 20 - 6  # two epochs, 3 bad steps each


def test_nan_in_the_cli_gives_one_line_and_nonzero_exit(tmp_path, cli_env):
    x = np.linspace(-1, 1, 1000, dtype=np.float32).reshape(-1, 1)
    y = 2 * x
    y[500] = np.nan
    np.savez(tmp_path / "bad.npz", x=x, y=y)
    result = _run(["--trainer=regression", f"--data={tmp_path / 'bad.npz'}", "--train_steps=50",
                   "--steps_per_loop=10", f"--model_dir={tmp_path / 'run'}"], cli_env)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "error: non-finite loss at step" in result.stderr.strip().splitlines()[-1]


# ------------------------------------------------------------------ clipping and accumulation


class LinearSGD(Unshuffled):
    """A linear model under plain SGD (update size proportional to the gradient); data
    comes through fit(dataset=...), the MSE step is Unshuffled's."""

    default_global_batch_size = 32

    def build(self):
        self.model = keras.layers.Dense(1, kernel_initializer="ones", bias_initializer="zeros")
        self.model.build((None, 3))
        self.optimizer = keras.optimizers.SGD(0.1)


def _rows(count):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((count, 3)).astype(np.float32)
    return x, (x @ np.array([[0.5], [-2.0], [3.0]], np.float32) + 1.0).astype(np.float32)


@pytest.mark.parametrize("replicas", [1, 2])
def test_two_accumulated_micro_steps_equal_one_step_of_twice_the_batch(replicas):
    x, y = _rows(16)
    strategy = {"strategy": "mirrored", "cpu_replicas": 2} if replicas == 2 else {}
    big = LinearSGD(global_batch_size=16, **strategy)
    big.fit(train_steps=1, dataset=tf.data.Dataset.from_tensors((x, y)))
    accumulating = LinearSGD(global_batch_size=8, gradient_accumulation_steps=2, **strategy)
    halves = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    accumulating.fit(train_steps=1, dataset=halves)
    np.testing.assert_array_equal(accumulating.model.kernel.numpy(), np.ones((3, 1)))  # not yet
    accumulating.fit(train_steps=2)
    for a, b in zip(big.model.trainable_variables, accumulating.model.trainable_variables):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-6, atol=1e-6)
    assert int(accumulating.optimizer.iterations.numpy()) == 1


@pytest.mark.parametrize("replicas", [1, 2])
def test_clipping_bounds_the_global_batch_gradient_norm(replicas):
    x, y = _rows(16)
    strategy = {"strategy": "mirrored", "cpu_replicas": 2} if replicas == 2 else {}
    trainer = LinearSGD(global_batch_size=16, clip_global_norm=0.01, **strategy)
    trainer.fit(train_steps=1, dataset=tf.data.Dataset.from_tensors((x, y)))
    kernel, bias = (v.numpy() for v in trainer.model.trainable_variables)
    moved = np.sqrt(np.sum((kernel - 1.0) ** 2) + np.sum(bias ** 2))
    assert moved == pytest.approx(0.1 * 0.01, rel=1e-4)  # learning rate × clip norm


# ------------------------------------------------------------------ evaluation and callbacks


def test_evaluation_is_written_beside_training_metrics(tmp_path):
    trainer = RegressionTrainer(model_dir=str(tmp_path))
    trainer.fit(train_steps=60, steps_per_loop=10, eval_every_steps=25, eval_steps=3)
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [30, 50, 60]
    assert all(np.isfinite(r["loss"]) for r in evals)
    assert len([r for r in records if r["split"] == "train"]) == 6


def test_user_callbacks_see_every_hook_in_order():
    calls = []

    class Recorder(tapekit.Callback):
        def on_train_begin(self, step):
            calls.append(("begin", step))

        def on_loop_end(self, step, logs):
            calls.append(("loop", step, "loss" in logs))

        def on_eval_end(self, step, logs):
            calls.append(("eval", step))

        def on_train_end(self, step, logs):
            calls.append(("end", step))

    RegressionTrainer().fit(train_steps=20, steps_per_loop=10, eval_every_steps=20,
                            callbacks=[Recorder()])
    assert calls == [("begin", 0), ("loop", 10, True), ("loop", 20, True), ("eval", 20),
                     ("end", 20)]


def test_early_stopping_stops_when_the_metric_plateaus():
    stopper = EarlyStopping("loss", patience=3, min_delta=1e-3)
    trainer = RegressionTrainer(model="linear", learning_rate=1e-9)  # the loss cannot move
    history = trainer.fit(train_steps=1000, steps_per_loop=10, callbacks=[stopper])
    assert len(history) == 4 and stopper.stopped_at == 40 and trainer.current_step == 40


# ------------------------------------------------------------------ bad input


class FixedInput(Unshuffled):
    """An MLP built for 5 features, fed whatever `arrays` holds (Unshuffled's input and step)."""

    def __init__(self, arrays, **kwargs):
        super().__init__(global_batch_size=32, **kwargs)
        self.arrays = arrays

    def build(self):
        self.model = MLP(hidden_units=4, output_units=1)
        self.model.build((None, 5))
        self.optimizer = keras.optimizers.SGD(0.1)


def test_data_of_the_wrong_shape_fails_before_the_first_step():
    trainer = FixedInput((np.zeros((64, 3), np.float32), np.zeros((64, 1), np.float32)))
    with pytest.raises(tapekit.TapekitError) as raised:
        trainer.fit(train_steps=5)
    message = str(raised.value)
    assert "cannot run on this data: batches are (float32[32, 3], float32[32, 1])" in message
    assert "expected axis -1 of input shape to have value 5" in message  # what the model expects
    assert "\n" not in message
    assert trainer.current_step == 0


def test_data_of_the_wrong_dtype_fails_before_the_first_step():
    trainer = FixedInput((np.array([["a"] * 5] * 64), np.zeros((64, 1), np.float32)))
    with pytest.raises(tapekit.TapekitError, match=r"batches are \(string\[32, 5\], float32\[32, 1\]\)"):
        trainer.fit(train_steps=5)
    assert trainer.current_step == 0


def _snapshot(directory):
    return {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))
            if (directory / name).is_file()}


def test_a_checkpoint_of_another_model_is_refused_with_the_mismatches(tmp_path):
    RegressionTrainer(model="linear", model_dir=str(tmp_path)).fit(train_steps=20, steps_per_loop=10)
    before = _snapshot(tmp_path / "checkpoints")
    other = RegressionTrainer(model="mlp", model_dir=str(tmp_path))
    with pytest.raises(tapekit.TapekitError) as raised:
        other.fit(train_steps=40)
    message = str(raised.value)
    assert "does not fit this trainer" in message and "mismatches" in message
    assert "model/w in the checkpoint is not in this trainer" in message
    assert "missing from the checkpoint" in message
    assert _snapshot(tmp_path / "checkpoints") == before


def test_a_checkpoint_with_other_shapes_is_refused(tmp_path):
    RegressionTrainer(model="mlp", hidden_units=10, model_dir=str(tmp_path)).fit(
        train_steps=10, steps_per_loop=10)
    with pytest.raises(tapekit.TapekitError, match=r"has shape \[5, 10\] in the checkpoint, \[5, 7\] here"):
        RegressionTrainer(model="mlp", hidden_units=7, model_dir=str(tmp_path)).fit(train_steps=20)


def test_a_truncated_checkpoint_is_named_left_alone_and_an_older_one_restores(tmp_path):
    RegressionTrainer(model_dir=str(tmp_path), checkpoint_every_steps=10).fit(
        train_steps=20, steps_per_loop=10)
    checkpoints = tmp_path / "checkpoints"
    damaged = checkpoints / "ckpt-20.data-00000-of-00001"
    damaged.write_bytes(damaged.read_bytes()[:7])
    with pytest.raises(tapekit.TapekitError) as raised:
        RegressionTrainer(model_dir=str(tmp_path)).fit(train_steps=30)
    message = str(raised.value)
    assert str(damaged) in message and "--restore_from=" in message and "ckpt-10" in message
    assert damaged.read_bytes() and len(damaged.read_bytes()) == 7

    restarted = RegressionTrainer(model_dir=str(tmp_path), restore_from=str(checkpoints / "ckpt-10"))
    restarted.fit(train_steps=30, steps_per_loop=10)
    assert restarted.current_step == 30
    (aside,) = [d for d in os.listdir(checkpoints) if d.startswith("set_aside-")]
    assert len((checkpoints / aside / damaged.name).read_bytes()) == 7  # kept, not overwritten
    assert tf.train.latest_checkpoint(checkpoints).endswith("ckpt-30")


def test_restore_from_a_path_that_is_not_a_checkpoint(tmp_path):
    with pytest.raises(tapekit.TapekitError, match="is not a checkpoint"):
        RegressionTrainer(restore_from=str(tmp_path / "nothing-here"))


def test_model_dir_that_is_a_file_or_unwritable_fails_before_training(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    with pytest.raises(tapekit.TapekitError, match="is a file, not a directory"):
        RegressionTrainer(model_dir=str(afile))
    with pytest.raises(tapekit.TapekitError, match="cannot write to model_dir"):
        RegressionTrainer(model_dir=str(afile / "below"))
    with pytest.raises(tapekit.TapekitError, match="cannot write to model_dir"):
        RegressionTrainer(model_dir="/proc/tapekit-cannot-write-here")
    assert afile.read_text() == "keep me"


def test_data_that_runs_out_stops_cleanly_at_the_last_step_and_checkpoints_it(tmp_path, caplog):
    x, y = _rows(23 * 8)
    trainer = LinearSGD(global_batch_size=8, model_dir=str(tmp_path))
    history = trainer.fit(train_steps=100, steps_per_loop=10,
                          dataset=tf.data.Dataset.from_tensor_slices((x, y)).batch(8))
    assert trainer.current_step == 23
    assert [h["step"] for h in history] == [10, 20, 23]
    assert "the training data ran out: 3 of this loop's 10 steps ran" in caplog.text
    assert tf.train.latest_checkpoint(tmp_path / "checkpoints").endswith("ckpt-23")
