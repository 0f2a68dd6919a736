"""Trainers for the subprocess fault-tolerance tests: print final weights; can pause for the
test at a chosen step, wait for an evaluator, or run slowly.

The pause and the wait are handshakes through files, so a test acts on a state it has seen
(a checkpoint saved, a loop paused) instead of racing a running process.
"""

import json
import os
import time

import keras
import tensorflow as tf
from absl import flags

import tapekit
from tapekit.trainers import GANTrainer, RegressionTrainer

# A guard against a test that died without killing its process; never reached otherwise.
_HANDSHAKE_TIMEOUT_SECS = 120


def _wait_until(done, what):
    deadline = time.monotonic() + _HANDSHAKE_TIMEOUT_SECS
    while not done():
        if time.monotonic() > deadline:
            raise RuntimeError(f"resumable: gave up waiting for {what}")
        time.sleep(0.02)


class _Sleep(tapekit.Callback):
    def __init__(self, seconds):
        self.seconds = seconds

    def on_loop_end(self, step, logs):
        time.sleep(self.seconds)


class _PauseAt(tapekit.Callback):
    """At the end of the loop that reaches `step` (after tapekit's own callbacks, so a
    checkpoint due there is saved), writes the step to `path`, then waits until `path`.go
    exists; a signal that arrives meanwhile is handled as during a loop."""

    def __init__(self, step, path):
        self.step, self.path = step, path

    def on_loop_end(self, step, logs):
        if step != self.step:
            return
        with open(self.path + ".tmp", "w") as file:
            file.write(str(step))
        os.replace(self.path + ".tmp", self.path)  # the test never reads a half-written file
        _wait_until(lambda: os.path.exists(self.path + ".go"), f"{self.path}.go")


class _WaitForEvaluation(tapekit.Callback):
    """After each loop end that saved a checkpoint, waits until an evaluator process has
    written that step's row to MODEL_DIR/eval_metrics.jsonl (so none is deleted unseen)."""

    def on_loop_end(self, step, logs):
        model_dir = self.trainer.model_dir
        latest = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
        if latest is None or not latest.endswith(f"ckpt-{step}"):
            return
        rows = os.path.join(model_dir, "eval_metrics.jsonl")
        _wait_until(lambda: os.path.exists(rows) and any(
            json.loads(line)["step"] == step for line in open(rows).read().splitlines()
            if line.endswith("}")), f"the evaluation of step {step} in {rows}")


class _Reporting:
    """Mixin: prints the final weights; --pause_at_step, --wait_for_evaluation and
    --sleep_per_loop let a test act on a run in progress."""

    # a resumed run need not pause, wait or sleep as the first one did
    arguments_safe_to_change = ("sleep_per_loop", "pause_at_step", "pause_file",
                                "wait_for_evaluation")

    @classmethod
    def define_flags(cls):
        super().define_flags()
        flags.DEFINE_float("sleep_per_loop", 0.0, "Seconds to sleep after each loop.")
        flags.DEFINE_integer("pause_at_step", 0, "Pause at the end of the loop that reaches this "
                             "step (0: never): write --pause_file, wait for PAUSE_FILE.go.")
        flags.DEFINE_string("pause_file", None, "Written (holding the step) when paused.")
        flags.DEFINE_bool("wait_for_evaluation", False, "After each checkpoint, wait until "
                          "MODEL_DIR/eval_metrics.jsonl has its step.")

    def __init__(self, sleep_per_loop=0.0, pause_at_step=0, pause_file=None,
                 wait_for_evaluation=False, **kwargs):
        if pause_at_step and not pause_file:
            raise tapekit.TapekitError("--pause_at_step needs --pause_file.")
        self.sleep_per_loop = sleep_per_loop
        self.pause_at_step, self.pause_file = pause_at_step, pause_file
        self.wait_for_evaluation = wait_for_evaluation
        super().__init__(**kwargs)

    def fit(self, *args, callbacks=(), **kwargs):
        extra = [_Sleep(self.sleep_per_loop)] if self.sleep_per_loop else []
        if self.pause_at_step:
            extra.append(_PauseAt(self.pause_at_step, self.pause_file))
        if self.wait_for_evaluation:
            extra.append(_WaitForEvaluation())
        return super().fit(*args, callbacks=list(callbacks) + extra, **kwargs)

    def results_summary(self):
        models = [self.gan] if hasattr(self, "gan") else [self.model]
        weights = [v.numpy().tolist() for m in models for v in m.trainable_variables]
        return "WEIGHTS " + json.dumps({"step": self.current_step, "weights": weights})


class Regression(_Reporting, RegressionTrainer):
    pass


class GAN(_Reporting, GANTrainer):
    pass


class Poisoned(_Reporting, tapekit.Trainer):
    """Linear regression (y = 3x + 2 + noise, Adam) on batches made from their position in
    the data, so every run and every replica count sees the same ones; the labels of the
    steps in `poison` are multiplied by `factor` (a corrupt shard). With `steps_per_epoch`
    the data ends there, and every pass is the same (`poison` counts steps in a pass)."""

    default_global_batch_size = 32
    default_learning_rate = 0.05

    @classmethod
    def define_flags(cls):
        super().define_flags()
        flags.DEFINE_list("poison", [], "Global steps whose labels are multiplied by --factor.")
        flags.DEFINE_float("factor", 1e30, "What poisoned labels are multiplied by.")

    def __init__(self, poison=(), factor=1e30, steps_per_epoch=None, **kwargs):
        self.poison = tuple(int(step) for step in poison)
        self.factor = float(factor)
        self.steps_per_epoch = steps_per_epoch  # data that ends (each pass the same batches)
        super().__init__(**kwargs)

    def build(self):
        self.model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
        self.optimizer = keras.optimizers.Adam(self.learning_rate)

    def train_dataset(self, context):
        local_replicas = context.num_replicas_in_sync // context.num_input_pipelines
        size = self.global_batch_size // context.num_replicas_in_sync
        poison = tf.constant(list(self.poison) or [-1], tf.int64)
        factor, worker = self.factor, context.input_pipeline_id

        def batch(index):  # one replica's part of a global step's batch
            step = index // local_replicas + 1
            part = worker * local_replicas + index % local_replicas
            seed = tf.stack([step, part])
            x = tf.random.stateless_normal([size, 1], seed=seed)
            noise = tf.random.stateless_normal([size, 1], seed=seed + 1000)
            y = 3.0 * x + 2.0 + 0.1 * noise
            return x, tf.where(tf.reduce_any(tf.equal(poison, step)), y * factor, y)
        steps = self.steps_per_epoch or 1_000_000
        return tf.data.Dataset.range(steps * local_replicas).map(batch)

    def eval_dataset(self, context):
        x = tf.random.stateless_normal([64, 1], seed=[0, 1])
        return tf.data.Dataset.from_tensor_slices((x, 3.0 * x + 2.0)).batch(
            context.get_per_replica_batch_size(32))

    def train_step(self, batch):
        x, y = batch
        with tf.GradientTape() as tape:
            loss = self.compute_loss(tf.square(y - self.model(x)))
        self.apply_gradients(tape, loss, self.model, self.optimizer)
        return {"loss": loss}

    def eval_step(self, batch):
        x, y = batch
        return {"loss": self.compute_loss(tf.square(y - self.model(x)))}


class Big(_Reporting, tapekit.Trainer):
    """About `megabytes` MB of state (a Dense net under Adam: weights and two slots), so that
    writing a checkpoint takes a while; reports a checksum instead of the weights."""

    default_global_batch_size = 16
    default_learning_rate = 1e-4

    @classmethod
    def define_flags(cls):
        super().define_flags()
        flags.DEFINE_integer("megabytes", 96, "The state's size.")

    def __init__(self, megabytes=96, **kwargs):
        self.width = max(int((megabytes * (1 << 20) / 12) ** 0.5), 8)  # 3 copies of w*w floats
        super().__init__(**kwargs)

    def build(self):
        self.model = keras.Sequential([keras.Input((self.width,)), keras.layers.Dense(self.width)])
        self.optimizer = keras.optimizers.Adam(self.learning_rate)

    def train_arrays(self):
        x = tf.random.stateless_normal([64, self.width], seed=[1, 2]).numpy()
        return x, x

    def train_step(self, batch):
        x, y = batch
        with tf.GradientTape() as tape:
            loss = self.compute_loss(tf.square(self.model(x) - y))
        self.apply_gradients(tape, loss, self.model, self.optimizer)
        return {"loss": loss}

    def results_summary(self):
        total = sum(float(tf.reduce_sum(tf.cast(v, tf.float64)).numpy())
                    for v in self.model.trainable_variables)
        return "WEIGHTS " + json.dumps({"step": self.current_step, "checksum": total})
