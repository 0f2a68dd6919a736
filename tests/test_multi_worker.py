"""A real two-process MultiWorkerMirroredStrategy run on loopback."""

import json
import os
import signal
import socket
import time

import tensorflow as tf

from helpers import TESTS, let_go, run_cli, start_cli, wait_for_pause


def _free_ports(count):
    sockets = []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _weights(stdout):
    line = next(out for out in stdout.splitlines() if out.startswith("WEIGHTS "))
    return json.loads(line[len("WEIGHTS "):])


def _launch(tmp_path, env, flags, worker_flags=None,
            trainer=("--trainer=resumable:Regression", "--model=linear")):
    """Starts two workers on loopback ports, each with its own TF_CONFIG and TMPDIR;
    `worker_flags` maps a worker index to flags for that worker only."""
    workers = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    processes = []
    for index in range(2):
        worker_env = dict(env)
        worker_env["TF_CONFIG"] = json.dumps({"cluster": {"worker": workers},
                                              "task": {"type": "worker", "index": index}})
        worker_env["TMPDIR"] = str(tmp_path / f"tmp{index}")
        os.makedirs(worker_env["TMPDIR"], exist_ok=True)
        processes.append(start_cli(
            list(trainer) + ["--strategy=multi_worker", "--global_batch_size=100"] + flags
            + (worker_flags or {}).get(index, []),
            worker_env, cwd=TESTS))
    return processes


def _finish(processes, timeout=240):
    deadline = time.monotonic() + timeout
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=max(deadline - time.monotonic(), 1)))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    for process, (_, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr[-3000:]
    return outputs


def test_two_workers_train_in_sync_and_only_the_chief_writes(tmp_path, cli_env):
    model_dir = tmp_path / "run"  # shared by both workers, as on a cluster file system
    outputs = _finish(_launch(tmp_path, cli_env, [
        "--train_steps=120", "--steps_per_loop=40", "--checkpoint_every_steps=40",
        f"--model_dir={model_dir}"]))
    chief, other = (_weights(stdout) for stdout, _ in outputs)
    assert chief["step"] == other["step"] == 120
    assert chief["weights"] == other["weights"]  # identical, not just close
    w, b = chief["weights"]
    assert abs(w[0][0] - 3.0) < 0.1 and abs(b[0] - 2.0) < 0.1

    checkpoints = sorted(os.listdir(model_dir / "checkpoints"))
    assert "checkpoint" in checkpoints and any(n.startswith("ckpt-120") for n in checkpoints)
    records = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [40, 80, 120]  # by the chief
    assert sorted(os.listdir(model_dir)) == ["checkpoints", "flags.txt", "metrics.jsonl",
                                             "run.json", "summaries"]
    assert len(os.listdir(model_dir / "summaries" / "train")) == 1  # one writer: the chief's
    # the other worker's temporary checkpoint directories are gone
    assert os.listdir(tmp_path / "tmp1") == []


def test_two_workers_roll_back_together_and_skip_the_same_poisoned_steps(tmp_path, cli_env):
    model_dir = tmp_path / "run"
    outputs = _finish(_launch(tmp_path, cli_env, [
        "--train_steps=40", "--steps_per_loop=10", "--nan_policy=rollback",
        f"--model_dir={model_dir}"], trainer=("--trainer=resumable:Poisoned", "--poison=23,24,25")))
    chief, other = (_weights(stdout) for stdout, _ in outputs)
    assert chief == other and chief["step"] == 40
    assert json.loads((model_dir / "run.json").read_text())["skipped"] == [[23, 25]]
    for _, stderr in outputs:
        assert "replayed steps 21-30 one per loop; skipped: 23-25" in stderr
    rows = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if row["split"] == "train"] == [
        10, 20, 21, 22, 26, 27, 28, 29, 30, 40]


def _kill_all(processes):
    for process in processes:
        process.kill()
        process.wait()


def test_sigterm_to_one_worker_stops_both_at_the_same_step_with_a_checkpoint(tmp_path, cli_env):
    model_dir, pause = tmp_path / "run", str(tmp_path / "paused")
    # Worker 1 pauses at step 20; the chief waits for it in the stop vote of that loop end.
    processes = _launch(tmp_path, cli_env, [
        "--train_steps=5000", "--steps_per_loop=10", f"--model_dir={model_dir}"],
        {1: ["--pause_at_step=20", f"--pause_file={pause}"]})
    try:
        assert wait_for_pause(pause, processes[1]) == 20
        processes[1].send_signal(signal.SIGTERM)  # the non-chief worker is preempted
        let_go(pause)
    except BaseException:
        _kill_all(processes)
        raise
    outputs = _finish(processes)
    steps = [int(stderr.split("preempted at step ")[1].split(",")[0]) for _, stderr in outputs]
    assert steps == [20, 20]
    assert tf.train.latest_checkpoint(str(model_dir / "checkpoints")).endswith("ckpt-20")


def test_a_worker_killed_stops_the_other_with_one_line_and_a_restart_resumes(tmp_path, cli_env):
    model_dir, pause = tmp_path / "run", str(tmp_path / "paused")
    flags = ["--train_steps=120", "--steps_per_loop=10", "--checkpoint_every_steps=20",
             f"--model_dir={model_dir}"]
    # Worker 1 pauses at step 30, after ckpt-20 was saved (collectively, before that loop).
    processes = _launch(tmp_path, cli_env, flags,
                        {1: ["--pause_at_step=30", f"--pause_file={pause}"]})
    try:
        assert wait_for_pause(pause, processes[1]) == 30
        processes[1].kill()  # SIGKILL: no handler, no checkpoint, no goodbye
        _, stderr = processes[0].communicate(timeout=120)  # a guard against a hang, not a check
    finally:
        _kill_all(processes)
    assert processes[0].returncode != 0
    # The last line tapekit writes (TensorFlow 2.16 then prints a multiprocessing pool's
    # "Exception ignored" traceback as the interpreter exits).
    last = [line for line in stderr.splitlines() if line.startswith("tapekit-train:")][-1]
    assert last.startswith("tapekit-train: error: worker 1 stopped (no more heartbeats) while "
                           "this worker was at step 30"), stderr[-3000:]
    assert f"the last checkpoint is {model_dir / 'checkpoints' / 'ckpt-20'}" in last, last
    assert "Restart all workers to resume from it." in last
    outputs = _finish(_launch(tmp_path, cli_env, flags))  # both restarted: resume, then finish
    assert all(f"resumed from checkpoint {model_dir / 'checkpoints' / 'ckpt-20'} at step 20" in err
               for _, err in outputs)
    assert _weights(outputs[0][0])["step"] == 120


def _two_free_consecutive_ports():
    while True:
        (base,) = _free_ports(1)
        probe = socket.socket()
        try:
            probe.bind(("127.0.0.1", base + 1))
            return base
        except OSError:
            continue
        finally:
            probe.close()


def test_two_slurm_tasks_build_the_cluster_without_tf_config(tmp_path, cli_env):
    """What `srun tapekit-train --strategy=multi_worker --cluster_resolver=slurm` sees: the
    variables Slurm sets for a step of two tasks on one node (TensorFlow's resolver expands
    the node list itself, so no `scontrol` is needed)."""
    model_dir, base = tmp_path / "run", _two_free_consecutive_ports()
    processes = []
    for rank in range(2):
        env = {**cli_env, "SLURM_PROCID": str(rank), "SLURM_STEP_NUM_TASKS": "2",
               "SLURM_STEP_NODELIST": "localhost", "SLURM_STEP_TASKS_PER_NODE": "2",
               "TMPDIR": str(tmp_path / f"tmp{rank}")}
        env.pop("TF_CONFIG", None)
        os.makedirs(env["TMPDIR"], exist_ok=True)
        processes.append(start_cli(
            ["--trainer=resumable:Regression", "--model=linear", "--strategy=multi_worker",
             "--cluster_resolver=slurm", f"--slurm_port_base={base}", "--global_batch_size=100",
             "--train_steps=40", "--steps_per_loop=20", f"--model_dir={model_dir}"], env,
            cwd=TESTS))
    outputs = _finish(processes)
    chief, other = (_weights(stdout) for stdout, _ in outputs)
    assert chief["step"] == other["step"] == 40 and chief["weights"] == other["weights"]
    record = json.loads((model_dir / "run.json").read_text())
    assert (record["strategy"], record["workers"]) == ("CollectiveAllReduceStrategy", 2)


def test_slurm_outside_a_slurm_step_is_one_clear_error(cli_env):
    env = {k: v for k, v in cli_env.items() if not k.startswith("SLURM_")}
    result = run_cli(["--strategy=multi_worker", "--cluster_resolver=slurm"], env)
    assert result.returncode == 2
    assert "--cluster_resolver=slurm cannot read the Slurm step" in result.stderr.splitlines()[-1]
