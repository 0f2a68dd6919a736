"""log_gradient_norms: each loop's gradient norms, update ratio and clipped share, against a
hand computation (numpy) of the same steps, on one and two replicas."""

import collections

import keras
import numpy as np
import pytest
import tensorflow as tf

import tapekit

from small_trainers import rows

METRICS = ("grad_norm", "grad_norm_clipped", "update_ratio", "clipped_share")
TWO_REPLICAS = {"strategy": "mirrored", "cpu_replicas": 2}


class Linear(tapekit.Trainer):
    """y ≈ xW + b by mean squared error; W starts at ones, b at zero. `optimizers`: one
    per model, each model fitting the same data (several: names suffixed)."""

    default_global_batch_size = 16

    def __init__(self, make_optimizer=lambda: keras.optimizers.SGD(0.1), models=1, **kwargs):
        self.make_optimizer, self.models = make_optimizer, models
        super().__init__(progress="none", **kwargs)

    def build(self):
        self.model = self._dense()
        self.optimizer = self.make_optimizer()
        if self.models == 2:
            self.other_model = self._dense()
            self.other_optimizer = self.make_optimizer()

    @staticmethod
    def _dense():
        model = keras.layers.Dense(1, kernel_initializer="ones", bias_initializer="zeros")
        model.build((None, 3))
        return model

    def train_step(self, batch):
        x, y = batch
        pairs = [(self.model, self.optimizer)]
        if self.models == 2:
            pairs.append((self.other_model, self.other_optimizer))
        metrics = {}
        for index, (model, optimizer) in enumerate(pairs):
            with tf.GradientTape() as tape:
                loss = self.compute_loss(tf.square(y - tf.cast(model(x), y.dtype)))
            self.apply_gradients(tape, loss, model, optimizer)
            metrics[f"loss{index}"] = loss
        return metrics


def batches(x, y, size=16):
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(size)


class Hand:
    """The same steps by hand: the global-batch MSE gradient of the linear model, clipped to
    `clip` (global norm), applied by SGD or Adam; the per-step norms it went through."""

    def __init__(self, optimizer="sgd", learning_rate=0.1, clip=None, clipnorm=None,
                 clipvalue=None):
        self.kernel, self.bias = np.ones((3, 1)), np.zeros(1)
        self.optimizer, self.learning_rate, self.clip = optimizer, learning_rate, clip
        self.clipnorm, self.clipvalue = clipnorm, clipvalue
        self.moments = [np.zeros((3, 1)), np.zeros(1)], [np.zeros((3, 1)), np.zeros(1)]
        self.updates = 0
        self.steps = collections.defaultdict(list)

    def gradient(self, x, y):
        x, y = x.astype(np.float64), y.astype(np.float64)
        residual = y - (x @ self.kernel + self.bias)
        return [-2.0 * x.T @ residual / len(x), -2.0 * residual.sum(0) / len(x)]

    def step(self, x, y, gradient=None):
        gradient = self.gradient(x, y) if gradient is None else gradient
        norm = np.sqrt(sum(np.sum(g ** 2) for g in gradient))
        clipped = False
        if self.clip is not None and norm > self.clip:
            gradient, clipped = [g * self.clip / norm for g in gradient], True
        if self.clipnorm is not None:
            norms = [np.sqrt(np.sum(g ** 2)) for g in gradient]
            clipped = clipped or any(n > self.clipnorm for n in norms)
            gradient = [g * self.clipnorm / max(n, self.clipnorm) for g, n in zip(gradient, norms)]
        if self.clipvalue is not None:
            clipped = clipped or any(np.any(np.abs(g) > self.clipvalue) for g in gradient)
            gradient = [np.clip(g, -self.clipvalue, self.clipvalue) for g in gradient]
        before = [self.kernel.copy(), self.bias.copy()]
        self.apply(gradient)
        update = np.sqrt(np.sum((self.kernel - before[0]) ** 2) + np.sum((self.bias - before[1]) ** 2))
        weights = np.sqrt(np.sum(before[0] ** 2) + np.sum(before[1] ** 2))
        self.steps["grad_norm"].append(norm)
        self.steps["grad_norm_clipped"].append(np.sqrt(sum(np.sum(g ** 2) for g in gradient)))
        self.steps["update_ratio"].append(update / weights)
        self.steps["clipped_share"].append(float(clipped))

    def apply(self, gradient):
        self.updates += 1
        if self.optimizer == "sgd":
            self.kernel = self.kernel - self.learning_rate * gradient[0]
            self.bias = self.bias - self.learning_rate * gradient[1]
            return
        beta_1, beta_2, epsilon = 0.9, 0.999, 1e-7  # Keras's Adam defaults
        alpha = (self.learning_rate * np.sqrt(1 - beta_2 ** self.updates)
                 / (1 - beta_1 ** self.updates))
        first, second = self.moments
        for index, (variable, g) in enumerate(zip((self.kernel, self.bias), gradient)):
            first[index] = first[index] + (g - first[index]) * (1 - beta_1)
            second[index] = second[index] + (g ** 2 - second[index]) * (1 - beta_2)
            variable -= alpha * first[index] / (np.sqrt(second[index]) + epsilon)

    def means(self, suffix=""):
        return {name + suffix: float(np.mean(values)) for name, values in self.steps.items()}


def check(loop, expected, rtol=1e-5):
    for name, value in expected.items():
        assert loop[name] == pytest.approx(value, rel=rtol, abs=1e-7), name


def fit(trainer, x, y, steps=4, size=16):
    return trainer.fit(train_steps=steps, steps_per_loop=steps, dataset=batches(x, y, size))[-1]


@pytest.mark.parametrize("replicas, clipped_by", [(1, "tapekit"), (2, "tapekit"), (2, "optimizer")])
def test_sgd_norms_with_clipping_on_some_steps_match_the_hand_computation(replicas, clipped_by):
    x, y = rows(64)
    hand = Hand(clip=5.0)
    for start in range(0, 64, 16):
        hand.step(x[start:start + 16], y[start:start + 16])
    assert hand.steps["clipped_share"] == [1.0, 1.0, 0.0, 0.0]  # some steps clip, some don't
    clipping = ({"clip_global_norm": 5.0} if clipped_by == "tapekit" else
                {"make_optimizer": lambda: keras.optimizers.SGD(0.1, global_clipnorm=5.0)})
    loop = fit(Linear(log_gradient_norms=True, **clipping,
                      **(TWO_REPLICAS if replicas == 2 else {})), x, y)
    check(loop, hand.means())
    assert loop["clipped_share"] == 0.5


def test_adam_on_two_replicas_with_its_own_clipnorm_matches_the_hand_computation():
    x, y = rows(64)
    hand = Hand("adam", learning_rate=0.3, clipnorm=4.0)
    for start in range(0, 64, 16):
        hand.step(x[start:start + 16], y[start:start + 16])
    assert 0 < sum(hand.steps["clipped_share"]) < 4
    loop = fit(Linear(lambda: keras.optimizers.Adam(0.3, clipnorm=4.0), log_gradient_norms=True,
                      **TWO_REPLICAS), x, y)
    check(loop, hand.means())


def test_two_optimizers_get_a_suffix_each():
    x, y = rows(64)
    hand = Hand(clipvalue=3.5)
    for start in range(0, 64, 16):
        hand.step(x[start:start + 16], y[start:start + 16])
    assert 0 < sum(hand.steps["clipped_share"]) < 4
    loop = fit(Linear(lambda: keras.optimizers.SGD(0.1, clipvalue=3.5), models=2,
                      log_gradient_norms=True), x, y)
    check(loop, {**hand.means("/optimizer"), **hand.means("/other_optimizer")})
    assert not set(METRICS) & set(loop)


def test_accumulated_and_skipped_steps_count_only_the_updates_applied():
    # Micro-steps of 8 rows, two per update; the fourth update's rows hold a NaN: skipped.
    x, y = rows(64)
    y[60] = np.nan
    hand = Hand()
    for start in range(0, 48, 16):
        hand.step(None, None, gradient=hand.gradient(x[start:start + 16], y[start:start + 16]))
    loop = fit(Linear(gradient_accumulation_steps=2, nan_policy="skip_step",
                      log_gradient_norms=True), x, y, steps=8, size=8)
    check(loop, hand.means())


def test_under_loss_scaling_the_norms_are_of_the_unscaled_gradient():
    x, y = rows(64)
    x, y = x * 0.25, y * 0.25  # small enough for float16
    hand = Hand()
    for start in range(0, 64, 16):
        hand.step(x[start:start + 16], y[start:start + 16])
    loop = fit(Linear(precision="mixed_float16", log_gradient_norms=True), x, y)
    check(loop, hand.means(), rtol=5e-3)  # float16 forward and backward passes


class Embedded(tapekit.Trainer):
    """A sum of Embedding rows (ids repeat within a batch: a sparse gradient with repeated
    rows) under plain SGD."""

    default_global_batch_size = 8

    def __init__(self, **kwargs):
        super().__init__(progress="none", **kwargs)

    def build(self):
        self.model = keras.layers.Embedding(6, 2, embeddings_initializer="ones")
        self.model.build((None, 3))
        self.optimizer = keras.optimizers.SGD(0.1)

    def train_step(self, batch):
        ids, y = batch
        with tf.GradientTape() as tape:
            prediction = tf.reduce_sum(self.model(ids), axis=[1, 2])
            loss = self.compute_loss(tf.square(y - prediction))
        self.apply_gradients(tape, loss, self.model, self.optimizer)
        return {"loss": loss}


def test_a_sparse_gradient_with_repeated_rows_has_the_dense_gradients_norm():
    ids = np.array([[0, 0, 1], [1, 2, 2], [0, 3, 3], [1, 1, 1]] * 2, np.int32)
    y = np.arange(8, dtype=np.float32)
    table = tf.Variable(tf.ones((6, 2)))
    with tf.GradientTape() as tape:  # plain TensorFlow: the dense gradient of the same step
        prediction = tf.reduce_sum(tf.gather(table, ids), axis=[1, 2])
        loss = tf.reduce_mean(tf.square(y - prediction))
    dense = tf.convert_to_tensor(tape.gradient(loss, table)).numpy()
    loop = Embedded(log_gradient_norms=True, **TWO_REPLICAS).fit(
        train_steps=1, steps_per_loop=1, dataset=tf.data.Dataset.from_tensors((ids, y)))[-1]
    norm = np.sqrt(np.sum(dense ** 2))
    assert loop["grad_norm"] == pytest.approx(norm, rel=1e-5)
    assert loop["update_ratio"] == pytest.approx(0.1 * norm / np.sqrt(12.0), rel=1e-5)


def test_run_eagerly_reports_the_compiled_numbers():
    x, y = rows(64)
    compiled = fit(Linear(clip_global_norm=5.0, log_gradient_norms=True), x, y)
    eager = fit(Linear(clip_global_norm=5.0, log_gradient_norms=True, run_eagerly=True), x, y)
    check(eager, {name: compiled[name] for name in METRICS})


def _op_types(trainer):
    graph_def = trainer._engine.train_loop._concrete[1].graph.as_graph_def()
    types = [node.op for node in graph_def.node]
    types += [node.op for function in graph_def.library.function for node in function.node_def]
    return collections.Counter(types)


def test_off_no_metric_and_no_op_is_added():
    x, y = rows(64)
    off, on = Linear(), Linear(log_gradient_norms=True)
    assert not set(METRICS) & set(fit(off, x, y)) and set(METRICS) <= set(fit(on, x, y))
    off_ops, on_ops = _op_types(off), _op_types(on)
    assert off_ops["Sqrt"] == 0 and on_ops["Sqrt"] > 0  # the norms' square roots
    assert not off_ops - on_ops  # on adds ops; off has none of its own


class Clashing(Linear):
    def train_step(self, batch):
        return {**super().train_step(batch), "grad_norm": tf.constant(1.0)}


def test_a_step_metric_of_the_same_name_is_refused():
    x, y = rows(16)
    with pytest.raises(tapekit.TapekitError, match="train_step reports grad_norm, which "
                                                   "log_gradient_norms"):
        fit(Clashing(log_gradient_norms=True), x, y, steps=1)



class InMemory(Linear):
    def train_arrays(self):
        return rows(64)


def test_xla_on_two_replicas_reports_the_numbers_of_the_run_without_it():
    # The updates run after the compiled part there (`tapekit.compiled.xla`).
    plain = InMemory(clip_global_norm=5.0, log_gradient_norms=True).fit(4, steps_per_loop=4)[-1]
    compiled = InMemory(clip_global_norm=5.0, log_gradient_norms=True, jit_compile=True,
                        **TWO_REPLICAS).fit(4, steps_per_loop=4)[-1]
    check(compiled, {name: plain[name] for name in METRICS})


class CriticEveryOtherStep(Linear):
    """Two models on the same data, GAN-like: `model` updated every step, `other_model` (the
    "critic") only on even global steps, under a tensor condition (AutoGraph: a tf.cond)."""

    def __init__(self, **kwargs):
        super().__init__(models=2, **kwargs)

    def train_step(self, batch):
        x, y = batch
        with tf.GradientTape() as tape:
            loss = self.compute_loss(tf.square(y - tf.cast(self.model(x), y.dtype)))
        self.apply_gradients(tape, loss, self.model, self.optimizer)
        with tf.GradientTape() as tape:
            critic_loss = self.compute_loss(tf.square(y - tf.cast(self.other_model(x), y.dtype)))
        if self.global_step % 2 == 0:
            self.apply_gradients(tape, critic_loss, self.other_model, self.other_optimizer)
        return {"loss": loss, "critic_loss": critic_loss}


def _hand_loops(x, y, steps_per_loop, loops, applied):
    """The loops' means of a Hand whose update applies on the steps where `applied(step)`."""
    hand, means = Hand(), []
    for loop in range(loops):
        hand.steps.clear()
        for step in range(loop * steps_per_loop, (loop + 1) * steps_per_loop):
            if applied(step):
                hand.step(x[16 * step:16 * step + 16], y[16 * step:16 * step + 16])
        means.append(hand.means())
    return means


@pytest.mark.parametrize("mode", ["graph", "skip_step", "mixed_float16", "xla", "eager_two_replicas"])
def test_an_optimizer_applied_on_even_steps_only_reports_its_means_over_those_steps(mode):
    # In graph mode on several replicas an update under a tensor condition is refused by
    # tf.distribute itself (a merge_call in a cond branch), with or without the option.
    options = {"graph": {}, "skip_step": {"nan_policy": "skip_step"},
               "mixed_float16": {"precision": "mixed_float16"}, "xla": {"jit_compile": True},
               "eager_two_replicas": {"run_eagerly": True, **TWO_REPLICAS}}[mode]
    x, y = rows(96)
    if mode == "mixed_float16":
        x, y = x * 0.25, y * 0.25  # small enough for float16
    trainer = CriticEveryOtherStep(log_gradient_norms=True, **options)
    history = trainer.fit(train_steps=6, steps_per_loop=3, dataset=batches(x, y))
    assert len(history) == 2
    if mode == "graph":  # traced again once, carrying counts: not a retrace
        assert trainer._engine.train_loop.trace_count == 1
    every_step = _hand_loops(x, y, 3, 2, lambda step: True)
    even_steps = _hand_loops(x, y, 3, 2, lambda step: step % 2 == 0)  # steps 0, 2 | 4
    for loop, generator, critic in zip(history, every_step, even_steps):
        check(loop, {**{f"{name}/optimizer": value for name, value in generator.items()},
                     **{f"{name}/other_optimizer": value for name, value in critic.items()}},
              rtol=5e-3 if mode == "mixed_float16" else 1e-5)


class ExplicitCond(Linear):
    """The whole update written inside `tf.cond` (gradient included), on even global steps;
    with `nested`, inside a one-iteration `tf.while_loop` inside that branch."""

    def __init__(self, nested=False, **kwargs):
        self.nested = nested
        super().__init__(**kwargs)

    def train_step(self, batch):
        x, y = batch

        def update():
            with tf.GradientTape() as tape:
                loss = self.compute_loss(tf.square(y - self.model(x)))
            self.apply_gradients(tape, loss, self.model, self.optimizer)
            return loss

        def branch():
            if not self.nested:
                return update()
            return tf.while_loop(lambda i, _: i < 1, lambda i, _: (i + 1, update()),
                                 (tf.constant(0), tf.constant(0.0)))[1]

        applied = tf.equal(self.global_step % 2, 0)
        loss = tf.cond(applied, branch, lambda: tf.constant(0.0))
        return {"applied_loss": loss}


@pytest.mark.parametrize("nested", [False, True])
def test_an_update_written_inside_tf_cond_reports_the_steps_it_applied(nested):
    x, y = rows(96)
    history = ExplicitCond(nested=nested, log_gradient_norms=True).fit(
        train_steps=6, steps_per_loop=3, dataset=batches(x, y))
    assert len(history) == 2
    for loop, expected in zip(history, _hand_loops(x, y, 3, 2, lambda step: step % 2 == 0)):
        check(loop, expected)


def test_a_run_with_norms_on_two_replicas_resumes_bit_for_bit(tmp_path):
    """On several replicas the option routes the update through tapekit's own sum: a run
    stopped at step 4 and resumed by a new trainer still ends bitwise where the whole run
    does (weights, Adam's slots), with the same norms in its last loop."""
    x, y = rows(64)
    data = batches(x, y).repeat()

    def trainer(**options):
        return Linear(lambda: keras.optimizers.Adam(0.05, clipnorm=0.5), models=2,
                      log_gradient_norms=True, deterministic=True, **TWO_REPLICAS, **options)

    whole = trainer(model_dir=str(tmp_path / "whole"), checkpoint_every_steps=4)
    whole_last = whole.fit(train_steps=8, steps_per_loop=4, dataset=data)[-1]
    resumed = trainer(restore_from=str(tmp_path / "whole" / "checkpoints" / "ckpt-4"))
    resumed_last = resumed.fit(train_steps=8, steps_per_loop=4, dataset=data)[-1]
    assert resumed.history[0]["step"] == 8  # one loop: 5-8
    for name in ("model", "other_model", "optimizer", "other_optimizer"):
        for a, b in zip(getattr(whole, name).variables, getattr(resumed, name).variables):
            np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=f"{name} {a.path}")
    norms = [key for key in whole_last if key.split("/")[0] in METRICS]
    assert len(norms) == 8  # four per optimizer, suffixed
    assert {key: whole_last[key] for key in norms} == {key: resumed_last[key] for key in norms}
