"""Losses over the global batch (contrastive, triplet mining) give the same numbers on 1 and 2
replicas when each replica gathers every replica's embeddings (`all_gather`) and takes the
per-example loss of its own rows with `compute_loss` — the pattern of
docs/writing-a-trainer.md ("Losses over the whole global batch").

Tolerance: losses within 1e-6 (relative), weights within 1e-6 (absolute), after 40 steps
of Adam; measured here: at most 1.2e-7 for both. Without the gather (each replica's negatives its own
rows only) the 2-replica loss is another loss, which the last test shows.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tapekit

from families import nt_xent

TOLERANCE = 1e-6
NUM_EXAMPLES, NUM_EVAL_EXAMPLES = 512, 300  # 300: 9 global batches of 32, and 12 dropped


def views(seed: int, count: int):
    """Two noisy views float32 [count, 4] of `count` random points."""
    rng = np.random.default_rng(seed)
    points = rng.standard_normal((count, 4)).astype(np.float32)
    noise = 0.1 * rng.standard_normal((2, count, 4)).astype(np.float32)
    return points + noise[0], points + noise[1]


def info_nce(z1, z2, temperature: float, gather: bool = True):
    """This replica's InfoNCE losses [batch] and hits [batch]: each z1 row's positive is the
    z2 row of its own example, the negatives every other z2 row of the global batch.
    Traced, per replica. `gather=False` is the mistake: negatives from this replica only."""
    context = tf.distribute.get_replica_context()
    z1, z2 = tf.math.l2_normalize(z1, axis=1), tf.math.l2_normalize(z2, axis=1)
    local = tf.shape(z1)[0]
    if gather:
        candidates = context.all_gather(z2, axis=0)
        first = context.replica_id_in_sync_group * local  # replicas' rows, in replica order
    else:
        candidates, first = z2, 0
    positives = first + tf.range(local)
    logits = tf.matmul(z1, candidates, transpose_b=True) / temperature
    losses = tf.nn.sparse_softmax_cross_entropy_with_logits(positives, logits)
    hits = tf.cast(tf.equal(tf.argmax(logits, 1, output_type=tf.int32), positives), tf.float32)
    return losses, hits


class PairEmbedder(tapekit.Trainer):
    """A tiny contrastive trainer: an MLP embeds two views of each point, trained by
    InfoNCE (`loss="info_nce"`) or by SimCLR's NT-Xent (`"nt_xent"`, tests/families.py)."""

    default_global_batch_size = 32
    default_learning_rate = 0.01

    def __init__(self, loss: str = "info_nce", gather: bool = True, **kwargs):
        self.loss_name, self.gather = loss, gather
        super().__init__(**kwargs)

    def build(self):
        self.encoder = keras.Sequential([keras.layers.Dense(16, activation="relu"),
                                         keras.layers.Dense(8)])
        self.optimizer = keras.optimizers.Adam(self.learning_rate)

    def train_arrays(self):
        return views(self.seed, NUM_EXAMPLES)

    def eval_dataset(self, input_context):
        examples = tf.data.Dataset.from_tensor_slices(views(self.seed + 1, NUM_EVAL_EXAMPLES))
        # Full batches only: all_gather in a compiled loop fails when the last batch is
        # smaller than the others (TensorFlow's collectives, with or without tapekit).
        return tapekit.per_replica_batches(examples, input_context, self.global_batch_size,
                                           repeat=False, drop_remainder=True)

    def _losses(self, view1, view2, training):
        z1, z2 = self.encoder(view1, training=training), self.encoder(view2, training=training)
        if self.loss_name == "nt_xent":
            return nt_xent(z1, z2, temperature=0.2)
        return info_nce(z1, z2, temperature=0.2, gather=self.gather)

    def train_step(self, batch):
        with tf.GradientTape() as tape:
            losses, hits = self._losses(*batch, training=True)
            loss = self.compute_loss(losses)
        self.apply_gradients(tape, loss, self.encoder, self.optimizer)
        return {"loss": loss, "accuracy": self.compute_mean(hits)}

    def eval_step(self, batch):
        losses, hits = self._losses(*batch, training=False)
        return {"loss": self.compute_loss(losses), "accuracy": self.compute_mean(hits)}


REPLICAS = {1: dict(strategy="default"), 2: dict(strategy="mirrored", cpu_replicas=2)}


def train(replicas: int, **kwargs) -> PairEmbedder:
    trainer = PairEmbedder(seed=3, progress="none", **REPLICAS[replicas], **kwargs)
    assert trainer.num_replicas == replicas
    trainer.fit(train_steps=40, steps_per_loop=10)
    return trainer


def weights(trainer):
    return [variable.numpy() for variable in trainer.encoder.weights]


@pytest.mark.parametrize("loss", ["info_nce", "nt_xent"])
def test_a_global_batch_loss_gives_the_same_loss_and_weights_on_1_and_2_replicas(loss):
    one, two = train(1, loss=loss), train(2, loss=loss)
    assert one.history[-1]["loss"] < 0.8 * one.history[0]["loss"]  # it learns
    for row_one, row_two in zip(one.history, two.history, strict=True):
        for metric in ("loss", "accuracy"):
            assert row_two[metric] == pytest.approx(row_one[metric], rel=TOLERANCE), (
                f"step {row_one['step']} {metric}")
    for a, b in zip(weights(one), weights(two), strict=True):
        np.testing.assert_allclose(b, a, rtol=0, atol=TOLERANCE)
    evaluated_one, evaluated_two = one.evaluate(), two.evaluate()
    for metric in ("loss", "accuracy"):
        assert evaluated_two[metric] == pytest.approx(evaluated_one[metric], rel=TOLERANCE)


def test_without_the_gather_two_replicas_train_on_another_loss():
    one, two = train(1, gather=False), train(2, gather=False)
    assert abs(two.history[0]["loss"] - one.history[0]["loss"]) > 0.05
