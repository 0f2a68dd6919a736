"""Behaviour behind the speed work: in-memory input, trace counting, retrace guard, profiling."""

import glob
import os

import numpy as np
import pytest
import tensorflow as tf

import tapekit
from tapekit.data import InMemoryExamples
from tapekit.trainers import RegressionTrainer
from small_trainers import LinearSGD, rows


def _batches(source):
    @tf.function
    def batch(step):
        source.prepare(step // source.steps_per_epoch)
        return source.batch(step)
    return lambda step: batch(tf.constant(step, tf.int64))


def test_in_memory_batches_cover_each_epoch_once_and_differ_between_epochs():
    examples = np.arange(50, dtype=np.int64)
    source = InMemoryExamples(tf.distribute.get_strategy(), examples, global_batch_size=10, seed=4)
    batch = _batches(source)
    epoch0 = np.concatenate([batch(s).numpy() for s in range(5)])
    epoch1 = np.concatenate([batch(s).numpy() for s in range(5, 10)])
    assert sorted(epoch0) == list(range(50)) and sorted(epoch1) == list(range(50))
    assert list(epoch0) != list(range(50)) and list(epoch0) != list(epoch1)
    again = np.concatenate([batch(s).numpy() for s in range(5)])
    np.testing.assert_array_equal(again, epoch0)  # a pure function of (seed, step)


def test_in_memory_batches_split_the_global_batch_across_replicas():
    strategy = tapekit.distribute.resolve_strategy("mirrored", cpu_replicas=2)
    examples = np.arange(40, dtype=np.int64)
    one = InMemoryExamples(tf.distribute.get_strategy(), examples, 8, seed=1)
    two = InMemoryExamples(strategy, examples, 8, seed=1)
    whole = _batches(one)(3).numpy()

    @tf.function
    def replica_batch(step):
        two.prepare(step // two.steps_per_epoch)
        return two.batch(step)

    parts = strategy.run(replica_batch, args=(tf.constant(3, tf.int64),))
    halves = [t.numpy() for t in strategy.experimental_local_results(parts)]
    np.testing.assert_array_equal(np.concatenate(halves), whole)


def test_the_compiled_loop_is_built_once_per_trainer():
    trainer = RegressionTrainer(model="mlp")
    trainer.fit(train_steps=30, steps_per_loop=10)
    loop = trainer._train_loop
    for target in (60, 95, 100):
        trainer.fit(train_steps=target, steps_per_loop=7)
    assert trainer._train_loop is loop
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
    assert [h["step"] for h in history] == [4, 8, 18, 20]  # loops cut at the profiled steps
    traces = glob.glob(os.path.join(tmp_path, "profile", "plugins", "profile", "*", "*.xplane.pb"))
    assert traces and os.path.getsize(traces[0]) > 0


def test_profile_steps_need_a_model_dir_and_an_order():
    with pytest.raises(tapekit.TapekitError, match="needs a model_dir"):
        RegressionTrainer(profile_steps=(1, 2))
    with pytest.raises(tapekit.TapekitError, match="START,END"):
        RegressionTrainer(model_dir="/tmp/unused", profile_steps=(5, 2))
