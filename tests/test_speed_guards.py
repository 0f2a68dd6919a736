"""Behaviour behind the speed work: in-memory input, trace counting, retrace guard, profiling."""

import glob
import os

import pytest
import tensorflow as tf

import tapekit
from tapekit.trainers import RegressionTrainer

from small_trainers import LinearSGD, rows


def test_the_compiled_loop_is_built_once_per_trainer():
    trainer = RegressionTrainer(model="mlp")
    trainer.fit(train_steps=30, steps_per_loop=10)
    loop = trainer._engine.train_loop
    for target in (60, 95, 100):
        trainer.fit(train_steps=target, steps_per_loop=7)
    assert trainer._engine.train_loop is loop
    assert loop._function.experimental_get_tracing_count() == 1
    assert trainer.train_loop_trace_count == 1


def test_a_retrace_warns_naming_the_input_that_changed(caplog):
    x, y = rows(64)
    trainer = LinearSGD(global_batch_size=16)
    trainer.fit(train_steps=4, steps_per_loop=2,
                dataset=tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(16, drop_remainder=True))
    trainer.fit(train_steps=8, steps_per_loop=2,
                dataset=tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(8, drop_remainder=True))
    assert trainer.train_loop_trace_count == 2
    assert "train_loop traced again (2 traces)" in caplog.text
    assert "input[0]: float32[16, 3] -> float32[8, 3]" in caplog.text
    assert "input[1]: float32[16, 1] -> float32[8, 1]" in caplog.text


def test_max_retraces_turns_retracing_into_an_error():
    x, y = rows(64)
    trainer = LinearSGD(global_batch_size=16, max_retraces=0)
    trainer.fit(train_steps=2, steps_per_loop=2,
                dataset=tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(16, drop_remainder=True))
    with pytest.raises(tapekit.TapekitError, match="traced 2 times .more than max_retraces=0"):
        trainer.fit(train_steps=4, steps_per_loop=2,
                    dataset=tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(8, drop_remainder=True))
    assert trainer.current_step == 2


def test_profile_steps_write_a_profiler_trace(tmp_path):
    trainer = RegressionTrainer(model_dir=str(tmp_path), profile_steps=(5, 8))
    history = trainer.fit(train_steps=20, steps_per_loop=10)
    # one step a call from the step before the profiled ones (tapekit/run/profiler.py)
    assert [h["step"] for h in history] == [3, 4, 5, 6, 7, 8, 18, 20]
    traces = glob.glob(os.path.join(tmp_path, "profile", "plugins", "profile", "*", "*.xplane.pb"))
    assert traces and os.path.getsize(traces[0]) > 0


def test_profile_steps_need_a_model_dir_and_an_order():
    with pytest.raises(tapekit.TapekitError, match="needs a model_dir"):
        RegressionTrainer(profile_steps=(1, 2))
    with pytest.raises(tapekit.TapekitError, match="START,END"):
        RegressionTrainer(model_dir="/tmp/unused", profile_steps=(5, 2))
