"""Exact metrics: compute_loss/compute_mean and keras.metrics over partial batches and replicas."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tapekit

NUM_EVAL = 397  # not a multiple of the batch: the last global batch is partial


def _blobs(seed, count):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, count).astype(np.int32)
    points = (rng.standard_normal((count, 2)) + 1.2 * labels[:, None]).astype(np.float32)
    return points, labels


class Classifier(tapekit.Trainer):
    """Logistic regression with an accuracy from compute_mean and two keras.metrics."""

    default_global_batch_size = 50

    def build(self):
        self.model = keras.layers.Dense(2)
        self.optimizer = keras.optimizers.SGD(0.1)
        self.accuracy = keras.metrics.SparseCategoricalAccuracy(name="keras_accuracy")
        self.auc = keras.metrics.AUC(name="auc")

    def train_dataset(self, input_context):
        return tapekit.per_replica_batches(tf.data.Dataset.from_tensor_slices(_blobs(0, 1000)),
                                           input_context, self.global_batch_size,
                                           shuffle_buffer_size=1000, seed=self.seed)

    def eval_dataset(self, input_context):
        return tapekit.per_replica_batches(tf.data.Dataset.from_tensor_slices(_blobs(1, NUM_EVAL)),
                                           input_context, self.global_batch_size, repeat=False)

    def _metrics(self, points, labels):
        logits = self.model(points)
        self.accuracy.update_state(labels, logits)
        self.auc.update_state(labels, tf.nn.softmax(logits)[:, 1])
        correct = tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels)
        loss = self.compute_loss(keras.losses.sparse_categorical_crossentropy(
            labels, logits, from_logits=True))
        return loss, {"loss": loss, "accuracy": self.compute_mean(tf.cast(correct, tf.float32))}

    def train_step(self, batch):
        with tf.GradientTape() as tape:
            loss, metrics = self._metrics(*batch)
        self.apply_gradients(tape, loss, self.model, self.optimizer)
        return metrics

    def eval_step(self, batch):
        return self._metrics(*batch)[1]


def _expected(trainer):
    points, labels = _blobs(1, NUM_EVAL)
    logits = trainer.model(points).numpy()
    log_probabilities = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    auc = keras.metrics.AUC()
    auc.update_state(labels, tf.nn.softmax(logits)[:, 1])
    return {"accuracy": float(np.mean(np.argmax(logits, -1) == labels)),
            "loss": float(-np.mean(log_probabilities[np.arange(NUM_EVAL), labels])),
            "auc": float(auc.result())}


@pytest.mark.parametrize("replicas", [1, 2])
def test_evaluation_is_exact_over_every_example_with_a_partial_last_batch(replicas):
    strategy = dict(strategy="mirrored", cpu_replicas=2) if replicas == 2 else {}
    trainer = Classifier(**strategy)
    trainer.fit(train_steps=20, steps_per_loop=10)
    results = trainer.evaluate()  # no steps: the whole eval set, 8 batches, the last of 47
    expected = _expected(trainer)
    assert results["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-6)
    assert results["keras_accuracy"] == pytest.approx(expected["accuracy"], abs=1e-6)
    assert results["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert results["auc"] == pytest.approx(expected["auc"], abs=1e-6)
    assert trainer.evaluate() == results  # keras metrics were reset, not accumulated


def test_global_batches_that_end_in_an_empty_replica_batch_are_exact():
    """tf.distribute splits a last global batch of one example: one replica gets nothing."""
    trainer = Classifier(strategy="mirrored", cpu_replicas=2)
    trainer.fit(train_steps=10, steps_per_loop=10)
    points, labels = _blobs(1, 51)
    results = trainer.evaluate(dataset=tf.data.Dataset.from_tensor_slices((points, labels)).batch(50))
    logits = trainer.model(points).numpy()
    accuracy = float(np.mean(np.argmax(logits, -1) == labels))
    assert results["accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert results["keras_accuracy"] == pytest.approx(accuracy, abs=1e-6)


def test_keras_metrics_are_reset_at_every_loop_and_reported_by_name():
    trainer = Classifier()
    history = trainer.fit(train_steps=30, steps_per_loop=10)
    for loop in history:
        # compute_mean and SparseCategoricalAccuracy see the same 500 examples of the loop
        assert loop["keras_accuracy"] == pytest.approx(loop["accuracy"], abs=1e-6)
        assert 0.0 < loop["auc"] <= 1.0


@pytest.mark.parametrize("replicas", [1, 2])
def test_compute_mean_weights_every_value_by_its_sample_weight(replicas):
    class Masked(Classifier):
        def train_step(self, batch):
            points, labels = batch
            with tf.GradientTape() as tape:  # an update: a merge_call between the replicas
                loss = self.compute_loss(tf.square(self.model(points)))
            self.apply_gradients(tape, loss, self.model, self.optimizer)
            replica = tf.distribute.get_replica_context().replica_id_in_sync_group
            rows = tf.shape(labels)[0]
            values = tf.cast(tf.reshape(tf.range(2 * rows) + 2 * rows * replica, [-1, 2]),
                             tf.float32)
            mask = tf.tile(tf.constant([[1.0, 0.0]]), [rows, 1])
            return {"even_mean": self.compute_mean(values, sample_weight=mask), "plain": 1.0}

    strategy = dict(strategy="mirrored", cpu_replicas=2) if replicas == 2 else {}
    (loop,) = Masked(global_batch_size=10, **strategy).fit(train_steps=1, steps_per_loop=1)
    assert loop["even_mean"] == pytest.approx(np.mean(np.arange(0, 20, 2)))  # 0, 2, …, 18
    assert loop["plain"] == 1.0  # a Python number is a metric too


def test_evaluating_endless_data_to_its_end_is_refused_before_training():
    class Endless(Classifier):
        def eval_dataset(self, input_context):
            return self.train_dataset(input_context)  # repeats forever

    trainer = Endless()
    with pytest.raises(tapekit.TapekitError, match="repeats forever.*eval_steps"):
        trainer.fit(train_steps=10, eval_every_steps=5)
    assert trainer.current_step == 0
    assert set(trainer.evaluate(steps=2)) == {"loss", "accuracy", "keras_accuracy", "auc"}


def test_a_metric_created_outside_the_strategy_scope_is_refused_on_two_replicas():
    class Misplaced(Classifier):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.accuracy = keras.metrics.SparseCategoricalAccuracy(name="keras_accuracy")

        def build(self):
            self.model = keras.layers.Dense(2)
            self.optimizer = keras.optimizers.SGD(0.1)
            self.auc = keras.metrics.AUC(name="auc")

    with pytest.raises(tapekit.TapekitError, match="'keras_accuracy' was created outside the "
                                                   "strategy scope.*create it in build"):
        Misplaced(strategy="mirrored", cpu_replicas=2).fit(train_steps=1)
