"""The first hour with a new step: errors that name the mistake, and one convention for names."""

import json
import logging as std_logging

import keras
import numpy as np
import pytest
import tensorflow as tf

import tapekit
from tapekit.errors import TapekitError

from helpers import user_trainer_module


class Pair(tapekit.Trainer):
    """Two models; the discriminator's loss is (wrongly) computed from the generator only."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.default_learning_rate = 0.01
        self.default_global_batch_size = 8
        x = np.linspace(-1, 1, 32, dtype=np.float32)[:, None]
        self.arrays = (x, 2 * x)

    def build(self):
        self.generator = keras.Sequential([keras.layers.Dense(1)])
        self.discriminator = keras.Sequential([keras.layers.Dense(1)])
        self.optimizer = keras.optimizers.SGD(self.learning_rate)

    def train_arrays(self):
        return self.arrays

    def train_step(self, batch):
        x, y = batch
        with tf.GradientTape() as tape:
            self.discriminator(x)  # built, but the loss below ignores it
            loss = self.compute_loss(tf.square(self.generator(x) - y))
        self.apply_gradients(tape, loss, self.discriminator, self.optimizer)
        return {"loss": loss}

    def eval_step(self, batch):
        x, y = batch
        return {"loss": self.compute_loss(tf.square(self.generator(x) - y))}


def test_a_missing_gradient_names_the_model_attribute_and_the_call():
    with pytest.raises(TapekitError) as compiled:
        Pair(progress="none").fit(train_steps=1, steps_per_loop=1)
    assert "no gradient for 2 variable(s) of self.discriminator" in str(compiled.value)
    with pytest.raises(TapekitError) as eager:
        Pair(progress="none", run_eagerly=True).fit(train_steps=1, steps_per_loop=1)
    message = str(eager.value)
    assert "of self.discriminator (in apply_gradients at tests/test_debugging.py:" in message
    assert "self.apply_gradients(tape, loss, self.discriminator, self.optimizer)" in message


class NoEvalData(Pair):
    def train_step(self, batch):
        x, y = batch
        with tf.GradientTape() as tape:
            loss = self.compute_loss(tf.square(self.generator(x) - y))
        self.apply_gradients(tape, loss, self.generator, self.optimizer)
        return {"loss": loss}


def test_evaluating_a_trainer_of_in_memory_arrays_without_eval_dataset_is_one_line():
    trainer = NoEvalData(progress="none")
    with pytest.raises(TapekitError, match=r"^NoEvalData is evaluated but has no eval_dataset: "
                                           r"override eval_dataset\(input_context\)"):
        trainer.fit(train_steps=2, steps_per_loop=1, eval_every_steps=1)
    assert trainer.current_step == 0  # refused before training


class Broadcast(NoEvalData):
    def train_step(self, batch):
        x, y = batch
        y = tf.squeeze(y, -1)  # [b] against a prediction of [b, 1]: the classic mistake
        with tf.GradientTape() as tape:
            loss = self.compute_loss(tf.square(self.generator(x) - y))
        self.apply_gradients(tape, loss, self.generator, self.optimizer)
        return {"loss": loss}


def test_a_loss_broadcast_to_batch_by_batch_is_warned_about(caplog):
    with caplog.at_level(std_logging.WARNING):
        Broadcast(progress="none").fit(train_steps=1, steps_per_loop=1)
    warned = [r.getMessage() for r in caplog.records if "compute_loss got" in r.getMessage()]
    assert warned and "shape [8, 8]" in warned[0] and "y[:, None]" in warned[0]
    caplog.clear()
    with caplog.at_level(std_logging.WARNING):
        NoEvalData(progress="none").fit(train_steps=1, steps_per_loop=1)
    assert not [r for r in caplog.records if "compute_loss got" in r.getMessage()]


class Evaluated(NoEvalData):
    def eval_dataset(self, input_context):
        x, y = self.arrays
        return tf.data.Dataset.from_tensor_slices((x, y)).batch(8)


@pytest.mark.parametrize("written", ["eval_loss", "loss"])
def test_best_metric_is_written_as_early_stopping_writes_it(tmp_path, written):
    trainer = Evaluated(progress="none", model_dir=str(tmp_path), best_metric=written,
                        cpu_replicas=1)
    stopper = tapekit.callbacks.EarlyStopping("eval_loss", patience=100)
    trainer.fit(train_steps=4, steps_per_loop=2, eval_every_steps=2, callbacks=[stopper])
    best = json.loads((tmp_path / "best" / "best.json").read_text())
    assert best["step"] == 4 and best["metric"] == written
    assert stopper.best is not None  # early stopping read the evaluation's loss too
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    best_steps = [row["best_step"] for row in rows if "best_step" in row]
    assert best_steps == [2, 4] and all(isinstance(step, int) for step in best_steps)


class CallsNumpy(NoEvalData):
    def train_step(self, batch):
        outputs = super().train_step(batch)
        print("loss", outputs["loss"].numpy())  # works only eagerly
        return outputs


def test_numpy_in_a_compiled_step_suggests_run_eagerly_and_works_with_it(capsys):
    with pytest.raises(TapekitError) as error:
        CallsNumpy(progress="none").fit(train_steps=1, steps_per_loop=1)
    message = str(error.value)
    assert "test_debugging.py:" in message and ".numpy()" in message  # the user's line
    assert "--run_eagerly" in message
    CallsNumpy(progress="none", run_eagerly=True).fit(train_steps=2, steps_per_loop=2)
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("loss ")]
    assert len(printed) == 1 + 2  # the eager build call, then one line per step


BROKEN_TRAINER = user_trainer_module("Broken", """\
        x, y = batch
        marker = float(tf.reduce_sum(x).numpy()) * 10  # a value: only eagerly
        raise ValueError("step failed")
""")


def test_pdb_post_mortem_opens_the_debugger_in_the_users_step(tmp_path, cli_env):
    import subprocess

    from helpers import TAPEKIT_TRAIN
    (tmp_path / "broken_trainer.py").write_text(BROKEN_TRAINER)
    result = subprocess.run(
        TAPEKIT_TRAIN + ["--trainer=broken_trainer:Broken", "--global_batch_size=8",
                         "--train_steps=2", "--progress=none", "--pdb_post_mortem"],
        input="p marker\nwhere\nq\n", cwd=tmp_path, env=cli_env, capture_output=True,
        text=True, timeout=300)
    assert result.returncode == 2
    assert "tapekit-train: error: train_step raised ValueError" in result.stderr
    assert "(Pdb)" in result.stdout
    assert "160.0" in result.stdout  # `p marker` in the step's frame: 8 x 2 ones, x 10
    assert "broken_trainer.py" in result.stdout and "train_step()" in result.stdout


def test_tensorflow_info_lines_are_hidden_unless_asked_for(cli_env):
    # TensorFlow prints some while it is imported: only a process of its own shows them.
    from helpers import run_cli_process as run_cli
    env = {k: v for k, v in cli_env.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    args = ["--trainer=regression", "--model=linear", "--train_steps=10", "--steps_per_loop=10",
            "--progress=log"]
    quiet = run_cli(args, env)
    assert quiet.returncode == 0, quiet.stderr
    assert "oneDNN" not in quiet.stderr and not [
        line for line in quiet.stderr.splitlines() if line.startswith("I0000")]
    assert "step 10/10" in quiet.stderr  # tapekit's own lines stay
    loud = run_cli(args + ["--tensorflow_logs"], env)
    assert loud.returncode == 0 and "oneDNN" in loud.stderr


def test_a_resume_takes_the_flags_it_is_not_given_from_the_run(tmp_path, cli_env):
    import json

    from helpers import run_cli
    model_dir = str(tmp_path / "run")
    first = run_cli(["--trainer=regression", "--model=mlp", "--strategy=mirrored",
                     "--cpu_replicas=2", "--global_batch_size=50", "--train_steps=20",
                     "--steps_per_loop=10", "--progress=log", f"--model_dir={model_dir}"],
                    cli_env)
    assert first.returncode == 0, first.stderr
    # No --trainer, --model, --strategy: the run's own; --train_steps given: it wins.
    second = run_cli([f"--model_dir={model_dir}", "--train_steps=30", "--progress=log"], cli_env)
    assert second.returncode == 0, second.stderr
    assert "with the flags it was started with that this command does not give" in second.stderr
    for taken in ("--model=mlp", "--strategy=mirrored",
                  "--cpu_replicas=2", "--global_batch_size=50"):
        assert taken in second.stderr
    assert "--train_steps=20" not in second.stderr.split("does not give")[-1].splitlines()[0]
    run = json.loads(open(f"{model_dir}/run.json").read())
    assert run["replicas"] == 2 and run["resumes"][0]["step"] == 20 and run["mode"] == "train"
    assert run["settings"]["train_steps"] == 30 and run["arguments"]["model"] == "mlp"
    assert "trained RegressionTrainer to step 30" in second.stderr


def test_a_resume_without_trainer_continues_the_runs_trainer(tmp_path, cli_env):
    from helpers import run_cli
    model_dir = str(tmp_path / "gan")
    common = ["--steps_per_loop=5", "--progress=log", f"--model_dir={model_dir}"]
    first = run_cli(["--trainer=gan", "--train_steps=5"] + common, cli_env)
    assert first.returncode == 0, first.stderr
    second = run_cli(["--train_steps=10"] + common, cli_env)
    assert second.returncode == 0, second.stderr
    assert "--trainer=gan" in second.stderr and "trained GANTrainer to step 10" in second.stderr


PAUSING_TRAINER = user_trainer_module("Pausing", """\
        x, y = batch
        with tf.GradientTape() as tape:
            loss = self.compute_loss(tf.square(self.model(x) - y))
        self.apply_gradients(tape, loss, self.model, self.optimizer)
        breakpoint()
        return {"loss": loss}
""")


def test_breakpoint_stops_at_every_eager_step_with_values(tmp_path, cli_env):
    import subprocess

    from helpers import TAPEKIT_TRAIN
    (tmp_path / "pausing_trainer.py").write_text(PAUSING_TRAINER)
    env = dict(cli_env, PYTHONBREAKPOINT="pdb.set_trace")
    result = subprocess.run(
        TAPEKIT_TRAIN + ["--trainer=pausing_trainer:Pausing", "--global_batch_size=8",
                         "--train_steps=2", "--steps_per_loop=2", "--progress=none",
                         "--run_eagerly"],
        input="p 'loss=%.4f' % float(loss)\nc\n" * 4, cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    losses = [line for line in result.stdout.splitlines() if "loss=" in line]
    # Traced once to build (a symbolic loss: float() fails there), then once per step.
    values = [line.split("loss=")[1].strip("'") for line in losses]
    assert len(values) == 2 and values[0] != values[1]  # two steps, the second after an update
