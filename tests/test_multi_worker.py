"""A real two-process MultiWorkerMirroredStrategy run on loopback."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))


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
    line = next(l for l in stdout.splitlines() if l.startswith("WEIGHTS "))
    return json.loads(line[len("WEIGHTS "):])


def test_two_workers_train_in_sync_and_only_the_chief_writes(tmp_path, cli_env):
    model_dir = tmp_path / "run"  # shared by both workers, as on a cluster file system
    workers = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    processes = []
    for index in range(2):
        env = dict(cli_env)
        env["TF_CONFIG"] = json.dumps({"cluster": {"worker": workers},
                                       "task": {"type": "worker", "index": index}})
        env["TMPDIR"] = str(tmp_path / f"tmp{index}")
        os.makedirs(env["TMPDIR"])
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "tapekit.trainers",
             "--trainer=weights_reporting:WeightsReportingRegression", "--model=linear",
             "--strategy=multi_worker", "--train_steps=120", "--steps_per_loop=40",
             "--checkpoint_every_steps=40", "--global_batch_size=100", f"--model_dir={model_dir}"],
            cwd=TESTS, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    deadline = time.monotonic() + 240
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=max(deadline - time.monotonic(), 1)))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    for process, (stdout, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr[-3000:]
    chief, other = (_weights(stdout) for stdout, _ in outputs)
    assert chief["step"] == other["step"] == 120
    assert chief["weights"] == other["weights"]  # identical, not just close
    w, b = chief["weights"]
    assert abs(w[0][0] - 3.0) < 0.1 and abs(b[0] - 2.0) < 0.1

    checkpoints = sorted(os.listdir(model_dir / "checkpoints"))
    assert "checkpoint" in checkpoints and any(n.startswith("ckpt-120") for n in checkpoints)
    records = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [40, 80, 120]  # written once, by the chief
    assert sorted(os.listdir(model_dir)) == ["checkpoints", "metrics.jsonl"]
    # the other worker's temporary checkpoint directories are gone
    assert os.listdir(tmp_path / "tmp1") == []
