"""Keras randomness under tapekit: different on every replica, reproducible, resumed exactly."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tapekit

FEATURES = 16


class Noisy(tapekit.Trainer):
    """Each step returns what replica 0 and replica 1 drew: a Dropout mask, a
    `keras.random.normal` draw from a SeedGenerator, and a draw from `self.rng`."""

    default_global_batch_size = 4

    def build(self):
        self.dropout = keras.layers.Dropout(0.5, seed=7)
        self.seed_generator = keras.random.SeedGenerator(11)
        self.model = keras.layers.Dense(1)
        self.optimizer = keras.optimizers.SGD(0.01)

    def train_dataset(self, input_context):
        ones = tf.data.Dataset.from_tensors(tf.ones([FEATURES])).repeat()
        return tapekit.per_replica_batches(ones, input_context, self.global_batch_size)

    def train_step(self, x):
        mask = self.dropout(x, training=True)  # the same ones on every replica: only the mask differs
        noise = keras.random.normal([FEATURES], seed=self.seed_generator)
        draw = self.rng.normal([FEATURES])
        with tf.GradientTape() as tape:
            loss = self.compute_loss(tf.square(self.model(mask)))
        self.apply_gradients(tape, loss, self.model, self.optimizer)
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        metrics = {}
        for name, value in (("mask", mask[0]), ("noise", noise), ("rng", draw)):
            # A fingerprint of what this replica drew, reported per replica: the loop averages
            # over replicas, so replica r reports its value × N at slot r and 0 elsewhere.
            fingerprint = tf.reduce_sum(value * tf.range(1.0, FEATURES + 1.0))
            for slot in range(2):
                metrics[f"{name}_{slot}"] = tf.where(
                    tf.equal(replica, slot), fingerprint * self.num_replicas, 0.0)
        return metrics


def test_every_replica_draws_its_own_dropout_mask_keras_noise_and_rng_numbers():
    trainer = Noisy(strategy="mirrored", cpu_replicas=2, seed=1)
    (loop,) = trainer.fit(train_steps=1, steps_per_loop=1)
    for name in ("mask", "noise", "rng"):
        assert loop[f"{name}_0"] != 0.0 and loop[f"{name}_1"] != 0.0
        assert loop[f"{name}_0"] != loop[f"{name}_1"], name


def test_replica_draws_are_reproducible_from_the_seed():
    first, second = (Noisy(strategy="mirrored", cpu_replicas=2, seed=1).fit(
        train_steps=3, steps_per_loop=3)[0] for _ in range(2))
    drawn = [name for name in first if not name.endswith("_sec")]
    assert len(drawn) == 7  # step, and three fingerprints on two replicas
    assert {name: first[name] for name in drawn} == {name: second[name] for name in drawn}


def test_one_replica_draws_what_keras_draws_without_tapekit():
    """With one replica the seeds are Keras' own: tapekit changes nothing."""
    trainer = Noisy(seed=1)
    (loop,) = trainer.fit(train_steps=1, steps_per_loop=1)
    expected = keras.random.normal([FEATURES], seed=keras.random.SeedGenerator(11))
    assert loop["noise_0"] == pytest.approx(
        float(tf.reduce_sum(expected * tf.range(1.0, FEATURES + 1.0))), rel=1e-6)


class DropoutClassifier(tapekit.Trainer):
    """A tutorial-style MLP classifier with Dropout, on seeded blobs."""

    default_global_batch_size = 32

    def build(self):
        self.model = keras.Sequential([keras.layers.Dense(16, activation="relu"),
                                       keras.layers.Dropout(0.3),
                                       keras.layers.Dense(3)])
        self.optimizer = keras.optimizers.Adam(0.01)

    def train_dataset(self, input_context):
        rng = np.random.default_rng(0)
        labels = rng.integers(0, 3, 600)
        points = (rng.standard_normal((600, 4)) + labels[:, None]).astype(np.float32)
        examples = tf.data.Dataset.from_tensor_slices((points, labels.astype(np.int32)))
        return tapekit.per_replica_batches(examples, input_context, self.global_batch_size,
                                           shuffle_buffer_size=600, seed=self.seed)

    def train_step(self, batch):
        x, y = batch
        with tf.GradientTape() as tape:
            logits = self.model(x, training=True)
            loss = self.compute_loss(keras.losses.sparse_categorical_crossentropy(
                y, logits, from_logits=True))
        self.apply_gradients(tape, loss, self.model, self.optimizer)
        return {"loss": loss}


@pytest.mark.parametrize("replicas", [1, 2])
def test_dropout_model_resumes_bitwise(replicas, tmp_path):
    strategy = dict(strategy="mirrored", cpu_replicas=2) if replicas == 2 else {}
    whole = DropoutClassifier(seed=4, deterministic=True, **strategy)
    whole.fit(train_steps=30, steps_per_loop=5)
    DropoutClassifier(seed=4, deterministic=True, model_dir=str(tmp_path), **strategy).fit(
        train_steps=15, steps_per_loop=5)
    resumed = DropoutClassifier(seed=4, deterministic=True, model_dir=str(tmp_path), **strategy)
    resumed.fit(train_steps=30, steps_per_loop=5)
    assert resumed.current_step == 30
    for a, b in zip(whole.model.variables, resumed.model.variables):
        np.testing.assert_array_equal(b.numpy(), a.numpy(), err_msg=a.path)
