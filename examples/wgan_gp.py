"""WGAN-GP (Gulrajani et al. 2017) on a ring of Gaussians: several critic updates and a
gradient penalty from a nested tape, all inside one train_step.

    .venv/bin/tapekit-train --trainer=examples.wgan_gp:WGANGPTrainer --train_steps=5000

(about 20 s on two CPU cores; the summary then reports all 8 modes covered).

The critic D is trained to maximise D(real) − D(fake) with the penalty
λ·(‖∇ₓD(x̂)‖ − 1)² at points x̂ between real and generated samples (its gradient with
respect to x̂ comes from an inner tape, recorded by the critic's outer tape), and takes
`critic_steps` updates per generator update. All randomness (noise, interpolation
weights) comes from the input pipeline, a stateless function of (seed, example index), so
runs are deterministic and resume exactly.
"""

import math

import keras
import numpy as np
import tensorflow as tf
from absl import flags

import tapekit
from tapekit.models import MLP

# Stateless seed of the fixed noise behind results_summary and sample_histograms.
_SAMPLE_SEED = (4242, 0)


def ring_of_gaussians(seed: int, num_examples: int, modes: int, radius: float,
                      stddev: float) -> np.ndarray:
    """float32 [num_examples, 2]: equal mixture of N(centre_k, stddev²·I), centres evenly on a
    circle of `radius`. Deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    angles = 2 * np.pi * rng.integers(0, modes, num_examples) / modes
    centres = radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return (centres + stddev * rng.standard_normal((num_examples, 2))).astype(np.float32)


class WGANGPTrainer(tapekit.Trainer):
    """A WGAN-GP: ReLU MLP generator (noise → 2-D point) and critic (2-D point → score).

    Each example of the input pipeline carries what one training step needs per row:
    `critic_steps` real points, `critic_steps + 1` noise vectors and `critic_steps`
    interpolation weights; critic update i uses slice i, the generator update the last noise
    slice. Both use Adam(learning_rate, beta_1=0.5, beta_2=0.9), the paper's betas.
    """

    default_global_batch_size = 64
    default_learning_rate = 5e-4  # the paper's 1e-4 needs far more steps than a demo runs

    def __init__(self, critic_steps: int = 5, gradient_penalty_weight: float = 10.0,
                 noise_dim: int = 8, hidden_units: int = 128, modes: int = 8,
                 ring_radius: float = 2.0, mode_stddev: float = 0.1, num_examples: int = 8192,
                 **kwargs):
        if critic_steps < 1 or gradient_penalty_weight < 0:
            raise tapekit.TapekitError(
                f"critic_steps must be at least 1 and gradient_penalty_weight at least 0, got "
                f"{critic_steps} and {gradient_penalty_weight}.")
        self.critic_steps = critic_steps
        self.gradient_penalty_weight = gradient_penalty_weight
        self.noise_dim = noise_dim
        self.hidden_units = hidden_units
        self.centres = ring_radius * np.array(
            [[math.cos(2 * math.pi * k / modes), math.sin(2 * math.pi * k / modes)]
             for k in range(modes)], dtype=np.float32)
        self.ring_radius, self.mode_stddev = ring_radius, mode_stddev
        super().__init__(**kwargs)
        self.real = ring_of_gaussians(self.seed, num_examples, modes, ring_radius, mode_stddev)

    @classmethod
    def define_flags(cls):
        flags.DEFINE_integer("critic_steps", 5, "Critic updates per generator update (the "
                             "paper's n_critic), all in one training step.", lower_bound=1)
        flags.DEFINE_float("gradient_penalty_weight", 10.0, "λ of the penalty "
                           "λ·(‖∇D(x̂)‖ − 1)².", lower_bound=0.0)
        flags.DEFINE_integer("noise_dim", 8, "Size of the generator's noise input.",
                             lower_bound=1)
        flags.DEFINE_integer("hidden_units", 128, "Units of each of the two hidden layers of "
                             "both networks.", lower_bound=1)
        flags.DEFINE_integer("modes", 8, "Gaussians on the ring.", lower_bound=1)
        flags.DEFINE_float("ring_radius", 2.0, "Radius of the ring of Gaussians.")
        flags.DEFINE_float("mode_stddev", 0.1, "Standard deviation of each Gaussian.",
                           lower_bound=0.0)
        flags.DEFINE_integer("num_examples", 8192, "How many real points.", lower_bound=1)

    def build(self):
        self.generator = MLP([self.hidden_units] * 2, output_units=2, activation="relu",
                             name="generator")
        self.critic = MLP([self.hidden_units] * 2, output_units=1, activation="relu",
                          name="critic")
        self.generator_optimizer = keras.optimizers.Adam(self.learning_rate, beta_1=0.5,
                                                         beta_2=0.9)
        self.critic_optimizer = keras.optimizers.Adam(self.learning_rate, beta_1=0.5,
                                                      beta_2=0.9)

    def train_dataset(self, input_context):
        steps, noise_dim, seed, block = self.critic_steps, self.noise_dim, self.seed, 256
        # Rows of `critic_steps` real points; reshuffled every epoch.
        real = (tf.data.Dataset.from_tensor_slices(self.real)
                .shuffle(len(self.real), seed=seed).repeat().batch(steps, drop_remainder=True))

        def random_block(k):
            # Block k (of 256 examples) from stateless seeds: the same rows at the same step
            # however the batch is split across replicas.
            noise = tf.random.stateless_normal([block, steps + 1, noise_dim],
                                               seed=tf.stack([seed, 2 * k]))
            mix = tf.random.stateless_uniform([block, steps, 1], seed=tf.stack([seed, 2 * k + 1]))
            return noise, mix

        randomness = tf.data.Dataset.counter().map(random_block).unbatch()
        examples = tf.data.Dataset.zip((real, randomness)).map(
            lambda points, random: (points, random[0], random[1]))
        return tapekit.per_replica_batches(examples, input_context, self.global_batch_size,
                                           repeat=False)

    def train_step(self, batch):
        """Traced, per replica. batch: real [b, critic_steps, 2], noise [b, critic_steps + 1,
        noise_dim], mix [b, critic_steps, 1] (interpolation weights in [0, 1))."""
        real, noise, mix = batch
        generator, critic = self.generator, self.critic
        critic_losses, penalties, distances = [], [], []
        for i in range(self.critic_steps):  # unrolled: critic_steps updates in one step
            real_i = real[:, i]
            fake_i = tf.stop_gradient(tf.cast(generator(noise[:, i], training=True), tf.float32))
            between = mix[:, i] * real_i + (1.0 - mix[:, i]) * fake_i
            with tf.GradientTape() as critic_tape:
                with tf.GradientTape() as penalty_tape:
                    penalty_tape.watch(between)
                    critic_between = tf.cast(critic(between, training=True), tf.float32)
                # Each score depends on its own row only: this is ∇D at every x̂.
                gradient = penalty_tape.gradient(critic_between, between)
                # + 1e-12: the norm's gradient is finite even at a zero gradient.
                norm = tf.sqrt(tf.reduce_sum(tf.square(gradient), axis=1) + 1e-12)
                penalty = tf.square(norm - 1.0)
                critic_real = tf.cast(critic(real_i, training=True), tf.float32)[:, 0]
                critic_fake = tf.cast(critic(fake_i, training=True), tf.float32)[:, 0]
                critic_loss = self.compute_loss(
                    critic_fake - critic_real + self.gradient_penalty_weight * penalty)
            self.apply_gradients(critic_tape, critic_loss, critic, self.critic_optimizer)
            critic_losses.append(critic_loss)
            penalties.append(self.compute_loss(penalty))
            distances.append(self.compute_loss(critic_real - critic_fake))
        with tf.GradientTape() as generator_tape:
            fake = generator(noise[:, self.critic_steps], training=True)
            generator_loss = self.compute_loss(-tf.cast(critic(fake, training=True), tf.float32))
        self.apply_gradients(generator_tape, generator_loss, generator, self.generator_optimizer)
        return {"critic_loss": tf.add_n(critic_losses) / self.critic_steps,
                "gradient_penalty": tf.add_n(penalties) / self.critic_steps,
                "wasserstein_estimate": tf.add_n(distances) / self.critic_steps,
                "generator_loss": generator_loss}

    def sample(self, num_samples: int = 2000) -> np.ndarray:
        """Generated points [num_samples, 2] for fixed noise. Eager."""
        noise = tf.random.stateless_normal([num_samples, self.noise_dim], seed=_SAMPLE_SEED)
        return tf.cast(self.generator(noise, training=False), tf.float32).numpy()

    def results_summary(self):
        samples = self.sample()
        distances = np.linalg.norm(samples[:, None, :] - self.centres[None], axis=-1)
        nearest = distances.argmin(axis=1)
        close = distances.min(axis=1) < 4 * max(self.mode_stddev, 0.05)
        # A mode is covered when at least a quarter of its fair share of samples sits on it.
        counts = np.bincount(nearest[close], minlength=len(self.centres))
        covered = int((counts >= 0.25 * len(samples) / len(self.centres)).sum())
        radius = np.linalg.norm(samples, axis=1)
        return (f"Generated points: radius {radius.mean():.3f} ± {radius.std():.3f} (real "
                f"{self.ring_radius:.3f}), {close.mean():.0%} within 4σ of a mode, "
                f"{covered}/{len(self.centres)} modes covered")

    def sample_histograms(self):
        return {"generated_radius": np.linalg.norm(self.sample(), axis=1),
                "real_radius": np.linalg.norm(self.real, axis=1)}

    def export_model(self):
        return self.generator, [tf.TensorSpec([None, self.noise_dim], tf.float32, name="noise")]
