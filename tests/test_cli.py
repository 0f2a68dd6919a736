"""The tapekit-train entrypoint, run in-process (`helpers.run_cli`) as a process would run it."""

import json
import re
import textwrap

import pytest

from helpers import run_cli

USER_TRAINER = textwrap.dedent('''
    import keras
    import numpy as np
    import tensorflow as tf
    from absl import flags

    import tapekit
    from tapekit.models import LinearRegression


    class HalfTrainer(tapekit.Trainer):
        """Learns y = 0.5 x; declares its own flag --slope."""

        @classmethod
        def define_flags(cls):
            flags.DEFINE_float("slope", 0.5, "Slope of the synthetic line.")

        def __init__(self, slope=0.5, **kwargs):
            self.slope = slope
            super().__init__(**kwargs)

        def build(self):
            self.model = LinearRegression()
            self.optimizer = keras.optimizers.SGD(self.learning_rate)

        def train_dataset(self, input_context):
            x = np.linspace(-1, 1, 64, dtype=np.float32).reshape(-1, 1)
            examples = tf.data.Dataset.from_tensor_slices((x, self.slope * x))
            return tapekit.per_replica_batches(examples, input_context, self.global_batch_size)

        def train_step(self, batch):
            x, y = batch
            with tf.GradientTape() as tape:
                loss = self.compute_loss(tf.square(y - self.model(x)))
            self.apply_gradients(tape, loss, self.model, self.optimizer)
            return {"loss": loss}

        def results_summary(self):
            return f"slope learned: {self.model.w.numpy().item():.3f}"
''')


def test_linear_regression_with_no_flags_learns_w3_b2(cli_env):
    result = run_cli(["--trainer=regression", "--model=linear"], cli_env)
    assert result.returncode == 0, result.stderr[-2000:]
    match = re.search(r"Learned w: \[(\S+)\], Learned b: \[(\S+)\]", result.stdout)
    assert match, result.stdout
    w, b = float(match.group(1)), float(match.group(2))
    assert abs(w - 3.0) < 0.05 and abs(b - 2.0) < 0.05


def test_user_trainer_in_its_own_file_runs_with_its_own_flag(tmp_path, cli_env):
    (tmp_path / "my_trainers.py").write_text(USER_TRAINER)
    model_dir = tmp_path / "run"
    result = run_cli(["--trainer=my_trainers:HalfTrainer", "--slope=-2", "--learning_rate=0.5",
                      "--global_batch_size=16", "--train_steps=200", "--steps_per_loop=50",
                      f"--model_dir={model_dir}"], cli_env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    slope = float(re.search(r"slope learned: (\S+)", result.stdout).group(1))
    assert slope == pytest.approx(-2.0, abs=0.01)
    records = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [50, 100, 150, 200]


def test_helpfull_lists_the_trainers_own_flags(tmp_path, cli_env):
    (tmp_path / "my_trainers.py").write_text(USER_TRAINER)
    result = run_cli(["--trainer=my_trainers:HalfTrainer", "--helpfull"], cli_env, cwd=tmp_path)
    # absl prints help to stdout and exits 1, as it does for --help
    assert "--slope" in result.stdout and "--steps_per_loop" in result.stdout


@pytest.mark.parametrize("value, expected", [
    ("nonsense", "neither a built-in trainer"),
    ("no_such_module_xyz:Trainer", "cannot import module 'no_such_module_xyz'"),
    ("tapekit.trainer:NoSuchClass", "has no 'NoSuchClass'"),
    ("tapekit.options:Option", "is not a subclass of tapekit.Trainer"),
    ("broken_module:Anything", "SyntaxError"),
])
def test_bad_trainer_values_give_one_line_and_nonzero_exit(value, expected, tmp_path, cli_env):
    (tmp_path / "broken_module.py").write_text("def oops(:\n")
    result = run_cli([f"--trainer={value}"], cli_env, cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("tapekit-train: error: --trainer=") and expected in last


def test_nonsensical_flags_are_rejected_by_flag_validation(cli_env):
    for flag in ("--train_steps=0", "--global_batch_size=0", "--learning_rate=-0.1",
                 "--strategy=bogus"):
        result = run_cli(["--trainer=regression", flag], cli_env)
        assert result.returncode != 0, flag
        assert "Traceback" not in result.stderr, flag
        assert flag.split("=")[0] in result.stderr, flag


@pytest.mark.parametrize("flags, expected", [
    (["--strategy=multi_worker"], "needs the TF_CONFIG environment variable"),
    (["--strategy=mirrored", "--cpu_replicas=2", "--global_batch_size=33"],
     "global_batch_size=33 is not divisible by the 2 replicas"),
    (["--strategy=one_device", "--device=/gpu:0"], "device '/gpu:0' does not exist"),
])
def test_strategy_errors_are_one_line_and_write_nothing(flags, expected, tmp_path, cli_env):
    model_dir = tmp_path / "run"
    result = run_cli(["--trainer=regression", f"--model_dir={model_dir}"] + flags, cli_env)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert expected in result.stderr.strip().splitlines()[-1]
    assert not model_dir.exists()
