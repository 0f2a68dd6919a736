"""Exact resume: a run killed with SIGKILL and started again ends bitwise equal to an
uninterrupted one; a distributed input is replayed to the restored step."""

import signal

import numpy as np
import pytest

from helpers import TESTS, reported_weights, run_cli, start_cli, wait_for
from tapekit.trainers import GANTrainer


@pytest.mark.parametrize("trainer", ["resumable:Regression", "resumable:GAN"])
def test_sigkill_then_resume_is_bitwise_equal_to_an_uninterrupted_run(trainer, tmp_path, cli_env):
    # 35 steps is mid-epoch for both (1000 examples / 100 per step; 1024 / 64).
    common = [f"--trainer={trainer}", "--deterministic", "--seed=5", "--train_steps=120",
              "--steps_per_loop=5", "--checkpoint_every_steps=35"]
    whole = run_cli(common + [f"--model_dir={tmp_path / 'whole'}"], cli_env, cwd=TESTS)
    assert whole.returncode == 0, whole.stderr[-3000:]

    model_dir = tmp_path / "killed"
    process = start_cli(common + [f"--model_dir={model_dir}", "--sleep_per_loop=0.25"], cli_env, cwd=TESTS)
    try:
        # the manager's state file names ckpt-35 once that checkpoint is complete
        wait_for(model_dir / "checkpoints" / "checkpoint", process, containing="ckpt-35")
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    resumed = run_cli(common + [f"--model_dir={model_dir}"], cli_env, cwd=TESTS)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from checkpoint" in resumed.stderr
    assert "at step 120" not in resumed.stderr.split("resumed from checkpoint")[1].splitlines()[0]
    assert reported_weights(resumed.stdout) == reported_weights(whole.stdout)  # every float, bit for bit


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
