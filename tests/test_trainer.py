"""The core Trainer: compiled loop, metrics, losses, gradients, the seed workloads."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

import tapekit
from tapekit.models import MLP
from tapekit.trainers import GANTrainer, RegressionTrainer

from small_trainers import Unshuffled


def _issue_examples():
    """MyTrainer's 500 examples: x [500, 2], y = 2x₁ - x₂ + N(0, 0.01²)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 2)).astype(np.float32)
    y = (2 * x[:, :1] - x[:, 1:] + 0.01 * rng.standard_normal((500, 1))).astype(np.float32)
    return x, y


def _mean_squared_error(model, x, y):
    """The MSE of `model` on (x, y), eagerly, in float64 from the model's float32 output."""
    return float(np.mean((y.astype(np.float64) - model(x).numpy()) ** 2))


class MyTrainer(tapekit.Trainer):
    """The trainer from the issue's public-API example, on y = 2x₁ - x₂ + noise."""

    def build(self):
        self.model = MLP(hidden_units=10, output_units=1)
        self.optimizer = keras.optimizers.Adam(0.01)

    def train_dataset(self, input_context):
        return tapekit.per_replica_batches(tf.data.Dataset.from_tensor_slices(_issue_examples()),
                                           input_context, self.global_batch_size,
                                           shuffle_buffer_size=500)

    def train_step(self, batch):
        x, y = batch
        with tf.GradientTape() as tape:
            loss = self.compute_loss(tf.square(y - self.model(x, training=True)))
        self.apply_gradients(tape, loss, self.model, self.optimizer)
        return {"loss": loss}

    def eval_step(self, batch):
        x, y = batch
        return {"loss": self.compute_loss(tf.square(y - self.model(x)))}


def test_public_api_example_trains_and_writes_metrics(tmp_path):
    trainer = MyTrainer(model_dir=str(tmp_path), strategy="default", global_batch_size=100)
    history = trainer.fit(train_steps=500, steps_per_loop=50)
    assert [h["step"] for h in history] == list(range(50, 501, 50))
    assert history[-1]["loss"] < 0.2 * history[0]["loss"]
    assert trainer.current_step == 500
    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    lines = [line for line in lines if line["split"] != "stats"]  # a loop's time and memory
    assert len(lines) == 10
    assert {"split", "step", "loss", "steps_per_sec", "examples_per_sec"} <= set(lines[0])
    assert lines[-1]["step"] == 500 and lines[-1]["split"] == "train"
    assert lines[-1]["examples_per_sec"] == pytest.approx(lines[-1]["steps_per_sec"] * 100)
    # Five steps of 100 are one epoch: each of the 500 examples once, in whatever order.
    evaluation = trainer.evaluate(steps=5)
    assert evaluation["loss"] == pytest.approx(_mean_squared_error(trainer.model, *_issue_examples()),
                                               rel=1e-5)


def test_compiled_loop_is_traced_once_across_many_loops():
    trainer = MyTrainer(global_batch_size=50)
    trainer.fit(train_steps=95, steps_per_loop=10)  # ten loops, the last one clamped to 5 steps
    assert trainer.train_loop_trace_count == 1
    trainer.fit(train_steps=120, steps_per_loop=7)  # a later fit continues to step 120
    assert trainer.current_step == 120
    assert trainer.train_loop_trace_count == 1


def test_loop_metrics_are_the_mean_over_the_loop_steps():
    class Counting(MyTrainer):
        def train_step(self, batch):
            super().train_step(batch)
            return {"step_seen": tf.cast(self.global_step, tf.float32)}

    trainer = Counting(global_batch_size=10)
    history = trainer.fit(train_steps=8, steps_per_loop=4)
    # the step counter reads 0..3 in the first loop and 4..7 in the second
    assert [h["step_seen"] for h in history] == [1.5, 5.5]


def test_fit_trains_on_the_arrays_or_the_dataset_it_is_given():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((200, 2)).astype(np.float32)
    y = x[:, :1] + x[:, 1:] + 3.0  # not MyTrainer's own y = 2x₁ - x₂
    trainer = MyTrainer(global_batch_size=20)
    trainer.evaluate(steps=1)  # builds the model, trains nothing
    # Arrays of one global batch: the step's loss is the MSE on exactly these 20 rows.
    expected = _mean_squared_error(trainer.model, x[:20], y[:20])
    history = trainer.fit(train_steps=1, steps_per_loop=1, dataset=(x[:20], y[:20]))
    assert history[-1]["loss"] == pytest.approx(expected, rel=1e-5)
    # A dataset of global batches, in order: the next step's loss is on its first batch.
    expected = _mean_squared_error(trainer.model, x[:20], -y[:20])
    dataset = tf.data.Dataset.from_tensor_slices((x, -y)).repeat().batch(20)
    history = trainer.fit(train_steps=2, steps_per_loop=1, dataset=dataset)
    assert trainer.current_step == 2
    assert history[-1]["loss"] == pytest.approx(expected, rel=1e-5)
    # Trained on the arrays, the model learns their relation, not its own data's.
    trainer.fit(train_steps=1000, steps_per_loop=500, dataset=(x, y))
    assert _mean_squared_error(trainer.model, x, y) < 0.05
    assert _mean_squared_error(trainer.model, *_issue_examples()) > 1.0


def test_compute_loss_is_the_global_mean_and_rejects_scalars():
    trainer = MyTrainer(global_batch_size=4)
    loss = trainer.compute_loss(tf.constant([[1.0, 3.0], [2.0, 2.0], [0.0, 0.0], [4.0, 4.0]]))
    assert float(loss) == pytest.approx(2.0)
    with pytest.raises(tapekit.TapekitError, match="one loss per example"):
        trainer.compute_loss(tf.constant(1.0))


def test_a_variable_without_gradient_is_named_in_one_error():
    class Forgetful(MyTrainer):
        def build(self):
            super().build()
            self.unused = keras.layers.Dense(1, name="unused_head")
            self.unused.build((None, 2))

        def train_step(self, batch):
            x, y = batch
            with tf.GradientTape() as tape:
                loss = self.compute_loss(tf.square(y - self.model(x)))
            self.apply_gradients(tape, loss, [self.model, self.unused], self.optimizer)
            return {"loss": loss}

    trainer = Forgetful(global_batch_size=10)
    with pytest.raises(tapekit.TapekitError) as raised:
        trainer.fit(train_steps=2, steps_per_loop=1)
    message = str(raised.value)
    assert "\n" not in message
    assert "no gradient for 2 variable(s)" in message and "unused_head/kernel" in message
    assert trainer.current_step == 0  # nothing ran


def test_train_step_must_return_a_dict_of_scalars():
    class ReturnsVector(MyTrainer):
        def train_step(self, batch):
            super().train_step(batch)
            return {"per_example": batch[1][:, 0]}

    with pytest.raises(tapekit.TapekitError, match="'per_example' with shape"):
        ReturnsVector(global_batch_size=10).fit(train_steps=1)


def test_bad_constructor_arguments_raise_clear_errors():
    with pytest.raises(tapekit.TapekitError, match="global_batch_size must be a positive"):
        MyTrainer(global_batch_size=0)
    with pytest.raises(tapekit.TapekitError, match="learning_rate must be positive"):
        MyTrainer(learning_rate=-1.0)
    with pytest.raises(tapekit.TapekitError, match="train_steps must be a positive integer"):
        MyTrainer(global_batch_size=10).fit(train_steps=0)


def test_jit_compile_trains_the_same_workload():
    trainer = MyTrainer(global_batch_size=50, jit_compile=True)
    history = trainer.fit(train_steps=200, steps_per_loop=100)
    assert history[-1]["loss"] < history[0]["loss"]
    assert trainer.train_loop_trace_count == 1


# ------------------------------------------------------------------ the seed workloads


def test_linear_regression_defaults_learn_the_seed_line():
    trainer = RegressionTrainer(model="linear")
    trainer.fit(train_steps=1000, steps_per_loop=100)
    assert trainer.model.w.numpy().item() == pytest.approx(3.0, abs=0.05)
    assert trainer.model.b.numpy().item() == pytest.approx(2.0, abs=0.05)
    assert trainer.results_summary().startswith("Learned w: [3.")


def test_seed_mlp_loss_falls_clearly():
    trainer = RegressionTrainer(model="mlp")
    history = trainer.fit(train_steps=500, steps_per_loop=50)
    assert len(trainer.model.trainable_variables) == 4  # W1, b1, W2, b2 as in the seed
    assert history[-1]["loss"] < 0.6 * history[0]["loss"]


def _weights(model):
    return [v.numpy().copy() for v in model.trainable_variables]


def test_gan_updates_both_networks_every_step_with_finite_losses():
    trainer = GANTrainer()
    trainer.fit(train_steps=1, steps_per_loop=1)
    generator, discriminator = trainer.gan.generator, trainer.gan.discriminator
    count = len(trainer.gan.trainable_variables)
    assert count == len(generator.trainable_variables) + len(discriminator.trainable_variables) == 8
    assert not {id(v) for v in generator.trainable_variables} & {
        id(v) for v in discriminator.trainable_variables}
    for _ in range(3):
        before_g, before_d = _weights(generator), _weights(discriminator)
        logs = trainer.fit(train_steps=trainer.current_step + 1, steps_per_loop=1)[-1]
        assert np.isfinite(logs["generator_loss"]) and np.isfinite(logs["discriminator_loss"])
        for old, new in zip(before_g + before_d, _weights(generator) + _weights(discriminator)):
            assert not np.array_equal(old, new)
        assert len(trainer.gan.trainable_variables) == count


def test_gan_learns_a_shifted_gaussian():
    trainer = GANTrainer(real_mean=4.0, real_stddev=1.25, seed=1)
    untrained = trainer.evaluate()["w1"]
    trainer.fit(train_steps=2000, steps_per_loop=500)
    samples = trainer.sample()
    assert abs(samples.mean() - 4.0) < 0.5
    assert trainer.train_loop_trace_count == 1
    # The README's bar for "learned the target": W1 below 0.2 stddevs (0.25 here).
    assert untrained > 3.0 and trainer.evaluate()["w1"] < 0.25
    assert "Wasserstein-1 to the real samples" in trainer.results_summary()


def test_w1_is_exact_for_one_dimensional_samples_and_the_same_on_two_replicas():
    from tapekit.trainers.gan import wasserstein_1
    real = np.array([[0.0], [1.0], [5.0]], np.float32)
    fake = np.array([[4.0], [2.0], [0.5]], np.float32)  # pairs (0, 0.5), (1, 2), (5, 4)
    assert float(wasserstein_1(real, fake)) == pytest.approx((0.5 + 1.0 + 1.0) / 3)
    values = [GANTrainer(strategy=strategy, cpu_replicas=replicas, seed=3).evaluate()["w1"]
              for strategy, replicas in (("default", 1), ("mirrored", 2))]
    assert values[1] == pytest.approx(values[0], rel=1e-5)


def test_a_step_that_differentiates_and_updates_by_itself_works():
    """tape.gradient and optimizer.apply_gradients called directly, as in a hand-written loop."""

    class HandWritten(MyTrainer):
        def train_step(self, batch):
            x, y = batch
            with tf.GradientTape() as tape:
                loss = self.compute_loss(tf.square(y - self.model(x, training=True)))
            grads = tape.gradient(loss, self.model.trainable_variables)
            self.optimizer.apply_gradients(zip(grads, self.model.trainable_variables))
            return {"loss": loss}

    trainer = HandWritten(global_batch_size=50)
    history = trainer.fit(train_steps=200, steps_per_loop=100)
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert int(trainer.optimizer.iterations.numpy()) == 200
    assert "apply_gradients" not in vars(trainer.optimizer)  # the probe's stand-in is gone


class _PythonControlFlow(Unshuffled):
    """A step with a tensor-dependent `if` and a `for` over tf.range, as tutorials write them:
    AutoGraph must convert the user's step (tapekit's own code is traced without it)."""

    def train_step(self, batch):
        x, y = batch
        with tf.GradientTape() as tape:
            error = tf.square(y - self.model(x))
            if tf.reduce_mean(error) > 1e6:  # never true here: the loss stays the MSE
                error = error * 0.0
            loss = self.compute_loss(error)
        self.apply_gradients(tape, loss, self.model, self.optimizer)
        rows_seen = tf.constant(0.0)
        for _ in tf.range(tf.shape(x)[0]):
            rows_seen += 1.0
        return {"loss": loss, "rows_seen": rows_seen}


def test_tensor_control_flow_in_the_user_step_is_converted_by_autograph():
    trainer = _PythonControlFlow()
    history = trainer.fit(train_steps=4, steps_per_loop=2)
    assert [entry["rows_seen"] for entry in history] == [100.0, 100.0]
    assert history[1]["loss"] < history[0]["loss"]
