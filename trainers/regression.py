"""Mean-squared-error regression: the seed article's examples 1 (linear) and 2 (sigmoid MLP)."""

from typing import Optional

import keras
import numpy as np
import tensorflow as tf
from absl import flags

import tapekit
from tapekit.models import MLP, LinearRegression
from tapekit.trainers import datasets


class RegressionTrainer(tapekit.Trainer):
    """Fits `y ≈ model(x)` by MSE.

    `model="linear"` is the seed's example 1 (SGD, default learning rate 0.1, 1000 points of
    y = 3x + 2 + noise); `model="mlp"` is example 2 (5 → hidden sigmoid → 1, Adam 0.01,
    100 uniform random points). `data` names an .npz with arrays `x` and `y` instead (held
    in memory), or a glob of TFRecord files with features `x` and `y` (read per worker).
    """

    default_global_batch_size = 100

    def __init__(self, model: str = "linear", data: Optional[str] = None,
                 hidden_units: int = 10, **kwargs):
        if model not in ("linear", "mlp"):
            raise tapekit.TapekitError(f"model must be 'linear' or 'mlp', got {model!r}.")
        super().__init__(**kwargs)
        self.model_name = model
        self.data_path = data
        self.hidden_units = hidden_units
        self.default_learning_rate = 0.1 if model == "linear" else 0.01
        self.files = self.arrays = None
        if datasets.is_file_pattern(data):
            self.files = datasets.FileData(data, ("x", "y"))
            return
        if data:
            self.arrays = datasets.load_npz(data, ("x", "y"))
        elif model == "linear":
            self.arrays = datasets.seed_linear(self.seed)
        else:
            self.arrays = datasets.seed_mlp(self.seed)
        datasets.require_examples(self.arrays, self.global_batch_size, data)

    @classmethod
    def define_flags(cls):
        flags.DEFINE_enum("model", "linear", ["linear", "mlp"],
                          "linear: y = xw + b (SGD); mlp: one sigmoid hidden layer (Adam).")
        flags.DEFINE_string("data", None, ".npz file with arrays x [n, d] and y [n, k], or a "
                            "glob of TFRecord files of tf.train.Example with features x and y "
                            "(tapekit-data npz-to-tfrecord); unset: the seed article's "
                            "synthetic data.")
        flags.DEFINE_integer("hidden_units", 10, "Hidden units of --model=mlp.", lower_bound=1)

    def build(self):
        output_units = self._shape("y")[-1]
        if self.model_name == "linear":
            self.model = LinearRegression(output_units=output_units, name="linear")
            self.optimizer = keras.optimizers.SGD(self.learning_rate)
        else:
            self.model = MLP(hidden_units=self.hidden_units, output_units=output_units,
                             activation="sigmoid", name="mlp")
            self.optimizer = keras.optimizers.Adam(self.learning_rate)

    def train_arrays(self):
        # In memory: tapekit keeps them on the devices and batches them inside the loop.
        return None if self.files else (self.arrays["x"], self.arrays["y"])

    def _shape(self, name):
        return self.files.shapes[name] if self.files else self.arrays[name].shape[1:]

    def train_dataset(self, input_context):
        if self.files:  # each worker reads its own files
            return tapekit.per_replica_batches(
                self.files.examples(input_context), input_context, self.global_batch_size,
                shuffle_buffer_size=10_000, seed=self.seed, already_sharded=True)
        examples = tf.data.Dataset.from_tensor_slices((self.arrays["x"], self.arrays["y"]))
        return tapekit.per_replica_batches(
            examples, input_context, self.global_batch_size,
            shuffle_buffer_size=len(self.arrays["x"]), seed=self.seed)

    def train_step(self, batch):
        x, y = batch
        with tf.GradientTape() as tape:
            prediction = tf.cast(self.model(x, training=True), tf.float32)  # float32 under mixed precision
            loss = self.compute_loss(tf.square(y - prediction))
        self.apply_gradients(tape, loss, self.model, self.optimizer)
        return {"loss": loss}

    def eval_dataset(self, input_context):
        # One pass over the examples in order (the seed workloads have no held-out set).
        if self.files:
            return tapekit.per_replica_batches(self.files.examples(input_context), input_context,
                                               self.global_batch_size, repeat=False,
                                               already_sharded=True)
        examples = tf.data.Dataset.from_tensor_slices((self.arrays["x"], self.arrays["y"]))
        return tapekit.per_replica_batches(examples, input_context, self.global_batch_size,
                                           repeat=False)

    def eval_step(self, batch):
        x, y = batch
        prediction = tf.cast(self.model(x, training=False), tf.float32)
        return {"loss": self.compute_loss(tf.square(y - prediction))}

    def results_summary(self):
        if self.model_name == "linear":
            w = np.array2string(self.model.w.numpy().ravel(), precision=4)
            b = np.array2string(self.model.b.numpy().ravel(), precision=4)
            return f"Learned w: {w}, Learned b: {b}"
        if self.history:
            first, last = self.history[0]["loss"], self.history[-1]["loss"]
            return f"MLP loss: {first:.5f} (first loop) -> {last:.5f} (last loop)"
        return None

    def export_model(self):
        """The fitted model, served on x [batch, input_dim] float32. Eager."""
        input_dim = self._shape("x")[-1]
        return self.model, [tf.TensorSpec([None, input_dim], tf.float32, name="x")]
