"""The run behind tests/data/saved_run/: a checkpoint written by tapekit before its modules
moved into subpackages, which later code must restore and resume bit for bit.

Regenerate only on purpose (it is the point that the files stay as they were):
    .venv/bin/python -c "import sys; sys.path.insert(0, 'tests'); import saved_run; saved_run.write()"
"""

import os
import shutil
import tempfile

import keras
import numpy as np
import tensorflow as tf

import tapekit

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "saved_run")
RESUME_STEP, FINAL_STEP = 6, 12


class SavedRunTrainer(tapekit.Trainer):
    """Dropout (a Keras SeedGenerator), Adam with global_clipnorm, a keras metric and draws
    from `self.rng`: the state that must come back exactly."""

    default_global_batch_size = 16

    def build(self):
        self.model = keras.Sequential([keras.layers.Dense(8, activation="relu"),
                                       keras.layers.Dropout(0.3), keras.layers.Dense(1)])
        self.optimizer = keras.optimizers.Adam(0.01, global_clipnorm=1.0)
        self.error = keras.metrics.MeanAbsoluteError(name="mae")

    def train_arrays(self):
        x = tf.random.stateless_normal([128, 4], seed=[1, 2])
        return x, tf.reduce_sum(x * [1.0, -2.0, 0.5, 3.0], axis=1, keepdims=True)

    def train_step(self, batch):
        x, y = batch
        x = x + 0.01 * self.rng.normal(tf.shape(x))
        with tf.GradientTape() as tape:
            prediction = self.model(x, training=True)
            loss = self.compute_loss(tf.square(y - prediction))
        self.apply_gradients(tape, loss, self.model, self.optimizer)
        self.error.update_state(y, prediction)
        return {"loss": loss}


def trainer(model_dir):
    return SavedRunTrainer(model_dir=model_dir, seed=3, deterministic=True,
                           checkpoint_every_steps=RESUME_STEP, progress="none")


def weights(run) -> dict:
    """Every variable a checkpoint holds, by its checkpoint name."""
    return {v.path if hasattr(v, "path") else v.name: np.asarray(v.numpy())
            for v in run.model.variables + run.optimizer.variables}


def write(target: str = DATA) -> None:
    """Trains 12 steps uninterrupted; keeps run.json, ckpt-6 and the final variables."""
    with tempfile.TemporaryDirectory() as model_dir:
        run = trainer(model_dir)
        run.fit(train_steps=FINAL_STEP, steps_per_loop=3)
        shutil.rmtree(target, ignore_errors=True)
        os.makedirs(os.path.join(target, "checkpoints"))
        shutil.copy(os.path.join(model_dir, "run.json"), target)
        checkpoints = os.path.join(model_dir, "checkpoints")
        for name in os.listdir(checkpoints):
            if name.startswith(f"ckpt-{RESUME_STEP}."):
                shutil.copy(os.path.join(checkpoints, name), os.path.join(target, "checkpoints"))
        with open(os.path.join(target, "checkpoints", "checkpoint"), "w") as stream:
            stream.write(f'model_checkpoint_path: "ckpt-{RESUME_STEP}"\n'
                         f'all_model_checkpoint_paths: "ckpt-{RESUME_STEP}"\n')
        np.savez(os.path.join(target, f"step_{FINAL_STEP}.npz"), **weights(run))
