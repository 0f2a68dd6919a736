"""tapekit.checkpoint.state: a checkpoint holds every variable the trainer owns, Keras-untracked ones too."""

import gc
import logging as python_logging

import keras
import numpy as np
import pytest
import tensorflow as tf

import tapekit
from tapekit.checkpoint import state


class Everything(tapekit.Trainer):
    """Dropout, BatchNorm, a SeedGenerator, a keras metric and two models in a list."""

    default_global_batch_size = 16

    def build(self):
        self.model = keras.Sequential([keras.layers.Dense(8), keras.layers.BatchNormalization(),
                                       keras.layers.Dropout(0.5), keras.layers.Dense(1)])
        self.heads = [keras.layers.Dense(1), keras.layers.Dense(1)]
        self.noise = keras.random.SeedGenerator(3)
        self.error = keras.metrics.MeanSquaredError(name="mse")
        self.optimizer = keras.optimizers.Adam(0.01)

    def train_dataset(self, input_context):
        rng = np.random.default_rng(0)
        x = rng.standard_normal((160, 4)).astype(np.float32)
        y = x[:, :1] - x[:, 1:2]
        return tapekit.per_replica_batches(tf.data.Dataset.from_tensor_slices((x, y)),
                                           input_context, self.global_batch_size,
                                           shuffle_buffer_size=160, seed=self.seed)

    def train_step(self, batch):
        x, y = batch
        x = x + 0.01 * keras.random.normal(tf.shape(x), seed=self.noise)
        with tf.GradientTape() as tape:
            hidden = self.model(x, training=True)
            prediction = hidden + self.heads[0](hidden) + self.heads[1](hidden)
            loss = self.compute_loss(tf.square(y - prediction))
        self.apply_gradients(tape, loss, [self.model] + self.heads, self.optimizer)
        self.error.update_state(y, prediction)
        return {"loss": loss}


def _all_variables(trainer):
    return [v for owner in (trainer.model, *trainer.heads, trainer.error, trainer.optimizer)
            for v in owner.variables] + [trainer.noise.state]


def test_a_restored_trainer_holds_every_variable_of_the_saved_one(tmp_path):
    saved = Everything(model_dir=str(tmp_path), seed=1)
    saved.fit(train_steps=12, steps_per_loop=6)
    path = tf.train.latest_checkpoint(str(tmp_path / "checkpoints"))
    names = [name for name, _ in tf.train.list_variables(path)]
    assert any("seed_generator_state" in name for name in names)
    restored = Everything(seed=2)  # other initial weights and seeds
    assert restored.restore(path) == 12
    pairs = list(zip(_all_variables(saved), _all_variables(restored)))
    assert len(pairs) > 20
    for a, b in pairs:
        np.testing.assert_array_equal(b.numpy(), a.numpy(), err_msg=a.path)
    # the Dropout layer's and the trainer's seed generators moved on, and were restored
    assert all(int(v.numpy()[1]) > 0 for v in restored.model.variables if "seed" in v.path)


def test_coverage_check_names_a_variable_the_checkpoint_would_miss():
    owned = {"model": keras.layers.Dense(1), "counter": tf.Variable(1.0, name="counter")}
    owned["model"].build((None, 2))
    objects = state.checkpoint_objects(owned)
    state.check_coverage(owned, objects)  # all saved
    del objects["counter"]
    with pytest.raises(tapekit.TapekitError, match=r"1 variable\(s\) would not be saved in "
                                                   r"checkpoints: counter: counter"):
        state.check_coverage(owned, objects)


def test_restore_warns_about_nothing(tmp_path, caplog):
    class FromGenerator(Everything):
        """One replica, tf.data: the checkpoint also holds the input iterator."""

    FromGenerator(model_dir=str(tmp_path)).fit(train_steps=6, steps_per_loop=6)
    restored = FromGenerator(model_dir=str(tmp_path))
    with caplog.at_level(python_logging.WARNING):
        restored.restore()
        del restored
        gc.collect(1)  # the restore status is young: no full collection needed
    assert "could not be found" not in caplog.text
    assert "train_iterator" not in caplog.text


def test_dict_attributes_with_any_keys_are_saved(tmp_path):
    class Heads(Everything):
        def build(self):
            super().build()
            self.by_index = {0: keras.layers.Dense(1), 1: keras.layers.Dense(1)}
            for layer in self.by_index.values():
                layer.build((None, 1))

    Heads(model_dir=str(tmp_path)).fit(train_steps=2, steps_per_loop=2)
    names = [name for name, _ in tf.train.list_variables(
        tf.train.latest_checkpoint(str(tmp_path / "checkpoints")))]
    assert any(name.startswith("by_index/value/0/") for name in names)


class UnsynchronizedBatchNorm(tapekit.Trainer):
    """Replicas see different examples (unshuffled rows of growing scale)."""

    default_global_batch_size = 8

    def build(self):
        self.model = keras.Sequential([keras.layers.Dense(4), keras.layers.BatchNormalization(),
                                       keras.layers.Dense(1)])
        self.optimizer = keras.optimizers.SGD(0.01)

    def _examples(self):
        rng = np.random.default_rng(0)
        x = rng.normal(size=(64, 3)) * np.linspace(0.1, 3, 64)[:, None]
        return tf.data.Dataset.from_tensor_slices((x.astype(np.float32),
                                                   rng.normal(size=(64, 1)).astype(np.float32)))

    def train_dataset(self, input_context):
        return tapekit.per_replica_batches(self._examples(), input_context, self.global_batch_size)

    def eval_dataset(self, input_context):
        return tapekit.per_replica_batches(self._examples(), input_context,
                                           self.global_batch_size, repeat=False)

    def train_step(self, batch):
        x, y = batch
        with tf.GradientTape() as tape:
            loss = self.compute_loss(tf.square(self.model(x, training=True) - y))
        self.apply_gradients(tape, loss, self.model, self.optimizer)
        return {"loss": loss}

    def eval_step(self, batch):
        x, y = batch
        return {"loss": self.compute_loss(tf.square(self.model(x) - y))}


def test_batchnorm_statistics_stay_one_value_on_two_replicas(tmp_path):
    trainer = UnsynchronizedBatchNorm(strategy="mirrored", cpu_replicas=2, model_dir=str(tmp_path))
    trainer.fit(train_steps=8, steps_per_loop=8)
    batch_norm = trainer.model.layers[1]
    for variable in (batch_norm.moving_mean, batch_norm.moving_variance):
        first, second = trainer.strategy.experimental_local_results(variable.value)
        np.testing.assert_array_equal(second.numpy(), first.numpy())
    assert float(batch_norm.moving_mean.numpy().std()) > 0  # it did move
    saved_path = tf.train.latest_checkpoint(str(tmp_path / "checkpoints"))
    saved_statistics = [v.numpy() for v in (batch_norm.moving_mean, batch_norm.moving_variance)]
    saved_evaluation = trainer.evaluate()
    trainer.fit(train_steps=16, steps_per_loop=8)  # moves on past the checkpoint at step 8
    assert not np.array_equal(batch_norm.moving_mean.numpy(), saved_statistics[0])
    assert trainer.evaluate()["loss"] != saved_evaluation["loss"]
    # A fresh trainer (other initial weights) restored from step 8 holds step 8's statistics,
    # one value on both replicas, and evaluates as the trainer did then.
    restored = UnsynchronizedBatchNorm(strategy="mirrored", cpu_replicas=2, seed=1)
    assert restored.restore(saved_path) == 8
    restored_norm = restored.model.layers[1]
    for variable, saved in zip((restored_norm.moving_mean, restored_norm.moving_variance),
                               saved_statistics):
        for local in restored.strategy.experimental_local_results(variable.value):
            np.testing.assert_array_equal(local.numpy(), saved)
    assert restored.evaluate() == saved_evaluation
