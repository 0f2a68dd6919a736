"""An optimizer's `use_ema=True` as Keras users expect it (`tapekit.run.ema`): the models end
`fit` (and `restore`) on the averages, evaluations during `fit` report both, best/ may keep
either, exports serve the averages, and training always goes on from the raw weights."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

import tapekit


class Averaged(tapekit.Trainer):
    default_global_batch_size = 16

    def __init__(self, use_ema=True, **options):
        super().__init__(**options)
        self.use_ema = use_ema

    def build(self):
        self.model = keras.Sequential([keras.layers.Dense(8, activation="tanh"),
                                       keras.layers.Dense(1)])
        self.optimizer = keras.optimizers.Adam(0.05, use_ema=self.use_ema, ema_momentum=0.9)

    def train_arrays(self):
        x = tf.random.stateless_uniform([256, 1], [3, 4], -1.0, 1.0)
        return x, tf.sin(3.0 * x)

    def train_step(self, batch):
        x, y = batch
        with tf.GradientTape() as tape:
            loss = self.compute_loss(tf.square(y - self.model(x, training=True)))
        self.apply_gradients(tape, loss, self.model, self.optimizer)
        return {"loss": loss}

    def eval_dataset(self, input_context):
        x = tf.random.stateless_uniform([64, 1], [5, 6], -1.0, 1.0)
        return tapekit.per_replica_batches(tf.data.Dataset.from_tensor_slices((x, tf.sin(3.0 * x))),
                                           input_context, self.global_batch_size, repeat=False)

    def eval_step(self, batch):
        x, y = batch
        return {"loss": self.compute_loss(tf.square(y - self.model(x)))}

    def export_model(self):
        return self.model, [tf.TensorSpec([None, 1], tf.float32, name="x")]


def weights(trainer):
    return [v.numpy() for v in trainer.model.weights + trainer.optimizer.variables]


def replicas(count):
    return dict(strategy="mirrored", cpu_replicas=2) if count == 2 else {}


@pytest.mark.parametrize("count", [1, 2])
def test_fit_ends_on_the_averages_and_goes_on_from_the_raw_weights_bit_for_bit(tmp_path, count):
    options = dict(seed=2, deterministic=True, progress="none", checkpoint_every_steps=30,
                   **replicas(count))
    whole = Averaged(model_dir=str(tmp_path / "whole"), **options)
    whole.fit(train_steps=60, steps_per_loop=15)
    raw = Averaged(use_ema=False, **options)  # the same raw updates, no averages
    raw.fit(train_steps=60, steps_per_loop=15)
    ends = [a - b for a, b in zip(whole.model.get_weights(), raw.model.get_weights())]
    assert max(np.max(np.abs(d)) for d in ends) > 1e-3  # the models hold the averages
    # fit again continues from the raw weights: 30 + 30 steps end where 60 do
    twice = Averaged(**options)
    twice.fit(train_steps=30, steps_per_loop=15)
    twice.fit(train_steps=60, steps_per_loop=15)
    # and a run stopped at 30 and resumed (a new trainer on its model_dir) does too
    Averaged(model_dir=str(tmp_path / "parts"), **options).fit(train_steps=30, steps_per_loop=15)
    resumed = Averaged(model_dir=str(tmp_path / "parts"), **options)
    resumed.fit(train_steps=60, steps_per_loop=15)
    for other in (twice, resumed):
        for a, b in zip(weights(whole), weights(other)):
            np.testing.assert_array_equal(a, b)
    # restore() gives the averages too (as after fit), from the raw weights in the checkpoint
    restored = Averaged(model_dir=str(tmp_path / "whole"), **options)
    assert restored.restore() == 60
    for a, b in zip(whole.model.get_weights(), restored.model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_evaluations_report_both_best_keeps_the_averages_and_exports_serve_them(tmp_path):
    trainer = Averaged(model_dir=str(tmp_path), seed=2, progress="none",
                       best_metric="eval_ema_loss")
    trainer.fit(train_steps=60, steps_per_loop=20, eval_every_steps=20)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evaluations = [row for row in rows if row["split"] == "eval"]
    assert [row["step"] for row in evaluations] == [20, 40, 60]
    assert all({"loss", "ema_loss", "best_eval_ema_loss"} <= set(row) for row in evaluations)
    assert all(row["loss"] != row["ema_loss"] for row in evaluations)
    best = json.loads((tmp_path / "best" / "best.json").read_text())
    assert best["metric"] == "eval_ema_loss"
    assert best["value"] == min(row["ema_loss"] for row in evaluations)
    x = np.linspace(-1, 1, 7, dtype=np.float32).reshape(-1, 1)
    served = tf.saved_model.load(str(tmp_path / "best" / "saved_model")).signatures[
        "serving_default"]
    if best["step"] == 60:  # the averaged model of the last evaluation is the one fit ends on
        np.testing.assert_allclose(list(served(x=tf.constant(x)).values())[0].numpy(),
                                   trainer.model(x).numpy(), rtol=1e-6, atol=1e-6)
    trainer.export(str(tmp_path / "export"))  # after fit: the averages, as the model holds
    exported = tf.saved_model.load(str(tmp_path / "export")).signatures["serving_default"]
    np.testing.assert_allclose(list(exported(x=tf.constant(x)).values())[0].numpy(),
                               trainer.model(x).numpy(), rtol=1e-6, atol=1e-6)
    after = trainer.evaluate()  # outside fit: the weights the models hold, the averages
    assert after["loss"] == pytest.approx(evaluations[-1]["ema_loss"], rel=1e-6)
