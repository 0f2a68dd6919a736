"""Input pipelines that split a global batch across replicas the same way for any strategy.

The rule: step t of training consumes rows [t * G, (t + 1) * G) of the (shuffled) example
stream, G being the global batch size, and replica r of N gets the r-th of N equal slices
of those rows. So 1 replica and N replicas see exactly the same examples per step, and a
run's input is a deterministic function of (seed, step) — the basis for exact resume.
"""

import inspect
from typing import Optional

import numpy as np
import tensorflow as tf

from tapekit.errors import TapekitError


def per_replica_batches(
    examples: tf.data.Dataset,
    input_context: Optional[tf.distribute.InputContext],
    global_batch_size: int,
    shuffle_buffer_size: Optional[int] = None,
    seed: int = 0,
    repeat: bool = True,
    drop_remainder: Optional[bool] = None,
    already_sharded: bool = False,
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
      drop_remainder: drop the examples that do not fill a last global batch. Default:
        True when repeating or when `examples` never end (static batch shapes), else False
        (one pass: evaluation sees every example; the last global batch is then split as
        far as it goes, and replicas past its end get empty batches from tf.distribute).
      already_sharded: `examples` are this input pipeline's own share (e.g. read from its
        files, `shard_files`): they are cut straight into per-replica batches instead of
        global batches this pipeline keeps a slice of.

    Returns:
      A dataset whose elements are per-replica batches of
      `global_batch_size // num_replicas_in_sync` examples (a static batch dimension when
      the remainder is dropped).
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
    if drop_remainder is None:  # keep static shapes unless one pass must see every example
        drop_remainder = repeat or examples.cardinality() == tf.data.INFINITE_CARDINALITY
    if already_sharded:
        return dataset.batch(per_replica, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)
    dataset = dataset.batch(global_batch_size, drop_remainder=drop_remainder)
    if num_replicas > 1:
        # Each worker keeps its contiguous share of the global batch, then cuts it into
        # per-replica batches; tf.distribute hands those to local replicas in order.
        replicas_per_pipeline = num_replicas // num_pipelines
        start = pipeline_id * replicas_per_pipeline * per_replica
        stop = start + replicas_per_pipeline * per_replica
        if drop_remainder and _dense(dataset.element_spec):
            # Whole batches: one reshape per global batch, so nothing runs per example.
            dataset = dataset.map(_split_rows(start, stop, replicas_per_pipeline, per_replica),
                                  num_parallel_calls=tf.data.AUTOTUNE).unbatch()
        else:  # a partial last batch is split as far as it goes
            dataset = dataset.map(_slice_rows(start, stop), num_parallel_calls=tf.data.AUTOTUNE)
            dataset = dataset.unbatch().batch(per_replica, drop_remainder=drop_remainder)
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


def _dense(element_spec) -> bool:
    return all(isinstance(spec, tf.TensorSpec) for spec in tf.nest.flatten(element_spec))


def _split_rows(start, stop, parts, rows):
    """Rows [start, stop) of a global batch as `parts` batches of `rows`: [parts, rows, ...]."""
    def split_rows(*batch):
        def split(tensor):
            rest = tensor.shape[1:]
            shape = ([parts, rows] + rest.as_list() if rest.is_fully_defined() else
                     tf.concat([tf.constant([parts, rows]), tf.shape(tensor)[1:]], 0))
            return tf.reshape(tensor[start:stop], shape)
        split_batch = tf.nest.map_structure(split, batch)
        return split_batch[0] if len(split_batch) == 1 else split_batch
    return split_rows


def _slice_rows(start, stop):
    def slice_rows(*batch):
        sliced = tf.nest.map_structure(lambda t: t[start:stop], batch)
        return sliced[0] if len(sliced) == 1 else sliced
    return slice_rows


class InMemoryExamples:
    """Examples kept on every replica's device; each step's batch is gathered in the graph.

    The device-resident input path: no `tf.data` iterator per step. The examples are
    copied once into non-trainable variables created in the strategy scope (one copy per
    device under MirroredStrategy). Epoch e is a stateless pseudorandom permutation of the
    N examples (`stateless_shuffle` seeded by (seed, e)) cut into N // G global batches
    (G = global batch size; the N mod G examples left over change from epoch to epoch);
    step t is batch t mod (N // G) of epoch t // (N // G), and replica r takes its r-th
    slice. So the input is a pure function of (seed, step): identical for any number of
    replicas, and exact on resume.

    `prepare(epoch)` caches an epoch's permutation on each replica (the compiled loop calls
    it once per stretch of steps within one epoch, not per step); `batch(step)` is then a
    slice and a gather.

    Args:
      strategy: the trainer's strategy (variables are created in its scope).
      arrays: an array, or a tuple/dict of arrays with the same first dimension.
      global_batch_size: examples per step over all replicas.
      seed: the shuffle seed.
    """

    def __init__(self, strategy: tf.distribute.Strategy, arrays, global_batch_size: int, seed: int):
        flat = tf.nest.flatten(arrays)
        lengths = {int(len(a)) for a in flat}
        if len(lengths) != 1:
            raise TapekitError(f"in-memory arrays differ in length ({sorted(lengths)}); they must match.")
        (self.num_examples,) = lengths
        replicas = strategy.num_replicas_in_sync
        if self.num_examples < global_batch_size:
            raise TapekitError(
                f"{self.num_examples} examples are fewer than one global batch "
                f"({global_batch_size}); lower global_batch_size.")
        self.global_batch_size = global_batch_size
        self.per_replica_batch = global_batch_size // replicas
        self.steps_per_epoch = self.num_examples // global_batch_size
        self.seed = int(seed)
        local = dict(trainable=False, synchronization=tf.VariableSynchronization.ON_READ,
                     aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        with strategy.scope():
            self._tensors = tf.nest.map_structure(
                lambda a: tf.Variable(a, trainable=False, name="in_memory_examples"), arrays)
            self._permutation = tf.Variable(tf.zeros([self.num_examples], tf.int64),
                                            name="epoch_permutation", **local)
            self._cached_epoch = tf.Variable(tf.constant(-1, tf.int64), name="cached_epoch", **local)

    @property
    def element_spec(self):
        """The spec of one replica's batch (static batch dimension)."""
        return tf.nest.map_structure(
            lambda v: tf.TensorSpec([self.per_replica_batch] + v.shape[1:], v.dtype), self._tensors)

    def first_batch(self, strategy):
        """The first examples, unshuffled, as a distributed batch (each replica its slice).
        Eager."""
        size = self.per_replica_batch
        return strategy.experimental_distribute_values_from_function(
            lambda context: tf.nest.map_structure(
                lambda t: t[context.replica_id_in_sync_group * size:][:size], self._tensors))

    def prepare(self, epoch):
        """Caches epoch `epoch`'s permutation on this replica if not cached. Traced, per replica."""
        def refresh():
            self._permutation.assign(tf.random.experimental.stateless_shuffle(
                tf.range(self.num_examples, dtype=tf.int64),
                seed=tf.stack([tf.constant(self.seed, tf.int64), epoch])))
            self._cached_epoch.assign(epoch)
            return tf.constant(True)

        return tf.cond(tf.equal(self._cached_epoch, epoch), lambda: tf.constant(False), refresh)

    def batch(self, step):
        """This replica's batch for global step `step` (int64), whose epoch has been
        `prepare`d. Traced, per replica."""
        replica = tf.cast(tf.distribute.get_replica_context().replica_id_in_sync_group, tf.int64)
        start = (step % self.steps_per_epoch) * self.global_batch_size + replica * self.per_replica_batch
        # A slice of static size: the batch keeps a static shape (cheaper metrics and losses).
        indices = tf.slice(self._permutation, tf.reshape(start, [1]), [self.per_replica_batch])
        return tf.nest.map_structure(lambda t: tf.gather(t, indices), self._tensors)


def is_arrays(value) -> bool:
    """True for an array or a tuple/dict of arrays (not a tf.data / distributed dataset)."""
    if isinstance(value, (tf.data.Dataset, tf.distribute.DistributedDataset)) or value is None:
        return False
    flat = tf.nest.flatten(value)
    return bool(flat) and all(isinstance(a, (np.ndarray, tf.Tensor)) for a in flat)


def takes_no_batch(step_fn) -> bool:
    """Whether a (bound) step is written without a batch argument: `def train_step(self)`."""
    try:
        parameters = inspect.signature(step_fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return not [p for p in parameters
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]


class NoData:
    """The input of a step that makes its own data (`def train_step(self)`: RL rollouts in
    TensorFlow ops, a PINN's collocation points, a replay buffer in variables): no batch.

    It stands where `InMemoryExamples` does, because the loop needs the same of both: the
    batch is a function of the step (here, nothing), so the loop reads no iterator, a
    resume has no input to position, and a skipped step reads nothing. The step's state
    lives in variables (and `self.rng`), which checkpoints hold. It has no epochs.
    """

    makes_own_data = True
    element_spec = None
    steps_per_epoch = 1 << 62  # no epochs

    def prepare(self, epoch) -> None:
        """Nothing to prepare: there are no examples."""

    def batch(self, step):
        return None

    def first_batch(self, strategy):
        return None
