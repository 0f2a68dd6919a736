"""--loggers: which files a run writes, metrics.csv, a user's logger, and the HParams session
as TensorBoard itself serves it."""

import csv
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from tapekit.callbacks import Callback, CsvLogger, HParams
from tapekit.checkpoint import files

from helpers import run_cli

COMMON = ["--trainer=regression", "--model=linear", "--steps_per_loop=10", "--eval_every_steps=20",
          "--progress=none"]


def csv_rows(path):
    text = files.read_text(path)
    return list(csv.DictReader(io.StringIO(text)))


def test_csv_writes_a_row_per_loop_and_evaluation_and_nothing_else(tmp_path, cli_env):
    model_dir = tmp_path / "run"
    result = run_cli(COMMON + [f"--model_dir={model_dir}", "--train_steps=40", "--loggers=csv"],
                     cli_env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (model_dir / "metrics.jsonl").exists() and not (model_dir / "summaries").exists()
    header = open(model_dir / "metrics.csv").readline().strip().split(",")
    assert header[:2] == ["split", "step"] and "loss" in header and "steps_per_sec" in header
    rows = [row for row in csv_rows(str(model_dir / "metrics.csv")) if row["split"] in ("train", "eval")]
    assert [(row["split"], int(row["step"])) for row in rows] == [
        ("train", 10), ("train", 20), ("eval", 20), ("train", 30), ("train", 40), ("eval", 40)]
    assert all(float(row["loss"]) >= 0 for row in rows)
    assert all(row["steps_per_sec"] == "" for row in rows if row["split"] == "eval")
    # A row written after the last checkpoint (a job killed before saving step 50's loop):
    # the resumed run trains step 50 again and its row replaces that one.
    with open(model_dir / "metrics.csv", "a") as stream:
        stream.write("train,50,123.0" + "," * (len(header) - 3) + "\n")
    result = run_cli(COMMON + [f"--model_dir={model_dir}", "--train_steps=60", "--loggers=csv"],
                     cli_env)
    assert result.returncode == 0, result.stderr[-3000:]
    train = [row for row in csv_rows(str(model_dir / "metrics.csv")) if row["split"] == "train"]
    assert [int(row["step"]) for row in train] == [10, 20, 30, 40, 50, 60]
    assert float(train[4]["loss"]) < 1


def test_jsonl_alone_writes_no_summaries_and_tensorboard_alone_no_metrics_file(tmp_path, cli_env):
    for loggers, present, absent in (("jsonl", "metrics.jsonl", "summaries"),
                                     ("tensorboard", "summaries", "metrics.jsonl")):
        model_dir = tmp_path / loggers
        result = run_cli(COMMON + [f"--model_dir={model_dir}", "--train_steps=20",
                                   f"--loggers={loggers}"], cli_env)
        assert result.returncode == 0, result.stderr[-3000:]
        assert (model_dir / present).exists() and not (model_dir / absent).exists()
        assert not (model_dir / "metrics.csv").exists()


def test_a_new_column_rewrites_the_header_and_a_resume_drops_later_rows_on_an_object_store():
    path = f"ram://loggers_{os.getpid()}/run/metrics.csv"
    logger = CsvLogger(path)
    logger.on_train_begin(0)
    logger.on_loop_end(10, {"loss": 1.5, "steps_per_sec": 100.0})
    logger.on_loop_end(20, {"loss": 1.25, "steps_per_sec": 100.0})
    logger.on_eval_end(20, {"loss": 1.0, "best_loss": 1.0, "best_step": 20})
    logger.on_profile(20, {"step_time_ms": 1.5, "verdict": "input-bound"})
    text = files.read_text(path)
    assert text.splitlines()[0] == "split,step,loss,steps_per_sec,best_loss,best_step,step_time_ms"
    assert text.splitlines()[1:] == ["train,10,1.5,100.0,,,", "train,20,1.25,100.0,,,",
                                     "eval,20,1.0,,1.0,20,", "profile,20,,,,,1.5"]
    resumed = CsvLogger(path)
    resumed.on_train_begin(10)  # the checkpoint of step 10: step 20's rows go
    resumed.on_loop_end(20, {"loss": 1.25, "steps_per_sec": 90.0})
    assert files.read_text(path).splitlines()[1:] == ["train,10,1.5,100.0,,,",
                                                      "train,20,1.25,90.0,,,"]


class Rows(Callback):
    """A logger of one's own: a Callback that keeps what it is given."""

    def __init__(self):
        self.rows = []

    def on_loop_end(self, step, logs):
        self.rows.append(("train", step, sorted(logs)))

    def on_eval_end(self, step, logs):
        self.rows.append(("eval", step, sorted(logs)))


def test_a_users_callback_is_a_logger_and_loggers_can_be_none(tmp_path):
    from tapekit.trainers.regression import RegressionTrainer
    model_dir = tmp_path / "run"
    logger = Rows()
    RegressionTrainer(model="linear", model_dir=str(model_dir), loggers="").fit(
        train_steps=20, steps_per_loop=10, eval_every_steps=20, callbacks=[logger])
    assert [row[:2] for row in logger.rows] == [("train", 10), ("train", 20), ("eval", 20)]
    assert "loss" in logger.rows[0][2] and "loss" in logger.rows[2][2]
    assert not {"metrics.jsonl", "metrics.csv", "summaries"} & set(os.listdir(model_dir))


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(url, body):
    request = urllib.request.Request(url, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_two_runs_line_up_in_tensorboards_hparams_dashboard(tmp_path, cli_env):
    pytest.importorskip("tensorboard.plugins.hparams.api")
    parent = tmp_path / "sweep"
    for rate in ("0.05", "0.2"):
        result = run_cli(COMMON + [f"--model_dir={parent / ('lr' + rate)}", "--train_steps=40",
                                   f"--learning_rate={rate}", "--best_metric=loss"], cli_env)
        assert result.returncode == 0, result.stderr[-3000:]
    port = free_port()
    base = f"http://127.0.0.1:{port}/data/plugin/hparams"
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", f"--logdir={parent}",
                               f"--port={port}", "--host=127.0.0.1", "--reload_interval=1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, groups = time.monotonic() + 90, []
        while time.monotonic() < deadline:
            try:
                groups = post(f"{base}/session_groups", {
                    "experimentName": "", "startIndex": 0, "sliceSize": 10,
                    "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE",
                                        "STATUS_RUNNING"]}).get("sessionGroups", [])
            except OSError:  # not listening yet
                groups = []
            if len(groups) == 2 and all(len(group["metricValues"]) >= 5 for group in groups):
                break
            assert server.poll() is None, "tensorboard exited"
            time.sleep(0.5)
        experiment = post(f"{base}/experiment", {"experimentName": ""})
    finally:
        server.kill()
        server.wait()
    assert len(groups) == 2, groups
    infos = {info["name"]: info for info in experiment["hparamInfos"]}
    assert infos["learning_rate"]["differs"] and infos["model"]["domainDiscrete"] == ["linear"]
    metrics = {(info["name"]["group"], info["name"]["tag"]) for info in experiment["metricInfos"]}
    assert {("train", "loss"), ("eval", "loss"), ("eval", "best_loss")} <= metrics
    by_rate = {group["hparams"]["learning_rate"]: group for group in groups}
    assert set(by_rate) == {0.05, 0.2}
    for rate, group in by_rate.items():
        assert group["sessions"][0]["name"] == f"lr{rate}/summaries"
        values = {(value["name"]["group"], value["name"]["tag"]): value
                  for value in group["metricValues"]}
        final = [json.loads(line) for line in open(parent / f"lr{rate}" / "metrics.jsonl")]
        last_eval = [row for row in final if row["split"] == "eval"][-1]
        assert values[("eval", "loss")]["trainingStep"] == 40
        assert values[("eval", "loss")]["value"] == pytest.approx(last_eval["loss"], rel=1e-6)
        assert values[("eval", "best_loss")]["value"] == pytest.approx(last_eval["best_loss"],
                                                                       rel=1e-6)


def test_without_tensorboard_hparams_says_how_to_get_it_and_writes_nothing(tmp_path, monkeypatch,
                                                                           caplog):
    for name in ("tensorboard.plugins.hparams", "tensorboard.plugins.hparams.api"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    caplog.set_level("INFO")
    HParams(str(tmp_path)).on_train_begin(0)
    assert any("pip install tensorboard" in record.getMessage() for record in caplog.records)
    assert not (tmp_path / "summaries").exists()
