"""Training by epochs: passes over data that ends, each reshuffled, resumable mid-pass."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

import tapekit
from tapekit.errors import TapekitError

EXAMPLES, BATCH = 40, 8  # 5 steps per epoch


class Passes(tapekit.Trainer):
    """A linear model on 40 examples that end (shuffled each pass); the step returns the
    batch's example ids, summed and hashed, so a row tells which examples it saw."""

    def __init__(self, repeat=False, in_memory=False, **kwargs):
        super().__init__(**kwargs)
        self.default_learning_rate = 0.05
        self.default_global_batch_size = BATCH
        self.repeat, self.in_memory = repeat, in_memory
        ids = np.arange(EXAMPLES, dtype=np.float32)[:, None]
        self.examples = (ids, np.sin(ids) + 0.1 * ids)

    def build(self):
        self.model = keras.layers.Dense(1)
        self.optimizer = keras.optimizers.SGD(self.learning_rate)

    def train_arrays(self):
        return self.examples if self.in_memory else None

    def train_dataset(self, input_context):
        dataset = tf.data.Dataset.from_tensor_slices(self.examples).shuffle(EXAMPLES, seed=3)
        if self.repeat:
            dataset = dataset.repeat()
        return dataset.batch(input_context.get_per_replica_batch_size(self.global_batch_size))

    def eval_dataset(self, input_context):
        return tf.data.Dataset.from_tensor_slices(self.examples).batch(BATCH)

    def train_step(self, batch):
        ids, y = batch
        with tf.GradientTape() as tape:
            loss = self.compute_loss(tf.square(self.model(ids / EXAMPLES) - y))
        self.apply_gradients(tape, loss, self.model, self.optimizer)
        return {"loss": loss, "order": tf.reduce_sum(tf.sin(ids * 1.7) * ids)}

    def eval_step(self, batch):
        ids, y = batch
        return {"loss": self.compute_loss(tf.square(self.model(ids / EXAMPLES) - y))}


class StopAt(tapekit.Callback):
    def __init__(self, step):
        self.step = step

    def on_loop_end(self, step, logs):
        if step >= self.step:
            self.trainer.stop_training = True


class Epochs(tapekit.Callback):
    def __init__(self):
        self.ended, self.evaluated = [], []

    def on_epoch_end(self, step, epoch):
        self.ended.append((step, epoch))

    def on_eval_end(self, step, logs):
        self.evaluated.append(step)


def test_each_epoch_is_one_reshuffled_pass_and_rows_carry_it():
    trainer = Passes(progress="none")
    epochs = Epochs()
    history = trainer.fit(train_epochs=3, steps_per_loop=2, callbacks=[epochs])
    assert trainer.current_step == 3 * EXAMPLES // BATCH
    assert [(row["step"], row["epoch"]) for row in history] == [
        (2, 1), (4, 1), (5, 1), (7, 2), (9, 2), (10, 2), (12, 3), (14, 3), (15, 3)]
    assert epochs.ended == [(5, 1), (10, 2), (15, 3)]
    orders = [[row["order"] for row in history if row["epoch"] == e] for e in (1, 2, 3)]
    assert orders[0] != pytest.approx(orders[1]) and orders[1] != pytest.approx(orders[2])


@pytest.mark.parametrize("strategy", [{}, {"strategy": "mirrored", "cpu_replicas": 2}],
                         ids=["one_replica", "two_replicas"])
def test_a_run_resumed_mid_epoch_sees_the_batches_an_uninterrupted_one_sees(tmp_path, strategy):
    options = dict(progress="none", deterministic=True, **strategy)
    whole = Passes(model_dir=str(tmp_path / "whole"), **options)
    expected = whole.fit(train_epochs=3, steps_per_loop=2)
    first = Passes(model_dir=str(tmp_path / "resumed"), **options)
    first.fit(train_epochs=3, steps_per_loop=2, callbacks=[StopAt(7)])  # mid epoch 2
    assert first.current_step == 7
    resumed = Passes(model_dir=str(tmp_path / "resumed"), **options)
    rest = resumed.fit(train_epochs=3, steps_per_loop=2)
    assert resumed.current_step == 15
    after = [row for row in expected if row["step"] > 7]
    assert [(r["step"], r["epoch"], r["order"]) for r in rest] == [
        (r["step"], r["epoch"], r["order"]) for r in after]
    for a, b in zip(whole.model.weights, resumed.model.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_eval_and_checkpoints_every_n_epochs(tmp_path):
    trainer = Passes(progress="none", model_dir=str(tmp_path))
    epochs = Epochs()
    trainer.fit(train_epochs=3, steps_per_loop=10, eval_every_epochs=2,
                checkpoint_every_epochs=1, callbacks=[epochs])
    assert epochs.evaluated == [10, 15]  # epoch 2, and the end
    saved = sorted(int(p.name.split("-")[1].split(".")[0])
                   for p in (tmp_path / "checkpoints").glob("ckpt-*.index"))
    assert saved == [5, 10, 15]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows if row["split"] == "train"] == [1, 2, 3]
    assert all(isinstance(row["epoch"], int) for row in rows if row["split"] == "train")


def test_in_memory_arrays_train_for_epochs_of_their_length():
    trainer = Passes(progress="none", in_memory=True)
    history = trainer.fit(train_epochs=2, steps_per_loop=3)
    assert trainer.current_step == 2 * EXAMPLES // BATCH
    assert [(row["step"], row["epoch"]) for row in history] == [(3, 1), (5, 1), (8, 2), (10, 2)]


def test_epochs_of_data_that_never_ends_or_with_train_steps_are_refused():
    with pytest.raises(TapekitError, match="train_epochs needs training data that ends"):
        Passes(progress="none", repeat=True).fit(train_epochs=2)
    with pytest.raises(TapekitError, match=r"not both \(got train_steps=10, train_epochs=2\)"):
        Passes(progress="none").fit(train_steps=10, train_epochs=2)
    with pytest.raises(TapekitError, match="not neither"):
        Passes(progress="none").fit()


def test_one_model_dir_is_trained_by_steps_or_by_epochs_not_both(tmp_path):
    by_steps, by_epochs = tmp_path / "steps", tmp_path / "epochs"
    Passes(progress="none", model_dir=str(by_steps)).fit(train_steps=5, steps_per_loop=5)
    with pytest.raises(TapekitError, match="trained by train_steps .*resume with train_steps"):
        Passes(progress="none", model_dir=str(by_steps)).fit(train_epochs=2)
    Passes(progress="none", model_dir=str(by_epochs)).fit(train_epochs=1)
    with pytest.raises(TapekitError, match=r"trained by train_epochs \(train_epochs=1\)"):
        Passes(progress="none", model_dir=str(by_epochs)).fit(train_steps=50)
    # nothing was changed: the runs go on as they were measured
    assert Passes(progress="none", model_dir=str(by_epochs)).fit(train_epochs=2)[-1]["epoch"] == 2
