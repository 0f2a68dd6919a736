"""What users set is what they get (issue 28): each setting a user of Keras, Orbit or
Lightning reaches for does what it says, or is refused in one line."""

import glob
import os

import keras
import numpy as np
import tensorflow as tf

import tapekit
from tapekit.images import image_grid

from test_visuals import _events


class Sampling(tapekit.Trainer):
    """A regression whose `sample_images` draws fresh noise each call, and counts calls."""

    default_global_batch_size = 8

    def __init__(self, **options):
        super().__init__(**options)
        self.sample_calls = []

    def build(self):
        self.model = keras.layers.Dense(1)
        self.optimizer = keras.optimizers.SGD(0.1)

    def train_arrays(self):
        x = np.linspace(-1, 1, 64, dtype=np.float32).reshape(-1, 1)
        return x, 2 * x

    def train_step(self, batch):
        x, y = batch
        with tf.GradientTape() as tape:
            loss = self.compute_loss(tf.square(y - self.model(x)))
        self.apply_gradients(tape, loss, self.model, self.optimizer)
        return {"loss": loss}

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
