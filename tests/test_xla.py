"""--jit_compile on two CPU replicas: XLA up to the gradients, the updates after it."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tapekit
from tapekit.trainers import GANTrainer, RegressionTrainer

TWO = dict(strategy="mirrored", cpu_replicas=2, progress="none")
# XLA fuses and reorders float operations: the same numbers up to float32 rounding
RTOL, ATOL = 1e-5, 1e-6
TIMINGS = ("step", "steps_per_sec", "examples_per_sec")


def _weights(trainer):
    model = trainer.gan if hasattr(trainer, "gan") else trainer.model
    return [v.numpy() for v in model.weights]


class _Normalized(tapekit.Trainer):
    """Dense + BatchNormalization, and a keras.metrics.Mean the step updates: Keras
    variables a step writes in its forward pass, which on several replicas are mirrored.
    (No Dropout: XLA's random kernels draw other numbers than TensorFlow's, on one replica
    as on several.)"""

    default_global_batch_size = 16

    def build(self):
        self.model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8),
                                       keras.layers.BatchNormalization(), keras.layers.Dense(1)])
        self.optimizer = keras.optimizers.SGD(0.05)
        self.mean_output = keras.metrics.Mean(name="mean_output")

    def train_arrays(self):
        x = np.random.default_rng(0).standard_normal((64, 4)).astype(np.float32)
        return x, x[:, :1] * 2.0

    def train_step(self, batch):
        x, y = batch
        with tf.GradientTape() as tape:
            predicted = self.model(x, training=True)
            loss = self.compute_loss(tf.square(predicted - y))
        self.apply_gradients(tape, loss, self.model, self.optimizer)
        self.mean_output.update_state(predicted)
        return {"loss": loss}


@pytest.mark.parametrize("trainer_class, kwargs", [
    (RegressionTrainer, {"model": "mlp"}),  # the seed MLP: one optimizer
    (GANTrainer, {}),  # the seed GAN: two tapes and two optimizers in one step
    (_Normalized, {}),  # Keras variables written in the forward pass
])
def test_xla_on_two_replicas_gives_the_numbers_of_the_run_without_it(trainer_class, kwargs):
    runs = {}
    for jit in (False, True):
        trainer = trainer_class(jit_compile=jit, **TWO, **kwargs)
        runs[jit] = trainer, trainer.fit(train_steps=100, steps_per_loop=50)
    (plain, plain_rows), (compiled, compiled_rows) = runs[False], runs[True]
    # compiled with XLA: one trace per replica of the part up to the gradients
    assert compiled._engine.train_loop._measured_step._compiled.experimental_get_tracing_count() == 2
    assert [row["step"] for row in compiled_rows] == [50, 100]
    for row, compiled_row in zip(plain_rows, compiled_rows):
        for name in set(row) - set(TIMINGS):
            np.testing.assert_allclose(compiled_row[name], row[name], rtol=RTOL, atol=ATOL,
                                       err_msg=name)
    for a, b in zip(_weights(plain), _weights(compiled)):
        np.testing.assert_allclose(b, a, rtol=RTOL, atol=ATOL)
    if trainer_class is _Normalized:  # the moving statistics moved, alike on both replicas
        moving = compiled.model.layers[1].moving_mean
        assert not np.allclose(moving.numpy(), 0.0)
        replicas = [v.numpy() for v in compiled.strategy.experimental_local_results(moving.value)]
        np.testing.assert_array_equal(replicas[0], replicas[1])


class _Sequential(tapekit.Trainer):
    """A GAN-like step that updates one model, then runs it again (a sequential update)."""

    default_global_batch_size = 8

    def build(self):
        self.first = keras.layers.Dense(1)
        self.second = keras.layers.Dense(1)
        self.first_optimizer = keras.optimizers.SGD(0.1)
        self.second_optimizer = keras.optimizers.SGD(0.1)

    def train_arrays(self):
        x = np.linspace(-1, 1, 32, dtype=np.float32).reshape(16, 2)
        return x, x[:, :1]

    def train_step(self, batch):
        x, y = batch
        with tf.GradientTape() as tape:
            first_loss = self.compute_loss(tf.square(self.first(x) - y))
        self.apply_gradients(tape, first_loss, self.first, self.first_optimizer)
        with tf.GradientTape() as tape:  # reads self.first after its update
            second_loss = self.compute_loss(tf.square(self.second(self.first(x)) - y))
        self.apply_gradients(tape, second_loss, self.second, self.second_optimizer)
        return {"loss": second_loss}


class _Direct(_Sequential):
    def train_step(self, batch):
        x, y = batch
        with tf.GradientTape() as tape:
            loss = self.compute_loss(tf.square(self.first(x) - y))
        gradients = tape.gradient(loss, self.first.trainable_variables)
        self.first_optimizer.apply_gradients(zip(gradients, self.first.trainable_variables))
        return {"loss": loss}


def test_what_xla_on_two_replicas_cannot_compile_is_one_error_before_step_1():
    trainer = _Sequential(jit_compile=True, **TWO)
    with pytest.raises(tapekit.TapekitError, match=r"reads .*dense.*kernel.* after an "
                       r"apply_gradients that updates it \(a sequential update\)"):
        trainer.fit(train_steps=4, steps_per_loop=2)
    assert trainer.current_step == 0
    _Sequential(**TWO).fit(train_steps=4, steps_per_loop=2)  # trains without XLA
    _Sequential(jit_compile=True, progress="none").fit(train_steps=4, steps_per_loop=2)  # 1 replica

    direct = _Direct(jit_compile=True, **TWO)
    with pytest.raises(tapekit.TapekitError, match=r"optimizer.apply_gradients called "
                       r"directly \(use self.apply_gradients"):
        direct.fit(train_steps=4, steps_per_loop=2)
    assert direct.current_step == 0
