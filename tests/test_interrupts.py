"""SIGTERM saves and exits 0; Ctrl-C saves and exits 130 (a second one aborts at once);
checkpoints by time."""

import os
import re
import signal

import tensorflow as tf

import tapekit
from helpers import TESTS, reported_weights, run_cli, start_cli, wait_for
from tapekit.trainers import RegressionTrainer

def test_sigterm_finishes_the_loop_saves_and_exits_zero_then_resumes(tmp_path, cli_env):
    model_dir = tmp_path / "run"
    args = ["--trainer=resumable:Regression", "--train_steps=2000", "--steps_per_loop=10",
            f"--model_dir={model_dir}"]
    process = start_cli(args + ["--sleep_per_loop=0.1"], cli_env, cwd=TESTS)
    try:
        wait_for(model_dir / "metrics.jsonl", process)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 0, stderr[-3000:]
    step = int(stderr.split("preempted at step ")[1].split(",")[0])
    assert 0 < step < 2000 and step % 10 == 0
    assert re.search(f"preempted at step {step}, checkpoint .*/ckpt-{step} saved", stderr)
    assert (model_dir / "checkpoints" / f"ckpt-{step}.index").exists()
    resumed = run_cli(args + ["--train_steps=" + str(step + 20)], cli_env, cwd=TESTS)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from checkpoint {model_dir / 'checkpoints' / f'ckpt-{step}'} at step {step}" in resumed.stderr
    assert reported_weights(resumed.stdout)["step"] == step + 20


def test_ctrl_c_finishes_the_loop_saves_and_exits_130(tmp_path, cli_env):
    model_dir = tmp_path / "run"
    process = start_cli(["--trainer=resumable:Regression", "--train_steps=5000",
                         "--steps_per_loop=10", f"--model_dir={model_dir}",
                         "--sleep_per_loop=0.1"], cli_env, cwd=TESTS)
    try:
        wait_for(model_dir / "metrics.jsonl", process)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    step = int(stderr.split("interrupted at step ")[1].split(",")[0])
    assert 0 < step < 5000 and step % 10 == 0
    assert re.search(f"interrupted at step {step}, checkpoint .*/ckpt-{step} saved", stderr)
    assert tf.train.latest_checkpoint(str(model_dir / "checkpoints")).endswith(f"ckpt-{step}")


def test_a_second_ctrl_c_aborts_at_once(tmp_path, cli_env):
    model_dir = tmp_path / "run"
    log = tmp_path / "stderr.txt"
    # Each loop end sleeps 60 s, then a first Ctrl-C would save a checkpoint and exit 130;
    # killed by the second one, the process ends by the signal with nothing saved.
    with open(log, "w") as stderr:
        process = start_cli(["--trainer=resumable:Regression", "--train_steps=5000",
                             "--steps_per_loop=10", f"--model_dir={model_dir}",
                             "--sleep_per_loop=60"], cli_env, cwd=TESTS, stderr=stderr)
        try:
            wait_for(model_dir / "metrics.jsonl", process)
            process.send_signal(signal.SIGINT)
            wait_for(log, process, containing="press Ctrl-C again to abort")
            process.send_signal(signal.SIGINT)
            process.wait(timeout=120)  # a guard against a hang: past 60 s it would save
        finally:
            process.kill()
    assert process.returncode == -signal.SIGINT, log.read_text()[-3000:]
    assert not (model_dir / "checkpoints" / "checkpoint").exists()  # nothing half-written


def test_checkpoints_are_saved_by_time(tmp_path):
    trainer = RegressionTrainer(model_dir=str(tmp_path), checkpoint_every_secs=1e-6,
                                max_checkpoints_to_keep=10)
    trainer.fit(train_steps=20, steps_per_loop=5)
    state = tf.train.get_checkpoint_state(str(tmp_path / "checkpoints"))
    assert [int(p.rsplit("-", 1)[1]) for p in state.all_model_checkpoint_paths] == [5, 10, 15, 20]


def test_by_default_a_short_run_saves_only_at_its_end(tmp_path):
    RegressionTrainer(model_dir=str(tmp_path)).fit(train_steps=20, steps_per_loop=5)
    state = tf.train.get_checkpoint_state(str(tmp_path / "checkpoints"))
    assert [int(p.rsplit("-", 1)[1]) for p in state.all_model_checkpoint_paths] == [20]


def test_a_stop_signal_skips_the_evaluation_that_was_due(tmp_path):
    evaluated = []

    class SignalAtStep10(tapekit.Callback):
        def on_loop_end(self, step, logs):
            if step == 10:
                os.kill(os.getpid(), signal.SIGTERM)  # handled by fit: stop after this loop

        def on_eval_end(self, step, logs):
            evaluated.append(step)

    trainer = RegressionTrainer(model_dir=str(tmp_path))
    trainer.fit(train_steps=100, steps_per_loop=5, eval_every_steps=5, callbacks=[SignalAtStep10()])
    assert trainer.preempted and trainer.current_step == 10
    assert evaluated == [5]  # not at 10: the grace period is for the checkpoint
    assert tf.train.latest_checkpoint(str(tmp_path / "checkpoints")).endswith("ckpt-10")
