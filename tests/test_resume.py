"""Exact resume: a run killed with SIGKILL and started again ends bitwise equal to an
uninterrupted one, on 1 and on 2 replicas; a distributed input is replayed to the restored
step."""

import json
import signal

import numpy as np
import pytest
import tensorflow as tf

from tapekit.trainers import GANTrainer

from helpers import TESTS, reported_weights, run_cli, start_cli, wait_for_pause


# The GAN on one replica is killed five times in test_faults' chaos test.
@pytest.mark.parametrize("trainer, replicas", [
    ("resumable:Regression", 1), ("resumable:Regression", 2), ("resumable:GAN", 2)])
def test_sigkill_then_resume_is_bitwise_equal_to_an_uninterrupted_run(trainer, replicas, tmp_path,
                                                                      cli_env):
    # 35 steps is mid-epoch for both (1000 examples / 100 per step; 1024 / 64).
    common = [f"--trainer={trainer}", "--deterministic", "--seed=5", "--train_steps=120",
              "--steps_per_loop=5", "--checkpoint_every_steps=35"]
    if replicas > 1:
        common += ["--strategy=mirrored", f"--cpu_replicas={replicas}"]
    whole = run_cli(common + [f"--model_dir={tmp_path / 'whole'}"], cli_env, cwd=TESTS)
    assert whole.returncode == 0, whole.stderr[-3000:]

    model_dir, pause = tmp_path / "killed", str(tmp_path / "paused")
    # Paused at step 50, past ckpt-35 and short of ckpt-70: the kill loses 15 steps of work.
    process = start_cli(common + [f"--model_dir={model_dir}", "--pause_at_step=50",
                                  f"--pause_file={pause}"], cli_env, cwd=TESTS)
    try:
        assert wait_for_pause(pause, process) == 50
        latest = tf.train.latest_checkpoint(str(model_dir / "checkpoints"))
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert latest == str(model_dir / "checkpoints" / "ckpt-35")
    resumed = run_cli(common + [f"--model_dir={model_dir}"], cli_env, cwd=TESTS)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from checkpoint {latest} at step 35" in resumed.stderr
    for run in ("whole", "killed"):
        assert json.loads((tmp_path / run / "run.json").read_text())["replicas"] == replicas
    assert reported_weights(resumed.stdout) == reported_weights(whole.stdout)  # every float, bit for bit
    assert reported_weights(resumed.stdout)["step"] == 120


def test_resume_under_mirrored_replays_the_input_exactly(tmp_path):
    """Distributed iterators cannot be checkpointed; the input is skipped to the saved step."""
    whole = GANTrainer(strategy="mirrored", cpu_replicas=2, seed=2)
    whole.fit(train_steps=40, steps_per_loop=10)
    first = GANTrainer(strategy="mirrored", cpu_replicas=2, seed=2, model_dir=str(tmp_path))
    first.fit(train_steps=25, steps_per_loop=5)
    second = GANTrainer(strategy="mirrored", cpu_replicas=2, seed=2, model_dir=str(tmp_path))
    second.fit(train_steps=40, steps_per_loop=5)
    assert second.current_step == 40
    for a, b in zip(whole.gan.trainable_variables, second.gan.trainable_variables):
        np.testing.assert_array_equal(b.numpy(), a.numpy())
