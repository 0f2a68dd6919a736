"""`tapekit.run.engine`: the machinery behind a trainer, kept off the user's namespace."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tapekit
from tapekit.namespace import TAPEKIT_ATTRIBUTES
from tapekit.run import runner as runner_lib
from tapekit.run.engine import Engine


class Line(tapekit.Trainer):
    """y = 2x by SGD on 64 in-memory examples; defaults set after super().__init__()."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.default_learning_rate = 0.25  # read when first used: no ordering trap
        self.default_global_batch_size = 16
        x = np.linspace(-1, 1, 64, dtype=np.float32)[:, None]
        self.arrays = (x, 2 * x)

    def build(self):
        self.model = keras.layers.Dense(1, use_bias=False)
        self.optimizer = keras.optimizers.SGD(self.learning_rate)

    def train_arrays(self):
        return self.arrays

    def train_step(self, batch):
        x, y = batch
        with tf.GradientTape() as tape:
            loss = self.compute_loss(tf.square(self.model(x) - y))
        self.apply_gradients(tape, loss, self.model, self.optimizer)
        return {"loss": loss, "batch": tf.cast(tf.shape(x)[0], tf.float32)}


def test_tapekit_keeps_one_private_attribute_and_user_attributes_are_the_users():
    trainer = Line(progress="none")
    assert set(vars(trainer)) == {"_engine", "default_learning_rate",
                                  "default_global_batch_size", "arrays"}
    trainer.fit(train_steps=2, steps_per_loop=2)
    assert set(vars(trainer)) - {"_engine", "default_learning_rate",
                                 "default_global_batch_size", "arrays"} == {"model", "optimizer"}


def test_defaults_set_after_super_init_are_the_ones_used():
    trainer = Line(progress="none", cpu_replicas=1)
    history = trainer.fit(train_steps=3, steps_per_loop=3)
    assert trainer.learning_rate == 0.25
    assert float(trainer.optimizer.learning_rate.numpy()) == 0.25
    assert history[0]["batch"] == 16.0  # per-replica batch of the default global batch of 16
    explicit = Line(progress="none", learning_rate=0.5, global_batch_size=8)
    assert (explicit.learning_rate, explicit.global_batch_size) == (0.5, 8)


def test_options_are_readable_and_none_can_be_assigned():
    trainer = Line(progress="none", nan_policy="skip_step", seed=7)
    assert (trainer.nan_policy, trainer.seed, trainer.options.seed) == ("skip_step", 7, 7)
    for name in ("seed", "strategy", "global_step", "precision", "history"):
        with pytest.raises(tapekit.TapekitError, match=f"Line.{name} is tapekit's"):
            setattr(trainer, name, 1)
    trainer.stop_training = True  # the one that callbacks set
    assert trainer.stop_training


def test_a_natural_line_that_would_shadow_the_seed_is_an_error_naming_it():
    class Noisy(Line):
        def build(self):
            super().build()
            self.seed = keras.random.SeedGenerator(1)  # would replace the run's seed

    with pytest.raises(tapekit.TapekitError) as error:
        Noisy(progress="none").fit(train_steps=1, steps_per_loop=1)
    message = str(error.value)
    assert message.startswith("Noisy.seed is tapekit's (the run's seed, which input pipelines")
    assert "give your attribute another name (e.g. self.seed_)" in message


def test_a_class_attribute_that_redefines_one_of_tapekits_is_an_error_at_build():
    class Shadowing(Line):
        rng = keras.random.SeedGenerator(3)

    trainer = Shadowing(progress="none")
    with pytest.raises(tapekit.TapekitError, match="Shadowing defines 'rng', which is tapekit's"):
        trainer.fit(train_steps=1, steps_per_loop=1)


def test_a_default_batch_size_the_replicas_cannot_share_is_refused_when_read():
    class Odd(Line):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.default_global_batch_size = 33

    trainer = Odd(progress="none", strategy="mirrored", cpu_replicas=2)
    with pytest.raises(tapekit.TapekitError, match="global_batch_size=33 is not divisible by the 2"):
        trainer.global_batch_size


def test_the_engine_is_what_the_controller_drives():
    trainer = Line(progress="none")
    engine = trainer._engine
    assert isinstance(engine, Engine)
    for name in ("current_step", "examples_per_step", "latest_checkpoint", "run_train_loop",
                 "evaluate", "any_worker", "status"):
        assert hasattr(runner_lib.Runner, name) or name == "status"
        assert hasattr(engine, name)
    engine.prepare_training()
    result = engine.run_train_loop(4)
    assert isinstance(result, runner_lib.LoopResult) and result.steps_run == 4
    assert engine.current_step == 4 and engine.examples_per_step == 16
    assert engine.latest_checkpoint is None and engine.any_worker(True) is True


def test_every_public_name_tapekit_reserves_is_documented():
    reserved = [name for name in dir(tapekit.Trainer)
                if isinstance(getattr(tapekit.Trainer, name), property)]
    assert set(reserved) - {"stop_training"} <= set(TAPEKIT_ATTRIBUTES)


def test_data_that_never_ends_is_read_without_a_per_step_end_check():
    class FromPipeline(Line):
        def train_arrays(self):
            return None

        def train_dataset(self, input_context):
            return tapekit.per_replica_batches(tf.data.Dataset.from_tensor_slices(self.arrays),
                                               input_context, self.global_batch_size)

    trainer = FromPipeline(progress="none")
    trainer.fit(train_steps=8, steps_per_loop=4)
    assert trainer._engine.train_loop.endless  # repeat(): infinite cardinality
    finite = tf.data.Dataset.from_tensor_slices(trainer.arrays).batch(16)
    history = trainer.fit(train_steps=100, steps_per_loop=4, dataset=finite)
    assert not trainer._engine.train_loop.endless and trainer.current_step == 12
    assert [h["step"] for h in history] == [12]  # 4 batches of 64 examples, then it ran out


class CountedEvaluation(Line):
    """Line, evaluated on a tf.data pipeline that counts how often it is made."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.eval_pipelines_made = 0

    def eval_dataset(self, input_context):
        self.eval_pipelines_made += 1
        x, y = self.arrays
        return tf.data.Dataset.from_tensor_slices((x, y)).batch(8, drop_remainder=True)

    def eval_step(self, batch):
        x, y = batch
        return {"eval_loss": self.compute_loss(tf.square(self.model(x) - y))}


def test_a_fit_makes_its_evaluation_input_once_for_every_evaluation(tmp_path):
    trainer = CountedEvaluation(progress="none", cpu_replicas=1, model_dir=str(tmp_path),
                                best_metric="eval_loss")
    evaluations = []
    seen = tapekit.Callback()
    seen.on_eval_end = lambda step, logs: evaluations.append(dict(logs))
    trainer.fit(train_steps=6, steps_per_loop=2, eval_every_steps=2, callbacks=[seen])
    assert [logs["best_step"] for logs in evaluations] == [2, 4, 6]  # best/ kept from them
    assert trainer.eval_pipelines_made == 1
    assert evaluations[0]["eval_loss"] > evaluations[-1]["eval_loss"]  # it did evaluate anew
    trainer.evaluate()  # outside fit: its own input
    assert trainer.eval_pipelines_made == 2


class DeterminismSeen(tapekit.Callback):
    def __init__(self):
        self.seen = []

    def on_loop_end(self, step, logs):
        from tapekit import compat
        self.seen.append(compat.op_determinism_enabled())


def test_op_determinism_is_on_while_a_deterministic_trainer_runs_and_off_after():
    from tapekit import compat
    assert not compat.op_determinism_enabled()
    seen = DeterminismSeen()
    trainer = Line(progress="none", deterministic=True)
    assert not compat.op_determinism_enabled()  # constructing it turns nothing on
    trainer.fit(train_steps=4, steps_per_loop=2, callbacks=[seen])
    assert seen.seen == [True, True]
    assert not compat.op_determinism_enabled()  # the process is as it was
    Line(progress="none").fit(train_steps=2, steps_per_loop=2, callbacks=[seen])
    assert seen.seen == [True, True, False]


def test_parameter_counts_are_logged_and_recorded_in_run_json(tmp_path, caplog):
    import json
    import logging as std_logging

    class Counted(Line):
        def build(self):
            self.model = keras.Sequential([keras.layers.Dense(4), keras.layers.BatchNormalization(),
                                           keras.layers.Dense(1)])
            self.optimizer = keras.optimizers.Adam(self.learning_rate)

    from absl import logging as absl_logging
    trainer = Counted(progress="none", model_dir=str(tmp_path))
    verbosity = absl_logging.get_verbosity()  # an earlier test may have lowered absl's
    absl_logging.set_verbosity(absl_logging.INFO)
    try:
        with caplog.at_level(std_logging.INFO):
            trainer.fit(train_steps=1, steps_per_loop=1)
    finally:
        absl_logging.set_verbosity(verbosity)
    # Dense(1->4): 8; BatchNorm(4): gamma, beta trainable 8, moving mean/variance 8; Dense(4->1): 5.
    expected = {"models": {"model": {"trainable": 8 + 8 + 5, "non_trainable": 8}},
                "optimizers": {"optimizer": {"slot_variables": 2 * 6, "slot_parameters": 2 * 21}}}
    assert json.loads((tmp_path / "run.json").read_text())["parameters"] == expected
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "model (Sequential): 21 trainable + 8 non-trainable parameters" in logged
    assert "optimizer (Adam): 12 slot variables, 42 parameters" in logged
