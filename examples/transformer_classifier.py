"""A Transformer text classifier as the Keras "Text classification with Transformer" example
writes it: token and learned position Embeddings, one attention block, Adam with its own
global gradient-norm clipping.

    .venv/bin/tapekit-train --trainer=examples.transformer_classifier:TransformerClassifier \\
        --strategy=mirrored --cpu_replicas=2 --eval_every_steps=200

Both embeddings have sparse gradients (`tf.IndexedSlices`). The position table is read once
per batch (its rows broadcast over the sequences), so on N replicas each of its rows
arrives N times: Keras's Adam would square each of those rows on its own, and its
`global_clipnorm` would clip each replica's share. tapekit's `apply_gradients` hands Adam the
gradient one device would see, so 1 and N replicas train alike. The data is synthetic and
seeded (a sequence's label says whether "positive" words outnumber "negative" ones in its
first half); nothing is downloaded.
"""

import keras
import numpy as np
import tensorflow as tf
from absl import flags
from keras import layers, ops

import tapekit

POSITIVE, NEGATIVE = range(1, 11), range(11, 21)  # word ids whose count decides the label


class TokenAndPositionEmbedding(layers.Layer):
    """Token embedding plus a learned embedding of each position 0..length-1."""

    def __init__(self, sequence_length, vocabulary_size, width, **kwargs):
        super().__init__(**kwargs)
        self.token_embedding = layers.Embedding(vocabulary_size, width)
        self.position_embedding = layers.Embedding(sequence_length, width)

    def call(self, tokens):
        positions = ops.arange(0, ops.shape(tokens)[-1], 1)
        return self.token_embedding(tokens) + self.position_embedding(positions)


class TransformerBlock(layers.Layer):
    """Self-attention and a feed-forward network, each with a residual and LayerNorm."""

    def __init__(self, width, num_heads, feed_forward_width, dropout_rate, **kwargs):
        super().__init__(**kwargs)
        self.attention = layers.MultiHeadAttention(num_heads=num_heads, key_dim=width)
        self.feed_forward = keras.Sequential([layers.Dense(feed_forward_width, activation="relu"),
                                              layers.Dense(width)])
        self.norm1 = layers.LayerNormalization(epsilon=1e-6)
        self.norm2 = layers.LayerNormalization(epsilon=1e-6)
        self.dropout1 = layers.Dropout(dropout_rate)
        self.dropout2 = layers.Dropout(dropout_rate)

    def call(self, inputs, training=False):
        attended = self.dropout1(self.attention(inputs, inputs), training=training)
        out1 = self.norm1(inputs + attended)
        return self.norm2(out1 + self.dropout2(self.feed_forward(out1), training=training))


def token_sequences(seed: int, num_examples: int, sequence_length: int, vocabulary_size: int):
    """tokens int32 [n, length] and labels int32 [n], deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocabulary_size, (num_examples, sequence_length))
    first_half = tokens[:, : sequence_length // 2]
    positive = np.isin(first_half, POSITIVE).sum(axis=1)
    negative = np.isin(first_half, NEGATIVE).sum(axis=1)
    return tokens.astype(np.int32), (positive > negative).astype(np.int32)


class TransformerClassifier(tapekit.Trainer):
    """Binary classification of token sequences by one Transformer block; Adam with
    `global_clipnorm` (the optimizer's own clipping). Steps return `loss` and `accuracy`."""

    default_global_batch_size = 32
    default_learning_rate = 1e-3

    def __init__(self, sequence_length: int = 32, vocabulary_size: int = 2000, width: int = 32,
                 num_heads: int = 2, feed_forward_width: int = 32, dropout_rate: float = 0.1,
                 global_clipnorm: float = 1.0, num_examples: int = 2048,
                 num_eval_examples: int = 512, **kwargs):
        self.sequence_length = sequence_length
        self.vocabulary_size = vocabulary_size
        self.width = width
        self.num_heads = num_heads
        self.feed_forward_width = feed_forward_width
        self.dropout_rate = dropout_rate
        self.global_clipnorm = global_clipnorm
        super().__init__(**kwargs)
        tokens, labels = token_sequences(self.seed, num_examples + num_eval_examples,
                                         sequence_length, vocabulary_size)
        self.train_examples = (tokens[:num_examples], labels[:num_examples])
        self.eval_examples = (tokens[num_examples:], labels[num_examples:])

    @classmethod
    def define_flags(cls):
        flags.DEFINE_integer("sequence_length", 32, "Tokens per sequence.", lower_bound=2)
        flags.DEFINE_integer("vocabulary_size", 2000, "Token ids 0..N-1.", lower_bound=21)
        flags.DEFINE_integer("width", 32, "Embedding width.", lower_bound=1)
        flags.DEFINE_integer("num_heads", 2, "Attention heads.", lower_bound=1)
        flags.DEFINE_integer("feed_forward_width", 32, "Hidden units of the feed-forward net.",
                             lower_bound=1)
        flags.DEFINE_float("dropout_rate", 0.1, "Dropout after attention and feed-forward.",
                           lower_bound=0.0, upper_bound=1.0)
        flags.DEFINE_float("global_clipnorm", 1.0, "Adam's own global gradient-norm clipping.",
                           lower_bound=0.0)
        flags.DEFINE_integer("num_examples", 2048, "Training sequences.", lower_bound=1)
        flags.DEFINE_integer("num_eval_examples", 512, "Held-out sequences.", lower_bound=1)

    def build(self):
        tokens = keras.Input((self.sequence_length,), dtype="int32")
        x = TokenAndPositionEmbedding(self.sequence_length, self.vocabulary_size,
                                      self.width)(tokens)
        x = TransformerBlock(self.width, self.num_heads, self.feed_forward_width,
                             self.dropout_rate)(x)
        x = layers.GlobalAveragePooling1D()(x)
        x = layers.Dropout(self.dropout_rate)(x)
        x = layers.Dense(20, activation="relu")(x)
        x = layers.Dropout(self.dropout_rate)(x)
        self.model = keras.Model(tokens, layers.Dense(2)(x), name="transformer_classifier")
        self.optimizer = keras.optimizers.Adam(self.learning_rate,
                                               global_clipnorm=self.global_clipnorm or None)

    def train_arrays(self):
        return self.train_examples

    def eval_dataset(self, input_context):
        examples = tf.data.Dataset.from_tensor_slices(self.eval_examples)
        return tapekit.per_replica_batches(examples, input_context, self.global_batch_size,
                                           repeat=False)

    def _loss_and_accuracy(self, tokens, labels, training):
        logits = self.model(tokens, training=training)
        loss = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
        correct = ops.cast(ops.equal(ops.argmax(logits, axis=-1), ops.cast(labels, "int64")),
                           "float32")
        return self.compute_loss(loss), self.compute_mean(correct)

    def train_step(self, batch):
        """Traced, per replica. batch: tokens int32 [b, length], labels int32 [b]."""
        tokens, labels = batch
        with tf.GradientTape() as tape:
            loss, accuracy = self._loss_and_accuracy(tokens, labels, training=True)
        self.apply_gradients(tape, loss, self.model, self.optimizer)
        return {"loss": loss, "accuracy": accuracy}

    def eval_step(self, batch):
        loss, accuracy = self._loss_and_accuracy(*batch, training=False)
        return {"loss": loss, "accuracy": accuracy}

    def export_model(self):
        return self.model, [tf.TensorSpec([None, self.sequence_length], tf.int32, name="tokens")]
