"""Any tf.data pipeline trains, checkpoints and resumes: Python generators and py_function too."""

import logging

import keras
import numpy as np
import pytest
import tensorflow as tf

import tapekit

NUM_EXAMPLES = 300


def _examples(seed):
    """A seeded Python generator of (features, target) pairs: the same stream every time."""
    def generate():
        rng = np.random.default_rng(seed)
        for _ in range(NUM_EXAMPLES):
            x = rng.standard_normal(3).astype(np.float32)
            yield x, np.float32(x @ np.array([1.0, -2.0, 0.5], np.float32))
    return generate


class GeneratorInput(tapekit.Trainer):
    """Linear regression fed by `tf.data.Dataset.from_generator` (+ a `py_function`)."""

    default_global_batch_size = 20

    def __init__(self, use_py_function=False, **kwargs):
        super().__init__(**kwargs)
        self.use_py_function = use_py_function

    def build(self):
        self.model = keras.layers.Dense(1)
        self.optimizer = keras.optimizers.SGD(0.05)

    def train_dataset(self, input_context):
        examples = tf.data.Dataset.from_generator(
            _examples(self.seed), output_signature=(tf.TensorSpec([3], tf.float32),
                                                    tf.TensorSpec([], tf.float32)))
        if self.use_py_function:
            examples = examples.map(lambda x, y: (x, tf.py_function(lambda t: t * 1.0, [y], tf.float32)))
            examples = examples.map(lambda x, y: (x, tf.ensure_shape(y, [])))
        return tapekit.per_replica_batches(examples, input_context, self.global_batch_size)

    def train_step(self, batch):
        x, y = batch
        with tf.GradientTape() as tape:
            loss = self.compute_loss(tf.square(y[:, None] - self.model(x)))
        self.apply_gradients(tape, loss, self.model, self.optimizer)
        return {"loss": loss}


@pytest.mark.parametrize("use_py_function", [False, True])
def test_a_generator_pipeline_checkpoints_and_resumes_exactly(use_py_function, tmp_path, caplog):
    kwargs = dict(use_py_function=use_py_function, seed=3)
    whole = GeneratorInput(**kwargs)
    whole.fit(train_steps=40, steps_per_loop=5)
    # 25 steps is mid-epoch (15 steps per epoch); a checkpoint every 5 steps
    first = GeneratorInput(model_dir=str(tmp_path), checkpoint_every_steps=5, **kwargs)
    with caplog.at_level(logging.INFO, logger="absl"):
        first.fit(train_steps=25, steps_per_loop=5)
    assert "iterator cannot be checkpointed" in caplog.text
    assert tf.train.latest_checkpoint(str(tmp_path / "checkpoints")).endswith("ckpt-25")
    resumed = GeneratorInput(model_dir=str(tmp_path), **kwargs)
    resumed.fit(train_steps=40, steps_per_loop=5)
    for a, b in zip(whole.model.variables, resumed.model.variables):
        np.testing.assert_array_equal(b.numpy(), a.numpy())
    assert whole.history[-1]["loss"] < 0.1 * whole.history[0]["loss"]
