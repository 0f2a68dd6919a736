"""`tapekit.input.run_input`: a trainer's input as distributed batches, and where a resume picks it up."""

import numpy as np
import pytest
import tensorflow as tf

from tapekit.checkpoint.checkpointing import Checkpointer
from tapekit.errors import TapekitError
from tapekit.input import run_input
from tapekit.run import distribute as distribute_lib

STRATEGY = tf.distribute.get_strategy()  # the default strategy: one replica


def batches(distributed, limit=100):
    return [np.asarray(batch).ravel().tolist() for batch, _ in zip(distributed, range(limit))]


def test_arrays_for_evaluation_are_read_once_in_order_keeping_the_partial_batch():
    x = np.arange(10, dtype=np.float32)
    distributed = run_input.distribute(STRATEGY, x, None, global_batch_size=4, seed=0,
                                    evaluation=True)
    assert batches(distributed) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_arrays_for_training_repeat_shuffled_and_resume_at_a_step():
    x = np.arange(10, dtype=np.float32)
    full = batches(run_input.distribute(STRATEGY, x, None, 4, seed=3), limit=7)
    assert all(len(b) == 4 for b in full) and sorted(full[0] + full[1]) != list(range(8))
    resumed = batches(run_input.distribute(STRATEGY, x, None, 4, seed=3, skip_steps=2), limit=5)
    assert resumed == full[2:]


def test_a_dataset_of_global_batches_skips_consumed_steps():
    dataset = tf.data.Dataset.range(12).batch(3)
    assert batches(run_input.distribute(STRATEGY, dataset, None, 3, 0, skip_steps=2)) == [
        [6, 7, 8], [9, 10, 11]]


def test_a_dataset_function_gets_an_input_context_and_is_skipped_per_local_replica():
    seen = []

    def dataset_fn(context):
        seen.append(context.num_replicas_in_sync)
        return tf.data.Dataset.range(8).batch(2)

    assert batches(run_input.distribute(STRATEGY, None, dataset_fn, 2, 0, skip_steps=3)) == [[6, 7]]
    assert seen == [1]


def test_what_cannot_be_read_is_one_clear_error():
    with pytest.raises(TapekitError, match="got a dataset of type str; pass a tf.data.Dataset"):
        run_input.distribute(STRATEGY, "data.csv", None, 4, 0)
    with pytest.raises(TapekitError, match="must return a tf.data.Dataset, got list"):
        run_input.distribute(STRATEGY, None, lambda context: [1, 2], 4, 0)
    endless = tf.data.Dataset.range(4).repeat()
    with pytest.raises(TapekitError, match="the evaluation data repeats forever"):
        run_input.distribute(STRATEGY, endless, None, 4, 0, must_end=True)
    mirrored = distribute_lib.resolve_strategy("mirrored", cpu_replicas=2)
    distributed = mirrored.experimental_distribute_dataset(tf.data.Dataset.range(4).batch(2))
    assert run_input.distribute(mirrored, distributed, None, 2, 0) is distributed
    with pytest.raises(TapekitError, match="cannot resume a tf.distribute.DistributedDataset"):
        run_input.distribute(mirrored, distributed, None, 2, 0, skip_steps=1)


class _NoArrays:
    def train_arrays(self):
        return None

    def train_step(self, batch):  # takes a batch: its input is examples, not made by the step
        return {}


def test_in_memory_examples_are_copied_to_the_devices_once_per_set_of_arrays():
    source = run_input.RunInput(STRATEGY, _NoArrays(), lambda: 4, 0)
    x, y = np.zeros([8, 2], np.float32), np.ones([8, 1], np.float32)
    first = source.in_memory_examples((x, y))
    assert source.in_memory_examples((x, y)) is first
    assert source.in_memory_examples((x, y.copy())) is not first
    assert source.in_memory_examples(tf.data.Dataset.range(4)) is None  # not arrays
    assert source.in_memory_examples(None) is None  # and train_arrays() gives none


def _checkpoint_at(tmp_path, step, iterator=None):
    global_step = tf.Variable(step, dtype=tf.int64)
    checkpointer = Checkpointer({"global_step": global_step}, str(tmp_path), True)
    if iterator is not None:
        checkpointer.track_iterator(iterator)
    checkpointer.save(step)
    return checkpointer, checkpointer.latest


def test_a_saveable_iterator_is_tracked_and_restored_with_the_checkpoint(tmp_path):
    def make_iterator(skip_steps):
        assert skip_steps == 0  # positioned by the checkpoint, never by skipping
        return iter(tf.data.Dataset.range(100))

    checkpointer, _ = _checkpoint_at(tmp_path, 0)
    iterator = run_input.positioned_iterator(make_iterator, checkpointer, None)
    assert [int(next(iterator)) for _ in range(3)] == [0, 1, 2]
    checkpointer.save(3)
    fresh = Checkpointer({"global_step": tf.Variable(0, dtype=tf.int64)}, str(tmp_path), True)
    resumed = run_input.positioned_iterator(make_iterator, fresh, checkpointer.latest)
    fresh.restore(checkpointer.latest)
    assert int(next(resumed)) == 3


def test_an_iterator_running_python_code_is_recreated_and_skipped(tmp_path, caplog):
    caplog.set_level("INFO", logger="absl")
    def make_iterator(skip_steps):
        dataset = tf.data.Dataset.from_generator(lambda: iter(range(100)), output_signature=
                                                 tf.TensorSpec([], tf.int64))
        return iter(dataset.skip(skip_steps))

    checkpointer, path = _checkpoint_at(tmp_path, 5)
    iterator = run_input.positioned_iterator(make_iterator, checkpointer, path)
    assert int(next(iterator)) == 5
    assert "the input pipeline's iterator cannot be checkpointed" in caplog.text
