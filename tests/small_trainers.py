"""Tiny trainers shared by several test files."""

import keras
import numpy as np
import tensorflow as tf

import tapekit


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


class LinearSGD(Unshuffled):
    """A linear model under plain SGD (update size proportional to the gradient); data
    comes through fit(dataset=...), the MSE step is Unshuffled's."""

    default_global_batch_size = 32

    def build(self):
        self.model = keras.layers.Dense(1, kernel_initializer="ones", bias_initializer="zeros")
        self.model.build((None, 3))
        self.optimizer = keras.optimizers.SGD(0.1)


def rows(count):
    """`count` rows of x [count, 3] and y = x·(0.5, −2, 3) + 1, seeded."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((count, 3)).astype(np.float32)
    return x, (x @ np.array([[0.5], [-2.0], [3.0]], np.float32) + 1.0).astype(np.float32)
