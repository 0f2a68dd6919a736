"""tapekit.compiled.build: the trainer is built by a real trace of its step; errors name the user's line."""

import os
import threading

import keras
import numpy as np
import pytest
import tensorflow as tf

import tapekit
from tapekit.compiled import build

HERE = os.path.basename(__file__)


class ActivityRegularized(keras.layers.Layer):
    """Adds an activity penalty with add_loss inside call (Keras 3 style)."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(units)

    def call(self, x):
        y = self.dense(x)
        self.add_loss(0.01 * tf.reduce_mean(tf.square(y)))
        return y


class Base(tapekit.Trainer):
    default_global_batch_size = 32

    def build(self):
        self.model = keras.Sequential([ActivityRegularized(8), keras.layers.Dense(1)])
        self.optimizer = keras.optimizers.Adam(0.01)

    def train_dataset(self, input_context):
        rng = np.random.default_rng(0)
        x = rng.standard_normal((256, 4)).astype(np.float32)
        y = x.sum(axis=1, keepdims=True)
        return tapekit.per_replica_batches(tf.data.Dataset.from_tensor_slices((x, y)),
                                           input_context, self.global_batch_size)


class AddLossStep(Base):
    def train_step(self, batch):
        x, y = batch
        with tf.GradientTape() as tape:
            prediction = self.model(x, training=True)
            penalty = tf.add_n(self.model.losses)  # empty in a symbolic probe: fails there
            loss = self.compute_loss(tf.square(y - prediction), regularization_losses=[penalty])
        self.apply_gradients(tape, loss, self.model, self.optimizer)
        return {"loss": loss, "penalty": penalty}


def test_add_loss_in_call_is_seen_when_the_trainer_is_built():
    history = AddLossStep().fit(train_steps=20, steps_per_loop=10)
    assert all(loop["penalty"] > 0 for loop in history)
    assert history[-1]["loss"] < history[0]["loss"]


@pytest.mark.parametrize("replicas", [1, 2])
def test_an_error_in_the_step_names_the_users_line_not_the_data(replicas):
    class Buggy(Base):
        def train_step(self, batch):
            x, y = batch
            wrong = tf.reshape(x, [7, -1])  # 32 × 4 values do not make rows of 7
            return {"loss": self.compute_loss(tf.square(wrong))}

    strategy = dict(strategy="mirrored", cpu_replicas=2) if replicas == 2 else {}
    with pytest.raises(tapekit.TapekitError) as raised:
        Buggy(**strategy).fit(train_steps=5)
    message = str(raised.value)
    assert message.startswith("train_step raised ")
    assert f"{HERE}:" in message and "tf.reshape(x, [7, -1])" in message
    assert "cannot run on this data" not in message and "\n" not in message


def test_an_optimizer_called_directly_and_a_metric_updated_in_the_step_are_recorded():
    class Direct(Base):
        def build(self):
            super().build()
            self.mean_error = keras.metrics.MeanAbsoluteError(name="mae")
            self.unused = keras.metrics.Mean(name="unused")

        def train_step(self, batch):
            x, y = batch
            with tf.GradientTape() as tape:
                prediction = self.model(x, training=True)
                loss = tf.reduce_mean(tf.square(y - prediction))
            gradients = tape.gradient(loss, self.model.trainable_variables)
            self.optimizer.apply_gradients(zip(gradients, self.model.trainable_variables))
            self.mean_error.update_state(y, prediction)
            return {"loss": loss}

    trainer = Direct()
    history = trainer.fit(train_steps=10, steps_per_loop=10)
    assert set(history[0]) == {"step", "loss", "mae", "steps_per_sec", "examples_per_sec"}
    assert int(trainer.optimizer.iterations.numpy()) == 10
    assert trainer.optimizer.built


def test_an_optimizer_held_twice_is_recorded_once():
    class Twice(AddLossStep):
        def build(self):
            super().build()
            self.optimizers = {"model": self.optimizer}

    trainer = Twice()
    trainer.fit(train_steps=2, steps_per_loop=2)
    assert int(trainer.optimizer.iterations.numpy()) == 2
    assert "apply_gradients" not in vars(trainer.optimizer)  # the stub is gone


def test_tracing_changes_no_state():
    trainer = AddLossStep()
    trainer._engine.ensure_built()
    assert trainer.current_step == 0
    assert int(trainer.optimizer.iterations.numpy()) == 0
    assert all(np.all(v.numpy() == 0) for v in trainer.optimizer.variables[2:])  # slots


def test_explain_blames_the_data_only_for_input_errors():
    spec = (tf.TensorSpec([32, 3], tf.float32),)
    incompatible = ValueError('Input 0 of layer "dense" is incompatible with the layer: '
                              "expected axis -1 of input shape to have value 5")
    assert build.explain(incompatible, "train_step", spec).startswith(
        "train_step cannot run on this data: batches are float32[32, 3]")
    mine = ValueError("expected a positive temperature\n\nArguments received by Scaled.call():\n"
                      "  • x=tf.Tensor(shape=(32, 2), dtype=float32)")
    assert build.explain(mine, "train_step", spec).startswith(
        "train_step raised ValueError: expected a positive temperature.")
    other = ZeroDivisionError("division by zero")
    assert build.explain(other, "eval_step", spec).startswith(
        "eval_step raised ZeroDivisionError: division by zero")


class MeetsAnotherBuild(Base):
    """Waits, inside its first trace (the build), until the other trainer's build has also
    recorded its update: both builds are then in progress at once."""

    def __init__(self, barrier, **kwargs):
        self.barrier = barrier
        super().__init__(**kwargs)

    def train_step(self, batch):
        x, y = batch
        with tf.GradientTape() as tape:
            loss = self.compute_loss(tf.square(y - self.model(x, training=True)))
        self.apply_gradients(tape, loss, self.model, self.optimizer)
        if not self.barrier.broken:
            try:
                self.barrier.wait(timeout=30)
            except threading.BrokenBarrierError:
                pass
            self.barrier.abort()  # later traces (the loop's) do not wait
        return {"loss": loss}


def test_two_trainers_building_in_two_threads_do_not_see_each_other():
    """What a build trace records lives in a context of its own, not in a module global
    that the second build would reset under the first."""
    barrier = threading.Barrier(2)
    trainers = [MeetsAnotherBuild(barrier, progress="none") for _ in range(2)]
    errors = []

    def fit(trainer):
        try:
            trainer.fit(2, steps_per_loop=2)
        except Exception as error:  # noqa: BLE001 - reported by the assert below
            errors.append(error)

    threads = [threading.Thread(target=fit, args=(trainer,)) for trainer in trainers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    assert [trainer.current_step for trainer in trainers] == [2, 2]
    assert all(int(trainer.optimizer.iterations.numpy()) == 2 for trainer in trainers)
