"""How a trainer's input becomes distributed batches, and where a resumed run picks it up.

Eager code, run once per `fit`/`evaluate` (never per step). The input is one of:
`train_arrays()`/NumPy arrays (the device-resident path, `tapekit.input.data.InMemoryExamples`),
a `tf.data.Dataset` of global batches, or the trainer's `train_dataset`/`eval_dataset`
functions of a `tf.distribute.InputContext`.
"""

from typing import Callable, Optional

import numpy as np
import tensorflow as tf
from absl import logging

from tapekit.checkpoint import checkpointing
from tapekit.errors import TapekitError
from tapekit.input import data as data_lib


def distribute(strategy: tf.distribute.Strategy, dataset, dataset_fn: Callable,
               global_batch_size: int, seed: int, skip_steps: int = 0, evaluation: bool = False,
               must_end: bool = False, on_dataset: Callable = lambda dataset: None):
    """A distributed dataset of `dataset` (or of `dataset_fn` when it is None), with
    `skip_steps` global steps of it already consumed.

    `evaluation`: arrays are read once, in order, not shuffled or repeated; `must_end`:
    refuse data that TensorFlow knows repeats forever. `on_dataset` is called with each
    `tf.data.Dataset` being distributed (one per input pipeline made here), when it is made.
    """
    def seen(made):
        on_dataset(made)
        return made

    if dataset is None:
        return strategy.distribute_datasets_from_function(
            lambda context: seen(skip(checked(dataset_fn(context), must_end), context,
                                      skip_steps)))
    if isinstance(dataset, tf.distribute.DistributedDataset):
        if skip_steps:
            raise TapekitError("cannot resume a tf.distribute.DistributedDataset at a step; pass "
                               "the tf.data.Dataset (or train_dataset) instead.")
        return dataset
    if isinstance(dataset, tf.data.Dataset):
        return strategy.experimental_distribute_dataset(
            seen(checked(dataset, must_end).skip(skip_steps)))
    if isinstance(dataset, (np.ndarray, tf.Tensor, tuple, list, dict)):
        examples = tf.data.Dataset.from_tensor_slices(
            tuple(dataset) if isinstance(dataset, list) else dataset)
        size = int(examples.cardinality())
        return strategy.distribute_datasets_from_function(
            lambda context: seen(skip(data_lib.per_replica_batches(
                examples, context, global_batch_size,
                shuffle_buffer_size=None if evaluation else size, seed=seed,
                repeat=not evaluation), context, skip_steps)))
    raise TapekitError(
        f"fit/evaluate got a dataset of type {type(dataset).__name__}; pass a tf.data.Dataset "
        "of global batches, NumPy arrays (or a tuple/dict of them), or None.")


def checked(dataset, must_end: bool = False) -> tf.data.Dataset:
    """`dataset` if it is a `tf.data.Dataset` that may be read (to its end if `must_end`)."""
    if not isinstance(dataset, tf.data.Dataset):
        raise TapekitError(
            f"train_dataset/eval_dataset must return a tf.data.Dataset, got "
            f"{type(dataset).__name__}.")
    if must_end and dataset.cardinality() == tf.data.INFINITE_CARDINALITY:
        raise TapekitError(
            "the evaluation data repeats forever, so evaluating 'to its end' would never end: "
            "give eval_steps (--eval_steps), or return one pass from eval_dataset (e.g. "
            "tapekit.per_replica_batches(..., repeat=False)).")
    if must_end and dataset.cardinality() == tf.data.UNKNOWN_CARDINALITY:
        logging.log_first_n(
            logging.INFO, "evaluating to the end of the data; TensorFlow does not know its "
            "length (its pipeline has a filter, a generator or the like), so it must end by "
            "itself; otherwise give eval_steps (--eval_steps)", 1)
    return dataset


def skip(dataset: tf.data.Dataset, context, steps: int) -> tf.data.Dataset:
    """Skips `steps` global steps of a per-replica dataset (each step takes one batch per
    local replica)."""
    if not steps:
        return dataset
    local_replicas = context.num_replicas_in_sync // context.num_input_pipelines if context else 1
    return dataset.skip(steps * local_replicas)


class RunInput:
    """A trainer's input for one run: its distributed datasets, the device-resident copy of
    in-memory examples (made once per set of arrays), and whether the training data
    provably never ends. `global_batch_size()` is read when the input is made."""

    def __init__(self, strategy, trainer, global_batch_size: Callable[[], int], seed: int):
        self.strategy, self.trainer, self.seed = strategy, trainer, seed
        self._global_batch_size = global_batch_size
        self.train_endless = False  # see train_iterator
        self._examples: Optional[data_lib.InMemoryExamples] = None
        self._key = None

    def distribute(self, dataset, dataset_fn, **kwargs):
        """A distributed dataset of `dataset`, or of `dataset_fn` (see `distribute`)."""
        return distribute(self.strategy, dataset, dataset_fn, self._global_batch_size(),
                          self.seed, **kwargs)

    def evaluation(self, dataset=None, must_end: bool = False):
        """The distributed evaluation input: `dataset`, else the trainer's `eval_dataset`;
        `NO_DATA` for an `eval_step(self)` that makes its own (then `must_end` is refused)."""
        if makes_own_data(self.trainer, "eval_step", dataset is not None, "eval_dataset"):
            if must_end:
                raise TapekitError(
                    f"{type(self.trainer).__name__}.eval_step makes its own data, which has no "
                    "end: give the evaluation's length (evaluate(steps=N), --eval_steps).")
            return NO_DATA
        return self.distribute(dataset, self.trainer.eval_dataset, evaluation=True,
                               must_end=must_end)

    def in_memory_examples(self, dataset) -> Optional[data_lib.InMemoryExamples]:
        """The device-resident input for `dataset` arrays (or `train_arrays()`); `NoData`
        for a `train_step(self)` that makes its own data; else None (a dataset)."""
        arrays = dataset if data_lib.is_arrays(dataset) else (
            self.trainer.train_arrays() if dataset is None else None)
        if makes_own_data(self.trainer, "train_step", dataset is not None or arrays is not None,
                          "train_dataset", "train_arrays() or "):
            return NO_DATA
        if arrays is None:
            return None
        key = tuple(id(a) for a in tf.nest.flatten(arrays))
        if self._examples is None or self._key != key:
            self._examples = data_lib.InMemoryExamples(self.strategy, arrays,
                                                       self._global_batch_size(), self.seed)
            self._key = key
        return self._examples

    def train_spec(self, dataset, in_memory):
        """The element spec of the training input."""
        return (in_memory.element_spec if in_memory is not None
                else self.distribute(dataset, self.trainer.train_dataset).element_spec)

    def first_train_batch(self, dataset, in_memory):
        """The first distributed batch of the training input (a pipeline of its own)."""
        if in_memory is not None:
            return in_memory.first_batch(self.strategy)
        return next(iter(self.distribute(dataset, self.trainer.train_dataset)))

    def epoch_data(self, dataset):
        """The distributed training data that each pass of `tapekit.input.epochs` iterates again
        (see `training_data`)."""
        return self.training_data(dataset)

    def train_iterator(self, dataset, skip_steps: int):
        """The training iterator, `skip_steps` steps in (see `training_data`)."""
        return iter(self.training_data(dataset, skip_steps))

    def training_data(self, dataset, skip_steps: int = 0):
        """The distributed training data, `skip_steps` steps in; notes whether it provably
        never ends (`train_endless`: every pipeline's dataset has infinite cardinality),
        which lets the loop skip the per-step end-of-data check."""
        pipelines = []
        data = self.distribute(dataset, self.trainer.train_dataset, skip_steps=skip_steps,
                               on_dataset=pipelines.append)
        self.train_endless = bool(pipelines) and all(
            d.cardinality() == tf.data.INFINITE_CARDINALITY for d in pipelines)
        return data


NO_DATA = data_lib.NoData()


def makes_own_data(trainer, step_name: str, has_input: bool, input_method: str,
                   other: str = "") -> bool:
    """Whether `trainer`'s `step_name` makes its own data: written without a batch, and no
    input given (no dataset= and no arrays, `has_input` False) nor overridden
    (`input_method`). A step without a batch that is given input is refused."""
    from tapekit.trainer import Trainer
    if not data_lib.takes_no_batch(getattr(trainer, step_name)):
        return False
    overridden = getattr(type(trainer), input_method) is not getattr(Trainer, input_method)
    if has_input or overridden:
        raise TapekitError(
            f"{type(trainer).__name__}.{step_name} takes no batch, but the trainer is given "
            f"input ({input_method} or {other}dataset=); give it a batch argument "
            f"({step_name}(self, batch)) or remove the input: a step without one makes its own "
            "data.")
    return True


def read_and_drop(iterator, steps: int) -> int:
    """Reads and drops up to `steps` elements of `iterator` (steps' batches skipped);
    returns how many there were before it ran out."""
    for done in range(steps):
        try:
            next(iterator)
        except (StopIteration, tf.errors.OutOfRangeError):
            return done
    return steps


def positioned_iterator(make_iterator: Callable[[int], object], checkpointer,
                        path: Optional[str], may_save: bool = True):
    """The training iterator, positioned where checkpoint `path` (None: a new run) left off.

    Call before restoring `path` with `checkpointer`. With one replica and a `tf.data`
    input the iterator itself is checkpointed when TensorFlow can save it (tried once,
    here): it is tracked by `checkpointer` and restored with the rest. Distributed
    iterators cannot be (tensorflow/tensorflow#24408), nor pipelines with Python code
    (`from_generator`, `py_function`): their input is re-created and skipped to the
    checkpoint's step, which is exact when the pipeline is a deterministic function of the
    seed. `make_iterator(skip_steps)` makes the iterator. Not `may_save`: never tracked
    (`nan_policy=rollback` re-makes the iterator at a step, like a distributed one's).
    """
    iterator = make_iterator(0)
    saveable = may_save and (isinstance(iterator, tf.data.Iterator)
                and checkpointing.iterator_can_be_saved(iterator))
    if isinstance(iterator, tf.data.Iterator) and may_save and not saveable:
        logging.info("the input pipeline's iterator cannot be checkpointed (it runs Python "
                     "code: from_generator, py_function, ...); a resumed run re-creates the "
                     "input and skips to the restored step, which is exact only if the "
                     "pipeline yields the same batches every time (seeded, deterministic)")
    if saveable and (path is None or checkpointing.has_iterator(path)):
        checkpointer.track_iterator(iterator)
        return iterator
    saved_step = checkpointing.saved_step(path) if path else 0
    return make_iterator(saved_step) if saved_step else iterator
