"""What users set is what they get (issue 28): each setting a user of Keras, Orbit or
Lightning reaches for does what it says, or is refused in one line."""

import glob
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import tapekit
from tapekit.errors import TapekitError
from tapekit.images import image_grid

from small_trainers import Unshuffled
from test_visuals import _events


class Sampling(Unshuffled):
    """Unshuffled's regression on 64 in-memory rows, whose `sample_images` draws fresh noise
    each call and counts the calls."""

    default_global_batch_size = 8
    default_learning_rate = 0.1

    def __init__(self, **options):
        super().__init__(**options)
        self.sample_calls = []

    def train_arrays(self):
        x = np.linspace(-1, 1, 64, dtype=np.float32).reshape(-1, 1)
        return x, 2 * x

    def sample_images(self, num_images):
        self.sample_calls.append(self.current_step)
        return np.random.default_rng().random((num_images, 4, 4, 1))  # new noise each call


def test_sample_images_is_called_once_per_sampling_step_for_the_png_and_tensorboard(tmp_path):
    trainer = Sampling(model_dir=str(tmp_path), sample_every_steps=10, progress="none")
    trainer.fit(train_steps=30, steps_per_loop=5)
    assert trainer.sample_calls == [10, 20, 30]
    pngs = sorted(glob.glob(str(tmp_path / "samples" / "*.png")))
    assert [os.path.basename(p) for p in pngs] == [f"step_0000{s}.png" for s in (10, 20, 30)]
    shown = {step: tf.io.decode_png(tensor[2]).numpy()
             for step, _, tensor in _events(tmp_path / "summaries" / "train")["samples"]}
    assert sorted(shown) == [10, 20, 30]
    for step, path in zip((10, 20, 30), pngs):  # the same noise in both
        np.testing.assert_array_equal(tf.io.decode_png(tf.io.read_file(path)).numpy(),
                                      shown[step])
    assert shown[10].shape == image_grid(np.zeros((16, 4, 4, 1))).shape


def test_initial_weights_depend_only_on_the_seed_not_on_trainers_made_before_fit():
    first, second = Sampling(seed=7, progress="none"), Sampling(seed=7, progress="none")
    Sampling(seed=1, progress="none").fit(train_steps=1, steps_per_loop=1)  # draws meanwhile
    first.fit(train_steps=5, steps_per_loop=5)
    second.fit(train_steps=5, steps_per_loop=5)
    for a, b in zip(first.model.weights, second.model.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    alone = Sampling(seed=7, progress="none")
    alone.fit(train_steps=5, steps_per_loop=5)
    np.testing.assert_array_equal(alone.model.kernel.numpy(), first.model.kernel.numpy())


class Prune(Exception):
    """A control-flow exception of the user's own, as a sweep raises to prune a trial."""


class RaisesInStep(Sampling):
    def __init__(self, raised, **options):
        super().__init__(**options)
        self.raised = raised

    def train_step(self, batch):
        raise self.raised


@pytest.mark.parametrize("run_eagerly", [False, True], ids=["compiled", "eager"])
def test_an_exception_of_the_users_own_class_in_the_step_reaches_fit_as_itself(run_eagerly):
    raised = Prune("from the step")
    trainer = RaisesInStep(raised, run_eagerly=run_eagerly, progress="none")
    with pytest.raises(Prune) as error:
        trainer.fit(train_steps=4, steps_per_loop=2)
    assert error.value is raised


def test_a_builtin_error_in_a_compiled_step_is_still_explained_in_one_line():
    trainer = RaisesInStep(ValueError("a bug"), progress="none")
    with pytest.raises(TapekitError, match=r"train_step raised ValueError at .*a bug"):
        trainer.fit(train_steps=4, steps_per_loop=2)


def test_an_optuna_study_prunes_trials_through_a_tapekit_callback(tmp_path):
    optuna = pytest.importorskip("optuna")

    class ReportToTrial(tapekit.Callback):
        def __init__(self, trial):
            self.trial = trial

        def on_loop_end(self, step, logs):
            self.trial.report(logs["loss"], step)
            if self.trial.should_prune():
                raise optuna.TrialPruned(f"loss {logs['loss']:.3g} at step {step}")

    def objective(trial):
        learning_rate = trial.suggest_categorical("learning_rate", [0.1, 1e-4])
        trainer = Sampling(model_dir=str(tmp_path / str(trial.number)), progress="none",
                           learning_rate=learning_rate, checkpoint_every_steps=100)
        history = trainer.fit(train_steps=40, steps_per_loop=10,
                              callbacks=[ReportToTrial(trial)])
        return history[-1]["loss"]

    study = optuna.create_study(
        sampler=optuna.samplers.GridSampler({"learning_rate": [0.1, 1e-4]}),
        pruner=optuna.pruners.ThresholdPruner(upper=0.5, n_warmup_steps=15))
    study.optimize(objective, n_trials=2)
    states = {trial.params["learning_rate"]: trial.state for trial in study.trials}
    assert states == {0.1: optuna.trial.TrialState.COMPLETE,
                      1e-4: optuna.trial.TrialState.PRUNED}  # recorded as pruned, not failed
    pruned = next(t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED)
    assert max(pruned.intermediate_values) == 20  # the first check past warm-up
    # the loop it was pruned after was saved first, as any stop between loops is
    assert os.path.exists(tmp_path / str(pruned.number) / "checkpoints" / "ckpt-20.index")


HOOKED = '''\
from tapekit.trainers import RegressionTrainer


class Hooked(RegressionTrainer):
    def sample_images(self, num_images):
        raise ValueError("a bug in a hook")
'''


def test_the_command_line_still_prints_one_line_for_a_users_exception(tmp_path):
    from helpers import run_cli
    (tmp_path / "hooked_trainer.py").write_text(HOOKED)
    result = run_cli(["--trainer=hooked_trainer:Hooked", f"--model_dir={tmp_path / 'run'}",
                      "--train_steps=20", "--steps_per_loop=10", "--sample_every_steps=10",
                      "--progress=none"], cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if "error:" in line]
    assert line.startswith("tapekit-train: error: ValueError at hooked_trainer.py:6")
    assert "a bug in a hook (raised between loops at step 10; saved checkpoint" in line
    assert os.path.exists(tmp_path / "run" / "checkpoints" / "ckpt-10.index")


class Rollouts(tapekit.Trainer):
    """A step that makes its own data: noisy points drawn from `self.rng` each step, kept
    in a replay buffer of variables that the step writes (as an RL or PINN step does)."""

    def build(self):
        self.model = keras.layers.Dense(1)
        self.model.build((None, 1))
        self.optimizer = keras.optimizers.Adam(0.05)
        self.buffer = tf.Variable(tf.zeros([32, 2]), trainable=False)
        self.filled = tf.Variable(0, dtype=tf.int64, trainable=False)

    def _points(self):
        x = self.rng.uniform([16, 1], -1.0, 1.0)
        return x, 3.0 * x + 2.0 + 0.1 * self.rng.normal([16, 1])

    def train_step(self):
        x, y = self._points()
        # A whole-variable assign: on several replicas it is aggregated (their mean), so
        # every replica's copy stays the one a checkpoint holds; a sliced assign would not.
        fresh = tf.concat([x, y], 1)
        first = tf.equal(self.filled % 2, 0)
        self.buffer.assign(tf.where(first, tf.concat([fresh, self.buffer[16:]], 0),
                                    tf.concat([self.buffer[:16], fresh], 0)))
        self.filled.assign_add(1)
        replay = self.buffer[:tf.minimum(self.filled, 2) * 16]
        with tf.GradientTape() as tape:
            loss = self.compute_loss(tf.square(replay[:, 1:] - self.model(replay[:, :1])))
        self.apply_gradients(tape, loss, self.model, self.optimizer)
        return {"loss": loss, "buffer_step": tf.cast(self.global_step, tf.float32)}

    def eval_step(self):
        x, y = self._points()
        return {"loss": self.compute_loss(tf.square(y - self.model(x)))}


def _state(trainer):
    return [v.numpy() for v in trainer.model.weights + trainer.optimizer.variables
            + [trainer.buffer, trainer.filled]] + [trainer.rng.state.numpy()]


@pytest.mark.parametrize("replicas", [1, 2])
def test_a_step_that_makes_its_own_data_trains_checkpoints_and_resumes_bit_for_bit(
        tmp_path, replicas):
    # On 2 replicas each draws its own points; the buffer (a float variable made from a
    # tensor, no dtype named) is averaged over them, so its copies stay the checkpoint's.
    options = dict(seed=4, progress="none", checkpoint_every_steps=20, deterministic=True,
                   strategy="mirrored" if replicas == 2 else "default", cpu_replicas=replicas)
    whole = Rollouts(model_dir=str(tmp_path / "whole"), **options)
    history = whole.fit(train_steps=60, steps_per_loop=20)
    assert history[0]["buffer_step"] == 9.5  # global_step inside a step: steps done before it
    assert history[-1]["loss"] < history[0]["loss"]
    stopped = Rollouts(model_dir=str(tmp_path / "parts"), **options)
    stopped.fit(train_steps=20, steps_per_loop=20)
    resumed = Rollouts(model_dir=str(tmp_path / "parts"), **options)  # a new process would
    assert resumed.fit(train_steps=60, steps_per_loop=20)[0]["step"] == 40
    for a, b in zip(_state(whole), _state(resumed)):
        np.testing.assert_array_equal(a, b)
    metrics = resumed.evaluate(steps=3)
    assert set(metrics) == {"loss"} and np.isfinite(metrics["loss"])
    with pytest.raises(TapekitError, match="makes its own data, which has no end: give"):
        resumed.evaluate()


def test_a_step_without_a_batch_given_input_is_refused_in_one_line():
    class Confused(Rollouts):
        def train_arrays(self):
            return np.zeros([64, 1], np.float32)

    with pytest.raises(TapekitError, match=r"train_step takes no batch, but the trainer is "
                                           r"given input \(train_dataset or train_arrays"):
        Confused(progress="none").fit(train_steps=2, steps_per_loop=1)
    with pytest.raises(TapekitError, match="has no epochs"):
        Rollouts(progress="none").fit(train_epochs=1)
