"""`tapekit.checkpoint.record`: MODEL_DIR/run.json and flags.txt, and resumes that cannot
silently change a run."""

import json
import os

import pytest

import tapekit
from tapekit.trainers import RegressionTrainer

from helpers import TESTS, reported_weights, run_cli


def _snapshot(directory):
    return {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))
            if (directory / name).is_file()}


def _record(model_dir):
    return json.loads((model_dir / "run.json").read_text())


def test_the_python_api_records_versions_trainer_strategy_and_every_setting(tmp_path):
    RegressionTrainer(model="mlp", model_dir=str(tmp_path), strategy="mirrored", cpu_replicas=2,
                      progress="none").fit(train_steps=20, steps_per_loop=10)
    record = _record(tmp_path)
    assert set(record["versions"]) == {"tapekit", "tensorflow", "keras", "python"}
    assert record["trainer"] == "tapekit.trainers.regression:RegressionTrainer"
    assert record["arguments"] == {"model": "mlp", "data": None, "hidden_units": 10}
    assert (record["strategy"], record["replicas"], record["workers"]) == ("MirroredStrategy", 2, 1)
    assert len(record["devices"]) == 2 and record["precision"] == "float32"
    settings = record["settings"]
    assert settings["global_batch_size"] == 100 and settings["learning_rate"] == 0.01  # resolved
    assert settings["train_steps"] == 20 and settings["steps_per_loop"] == 10
    assert record["started"].endswith("+00:00") and record["resumes"] == []


def test_a_resume_that_would_change_the_run_is_refused_listing_each_change(tmp_path):
    RegressionTrainer(model_dir=str(tmp_path), progress="none").fit(train_steps=20, steps_per_loop=10)
    before, record = _snapshot(tmp_path / "checkpoints"), _record(tmp_path)
    changed = RegressionTrainer(model="mlp", model_dir=str(tmp_path), global_batch_size=50,
                                seed=3, progress="none")
    with pytest.raises(tapekit.TapekitError) as error:
        changed.fit(train_steps=40, steps_per_loop=10)
    message = str(error.value)
    assert f"{tmp_path} holds a run at step 20 that was started with other settings" in message
    assert "global_batch_size 100 → 50; model \"linear\" → \"mlp\"; seed 0 → 3" in message
    assert "--allow_changes=global_batch_size,model,seed" in message
    assert "Nothing was restored or changed" in message and "\n" not in message
    assert _snapshot(tmp_path / "checkpoints") == before and _record(tmp_path) == record


class _OtherRegression(RegressionTrainer):
    """RegressionTrainer's model, data and arguments under another class."""


def _tree(directory):
    """Every file under `directory`: relative path → bytes."""
    return {str(path.relative_to(directory)): path.read_bytes()
            for path in sorted(directory.rglob("*")) if path.is_file()}


@pytest.mark.parametrize("change, listed", [
    ("trainer", "trainer \"tapekit.trainers.regression:RegressionTrainer\" → "
                "\"test_record:_OtherRegression\""),
    ("precision", "precision \"float32\" → \"mixed_float16\"")], ids=["trainer", "precision"])
def test_a_resume_with_another_trainer_class_or_precision_is_refused(tmp_path, change, listed):
    RegressionTrainer(model_dir=str(tmp_path), progress="none").fit(train_steps=20, steps_per_loop=10)
    saved = _tree(tmp_path)
    assert "run.json" in saved and "checkpoints/ckpt-20.index" in saved
    if change == "trainer":
        resumed = _OtherRegression(model_dir=str(tmp_path), progress="none")
    else:
        resumed = RegressionTrainer(model_dir=str(tmp_path), precision="mixed_float16",
                                    progress="none")
    with pytest.raises(tapekit.TapekitError) as error:
        resumed.fit(train_steps=40, steps_per_loop=10)
    message = str(error.value)
    # This one change, and only it, is named; the way to allow it is given.
    assert f"resuming would silently change it: {listed}. Resume with the old values" in message
    assert f"--allow_changes={change}. Nothing was restored" in message and "\n" not in message
    assert resumed.current_step == 0
    assert _tree(tmp_path) == saved  # checkpoints, run.json, metrics and summaries untouched


def test_changes_allowed_on_purpose_resume_and_are_recorded(tmp_path, caplog):
    RegressionTrainer(model_dir=str(tmp_path), progress="none").fit(train_steps=20, steps_per_loop=10)
    with caplog.at_level("INFO", logger="absl"):
        RegressionTrainer(model_dir=str(tmp_path), global_batch_size=50, progress="none",
                          allow_changes="global_batch_size").fit(train_steps=30, steps_per_loop=5)
    assert "resuming at step 20 with changed settings: global_batch_size 100 → 50; " \
           "steps_per_loop 10 → 5; train_steps 20 → 30" in caplog.text
    record = _record(tmp_path)
    assert record["settings"]["global_batch_size"] == 50
    (resume,) = record["resumes"]
    assert resume["step"] == 20 and resume["changes"]["global_batch_size"] == [100, 50]
    # The next resume compares with the allowed value, and harmless changes just resume.
    RegressionTrainer(model_dir=str(tmp_path), global_batch_size=50, progress="none").fit(
        train_steps=40, steps_per_loop=10)
    with pytest.raises(tapekit.TapekitError, match="allow_changes names sed, which is not a setting"):
        RegressionTrainer(model_dir=str(tmp_path), global_batch_size=50, progress="none",
                          allow_changes=["seed", "sed"]).fit(train_steps=50)


def test_a_learning_rate_given_on_resume_replaces_the_checkpoints(tmp_path, caplog):
    RegressionTrainer(model_dir=str(tmp_path), progress="none").fit(train_steps=20, steps_per_loop=10)
    same = RegressionTrainer(model_dir=str(tmp_path), progress="none")  # not given: the checkpoint's
    same.fit(train_steps=30, steps_per_loop=10)
    assert float(same.optimizer.learning_rate.numpy()) == pytest.approx(0.1)
    frozen = RegressionTrainer(model_dir=str(tmp_path), learning_rate=1e-9, progress="none")
    with caplog.at_level("INFO", logger="absl"):
        frozen.fit(train_steps=31, steps_per_loop=1)
    weights = frozen.model.w.numpy().copy()
    updates = int(frozen.optimizer.iterations.numpy())
    frozen.fit(train_steps=60, steps_per_loop=10)
    assert float(frozen.optimizer.learning_rate.numpy()) == pytest.approx(1e-9)
    assert int(frozen.optimizer.iterations.numpy()) == updates + 29  # every step updated...
    assert abs(float(frozen.model.w.numpy()[0, 0] - weights[0, 0])) < 1e-6  # ...at 1e-9
    assert "learning rate [0.1, 1e-09] given for this resumed run replaces" not in caplog.text
    assert "learning rate 1e-09 given for this resumed run replaces the checkpoint's 0.1" in caplog.text


def test_flags_txt_starts_the_same_run_again_and_the_command_line_refuses_changes(tmp_path, cli_env):
    first, again = tmp_path / "first", tmp_path / "again"
    flags = ["--trainer=resumable:Regression", "--model=mlp", "--train_steps=60",
             "--steps_per_loop=20", "--deterministic", "--progress=none", f"--model_dir={first}"]
    result = run_cli(flags, cli_env, cwd=TESTS)
    assert result.returncode == 0, result.stderr[-2000:]
    text = (first / "flags.txt").read_text().splitlines()
    assert "--model=mlp" in text and "--train_steps=60" in text and "--deterministic" in text
    assert json.loads((first / "run.json").read_text())["command"][1:] == flags

    refused = run_cli(flags + ["--train_steps=80", "--global_batch_size=50"], cli_env, cwd=TESTS)
    assert refused.returncode == 2
    (line,) = [out for out in refused.stderr.splitlines() if out.startswith("tapekit-train: error:")]
    assert "global_batch_size 100 → 50" in line and "--allow_changes=global_batch_size" in line

    rerun = run_cli([f"--flagfile={first / 'flags.txt'}", f"--model_dir={again}"], cli_env,
                    cwd=TESTS)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert reported_weights(rerun.stdout) == reported_weights(result.stdout)


def test_a_python_api_run_after_a_command_line_run_records_its_own_command(tmp_path):
    """The command line's argv and flags belong to the run it starts, not to the process."""
    import sys

    from tapekit.checkpoint import record

    by_command, by_python = tmp_path / "command", tmp_path / "python"
    with record.command_line(["tapekit-train", "--trainer=regression"], "--trainer=regression\n"):
        RegressionTrainer(model_dir=str(by_command), progress="none").fit(train_steps=10,
                                                                          steps_per_loop=10)
    RegressionTrainer(model_dir=str(by_python), progress="none").fit(train_steps=10,
                                                                     steps_per_loop=10)
    assert _record(by_command)["command"] == ["tapekit-train", "--trainer=regression"]
    assert (by_command / "flags.txt").read_text() == "--trainer=regression\n"
    assert _record(by_python)["command"] == list(sys.argv)
    assert not (by_python / "flags.txt").exists()
