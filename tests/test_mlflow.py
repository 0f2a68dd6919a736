"""--loggers=...,mlflow against a real MLflow store (sqlite) and a real `mlflow server` on
loopback: params, metrics per step, a resumed run continued with steps that only go up,
artifacts, the run's status, and a tracker that stops answering in the middle of a run."""

import json
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from tapekit.callbacks import Callback, MlflowLogger
from tapekit.callbacks.mlflow_logger import tracking_uri

from helpers import run_cli

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

COMMON = ["--trainer=regression", "--model=linear", "--steps_per_loop=10", "--eval_every_steps=20",
          "--progress=none", "--best_metric=loss"]


def only_run(client, experiment):
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return run


def steps(client, run_id, key):
    return [point.step for point in client.get_metric_history(run_id, key)]


def recorded_run_id(model_dir):
    return json.load(open(os.path.join(model_dir, "run.json")))["logger_runs"]["mlflow"]["run_id"]


def test_a_run_and_its_resume_are_one_mlflow_run_in_a_sqlite_store(tmp_path, cli_env):
    env = {**cli_env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/store.db"}
    model_dir = tmp_path / "regression" / "run1"
    for train_steps in (40, 80):  # stopped at 40, resumed to 80
        result = run_cli(COMMON + [f"--model_dir={model_dir}", f"--train_steps={train_steps}",
                                   "--loggers=jsonl,mlflow"], env, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        if train_steps == 40:
            first_id = recorded_run_id(model_dir)
    assert recorded_run_id(model_dir) == first_id
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    run = only_run(client, "regression")  # the experiment: the model_dir's parent's name
    assert run.info.run_id == first_id and run.info.status == "FINISHED"
    assert run.info.run_name == "run1"
    params = run.data.params
    assert params["model"] == "linear" and params["learning_rate"] == "0.1"
    assert params["train_steps"] == "40"  # as first logged: MLflow cannot change a param
    assert params["trainer"] == "tapekit.trainers.regression:RegressionTrainer"
    assert steps(client, first_id, "train/loss") == [10, 20, 30, 40, 50, 60, 70, 80]
    assert steps(client, first_id, "eval/loss") == [20, 40, 60, 80]
    assert steps(client, first_id, "eval/best_loss") == [20, 40, 60, 80]
    timings = sorted(key for key in run.data.metrics if key.startswith("time/"))
    assert timings and all(steps(client, first_id, key) == [10, 20, 30, 40, 50, 60, 70, 80]
                           for key in timings), timings  # each fit's last loop too
    rows = [json.loads(line) for line in open(model_dir / "metrics.jsonl")]
    history = client.get_metric_history(first_id, "train/loss")
    assert [point.value for point in history] == pytest.approx(
        [row["loss"] for row in rows if row["split"] == "train"], rel=1e-6)
    artifacts = {item.path for item in client.list_artifacts(first_id)}
    assert {"run.json", "best"} <= artifacts
    best = {item.path for item in client.list_artifacts(first_id, "best")}
    assert "best/best.json" in best
    assert not os.path.exists(tmp_path / "mlflow.db")  # the user's URI, not the default
    # Artifacts beside the user's store, not in ./mlruns under the current folder.
    assert run.info.artifact_uri.startswith(str(tmp_path / "mlartifacts")), run.info.artifact_uri
    assert os.path.exists(tmp_path / "mlartifacts") and not os.path.exists(tmp_path / "mlruns")
    assert run.data.tags["tapekit.model_dir"] == str(model_dir)


def test_without_a_tracking_uri_the_store_is_beside_the_model_dir_and_steps_only_go_up(
        tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    model_dir = str(tmp_path / "sweep" / "run1")
    os.makedirs(model_dir)
    uri, artifacts = tracking_uri(model_dir)
    assert uri == f"sqlite:///{tmp_path}/sweep/mlflow.db"
    assert artifacts == f"{tmp_path}/sweep/mlartifacts"
    first = MlflowLogger(model_dir, experiment="mine")
    first.on_train_begin(0)
    for step in (10, 20, 30, 40):
        first.on_loop_end(step, {"loss": 1.0 / step})
    first.on_train_end(40, None)
    first.on_loop_stats(40, {"time/train_secs": 0.5, "memory/host_rss_bytes": 1e8})  # as fit does
    # Resumed from the checkpoint of step 20 (the job was killed after logging step 40):
    # steps 30 and 40 are trained and reported again, and not logged twice.
    second = MlflowLogger(model_dir, experiment="mine")
    second.on_train_begin(20)
    for step in (30, 40, 50):
        second.on_loop_end(step, {"loss": 2.0 / step})
    second.on_profile(50, {"step_time_ms": 1.5, "verdict": "input-bound"})
    second.on_exception(50, ValueError("a bug"))
    assert second.run_id == first.run_id == recorded_run_id(model_dir)
    client = MlflowClient(uri)
    run = only_run(client, "mine")
    assert run.info.status == "FAILED"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(point.step, point.value) for point in history] == [
        (10, 0.1), (20, 0.05), (30, 1.0 / 30), (40, 0.025), (50, 0.04)]
    assert steps(client, run.info.run_id, "time/train_secs") == [40]
    assert steps(client, run.info.run_id, "profile/step_time_ms") == [50]
    assert "profile/verdict" not in run.data.metrics
    assert os.path.exists(tmp_path / "sweep" / "mlflow.db")


class Raise(Callback):
    def on_loop_end(self, step, logs):
        if step == 20:
            raise ValueError("a bug in a callback")


def test_a_fit_that_raises_leaves_the_run_failed(tmp_path, monkeypatch):
    from tapekit.trainers.regression import RegressionTrainer
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/store.db")
    os.makedirs(tmp_path / "elsewhere")
    monkeypatch.chdir(tmp_path / "elsewhere")  # where MLflow itself would put ./mlruns
    trainer = RegressionTrainer(model="linear", model_dir=str(tmp_path / "exp" / "run"),
                                loggers="mlflow", progress="none")
    with pytest.raises(ValueError):
        trainer.fit(train_steps=40, steps_per_loop=10, callbacks=[Raise()])
    run = only_run(MlflowClient(f"sqlite:///{tmp_path}/store.db"), "exp")
    assert run.info.status == "FAILED"
    assert steps(MlflowClient(f"sqlite:///{tmp_path}/store.db"), run.info.run_id,
                 "train/loss") == [10, 20]
    assert os.listdir(tmp_path / "elsewhere") == []


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real `mlflow server` on loopback (its sqlite store and artifacts in a temporary
    folder), shared by the tests of this file; the last one stops it."""
    folder = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    process = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "mlflow"), "server", "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1", "--backend-store-uri", f"sqlite:///{folder}/db",
         "--artifacts-destination", str(folder / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=folder)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        assert process.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
        time.sleep(0.25)
    process.uri = uri
    yield process
    process.kill()
    process.wait()


class StopServer(Callback):
    def __init__(self, process, at_step):
        self.process, self.at_step = process, at_step

    def on_loop_end(self, step, logs):
        if step == self.at_step:
            self.process.terminate()
            self.process.wait(30)


def test_a_server_run_goes_on_when_the_server_stops_in_the_middle(tmp_path, server, monkeypatch,
                                                                   caplog):
    from tapekit.trainers.regression import RegressionTrainer
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    model_dir = str(tmp_path / "served" / "run")

    def trainer():
        return RegressionTrainer(model="linear", model_dir=model_dir, loggers="jsonl,mlflow",
                                 progress="none")
    trainer().fit(train_steps=40, steps_per_loop=10, eval_every_steps=20)
    client = MlflowClient(server.uri)
    run = only_run(client, "served")
    assert run.info.status == "FINISHED" and run.info.run_id == recorded_run_id(model_dir)
    assert steps(client, run.info.run_id, "train/loss") == [10, 20, 30, 40]
    assert "run.json" in {item.path for item in client.list_artifacts(run.info.run_id)}
    # Resumed; the server stops after the loop of step 60.
    caplog.set_level(logging.WARNING)
    start = time.monotonic()
    history = trainer().fit(train_steps=200, steps_per_loop=10, eval_every_steps=20,
                            callbacks=[StopServer(server, 60)])
    seconds = time.monotonic() - start
    assert history[-1]["step"] == 200
    warnings = [record.getMessage() for record in caplog.records
                if record.levelno == logging.WARNING and record.getMessage().startswith("mlflow:")]
    assert warnings and ("unreachable" in warnings[0] or "failed" in warnings[0]), warnings
    assert len([line for line in warnings if "training goes on" in line]) == 1, warnings
    assert seconds < 60, seconds  # a sanity bound only: the sends are off the training thread
    rows = [json.loads(line) for line in open(os.path.join(model_dir, "metrics.jsonl"))]
    assert [row["step"] for row in rows if row["split"] == "train"][-1] == 200


def test_without_mlflow_the_trainer_says_how_to_get_it_before_writing_anything(tmp_path,
                                                                              monkeypatch):
    from tapekit.errors import TapekitError
    from tapekit.trainers.regression import RegressionTrainer
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    model_dir = tmp_path / "run"
    with pytest.raises(TapekitError, match=r"pip install 'tapekit\[mlflow\]'"):
        RegressionTrainer(model="linear", model_dir=str(model_dir), loggers="jsonl,mlflow")
    assert not os.path.exists(model_dir)
    with pytest.raises(TapekitError, match=r"pip install 'tapekit\[mlflow\]'"):
        MlflowLogger(str(model_dir))


def mlflow_warnings(caplog):
    return [record.getMessage() for record in caplog.records
            if record.levelno >= logging.WARNING and "mlflow" in record.getMessage().lower()]


def test_an_unsupported_tracking_uri_is_said_once_and_every_value_is_counted(
        tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "bogus://x")
    crashes = []
    monkeypatch.setattr("threading.excepthook", crashes.append)
    caplog.set_level(logging.WARNING)
    logger = MlflowLogger(str(tmp_path / "runs" / "a"), queue_size=2)
    logger.on_train_begin(0)
    for step in range(10, 110, 10):  # more than the queue holds: the thread keeps draining it
        logger.on_loop_end(step, {"loss": 1.0, "accuracy": 0.5})
        time.sleep(0.05)
    logger.on_train_end(100, None)
    logger.on_loop_stats(100, {"time/train_secs": 1.0})
    assert crashes == []
    assert logger.dropped == 21
    warnings = mlflow_warnings(caplog)
    assert len(warnings) == 2, warnings  # the reason, then the count
    assert "bogus://x" in warnings[0] and "\n" not in warnings[0]
    assert "does not support" in warnings[0] and "full" not in warnings[0]
    assert warnings[1].startswith("mlflow: 20 metric value(s) were not logged")


class Trainer:
    def __init__(self, **stopped):
        self.preempted = self.interrupted = self.stopped_by_time = False
        self.__dict__.update(stopped)


@pytest.mark.parametrize("stopped, status, best", [
    ({}, "FINISHED", True), ({"preempted": True}, "KILLED", False),
    ({"interrupted": True}, "KILLED", False), ({"stopped_by_time": True}, "KILLED", True)])
def test_the_end_of_a_run_as_it_stopped(tmp_path, monkeypatch, stopped, status, best):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    os.makedirs(tmp_path / "elsewhere")
    monkeypatch.chdir(tmp_path / "elsewhere")
    model_dir = tmp_path / "sweep" / "run"
    os.makedirs(model_dir / "best")
    (model_dir / "best" / "best.json").write_text("{}")
    (model_dir / "run.json").write_text("{}")
    logger = MlflowLogger(str(model_dir), experiment="Default")  # the store's own experiment
    logger.trainer = Trainer(**stopped)
    logger.on_train_begin(0)
    logger.on_loop_end(10, {"loss": 1.0})
    logger.on_train_end(10, None)
    client = MlflowClient(f"sqlite:///{tmp_path}/sweep/mlflow.db")
    run = client.get_run(logger.run_id)
    assert run.info.status == status
    artifacts = {item.path for item in client.list_artifacts(run.info.run_id)}
    assert artifacts == ({"run.json", "best"} if best else {"run.json"})
    assert run.info.artifact_uri.startswith(str(tmp_path / "sweep" / "mlartifacts"))
    assert os.listdir(tmp_path / "elsewhere") == []  # no ./mlruns


def test_a_sender_that_misses_the_end_stops_and_the_next_fit_waits_for_it(tmp_path, monkeypatch,
                                                                           caplog):
    """A tracker that accepts connections and never answers: the end does not wait past its
    deadline, the late thread makes no further call and ends, and a second fit's thread
    starts after it (never two on one logger)."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(8)
        logger = MlflowLogger(str(tmp_path / "hung" / "run"),
                              tracking_uri=f"http://127.0.0.1:{hung.getsockname()[1]}",
                              flush_timeout_secs=0.5)
        logger.on_train_begin(0)
        first = logger._thread
        logger.on_loop_end(10, {"loss": 1.0})
        start = time.monotonic()
        logger.on_train_end(10, None)
        assert time.monotonic() - start < 1.5
        assert first.is_alive()  # still in its request
        logger.on_train_begin(10)
        second = logger._thread
        logger.on_loop_end(20, {"loss": 1.0})
        logger.on_train_end(20, None)
        first.join(10)
        second.join(10)
        assert not first.is_alive() and not second.is_alive()
    assert logger.dropped >= 1
