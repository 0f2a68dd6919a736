"""SIGTERM saves and exits 0; Ctrl-C saves and exits 130 (a second one aborts at once);
checkpoints by time.

Each signal goes to a tapekit-train subprocess paused at a known step (the `resumable`
trainer's --pause_at_step), never to the pytest process, and never after a guessed delay.
"""

import json
import re
import signal

import tensorflow as tf

from tapekit.trainers import RegressionTrainer

from helpers import TESTS, let_go, reported_weights, run_cli, start_cli, wait_for, wait_for_pause


def _signal_at_pause(args, signum, tmp_path, cli_env):
    """Runs tapekit-train ARGS paused at step 20, sends `signum` there, lets it go on;
    returns the finished process and its stderr."""
    pause = str(tmp_path / "paused")
    process = start_cli(args + ["--pause_at_step=20", f"--pause_file={pause}"], cli_env, cwd=TESTS)
    try:
        assert wait_for_pause(pause, process) == 20
        process.send_signal(signum)
        let_go(pause)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
        process.wait()
    return process, stderr


def test_sigterm_finishes_the_loop_saves_skips_the_due_evaluation_exits_zero_then_resumes(
        tmp_path, cli_env):
    model_dir = tmp_path / "run"
    args = ["--trainer=resumable:Regression", "--train_steps=2000", "--steps_per_loop=5",
            "--eval_every_steps=5", f"--model_dir={model_dir}"]
    process, stderr = _signal_at_pause(args, signal.SIGTERM, tmp_path, cli_env)
    assert process.returncode == 0, stderr[-3000:]
    assert re.search("preempted at step 20, checkpoint .*/ckpt-20 saved", stderr), stderr[-3000:]
    assert tf.train.latest_checkpoint(str(model_dir / "checkpoints")).endswith("ckpt-20")
    rows = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if row["split"] == "train"] == [5, 10, 15, 20]
    # not at 20: the grace period is for the checkpoint
    assert [row["step"] for row in rows if row["split"] == "eval"] == [5, 10, 15]
    resumed = run_cli(args + ["--train_steps=40"], cli_env, cwd=TESTS)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from checkpoint {model_dir / 'checkpoints' / 'ckpt-20'} at step 20" in resumed.stderr
    assert reported_weights(resumed.stdout)["step"] == 40


def test_ctrl_c_finishes_the_loop_saves_and_exits_130(tmp_path, cli_env):
    model_dir = tmp_path / "run"
    process, stderr = _signal_at_pause(["--trainer=resumable:Regression", "--train_steps=5000",
                                        "--steps_per_loop=10", f"--model_dir={model_dir}"],
                                       signal.SIGINT, tmp_path, cli_env)
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert re.search("interrupted at step 20, checkpoint .*/ckpt-20 saved", stderr), stderr[-3000:]
    assert tf.train.latest_checkpoint(str(model_dir / "checkpoints")).endswith("ckpt-20")


def test_a_second_ctrl_c_aborts_at_once(tmp_path, cli_env):
    model_dir = tmp_path / "run"
    log, pause = tmp_path / "stderr.txt", str(tmp_path / "paused")
    # Paused for good at step 10 (nothing saved yet), after a first Ctrl-C the process would
    # save and exit 130 once let go; it never is: the second Ctrl-C ends it by the signal.
    with open(log, "w") as stderr:
        process = start_cli(["--trainer=resumable:Regression", "--train_steps=5000",
                             "--steps_per_loop=10", f"--model_dir={model_dir}",
                             "--pause_at_step=10", f"--pause_file={pause}"], cli_env, cwd=TESTS,
                            stderr=stderr)
        try:
            assert wait_for_pause(pause, process) == 10
            process.send_signal(signal.SIGINT)
            wait_for(log, process, containing="press Ctrl-C again to abort")
            process.send_signal(signal.SIGINT)
            process.wait(timeout=120)
        finally:
            process.kill()
            process.wait()
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
