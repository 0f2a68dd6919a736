"""Faults an unattended job meets, handled without a person: a torn checkpoint, a full disk,
a hook that raises."""

import glob
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import tapekit
from tapekit.errors import TapekitError


class Noisy(tapekit.Trainer):
    """Dropout, BatchNorm and a seeded, reshuffled tf.data pipeline: what a user writes."""

    default_global_batch_size = 16

    def build(self):
        self.model = keras.Sequential([keras.layers.Dense(8), keras.layers.BatchNormalization(),
                                       keras.layers.Dropout(0.2, seed=1), keras.layers.Dense(1)])
        self.optimizer = keras.optimizers.Adam(0.01)

    def train_dataset(self, input_context):
        rng = np.random.default_rng(0)
        x = rng.standard_normal((256, 4)).astype(np.float32)
        y = x @ np.array([[1.0], [-2.0], [0.5], [3.0]], np.float32)
        return tapekit.per_replica_batches(tf.data.Dataset.from_tensor_slices((x, y)),
                                           input_context, self.global_batch_size,
                                           shuffle_buffer_size=256, seed=self.seed)

    def train_step(self, batch):
        x, y = batch
        with tf.GradientTape() as tape:
            loss = self.compute_loss(tf.square(self.model(x, training=True) - y))
        self.apply_gradients(tape, loss, self.model, self.optimizer)
        return {"loss": loss}


def _train(model_dir, steps, **options):
    trainer = Noisy(model_dir=str(model_dir), progress="none", deterministic=True,
                    checkpoint_every_steps=10, **options)
    trainer.fit(train_steps=steps, steps_per_loop=10)
    return trainer


def _tear(path):
    """Truncates checkpoint `path`'s data file to half, as a write cut short would."""
    (data,) = glob.glob(path + ".data-*")
    size = os.path.getsize(data)
    with open(data, "r+b") as stream:
        stream.truncate(size // 2)


def test_a_torn_newest_checkpoint_is_set_aside_and_the_run_resumes_from_the_one_before(tmp_path):
    whole = _train(tmp_path / "whole", 40)
    _train(tmp_path / "torn", 30)
    _tear(str(tmp_path / "torn" / "checkpoints" / "ckpt-30"))
    resumed = _train(tmp_path / "torn", 40)  # no flag changed: it falls back by itself
    for a, b in zip(whole.model.weights, resumed.model.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    aside = glob.glob(str(tmp_path / "torn" / "checkpoints" / "set_aside-*" / "ckpt-30.*"))
    assert len(aside) == 2  # moved, data and index, never deleted
    run = json.loads((tmp_path / "torn" / "run.json").read_text())
    fell_back = run["resumes"][-1]["fell_back"]
    assert fell_back["damaged"][0].endswith("ckpt-30") and fell_back["resumed_from"].endswith(
        "ckpt-20") and run["resumes"][-1]["step"] == 20


def test_an_explicit_restore_from_a_torn_checkpoint_never_falls_back(tmp_path):
    _train(tmp_path, 30)
    torn = str(tmp_path / "checkpoints" / "ckpt-30")
    _tear(torn)
    with pytest.raises(TapekitError, match="ckpt-30' is damaged or unreadable"):
        _train(tmp_path, 40, restore_from=torn)
    assert os.path.exists(torn + ".index")  # left where it was


def test_when_no_checkpoint_is_readable_the_error_names_the_newest(tmp_path):
    _train(tmp_path, 20)
    for path in ("ckpt-10", "ckpt-20"):
        _tear(str(tmp_path / "checkpoints" / path))
    with pytest.raises(TapekitError, match="ckpt-20' is damaged or unreadable"):
        _train(tmp_path, 30)
