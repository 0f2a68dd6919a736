"""The NaN guard: stop at the loop's end keeping the last good checkpoint, or skip the step."""

import json

import numpy as np
import pytest
import tensorflow as tf

import tapekit

from helpers import TESTS, run_cli
from small_trainers import Unshuffled


def test_nan_from_the_data_stops_at_the_loop_end_and_keeps_the_last_good_checkpoint(tmp_path):
    trainer = Unshuffled(nan_from=750, model_dir=str(tmp_path), checkpoint_every_steps=5)
    with pytest.raises(tapekit.TapekitError) as raised:
        trainer.fit(train_steps=20, steps_per_loop=5)
    message = str(raised.value)
    # rows 700-799 are step 8's batch, in the loop of steps 6-10: stop checks each loop's sums
    assert "non-finite loss in steps 6-10 (one loop; --steps_per_loop=1" in message
    assert "ckpt-5 is kept" in message
    assert tf.train.latest_checkpoint(tmp_path / "checkpoints").endswith("ckpt-5")
    assert not (tmp_path / "checkpoints" / "ckpt-10.index").exists()
    rows = [json.loads(row) for row in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if row["split"] == "train"] == [5]
    saved = tf.train.load_variable(str(tmp_path / "checkpoints" / "ckpt-5"),
                                   "model/_kernel/.ATTRIBUTES/VARIABLE_VALUE")
    assert np.all(np.isfinite(saved))


def test_with_one_step_per_loop_the_error_names_the_step(tmp_path):
    trainer = Unshuffled(nan_from=750)
    with pytest.raises(tapekit.TapekitError, match="non-finite loss at step 8;"):
        trainer.fit(train_steps=20, steps_per_loop=1)
    assert trainer.current_step == 8


def test_nan_policy_skip_step_does_not_apply_bad_updates():
    trainer = Unshuffled(nan_from=750, nan_policy="skip_step")
    history = trainer.fit(train_steps=20, steps_per_loop=10)
    assert trainer.current_step == 20
    assert all(np.isfinite(v.numpy()).all() for v in trainer.model.trainable_variables)
    assert history[0]["nonfinite_steps"] == 3.0  # steps 8, 9, 10 hold the NaN rows
    assert np.isfinite(history[0]["loss"])
    assert int(trainer.optimizer.iterations.numpy()) == 20 - 6  # two epochs, 3 bad steps each


def test_nan_in_the_cli_gives_one_line_and_nonzero_exit(tmp_path, cli_env):
    x = np.linspace(-1, 1, 1000, dtype=np.float32).reshape(-1, 1)
    y = 2 * x
    y[500] = np.nan
    np.savez(tmp_path / "bad.npz", x=x, y=y)
    result = run_cli(["--trainer=regression", f"--data={tmp_path / 'bad.npz'}", "--train_steps=50",
                    "--steps_per_loop=10", f"--model_dir={tmp_path / 'run'}"], cli_env, cwd=TESTS)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "error: non-finite loss in steps 1-10" in result.stderr.strip().splitlines()[-1]
