"""The optimizer conformance table (`tests/optimizer_table.py`): each case is checked alike.

  (a) tapekit on one replica equals the same optimizer applied by hand to the dense gradient
      of the same global batches, to 1e-6;
  (b) one and two replicas (same global batches) agree to 1e-5;
  (c) stopped after 4 steps and resumed by a new trainer equals the uninterrupted run, bit
      for bit, on every variable of every model and optimizer (slots, EMA averages,
      iterations).

Each optimizer's five cases train as one trainer (one build and trace per run), once per module.
"""

import dataclasses
import sys
from typing import Dict, List

import keras
import numpy as np
import pytest
import tensorflow as tf

import tapekit

import optimizer_table as table
from conftest import REPO
from optimizer_table import CASES, OPTIMIZERS, OptimizerTable

if REPO not in sys.path:  # examples/ is a package of the repository, not installed
    sys.path.insert(0, REPO)

STEPS, STEPS_PER_LOOP, RESUME_STEP = 8, 4, 4
TWO_REPLICAS = {"strategy": "mirrored", "cpu_replicas": 2}


@dataclasses.dataclass
class TableRuns:
    by_hand: Dict[str, List[np.ndarray]]
    one_replica: Dict[str, List[np.ndarray]]
    two_replicas: Dict[str, List[np.ndarray]]
    uninterrupted_state: Dict[str, np.ndarray]
    resumed_state: Dict[str, np.ndarray]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> TableRuns:
    """Every run of the table, one trainer per optimizer (its five cases): a trainer of all
    forty cases traces in more than the sum of eight (53 s against 34 s on two replicas)."""
    result = TableRuns({}, {}, {}, {}, {})

    def fit(trainer, steps):
        trainer.fit(steps, STEPS_PER_LOOP, dataset=table.global_batches())
        return trainer

    for optimizer in OPTIMIZERS:
        cases = [case for case in CASES if case.startswith(optimizer + "/")]
        result.by_hand.update(table.model_weights(table.by_hand(cases, STEPS)))
        # The uninterrupted run saves at step 4; a new trainer resumes from that checkpoint.
        model_dir = str(tmp_path_factory.mktemp(optimizer) / "run")
        one = fit(OptimizerTable(cases, progress="none", deterministic=True, model_dir=model_dir,
                                 checkpoint_every_steps=RESUME_STEP), STEPS)
        resumed = fit(OptimizerTable(
            cases, progress="none", deterministic=True,
            restore_from=f"{model_dir}/checkpoints/ckpt-{RESUME_STEP}"), STEPS)
        assert resumed.history[0]["step"] == RESUME_STEP + STEPS_PER_LOOP  # resumed at step 4
        two = fit(OptimizerTable(cases, progress="none", **TWO_REPLICAS), STEPS)
        result.one_replica.update(table.model_weights(one.models))
        result.two_replicas.update(table.model_weights(two.models))
        result.uninterrupted_state.update(table.all_state(one))
        result.resumed_state.update(table.all_state(resumed))
    return result


def differences(actual: List[np.ndarray], expected: List[np.ndarray], **tolerance) -> List[str]:
    problems = []
    for index, (got, want) in enumerate(zip(actual, expected)):
        if not np.allclose(got, want, **tolerance):
            problems.append(f"variable {index}: max abs difference {np.max(np.abs(got - want)):.3g}")
    return problems


@pytest.mark.parametrize("case", CASES)
def test_one_replica_equals_the_optimizer_applied_by_hand_to_the_dense_gradient(case, runs):
    problems = differences(runs.one_replica[case], runs.by_hand[case], rtol=1e-6, atol=1e-6)
    assert not problems, f"{case}: " + "; ".join(problems)


@pytest.mark.parametrize("case", CASES)
def test_one_and_two_replicas_agree(case, runs):
    problems = differences(runs.two_replicas[case], runs.one_replica[case], rtol=1e-5, atol=1e-5)
    assert not problems, f"{case}: " + "; ".join(problems)


@pytest.mark.parametrize("case", CASES)
def test_a_resume_is_bitwise(case, runs):
    keys = [key for key in runs.uninterrupted_state if key.startswith(case + " ")]
    assert keys and sorted(keys) == sorted(k for k in runs.resumed_state if k.startswith(case + " "))
    differing = [key for key in keys
                 if not np.array_equal(runs.resumed_state[key], runs.uninterrupted_state[key])]
    assert not differing, f"{case}: resumed at step {RESUME_STEP}, differs in {differing}"


def test_every_clipping_case_clips(runs):
    """The table is not vacuous: each clipping option changes where training ends (Lion's
    update is the sign of its momentum, which scaling every gradient by one factor keeps)."""
    unchanged = []
    for case in CASES:
        optimizer, option = case.split("/")
        if option in ("none", "use_ema") or (optimizer == "lion" and option != "clipvalue"):
            continue
        moved = max(np.max(np.abs(a - b)) for a, b in
                    zip(runs.by_hand[case], runs.by_hand[f"{optimizer}/none"]))
        if moved < 1e-4:
            unchanged.append(f"{case} ({moved:.2g})")
    assert not unchanged, "clipping changed nothing in: " + ", ".join(unchanged)


def test_keras_alone_gets_other_numbers_on_these_repeated_sparse_rows():
    """The table's batches repeat indices enough to matter: Adam given the sparse gradient
    as it is (what a plain Keras loop does) ends far from Adam given its dense form."""
    case = "adam/none"
    model, reference = table.make_model(case), table.make_model(case)
    sparse_adam, dense_adam = table.make_optimizer(case), table.make_optimizer(case)

    @tf.function
    def step(batch):
        for one, optimizer, as_dense in ((model, sparse_adam, False), (reference, dense_adam, True)):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(table.per_example_loss(case, one, batch))
            gradients = tape.gradient(loss, one.trainable_variables)
            assert any(isinstance(g, tf.IndexedSlices) for g in gradients)
            if as_dense:
                gradients = [table.dense(g) for g in gradients]
            optimizer.apply_gradients(zip(gradients, one.trainable_variables))

    for batch in table.global_batches().take(STEPS):
        step(batch)
    gap = max(np.max(np.abs(a.numpy() - b.numpy()))
              for a, b in zip(model.trainable_variables, reference.trainable_variables))
    assert gap > 1e-3


# ------------------------------------------------------------------ refused before step 1


class OneOptimizer(tapekit.Trainer):
    """The table's model under whatever optimizer `make_optimizer` returns."""

    default_global_batch_size = table.GLOBAL_BATCH

    def __init__(self, make_optimizer=None, **kwargs):
        self.make_optimizer = make_optimizer
        super().__init__(**kwargs)

    def build(self):
        self.model = table.make_model("adam/none")
        self.optimizer = self.make_optimizer()

    def train_step(self, batch):
        with tf.GradientTape() as tape:
            loss = self.compute_loss(table.per_example_loss("adam/none", self.model, batch))
        self.apply_gradients(tape, loss, self.model, self.optimizer)
        return {"loss": loss}


@pytest.mark.parametrize("make_optimizer, options, expected", [
    (lambda: keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam()), {},
     r"LossScaleOptimizer is not supported: tapekit scales the loss itself.*"
     r"--precision=mixed_float16"),
    (lambda: keras.optimizers.Adam(gradient_accumulation_steps=2), TWO_REPLICAS,
     r"Adam\(gradient_accumulation_steps=2\) is not supported.*"
     r"--gradient_accumulation_steps=2"),
    (lambda: keras.optimizers.Adam(loss_scale_factor=128.0), {},
     r"Adam\(loss_scale_factor=128.0\) is not supported.*--precision=mixed_float16"),
    (lambda: keras.optimizers.Adam(global_clipnorm=1.0), {"clip_global_norm": 0.5},
     r"Adam\(global_clipnorm=1.0\) and clip_global_norm=0.5 \(--clip_global_norm\) both clip"),
], ids=["loss_scale_optimizer", "optimizer_accumulation", "loss_scale_factor",
        "two_global_clips"])
def test_optimizer_set_ups_tapekit_cannot_make_exact_are_refused_before_step_1(
        make_optimizer, options, expected, tmp_path):
    model_dir = tmp_path / "run"
    trainer = OneOptimizer(make_optimizer, progress="none", model_dir=str(model_dir), **options)
    with pytest.raises(tapekit.TapekitError, match=expected):
        trainer.fit(2, dataset=table.global_batches())
    assert trainer.current_step == 0
    assert not (model_dir / "checkpoints").exists() or not list((model_dir / "checkpoints").iterdir())


def test_the_users_optimizer_behaves_as_before_outside_tapekit():
    """tapekit's run does not leave its patch on the optimizer object (`tapekit.compat`)."""
    trainer = OneOptimizer(lambda: keras.optimizers.Adam(0.01, clipnorm=0.02), progress="none",
                           **TWO_REPLICAS)
    trainer.fit(2, dataset=table.global_batches())
    assert "_all_reduce_sum_gradients" not in vars(trainer.optimizer)
    assert trainer.optimizer.clipnorm == 0.02


def test_a_resume_on_two_replicas_is_bitwise(tmp_path):
    """(c) on two replicas, for Adam's five cases: the optimizer runs on the sum tapekit
    made, and its slots restore into every replica's copy."""
    cases = [case for case in CASES if case.startswith("adam/")]

    def fit(steps, **options):
        trainer = OptimizerTable(cases, progress="none", deterministic=True, **TWO_REPLICAS,
                                 **options)
        trainer.fit(steps, STEPS_PER_LOOP, dataset=table.global_batches())
        return trainer

    model_dir = str(tmp_path / "run")
    fit(RESUME_STEP, model_dir=model_dir)
    resumed, uninterrupted = fit(STEPS, model_dir=model_dir), fit(STEPS)
    assert resumed.history[0]["step"] == RESUME_STEP + STEPS_PER_LOOP
    expected, actual = table.all_state(uninterrupted), table.all_state(resumed)
    assert sorted(actual) == sorted(expected)
    assert [key for key in expected if not np.array_equal(actual[key], expected[key])] == []


def test_the_optimizer_gets_the_sum_over_replicas_once():
    """SGD is linear in its gradient, so a second sum over replicas (Keras's own, which
    tapekit leaves out when it has summed) would double the update: with a `clipnorm` too
    large to clip, 2 replicas must move the weights exactly as far as 1."""
    def train(**strategy):
        trainer = OneOptimizer(lambda: keras.optimizers.SGD(0.05, clipnorm=1e6),
                               progress="none", **strategy)
        before = [v.numpy() for v in table.make_model("adam/none").trainable_variables]
        trainer.fit(1, dataset=table.global_batches())
        return [v.numpy() - b for v, b in zip(trainer.model.trainable_variables, before)]

    one, two = train(), train(**TWO_REPLICAS)
    assert max(np.max(np.abs(step)) for step in one) > 1e-3  # the step moved the weights
    assert not differences(two, one, rtol=1e-5, atol=1e-7)


def test_a_learning_rate_schedule_with_clipping_trains_as_by_hand_on_one_and_two_replicas():
    """Adam on an ExponentialDecay schedule with its own clipnorm: the schedule reads the
    optimizer's iterations, which tapekit's path advances once per update."""
    def make():
        schedule = keras.optimizers.schedules.ExponentialDecay(0.01, decay_steps=2,
                                                               decay_rate=0.5)
        return keras.optimizers.Adam(schedule, clipnorm=0.02)

    def train(**strategy):
        trainer = OneOptimizer(make, progress="none", **strategy)
        trainer.fit(STEPS, STEPS_PER_LOOP, dataset=table.global_batches())
        assert int(trainer.optimizer.iterations.numpy()) == STEPS
        return [v.numpy() for v in trainer.model.trainable_variables]

    model, optimizer = table.make_model("adam/none"), make()

    @tf.function
    def step(batch):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(table.per_example_loss("adam/none", model, batch))
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip([table.dense(g) for g in gradients],
                                      model.trainable_variables))

    for batch in table.global_batches().take(STEPS):
        step(batch)
    hand = [v.numpy() for v in model.trainable_variables]
    one = train()
    assert not differences(one, hand, rtol=1e-6, atol=1e-6)
    assert not differences(train(**TWO_REPLICAS), one, rtol=1e-5, atol=1e-5)


class WithAnUnusedVariable(OneOptimizer):
    """The table's model plus a variable the loss does not use, under AdamW."""

    def build(self):
        super().build()
        self.unused = keras.Variable(np.ones(3, np.float32), name="unused")

    def train_step(self, batch):
        with tf.GradientTape() as tape:
            loss = self.compute_loss(table.per_example_loss("adam/none", self.model, batch))
        self.apply_gradients(tape, loss, [self.model, self.unused], self.optimizer,
                             allow_none_gradients=True)
        return {"loss": loss}


@pytest.mark.parametrize("options", [{}, {"clip_global_norm": 1.0}, TWO_REPLICAS,
                                     {"gradient_accumulation_steps": 2}],
                         ids=["plain", "clip_global_norm", "two_replicas", "accumulation"])
def test_a_variable_without_a_gradient_is_left_alone(options):
    """As Keras leaves out a variable whose gradient is None: AdamW's weight decay does not
    shrink it, on every path of `apply_gradients`."""
    trainer = WithAnUnusedVariable(lambda: keras.optimizers.AdamW(0.01, weight_decay=0.5),
                                   progress="none", **options)
    trainer.fit(4, dataset=table.global_batches())
    np.testing.assert_array_equal(trainer.unused.numpy(), np.ones(3, np.float32))


# ------------------------------------------------------------------ a tutorial's Transformer


def test_a_transformer_with_a_learned_position_embedding_trains_alike_on_one_and_two_replicas():
    """The Keras text-classification Transformer (token and position Embeddings) under Adam
    with its own `global_clipnorm`, 60 steps: on two replicas every row of the position
    table arrives from both, and Keras alone ends 1.7e-2 apart (TF 2.21, Keras 3.15.1);
    through tapekit, 7.5e-8."""
    from examples.transformer_classifier import TransformerClassifier

    def train(**strategy):
        trainer = TransformerClassifier(
            sequence_length=16, vocabulary_size=200, width=8, feed_forward_width=16,
            dropout_rate=0.0, global_clipnorm=0.05, num_examples=256, num_eval_examples=32,
            global_batch_size=16, progress="none", **strategy)  # the tutorial's Adam: 1e-3
        trainer.fit(60, steps_per_loop=30)
        return trainer

    one, two = train(), train(**TWO_REPLICAS)
    assert one.history[-1]["loss"] < one.history[0]["loss"]
    problems = differences([v.numpy() for v in two.model.trainable_variables],
                           [v.numpy() for v in one.model.trainable_variables], rtol=0, atol=1e-5)
    assert not problems, "; ".join(problems)
