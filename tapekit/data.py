"""Input pipelines that split a global batch across replicas the same way for any strategy.

The rule: step t of training consumes rows [t * G, (t + 1) * G) of the (shuffled) example
stream, G being the global batch size, and replica r of N gets the r-th of N equal slices
of those rows. So 1 replica and N replicas see exactly the same examples per step, and a
run's input is a deterministic function of (seed, step) — the basis for exact resume.
"""

from typing import Optional

import tensorflow as tf

from tapekit.errors import TapekitError


def per_replica_batches(
    examples: tf.data.Dataset,
    input_context: Optional[tf.distribute.InputContext],
    global_batch_size: int,
    shuffle_buffer_size: Optional[int] = None,
    seed: int = 0,
    repeat: bool = True,
) -> tf.data.Dataset:
    """Batches a dataset of single examples into this input pipeline's per-replica batches.

    Runs eagerly, once per input pipeline (one per worker), when a trainer's
    `train_dataset` is called by `strategy.distribute_datasets_from_function`.

    Args:
      examples: unbatched examples (any nested structure of tensors).
      input_context: the `tf.distribute.InputContext` tapekit passes to `train_dataset`;
        None means a single replica.
      global_batch_size: examples per training step, summed over all replicas.
      shuffle_buffer_size: None or 0 for no shuffling; otherwise shuffled with `seed`,
        reshuffled each epoch in the same way on every worker.
      seed: the shuffle seed.
      repeat: repeat the examples forever (training); False for one pass (evaluation).

    Returns:
      A dataset whose elements are per-replica batches of
      `global_batch_size // num_replicas_in_sync` examples (static batch dimension).
    """
    num_replicas = input_context.num_replicas_in_sync if input_context else 1
    num_pipelines = input_context.num_input_pipelines if input_context else 1
    pipeline_id = input_context.input_pipeline_id if input_context else 0
    if global_batch_size <= 0:
        raise TapekitError(f"global_batch_size must be positive, got {global_batch_size}.")
    if global_batch_size % num_replicas:
        raise TapekitError(
            f"global_batch_size={global_batch_size} is not divisible by the "
            f"{num_replicas} replicas in sync; pick a multiple of {num_replicas}.")
    per_replica = global_batch_size // num_replicas
    dataset = examples
    if shuffle_buffer_size:
        dataset = dataset.shuffle(shuffle_buffer_size, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        dataset = dataset.repeat()
    dataset = dataset.batch(global_batch_size, drop_remainder=True)
    if num_replicas > 1:
        # Each worker keeps its contiguous share of the global batch, then cuts it into
        # per-replica batches; tf.distribute hands those to local replicas in order.
        replicas_per_pipeline = num_replicas // num_pipelines
        start = pipeline_id * replicas_per_pipeline * per_replica
        stop = start + replicas_per_pipeline * per_replica
        dataset = dataset.map(_slice_rows(start, stop), num_parallel_calls=tf.data.AUTOTUNE)
        dataset = dataset.unbatch().batch(per_replica, drop_remainder=True)
    return dataset.prefetch(tf.data.AUTOTUNE)


def shard_files(files, input_context: Optional[tf.distribute.InputContext]) -> tf.data.Dataset:
    """This input pipeline's share of `files` (a glob pattern or a list): sharding by file.

    File i goes to pipeline i mod num_input_pipelines (one pipeline per worker), in sorted
    order, so workers read disjoint files. Read them with e.g. `.interleave(tf.data.TFRecordDataset)`.
    Unlike `per_replica_batches`, the examples a step sees then depend on the number of
    workers; use it when each worker cannot read the whole data set.
    """
    if isinstance(files, str):
        names = sorted(tf.io.gfile.glob(files))
    else:
        names = sorted(str(name) for name in files)
    pipelines = input_context.num_input_pipelines if input_context else 1
    if len(names) < pipelines:
        raise TapekitError(
            f"sharding by file needs at least one file per worker: {len(names)} file(s) for "
            f"{pipelines} workers; split the data into more files or shard by data.")
    dataset = tf.data.Dataset.from_tensor_slices(names)
    if pipelines > 1:
        dataset = dataset.shard(pipelines, input_context.input_pipeline_id)
    return dataset


def _slice_rows(start, stop):
    def slice_rows(*batch):
        sliced = tf.nest.map_structure(lambda t: t[start:stop], batch)
        return sliced[0] if len(sliced) == 1 else sliced
    return slice_rows
