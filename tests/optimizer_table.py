"""The optimizer conformance table: every optimizer set-up users write, as one trainer.

A case is (optimizer, option): eight Keras optimizers, each with the optimizer's own
`clipnorm`, `global_clipnorm`, `clipvalue` or `use_ema`, or none of them, on a model that has
both kinds of gradient: dense (a linear layer on float features) and sparse with repeated
indices (an Embedding whose batches repeat tokens: `tf.IndexedSlices` rows of one index).

`OptimizerTable` holds one small model and one optimizer per case and trains all of them in
one step, so the whole table costs one build and one trace per run. `by_hand` applies the
same optimizers to the dense gradients of the same global batches, on one device, in a
plain `tf.function`: what the mathematics says each case must end at.
"""

import itertools
from typing import Dict, List

import keras
import numpy as np
import tensorflow as tf
from keras import layers

import tapekit

OPTIMIZERS = {
    "sgd": lambda **kw: keras.optimizers.SGD(0.05, **kw),
    "sgd_momentum": lambda **kw: keras.optimizers.SGD(0.05, momentum=0.9, **kw),
    "adam": lambda **kw: keras.optimizers.Adam(0.01, **kw),
    "adamw": lambda **kw: keras.optimizers.AdamW(0.01, weight_decay=0.05, **kw),
    "rmsprop": lambda **kw: keras.optimizers.RMSprop(0.01, **kw),
    "adagrad": lambda **kw: keras.optimizers.Adagrad(0.05, **kw),
    "adafactor": lambda **kw: keras.optimizers.Adafactor(0.05, **kw),
    "lion": lambda **kw: keras.optimizers.Lion(0.002, **kw),
}
# Thresholds well below the gradients' size, so that every clipping case clips
# (`test_every_clipping_case_clips` proves it against the unclipped case).
OPTIONS = {
    "none": {},
    "clipnorm": {"clipnorm": 0.02},
    "global_clipnorm": {"global_clipnorm": 0.02},
    "clipvalue": {"clipvalue": 0.002},
    "use_ema": {"use_ema": True, "ema_momentum": 0.9},
}
CASES = ["/".join(parts) for parts in itertools.product(OPTIMIZERS, OPTIONS)]

FEATURES, TOKENS, VOCABULARY, WIDTH = 6, 8, 24, 4
GLOBAL_BATCH, NUM_EXAMPLES = 16, 64  # 4 global batches, repeated in order


def examples():
    """Features float32 [64, 6], tokens int32 [64, 8] and targets float32 [64, 1], seeded.

    Tokens come mostly from a handful of words, so nearly every batch repeats an index in
    every row of it (and, split over two replicas, each replica holds rows of the same words).
    """
    rng = np.random.default_rng(7)
    features = rng.standard_normal((NUM_EXAMPLES, FEATURES)).astype(np.float32)
    tokens = np.where(rng.random((NUM_EXAMPLES, TOKENS)) < 0.8,
                      rng.integers(0, 4, (NUM_EXAMPLES, TOKENS)),
                      rng.integers(0, VOCABULARY, (NUM_EXAMPLES, TOKENS))).astype(np.int32)
    targets = (np.sin(features[:, :1]) + 0.1 * tokens[:, :1]).astype(np.float32)
    return features, tokens, targets


def global_batches() -> tf.data.Dataset:
    """The global batches every run trains on, in one order (no shuffling), forever."""
    return tf.data.Dataset.from_tensor_slices(examples()).batch(GLOBAL_BATCH).repeat()


def make_model(case: str) -> keras.Model:
    """The case's model: a linear layer on the features (dense gradients) plus a linear layer
    on the mean Embedding of the tokens (sparse gradients with repeated indices), built, with
    weights that depend only on the case (not on how many models were made before it)."""
    seed = 1000 * CASES.index(case)
    features = keras.Input((FEATURES,), name="features")
    tokens = keras.Input((TOKENS,), dtype="int32", name="tokens")
    embedded = layers.Embedding(VOCABULARY, WIDTH, embeddings_initializer=keras.initializers.RandomNormal(
        stddev=0.5, seed=seed))(tokens)
    pooled = layers.GlobalAveragePooling1D()(embedded)
    output = (layers.Dense(1, kernel_initializer=keras.initializers.GlorotUniform(seed + 1))(features)
              + layers.Dense(1, kernel_initializer=keras.initializers.GlorotUniform(seed + 2))(pooled))
    return keras.Model([features, tokens], output)


def make_optimizer(case: str) -> keras.optimizers.Optimizer:
    optimizer, option = case.split("/")
    return OPTIMIZERS[optimizer](**OPTIONS[option])


def per_example_loss(case: str, model, batch):
    features, tokens, targets = batch
    return tf.reduce_mean(tf.square(model([features, tokens]) - targets), axis=1)


class OptimizerTable(tapekit.Trainer):
    """Every case's model trained by its own optimizer, through `apply_gradients`."""

    default_global_batch_size = GLOBAL_BATCH

    def __init__(self, cases: List[str] = tuple(CASES), **kwargs):
        self.case_names = list(cases)
        super().__init__(**kwargs)

    def build(self):
        self.models = {case: make_model(case) for case in self.case_names}
        self.optimizers = {case: make_optimizer(case) for case in self.case_names}

    def train_step(self, batch):
        losses = {}
        for case in self.case_names:
            with tf.GradientTape() as tape:
                loss = self.compute_loss(per_example_loss(case, self.models[case], batch))
            self.apply_gradients(tape, loss, self.models[case], self.optimizers[case])
            losses[case] = loss
        return {"loss": tf.add_n(list(losses.values()))}


def dense(gradient):
    """The gradient as one dense tensor (the rows of a sparse one summed per index)."""
    return tf.convert_to_tensor(gradient)


def by_hand(cases: List[str], steps: int) -> Dict[str, keras.Model]:
    """Each case's model after `steps` steps of its optimizer applied to the dense gradient
    of the mean loss over each global batch, on one device (no strategy), ended as Keras
    `fit` ends (`finalize_variable_values`: with `use_ema`, the averages)."""
    models = {case: make_model(case) for case in cases}
    optimizers = {case: make_optimizer(case) for case in cases}

    def step(batch):  # eager: 8 steps cost less than tracing them (8 s against 14 s)
        for case in cases:
            model = models[case]
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(per_example_loss(case, model, batch))
            gradients = tape.gradient(loss, model.trainable_variables)
            optimizers[case].apply_gradients(
                zip([dense(g) for g in gradients], model.trainable_variables))

    for batch in global_batches().take(steps):
        step(batch)
    for case in cases:  # as Keras fit ends (and tapekit's): use_ema's averages into the model
        optimizers[case].finalize_variable_values(models[case].trainable_variables)
    return models


def model_weights(models: Dict[str, keras.Model]) -> Dict[str, List[np.ndarray]]:
    return {case: [v.numpy() for v in model.trainable_variables] for case, model in models.items()}


def all_state(trainer) -> Dict[str, np.ndarray]:
    """Every variable of every case's model and optimizer (slots, EMA averages, iterations)."""
    state = {}
    for case in trainer.case_names:
        for owner, what in ((trainer.models[case], "model"), (trainer.optimizers[case], "opt")):
            for index, variable in enumerate(owner.variables):
                # Keyed by position: Keras numbers layer paths per process (embedding_80/...).
                state[f"{case} {what}[{index}]"] = np.array(variable.numpy())
    return state
