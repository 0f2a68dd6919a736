"""run_eagerly: each step's Python runs once per step (per replica), with the compiled numbers."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tapekit

STRATEGIES = {
    "default": {},
    "one_device": {"strategy": "one_device", "device": "/cpu:0"},
    "mirrored": {"strategy": "mirrored", "cpu_replicas": 2},
}


class Noisy(tapekit.Trainer):
    """An MLP with Dropout, a keras metric, clipping by the optimizer; its step notes each
    call's loss with `.numpy()` (only possible eagerly) into `calls`."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.default_learning_rate = 0.01
        self.default_global_batch_size = 8
        self.calls = None

    def build(self):
        self.model = keras.Sequential([keras.layers.Dense(8, activation="relu"),
                                       keras.layers.Dropout(0.3, seed=1),
                                       keras.layers.Dense(1)])
        self.optimizer = keras.optimizers.Adam(self.learning_rate, clipnorm=0.5)
        self.mae = keras.metrics.MeanAbsoluteError(name="mae")

    def train_dataset(self, input_context):
        x = np.linspace(-2, 2, 64, dtype=np.float32).reshape(32, 2)
        y = np.sum(x, axis=1, keepdims=True) * 3
        return tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(
            input_context.get_per_replica_batch_size(self.global_batch_size))

    def train_step(self, batch):
        x, y = batch
        with tf.GradientTape() as tape:
            prediction = self.model(x, training=True)
            loss = self.compute_loss(tf.square(prediction - y))
        self.apply_gradients(tape, loss, self.model, self.optimizer)
        self.mae.update_state(y, prediction)
        if self.calls is not None:
            self.calls.append(float(loss.numpy()))  # fails when traced: a SymbolicTensor
        return {"loss": loss}

    def eval_step(self, batch):
        x, y = batch
        if self.calls is not None:
            self.calls.append("eval")
        return {"eval_loss": self.compute_loss(tf.square(self.model(x) - y))}


def _weights(trainer):
    return [v.numpy() for v in trainer.model.weights]


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_an_eager_run_runs_the_step_each_step_with_the_compiled_numbers(name):
    compiled = Noisy(seed=3, progress="none", **STRATEGIES[name])
    compiled_history = compiled.fit(train_steps=6, steps_per_loop=3)
    eager = Noisy(seed=3, progress="none", run_eagerly=True, **STRATEGIES[name])
    eager.calls = []
    eager_history = eager.fit(train_steps=6, steps_per_loop=3)
    replicas = eager.num_replicas
    # A step that only runs eagerly is built by one eager call on the first batch (updates
    # recorded, not applied; variables restored), then runs once per step on every replica.
    assert len(eager.calls) == (1 + 6) * replicas
    assert sorted(eager.calls[:replicas]) == pytest.approx(sorted(eager.calls[replicas:2 * replicas]))
    for a, b in zip(_weights(compiled), _weights(eager)):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)
    for row_a, row_b in zip(compiled_history, eager_history):
        assert row_b["loss"] == pytest.approx(row_a["loss"], rel=1e-6)
        assert row_b["mae"] == pytest.approx(row_a["mae"], rel=1e-6)
    assert eager.evaluate(steps=2) == pytest.approx(compiled.evaluate(steps=2), rel=1e-6)
    # eval_step traces (its build), then runs once per step: a side effect fires 1 + 2 times.
    assert eager.calls.count("eval") == (1 + 2) * replicas
    assert eager.train_loop_trace_count == 0  # nothing was compiled


def test_tensorflow_run_functions_eagerly_is_honoured():
    trainer = Noisy(progress="none")
    trainer.calls = []
    tf.config.run_functions_eagerly(True)
    try:
        trainer.fit(train_steps=4, steps_per_loop=2)
    finally:
        tf.config.run_functions_eagerly(False)
    assert len(trainer.calls) == 1 + 4  # the eager build call, then one per step
    trainer.calls = None
    trainer.fit(train_steps=6, steps_per_loop=2)  # compiled again once the switch is off
    assert trainer.train_loop_trace_count == 1


def test_eager_accumulation_clipping_and_a_resume_give_the_compiled_numbers(tmp_path):
    options = dict(seed=5, progress="none", gradient_accumulation_steps=2, clip_global_norm=0.1,
                   **STRATEGIES["mirrored"])
    compiled = Noisy(**options)
    compiled.fit(train_steps=6, steps_per_loop=2)
    first = Noisy(run_eagerly=True, model_dir=str(tmp_path), **options)
    first.fit(train_steps=4, steps_per_loop=2)
    resumed = Noisy(run_eagerly=True, model_dir=str(tmp_path), **options)
    resumed.fit(train_steps=6, steps_per_loop=2)
    assert resumed.current_step == 6 and int(resumed.optimizer.iterations.numpy()) == 3
    for a, b in zip(_weights(compiled), _weights(resumed)):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)


def test_an_eager_step_may_branch_in_python_on_a_tensor():
    class Branching(Noisy):
        def train_step(self, batch):
            outputs = super().train_step(batch)
            if outputs["loss"] > 1e9:  # a Python bool of an eager tensor
                raise AssertionError("unreachable")
            return outputs

    trainer = Branching(progress="none", run_eagerly=True)
    trainer.calls = []
    trainer.fit(train_steps=3, steps_per_loop=3)
    assert len(trainer.calls) == 1 + 3
