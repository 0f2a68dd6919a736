"""A CNN image classifier written as the tutorials write it, on tapekit.

    .venv/bin/tapekit-train --trainer=examples.shapes_classifier:ShapesClassifier \\
        --train_steps=300 --eval_every_steps=100 --model_dir=/tmp/shapes

What it shows, beside the TensorFlow "Convolutional Neural Network" tutorial and Keras'
"Writing a training loop from scratch":

* BatchNormalization, Dropout and L2 kernel regularization in a plain `keras.Sequential`;
  the penalties (`model.losses`) go to `compute_loss(..., regularization_losses=...)`.
* `keras.metrics.SparseCategoricalAccuracy` objects created in `build()` and updated in the
  steps: tapekit resets them at every loop and evaluation and reports them by name
  (`train_accuracy`, `eval_accuracy`), exactly over every example on any number of replicas.
* `compute_mean` for a per-example quantity (`accuracy`), exact in the same way; the
  held-out set ends in a partial batch and `evaluate()` counts every image once.
* A checkpoint holds everything, the Dropout layer's seed-generator state and BatchNorm's
  moving statistics included, so with `--deterministic` a stopped run resumes bit for bit,
  and on several replicas every replica draws its own Dropout mask.
* `BatchNormalization(synchronized=True)` normalizes with the statistics of the global batch,
  so 1 and N replicas train the same model.

The data is procedural (bars and squares, seeded); nothing is downloaded.
"""

import keras
import numpy as np
import tensorflow as tf
from absl import flags
from keras import layers, ops

import tapekit

IMAGE_SIZE = 12
NUM_SHAPES = 4  # horizontal bar, vertical bar, filled square, hollow square


def shape_images(seed: int, num_examples: int, size: int = IMAGE_SIZE, noise: float = 0.1):
    """Images float32 [n, size, size, 1] in [0, 1] and labels int32 [n].

    Label 0: a horizontal bar, 1: a vertical bar, 2: a filled square, 3: a hollow square, each
    at a random position and size, plus Gaussian pixel noise of standard deviation `noise`
    (clipped to [0, 1]). Deterministic in `seed`.
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_SHAPES, num_examples).astype(np.int32)
    images = np.zeros((num_examples, size, size), np.float32)
    for index, label in enumerate(labels):
        if label < 2:  # a bar: long side 5..size-2, 2 pixels thick
            length = rng.integers(5, size - 1)
            start, offset = rng.integers(0, size - length + 1), rng.integers(0, size - 1)
            long, thick = slice(start, start + length), slice(offset, offset + 2)
            images[index][(thick, long) if label == 0 else (long, thick)] = 1.0
        else:  # a square: side 4..7, filled or a 1-pixel frame
            side = rng.integers(4, 8)
            top, left = rng.integers(0, size - side + 1, 2)
            images[index, top:top + side, left:left + side] = 1.0
            if label == 3:
                images[index, top + 1:top + side - 1, left + 1:left + side - 1] = 0.0
    images += noise * rng.standard_normal(images.shape).astype(np.float32)
    return np.clip(images, 0.0, 1.0)[..., None], labels


class ShapesClassifier(tapekit.Trainer):
    """Classifies 12×12 images of four shapes with a small CNN (see the module docstring).

    Steps return `loss` and `accuracy`; the keras metrics add `train_accuracy` (per loop) and
    `eval_accuracy` (per evaluation). `dropout_rate=0` switches the step's randomness off.
    """

    default_global_batch_size = 32

    def __init__(self, dropout_rate: float = 0.25, l2: float = 1e-4, num_examples: int = 800,
                 num_eval_examples: int = 256, **kwargs):
        self.dropout_rate = dropout_rate
        self.l2 = l2
        super().__init__(**kwargs)
        x, y = shape_images(self.seed, num_examples + num_eval_examples)
        x = 2.0 * x - 1.0  # pixels in [-1, 1]
        self.train_examples = (x[:num_examples], y[:num_examples])
        self.eval_examples = (x[num_examples:], y[num_examples:])

    @classmethod
    def define_flags(cls):
        flags.DEFINE_float("dropout_rate", 0.25, "Dropout before the last layer (0: none).",
                           lower_bound=0.0, upper_bound=0.99)
        flags.DEFINE_float("l2", 1e-4, "L2 penalty of the kernels.", lower_bound=0.0)
        flags.DEFINE_integer("num_examples", 800, "Training images.", lower_bound=1)
        flags.DEFINE_integer("num_eval_examples", 256, "Held-out images.", lower_bound=1)

    def build(self):
        regularizer = keras.regularizers.L2(self.l2)
        self.model = keras.Sequential([
            keras.Input(shape=(IMAGE_SIZE, IMAGE_SIZE, 1)),
            layers.Conv2D(8, 3, use_bias=False, kernel_regularizer=regularizer),
            # Statistics of the global batch: 1 and N replicas train the same model.
            layers.BatchNormalization(synchronized=True),
            layers.Activation("relu"),
            layers.MaxPooling2D(),
            layers.Conv2D(16, 3, activation="relu", kernel_regularizer=regularizer),
            layers.GlobalAveragePooling2D(),
            layers.Dropout(self.dropout_rate),
            layers.Dense(NUM_SHAPES, kernel_regularizer=regularizer),
        ], name="cnn")
        self.loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
        self.optimizer = keras.optimizers.Adam(self.learning_rate)
        self.train_accuracy = keras.metrics.SparseCategoricalAccuracy(name="train_accuracy")
        self.eval_accuracy = keras.metrics.SparseCategoricalAccuracy(name="eval_accuracy")

    def train_arrays(self):
        # In memory: tapekit keeps the images on the devices and batches them in the loop.
        return self.train_examples

    def eval_dataset(self, input_context):
        # One pass over the held-out images; the last batch may be partial (still exact).
        examples = tf.data.Dataset.from_tensor_slices(self.eval_examples)
        return tapekit.per_replica_batches(examples, input_context, self.global_batch_size,
                                           repeat=False)

    def train_step(self, batch):
        images, labels = batch
        with tf.GradientTape() as tape:
            logits = self.model(images, training=True)
            loss = self.compute_loss(self.loss_fn(labels, logits),
                                     regularization_losses=self.model.losses)
        self.apply_gradients(tape, loss, self.model, self.optimizer)
        self.train_accuracy.update_state(labels, logits)
        return {"loss": loss, "accuracy": self._accuracy(labels, logits)}

    def eval_step(self, batch):
        images, labels = batch
        logits = self.model(images, training=False)
        self.eval_accuracy.update_state(labels, logits)
        return {"loss": self.compute_loss(self.loss_fn(labels, logits)),
                "accuracy": self._accuracy(labels, logits)}

    def _accuracy(self, labels, logits):
        correct = ops.equal(ops.argmax(logits, axis=-1), ops.cast(labels, "int64"))
        return self.compute_mean(ops.cast(correct, "float32"))

    def results_summary(self):
        logits = self.model(self.eval_examples[0], training=False)
        accuracy = float(np.mean(np.argmax(logits, axis=-1) == self.eval_examples[1]))
        return f"Held-out accuracy: {accuracy:.3f} on {len(self.eval_examples[1])} images"

    def export_model(self):
        return self.model, [tf.TensorSpec([None, IMAGE_SIZE, IMAGE_SIZE, 1], tf.float32,
                                          name="images")]
