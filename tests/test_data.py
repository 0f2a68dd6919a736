"""`tapekit.input.data`: in-memory examples batched in the graph, and files sharded per worker."""

import numpy as np
import pytest
import tensorflow as tf

import tapekit
from tapekit.input import data
from tapekit.input.data import InMemoryExamples


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
    strategy = tapekit.run.distribute.resolve_strategy("mirrored", cpu_replicas=2)
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


def test_shard_files_gives_each_worker_disjoint_files(tmp_path):
    names = [str(tmp_path / f"part-{i}.tfrecord") for i in range(5)]
    shares = []
    for worker in range(2):
        context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=worker,
                                             num_replicas_in_sync=2)
        shares.append([n.decode() for n in data.shard_files(names, context).as_numpy_iterator()])
    assert shares == [names[0::2], names[1::2]]
    with pytest.raises(tapekit.TapekitError, match="at least one file per worker"):
        data.shard_files(names[:1], tf.distribute.InputContext(2, 0, 2))


@pytest.mark.parametrize("pipelines, pipeline_id", [(1, 0), (2, 1)])
def test_per_replica_batches_cut_each_global_batch_into_static_replica_slices(pipelines, pipeline_id):
    # 4 replicas, global batch 8: replica r gets rows [2r, 2r + 2) of each global batch (a
    # worker of 2 keeps its 2 replicas' rows), shapes static, the same rows as one replica.
    x = np.arange(48, dtype=np.float32).reshape(24, 2)
    examples = tf.data.Dataset.from_tensor_slices({"x": x, "i": np.arange(24)})
    context = tf.distribute.InputContext(pipelines, pipeline_id, num_replicas_in_sync=4)
    dataset = tapekit.per_replica_batches(examples, context, 8, shuffle_buffer_size=24, seed=3)
    assert dataset.element_spec["x"].shape == [2, 2] and dataset.element_spec["i"].shape == [2]
    whole = tapekit.per_replica_batches(examples, None, 8, shuffle_buffer_size=24, seed=3)
    local = 4 // pipelines
    parts = [b["i"] for b in dataset.take(6 * local).as_numpy_iterator()]
    for step, batch in enumerate(whole.take(6).as_numpy_iterator()):
        mine = batch["i"][pipeline_id * local * 2:(pipeline_id + 1) * local * 2]
        np.testing.assert_array_equal(np.concatenate(parts[step * local:(step + 1) * local]), mine)
    first = next(dataset.as_numpy_iterator())
    np.testing.assert_array_equal(first["x"], x[first["i"]])
