"""The seed article's toy GAN, working: two tapes, two optimizers, Keras models that own variables."""

from typing import Optional

import keras
import numpy as np
import tensorflow as tf
from absl import flags

import tapekit
from tapekit.models import GAN, Discriminator, Generator
from tapekit.trainers import datasets


class GANTrainer(tapekit.Trainer):
    """A GAN on 1-D "real" samples (the seed's N(0, 1) by default, or `data`'s array `x`).

    Each step updates the generator and the discriminator simultaneously from one forward
    pass, each with its own tape and Adam optimizer (binary cross-entropy on logits). The
    noise is part of the input pipeline (stateless, seeded by example index), so a run is
    the same whatever the number of replicas and can be resumed exactly.
    """

    default_global_batch_size = 64
    default_learning_rate = 1e-3

    def __init__(self, model: str = "dense", data: Optional[str] = None, real_mean: float = 0.0,
                 real_stddev: float = 1.0, num_examples: int = 1024, noise_dim: int = 10,
                 hidden_units: int = 10, **kwargs):
        if model != "dense":
            raise tapekit.TapekitError(f"model must be 'dense' for this GAN, got {model!r}.")
        self.noise_dim = noise_dim
        self.hidden_units = hidden_units
        self.real_mean, self.real_stddev = real_mean, real_stddev
        super().__init__(**kwargs)
        if data:
            self.arrays = datasets.load_npz(data, ("x",))
        else:
            self.arrays = datasets.gaussian_samples(self.seed, num_examples, real_mean, real_stddev)
        datasets.require_examples(self.arrays, self.global_batch_size, data)

    @classmethod
    def define_flags(cls):
        flags.DEFINE_enum("model", "dense", ["dense"], "dense: the seed's 10-unit ReLU networks.")
        flags.DEFINE_string("data", None, ".npz file with array x [n, d] of real samples; "
                            "unset: samples of N(--real_mean, --real_stddev²).")
        flags.DEFINE_float("real_mean", 0.0, "Mean of the synthetic real samples.")
        flags.DEFINE_float("real_stddev", 1.0, "Standard deviation of the synthetic real samples.",
                           lower_bound=0.0)
        flags.DEFINE_integer("num_examples", 1024, "How many synthetic real samples.", lower_bound=1)
        flags.DEFINE_integer("noise_dim", 10, "Size of the generator's noise input.", lower_bound=1)
        flags.DEFINE_integer("hidden_units", 10, "Hidden units of each network.", lower_bound=1)

    def build(self):
        data_dim = self.arrays["x"].shape[-1]
        self.gan = GAN(Generator(self.hidden_units, data_dim, name="generator"),
                       Discriminator(self.hidden_units, name="discriminator"),
                       noise_dim=self.noise_dim, name="gan")
        self.generator_optimizer = keras.optimizers.Adam(self.learning_rate)
        self.discriminator_optimizer = keras.optimizers.Adam(self.learning_rate)

    def train_dataset(self, input_context):
        real = tf.data.Dataset.from_tensor_slices(self.arrays["x"])
        real = real.shuffle(len(self.arrays["x"]), seed=self.seed).repeat()
        # Noise block k (of 1024 rows) is drawn from the stateless seed (seed, k): the same
        # rows at the same step however the batch is split, and cheap (one op per block).
        seed, noise_dim, block = self.seed, self.noise_dim, 1024
        noise = tf.data.Dataset.counter().map(
            lambda k: tf.random.stateless_normal([block, noise_dim], seed=tf.stack([seed, k]))
        ).unbatch()
        return tapekit.per_replica_batches(tf.data.Dataset.zip((real, noise)), input_context,
                                           self.global_batch_size, repeat=False)

    def train_step(self, batch):
        real, noise = batch
        generator, discriminator = self.gan.generator, self.gan.discriminator
        with tf.GradientTape() as generator_tape, tf.GradientTape() as discriminator_tape:
            fake = generator(noise, training=True)
            # logits in float32 whatever the precision policy: losses are computed in float32
            real_logits = tf.cast(discriminator(real, training=True), tf.float32)
            fake_logits = tf.cast(discriminator(fake, training=True), tf.float32)
            generator_loss = self.compute_loss(_bce(tf.ones_like(fake_logits), fake_logits))
            discriminator_loss = (
                self.compute_loss(_bce(tf.ones_like(real_logits), real_logits))
                + self.compute_loss(_bce(tf.zeros_like(fake_logits), fake_logits)))
        self.apply_gradients(generator_tape, generator_loss, generator, self.generator_optimizer)
        self.apply_gradients(discriminator_tape, discriminator_loss, discriminator,
                             self.discriminator_optimizer)
        return {"generator_loss": generator_loss, "discriminator_loss": discriminator_loss,
                "generated_mean": tf.reduce_mean(tf.cast(fake, tf.float32))}

    def sample(self, num_samples: int = 10000, seed: int = 12345) -> np.ndarray:
        """Generator samples for fixed noise (eager)."""
        noise = tf.random.stateless_normal([num_samples, self.noise_dim], seed=[seed, 0])
        return tf.cast(self.gan.generator(noise, training=False), tf.float32).numpy()

    def results_summary(self):
        samples = self.sample()
        real = self.arrays["x"]
        return (f"Generated samples: mean {samples.mean():.3f}, stddev {samples.std():.3f} "
                f"(real data: mean {real.mean():.3f}, stddev {real.std():.3f})")


def _bce(labels, logits):
    return tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits)
