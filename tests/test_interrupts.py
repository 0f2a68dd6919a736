"""Ctrl-C saves and exits 130 (a second one aborts at once); checkpoints by time."""

import os
import signal
import subprocess
import sys
import time

import tensorflow as tf

from tapekit.trainers import RegressionTrainer

TESTS = os.path.dirname(os.path.abspath(__file__))


def _start(args, env):
    return subprocess.Popen([sys.executable, "-m", "tapekit.trainers"] + args, cwd=TESTS, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_file(path, process, timeout=120):
    _wait_for_text(path, "", process, timeout)


def _wait_for_text(path, text, process, timeout=120):
    """Waits until file `path` exists and holds `text` while `process` runs."""
    deadline = time.monotonic() + timeout
    while not (os.path.exists(path) and text in open(path).read()):
        assert process.poll() is None, f"the process ended ({process.returncode})"
        assert time.monotonic() < deadline, f"{path} never held {text!r}"
        time.sleep(0.02)


def test_ctrl_c_finishes_the_loop_saves_and_exits_130(tmp_path, cli_env):
    model_dir = tmp_path / "run"
    process = _start(["--trainer=resumable:Regression", "--train_steps=5000", "--steps_per_loop=10",
                      f"--model_dir={model_dir}", "--sleep_per_loop=0.1"], cli_env)
    try:
        _wait_for_file(model_dir / "metrics.jsonl", process)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    step = int(stderr.split("interrupted at step ")[1].split(",")[0])
    assert 0 < step < 5000 and step % 10 == 0
    assert f"interrupted at step {step}, checkpoint saved" in stderr
    assert tf.train.latest_checkpoint(str(model_dir / "checkpoints")).endswith(f"ckpt-{step}")


def test_a_second_ctrl_c_aborts_at_once(tmp_path, cli_env):
    model_dir = tmp_path / "run"
    log = tmp_path / "stderr.txt"
    # Each loop end sleeps 60 s: only an abort ends the process quickly.
    with open(log, "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "tapekit.trainers", "--trainer=resumable:Regression",
             "--train_steps=5000", "--steps_per_loop=10", f"--model_dir={model_dir}",
             "--sleep_per_loop=60"], cwd=TESTS, env=cli_env, stdout=subprocess.DEVNULL,
            stderr=stderr)
        try:
            _wait_for_file(model_dir / "metrics.jsonl", process)
            process.send_signal(signal.SIGINT)
            _wait_for_text(log, "press Ctrl-C again to abort", process)
            process.send_signal(signal.SIGINT)
            process.wait(timeout=50)
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
