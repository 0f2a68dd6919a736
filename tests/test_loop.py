"""`tapekit.compiled.loop.CompiledLoop`: many steps in one tf.function, metrics summed in the graph."""

import pytest
import tensorflow as tf

from tapekit.compiled import build
from tapekit.compiled.loop import CompiledLoop, LoopPlan, describe_spec_changes
from tapekit.errors import TapekitError

STRATEGY = tf.distribute.get_strategy()


def planned(step, batches, step_counter=None, **options) -> LoopPlan:
    """The plan the engine makes: from a build trace of `step` on `batches`' spec."""
    report = build.trace_step(STRATEGY, step, batches.element_spec, step_counter=step_counter)
    return LoopPlan.from_build(report, **options)


def loop_of(step, batches, step_counter=None, endless=False, **options) -> CompiledLoop:
    return CompiledLoop(STRATEGY, step, planned(step, batches, step_counter, **options),
                        step_counter=step_counter, endless=endless)


def mean_of_batch(batch):
    return {"value": tf.reduce_mean(tf.cast(batch, tf.float32))}


def iterator(values, batch_size=2):
    return iter(STRATEGY.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices(tf.constant(values, tf.float32)).batch(batch_size)))


def test_a_loop_reports_the_mean_over_its_steps_and_counts_them():
    counter = tf.Variable(0, dtype=tf.int64)
    batches = iterator([1, 3, 5, 7, 9, 11, 13, 15])  # step means 2, 6, 10, 14
    loop = loop_of(mean_of_batch, batches, counter)
    first = loop(batches, 3)
    assert first.metrics == {"value": pytest.approx(6.0)} and first.steps_run == 3
    second = loop(batches, 3)  # only one batch is left
    assert second.steps_run == 1 and second.metrics["value"] == pytest.approx(14.0)
    assert int(counter.numpy()) == 4 and loop.trace_count == 1
    assert second.nonfinite_steps == 0 and second.first_nonfinite_offset is None


def _counter_updates_inside_the_loop(loop) -> int:
    """AssignAddVariableOps in the while loop's functions (body, cond, branches)."""
    library = loop._concrete[1].graph.as_graph_def().library.function
    return sum(node.op == "AssignAddVariableOp" for f in library for node in f.node_def)


def test_the_step_counter_is_updated_once_per_loop_unless_the_step_reads_it():
    counter = tf.Variable(0, dtype=tf.int64)
    batches = iterator([1, 3, 5, 7, 9, 11])
    loop = loop_of(mean_of_batch, batches, counter)
    assert not loop.plan.reads_step_counter
    assert loop(batches, 2).steps_run == 2 and int(counter.numpy()) == 2
    assert loop(batches, 2).steps_run == 1 and int(counter.numpy()) == 3  # the data ended
    assert _counter_updates_inside_the_loop(loop) == 0  # counted once, after the loop

    reading = tf.Variable(10, dtype=tf.int64)
    endless = iter(tf.data.Dataset.range(4).repeat())
    loop = loop_of(lambda batch: {"seen": tf.cast(reading, tf.float32)}, endless, reading,
                   endless=True)
    assert loop.plan.reads_step_counter  # found by the build trace
    result = loop(endless, 4)
    assert result.metrics["seen"] == pytest.approx(11.5)  # each step saw 10, 11, 12, 13
    assert int(reading.numpy()) == 14 and _counter_updates_inside_the_loop(loop) == 1


def test_none_steps_runs_the_data_to_its_end_weighting_a_partial_batch():
    batches = iterator([1, 2, 3, 4, 5], batch_size=2)  # batches of 2, 2 and 1
    result = loop_of(mean_of_batch, batches)(batches, None)
    assert result.steps_run == 3
    assert result.metrics["value"] == pytest.approx(3.0)  # the mean of every example


def test_per_step_counts_are_carried_only_for_weights_known_when_the_step_runs():
    # Static batches: plain sums (no counts carried through the loop, which costs every step).
    batches = iter(tf.data.Dataset.from_tensor_slices(tf.constant([1.0, 3, 5, 7])).batch(
        2, drop_remainder=True))
    static = loop_of(mean_of_batch, batches)
    assert static.plan.static_weights
    assert static(batches, None).metrics["value"] == pytest.approx(4.0)
    assert not static.carries_counts and static.trace_count == 1
    # Batches of unknown size: the build trace finds it, and the loop carries counts.
    partial = iterator([1, 2, 3, 4, 5, 6, 7], batch_size=3)  # 3, 3 and 1
    dynamic = loop_of(mean_of_batch, partial)
    assert not dynamic.plan.static_weights
    result = dynamic(partial, None)
    assert result.metrics["value"] == pytest.approx(4.0) and result.steps_run == 3
    assert dynamic.carries_counts
    # A loop planned on static batches, then given batches of another spec, carries counts
    # for those (no failed trace, no exception): the mean is still exact.
    result = static(iterator([1, 2, 3, 4, 5, 6, 7], batch_size=3), None)
    assert result.metrics["value"] == pytest.approx(4.0) and result.steps_run == 3
    assert static.carries_counts and static.trace_count == 2


def test_the_first_non_finite_step_and_metric_are_reported():
    def step(batch):
        x = tf.cast(batch, tf.float32)
        return {"fine": tf.reduce_mean(x), "log": tf.reduce_mean(tf.math.log(x))}

    batches = [1, 2, 3, 4, -1, 1, 0, 1]  # step 2 has log(-1), step 3 log(0)
    # stop: the loop's sums are checked once; the loop is bad, its first bad step not tracked
    result = loop_of(step, iterator(batches))(iterator(batches), 4)
    assert result.nonfinite_steps == 1 and result.first_nonfinite_offset is None
    assert result.first_nonfinite_metric == "log"
    fine = loop_of(step, iterator(batches))(iterator(batches), 2)
    assert fine.nonfinite_steps == 0 and fine.first_nonfinite_metric is None
    # skip_step checks every step: the first bad one is known
    result = loop_of(step, iterator(batches), finite_means=True)(iterator(batches), 4)
    assert result.nonfinite_steps == 2 and result.first_nonfinite_offset == 2
    assert result.first_nonfinite_metric == "fine"  # means of the finite values: all finite


def test_skip_step_means_leave_non_finite_values_out_and_count_them():
    def step(batch):
        return {"log": tf.reduce_mean(tf.math.log(tf.cast(batch, tf.float32)))}

    batches = iterator([1, 1, -1, 1, 1, 1, 0, 0])
    result = loop_of(step, batches, finite_means=True)(batches, 4)
    assert result.nonfinite_steps == 2 and result.metrics["log"] == pytest.approx(0.0)


def test_a_retrace_names_the_input_that_changed_and_too_many_raise():
    loop = loop_of(mean_of_batch, iterator([1, 2, 3, 4]), max_retraces=0)
    loop(iterator([1, 2, 3, 4]), 1)
    wide = iter(STRATEGY.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices(tf.zeros([4, 3])).batch(2)))
    with pytest.raises(TapekitError, match=r"traced 2 times .*input: float32\[None\] -> "
                                           r"float32\[None, 3\]"):
        loop(wide, 1)


def test_describe_spec_changes_lists_each_changed_input():
    old = (tf.TensorSpec([100, 5], tf.float32), {"label": tf.TensorSpec([100], tf.int32)})
    new = (tf.TensorSpec([50, 5], tf.float32), {"label": tf.TensorSpec([100], tf.int32)})
    assert describe_spec_changes(old, new) == "input[0]: float32[100, 5] -> float32[50, 5]"
    assert describe_spec_changes(old, old) == "the input's type changed (same shapes and dtypes)"
