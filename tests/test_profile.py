"""`--profile_steps`: a trace whose steps are marked, read back with xprof into a step time,
an input wait and TensorBoard's verdict (tapekit/run/profiler.py, profile_analysis.py)."""

import glob
import json
import logging
import os
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from tapekit.run import profile_analysis
from tapekit.trainers import RegressionTrainer

from helpers import run_cli

pytest.importorskip("xprof", reason="needs the profile extra: pip install 'tapekit[profile]'")


def profile_rows(model_dir):
    rows = [json.loads(line) for line in open(os.path.join(model_dir, "metrics.jsonl"))]
    return [row for row in rows if row["split"] == "profile"]


def test_the_seed_mlp_profile_has_a_step_time_and_is_not_input_bound(tmp_path):
    result = run_cli(["--trainer=regression", "--model=mlp", f"--model_dir={tmp_path}",
                      "--train_steps=40", "--steps_per_loop=10", "--profile_steps=21,30",
                      "--progress=none"])
    assert result.returncode == 0, result.stderr
    traces = glob.glob(os.path.join(tmp_path, "profile", "plugins", "profile", "*", "*.xplane.pb"))
    analysis = profile_analysis.analyse(traces)  # the converted trace, read again
    assert analysis["steps_measured"] >= 5 and 0 < analysis["step_time_ms"] < 100
    (row,) = profile_rows(tmp_path)
    assert row["step"] == 30 and row["step_time_ms"] > 0 and row["input_wait_percent"] < 5
    assert not row["input_bound"] and row["verdict"] in ("NOT input-bound", "POTENTIALLY input-bound")
    assert len(row["top_ops"]) == 5 and sum(op["percent"] for op in row["top_ops"]) <= 100.01
    assert ("profile of steps 21-30: step time " in result.stderr
            and f"(TensorBoard: {row['verdict']}), top ops: {row['top_ops'][0]['op']}" in result.stderr)
    train_steps = [row["step"] for row in map(json.loads, open(tmp_path / "metrics.jsonl"))
                   if row["split"] == "train"]
    assert train_steps == [10, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 40]  # one step a call


def slow_batches(milliseconds):
    """The seed MLP's kind of batches, each made on one thread with a `milliseconds` wait."""
    x = np.random.default_rng(0).uniform(size=(1000, 5)).astype(np.float32)
    y = x.sum(axis=1, keepdims=True)

    def slow(x, y):
        def wait(x):
            time.sleep(milliseconds / 1000)
            return x
        x = tf.py_function(wait, [x], tf.float32)
        return tf.ensure_shape(x, [100, 5]), y

    return tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(100, drop_remainder=True).map(
        slow, num_parallel_calls=1)


def test_a_slow_input_pipeline_is_called_input_bound(tmp_path):
    trainer = RegressionTrainer(model="mlp", model_dir=str(tmp_path), profile_steps=(6, 15),
                                progress="none")
    trainer.fit(train_steps=15, steps_per_loop=5, dataset=slow_batches(milliseconds=30))
    (row,) = profile_rows(tmp_path)
    assert row["verdict"] == "HIGHLY input-bound" and row["input_bound"]
    # Part of each wait overlaps the callbacks between one-step calls (the input reads ahead).
    assert row["input_wait_percent"] > 50 and row["step_time_ms"] > 15


def test_without_xprof_the_log_says_how_to_get_the_analysis(tmp_path, monkeypatch, caplog):
    for name in [name for name in sys.modules if name.split(".")[0] == "xprof"] + ["xprof"]:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    trainer = RegressionTrainer(model_dir=str(tmp_path), profile_steps=(3, 4), progress="none")
    with caplog.at_level(logging.INFO, logger="absl"):
        trainer.fit(train_steps=6, steps_per_loop=3)
    assert glob.glob(os.path.join(tmp_path, "profile", "plugins", "profile", "*", "*.xplane.pb"))
    assert (f"profile of steps 3-4 is in {tmp_path}/profile (TensorBoard's Profile tab opens it); "
            "`pip install 'tapekit[profile]'`") in caplog.text
    assert not profile_rows(tmp_path)


def test_an_analysis_that_fails_is_a_warning(tmp_path, monkeypatch, caplog):
    def broken(paths, top=5):
        raise ValueError("xprof could not convert the trace for overview_page")

    monkeypatch.setattr(profile_analysis, "analyse", broken)
    trainer = RegressionTrainer(model_dir=str(tmp_path), profile_steps=(3, 4), progress="none")
    assert [h["step"] for h in trainer.fit(train_steps=6, steps_per_loop=3)] == [1, 2, 3, 4, 6]
    assert "profile of steps 3-4 in" in caplog.text and "could not be analysed: ValueError" in caplog.text


def test_profiled_steps_train_as_unprofiled_ones_on_two_replicas(tmp_path):
    weights = []
    for profile_steps in (None, (6, 12)):
        trainer = RegressionTrainer(model="mlp", model_dir=str(tmp_path / str(profile_steps)),
                                    profile_steps=profile_steps, progress="none",
                                    strategy="mirrored", cpu_replicas=2)
        trainer.fit(train_steps=20, steps_per_loop=5)
        weights.append([variable.numpy() for variable in trainer.model.weights])
    for profiled, unprofiled in zip(*weights):
        np.testing.assert_array_equal(profiled, unprofiled)  # the one-step calls: the same steps
    (row,) = profile_rows(tmp_path / str((6, 12)))
    assert row["step"] == 12 and row["step_time_ms"] > 0 and row["steps_measured"] >= 3


def test_a_run_that_fails_inside_the_window_stops_the_profiler(tmp_path):
    import tapekit

    class FailsAt25(tapekit.Callback):
        def on_loop_end(self, step, logs):
            if step == 25:
                raise RuntimeError("a bug at step 25")

    trainer = RegressionTrainer(model="mlp", model_dir=str(tmp_path / "run"), profile_steps=(21, 30),
                                progress="none")
    with pytest.raises(RuntimeError, match="a bug at step 25"):
        trainer.fit(train_steps=40, steps_per_loop=10, callbacks=[FailsAt25()])
    # The trace was stopped (and read): a new capture can start in this process.
    assert glob.glob(str(tmp_path / "run" / "profile" / "plugins" / "profile" / "*" / "*.xplane.pb"))
    tf.profiler.experimental.start(str(tmp_path / "again"))
    tf.profiler.experimental.stop()


def test_a_run_stopped_by_a_signal_inside_the_window_leaves_its_trace_unanalysed(tmp_path, caplog):
    import signal

    import tapekit

    class SigtermAt5(tapekit.Callback):
        def on_loop_end(self, step, logs):
            if step == 5:
                os.kill(os.getpid(), signal.SIGTERM)

    trainer = RegressionTrainer(model_dir=str(tmp_path), profile_steps=(3, 100), progress="none")
    with caplog.at_level(logging.INFO, logger="absl"):
        trainer.fit(train_steps=200, steps_per_loop=10, callbacks=[SigtermAt5()])
    assert trainer.preempted and trainer.current_step == 5
    assert glob.glob(os.path.join(tmp_path, "profile", "plugins", "profile", "*", "*.xplane.pb"))
    assert f"profile of steps 3-5 is in {tmp_path}/profile, not analysed (training stopped early)" \
        in caplog.text
    assert not profile_rows(tmp_path) and "step time" not in caplog.text


def test_a_run_resumed_inside_the_window_warms_up_before_capturing(tmp_path, caplog):
    RegressionTrainer(model_dir=str(tmp_path), progress="none").fit(train_steps=5, steps_per_loop=5)
    trainer = RegressionTrainer(model_dir=str(tmp_path), profile_steps=(4, 8), progress="none")
    with caplog.at_level(logging.INFO, logger="absl"):
        trainer.fit(train_steps=10, steps_per_loop=5)
    assert "profiling steps 7 to 8 into" in caplog.text  # step 6 traced the one-step function
    (row,) = profile_rows(tmp_path)
    assert row["step"] == 8 and row["step_time_ms"] > 0


def test_several_workers_profile_into_their_own_folders_and_no_older_capture_is_read(tmp_path):
    from tapekit.run import profiler

    def strategy(task_type, task_id):
        cluster = tf.train.ClusterSpec({"worker": ["localhost:1", "localhost:2"]})
        resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
            cluster, task_type=task_type, task_id=task_id)
        return type("Strategy", (), {"cluster_resolver": resolver})()

    assert profiler.worker_profile_dir("/m", strategy("worker", 1)) == "/m/profile/worker_1"
    assert profiler.worker_profile_dir("/m", tf.distribute.get_strategy()) == "/m/profile"
    assert profiler.worker_profile_dir(None, tf.distribute.get_strategy()) is None
    logdir = str(tmp_path)
    tf.profiler.experimental.start(logdir)
    tf.profiler.experimental.stop()
    runs = set(profiler._runs(logdir))
    assert len(runs) == 1 and profiler._new_traces(logdir, set())  # the capture just made
    with pytest.raises(FileNotFoundError, match="no trace was written under"):
        profiler._new_traces(logdir, runs)  # nothing new: the older capture is not read
