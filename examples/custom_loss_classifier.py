"""A classifier trained with a hand-written loss: focal loss on two interleaved spirals.

    .venv/bin/tapekit-train --trainer=examples.custom_loss_classifier:FocalLossClassifier \\
        --eval_every_steps=500

Focal loss (Lin et al. 2017), FL = −(1 − p_t)^γ · log p_t with p_t the probability of the
true class, scales down the loss of points already classified with confidence, so training
concentrates on the hard ones (here: where the spiral arms meet, near the centre).
γ = 0 is plain cross-entropy. The data is synthetic and seeded; nothing is downloaded.
"""

import keras
import numpy as np
import tensorflow as tf
from absl import flags

import tapekit
from tapekit.models import MLP

NUM_CLASSES = 2


def two_spirals(seed: int, num_examples: int, turns: float,
                noise: float) -> "tuple[np.ndarray, np.ndarray]":
    """x float32 [n, 2], y int32 [n]: class c lies on the arm r = t, angle 2π·turns·t + cπ
    (t ~ U[0.1, 1]), plus N(0, noise²) jitter. Deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_CLASSES, num_examples)
    t = rng.uniform(0.1, 1.0, num_examples)
    angle = 2 * np.pi * turns * t + np.pi * labels
    points = np.stack([t * np.cos(angle), t * np.sin(angle)], axis=1)
    points += noise * rng.standard_normal(points.shape)
    return points.astype(np.float32), labels.astype(np.int32)


def focal_loss(labels, logits, gamma: float):
    """Per-example focal loss [batch] from integer labels [batch] and logits [batch, classes].

    Computed from log-softmax: log p_t is exact for confident predictions, and 1 − p_t is
    taken as −expm1(log p_t) (no cancellation near p_t = 1).
    """
    log_probabilities = tf.nn.log_softmax(tf.cast(logits, tf.float32))
    log_p_true = tf.gather(log_probabilities, labels, batch_dims=1)
    # The floor keeps the gradient of (1 − p)^γ finite at p = 1 when γ < 1.
    one_minus_p = tf.maximum(-tf.math.expm1(log_p_true), 1e-12)
    return -tf.pow(one_minus_p, gamma) * log_p_true


class FocalLossClassifier(tapekit.Trainer):
    """Two-spiral classification with an MLP (two ReLU layers) and focal loss, Adam.

    Trains on `num_examples` points and evaluates (`eval_step`, `--eval_every_steps`) on
    `num_eval_examples` other points of the same distribution. Steps return `loss` and
    `accuracy`.
    """

    default_global_batch_size = 100
    default_learning_rate = 0.01

    def __init__(self, focal_gamma: float = 2.0, hidden_units: int = 64,
                 num_examples: int = 2000, num_eval_examples: int = 1000,
                 spiral_turns: float = 1.5, spiral_noise: float = 0.05, **kwargs):
        if focal_gamma < 0:
            raise tapekit.TapekitError(f"focal_gamma must be at least 0, got {focal_gamma}.")
        self.focal_gamma = focal_gamma
        self.hidden_units = hidden_units
        super().__init__(**kwargs)
        x, y = two_spirals(self.seed, num_examples + num_eval_examples, spiral_turns,
                           spiral_noise)
        self.train_examples = (x[:num_examples], y[:num_examples])
        self.eval_examples = (x[num_examples:], y[num_examples:])
        for name, (examples, _) in (("num_examples", self.train_examples),
                                    ("num_eval_examples", self.eval_examples)):
            if len(examples) < self.global_batch_size:
                raise tapekit.TapekitError(
                    f"{name}={len(examples)} is less than one global batch "
                    f"({self.global_batch_size}); raise it or lower --global_batch_size.")

    @classmethod
    def define_flags(cls):
        flags.DEFINE_float("focal_gamma", 2.0, "γ of the focal loss; 0 is cross-entropy.",
                           lower_bound=0.0)
        flags.DEFINE_integer("hidden_units", 64, "Units of each of the two hidden layers.",
                             lower_bound=1)
        flags.DEFINE_integer("num_examples", 2000, "Training points.", lower_bound=1)
        flags.DEFINE_integer("num_eval_examples", 1000, "Held-out points for evaluation.",
                             lower_bound=1)
        flags.DEFINE_float("spiral_turns", 1.5, "Turns of each spiral arm (more is harder).",
                           lower_bound=0.0)
        flags.DEFINE_float("spiral_noise", 0.05, "Standard deviation of the points' jitter.",
                           lower_bound=0.0)

    def build(self):
        self.model = MLP([self.hidden_units] * 2, output_units=NUM_CLASSES, activation="relu",
                         name="classifier")
        self.optimizer = keras.optimizers.Adam(self.learning_rate)

    def train_dataset(self, input_context):
        examples = tf.data.Dataset.from_tensor_slices(self.train_examples)
        return tapekit.per_replica_batches(examples, input_context, self.global_batch_size,
                                           shuffle_buffer_size=len(self.train_examples[0]),
                                           seed=self.seed)

    def eval_dataset(self, input_context):
        examples = tf.data.Dataset.from_tensor_slices(self.eval_examples)
        return tapekit.per_replica_batches(examples, input_context, self.global_batch_size,
                                           repeat=False)

    def train_step(self, batch):
        """Traced, per replica. batch: points [b, 2] float32, labels [b] int32."""
        points, labels = batch
        with tf.GradientTape() as tape:
            logits = self.model(points, training=True)
            loss = self.compute_loss(focal_loss(labels, logits, self.focal_gamma))
        self.apply_gradients(tape, loss, self.model, self.optimizer)
        return {"loss": loss, "accuracy": self._accuracy(labels, logits)}

    def eval_step(self, batch):
        """Traced, per replica, no updates: the same metrics on held-out points."""
        points, labels = batch
        logits = self.model(points, training=False)
        return {"loss": self.compute_loss(focal_loss(labels, logits, self.focal_gamma)),
                "accuracy": self._accuracy(labels, logits)}

    def _accuracy(self, labels, logits):
        correct = tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), labels)
        return self.compute_loss(tf.cast(correct, tf.float32))  # the global-batch mean

    def results_summary(self):
        accuracies = []
        for points, labels in (self.train_examples, self.eval_examples):
            logits = self.model(points, training=False)
            accuracies.append(float(np.mean(np.argmax(logits, axis=-1) == labels)))
        return (f"Accuracy: {accuracies[0]:.3f} on the training points, {accuracies[1]:.3f} on "
                f"held-out points (focal loss, gamma {self.focal_gamma:g})")

    def export_model(self):
        return self.model, [tf.TensorSpec([None, 2], tf.float32, name="points")]
