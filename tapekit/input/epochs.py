"""Training by epochs (`train_epochs`): passes over data that ends, resumable mid-pass.

Every pass iterates one distributed dataset again, so a pipeline that reshuffles on each
iteration (`shuffle(..., seed=S)`, the default `reshuffle_each_iteration=True`) gives each
pass its own order, as Keras `fit(epochs=N)` does. Which pass the run is in, and the step it
began at, are checkpointed; a resumed run makes (and drops) the earlier passes' iterators,
which gives its pass the same order, then reads and drops the steps already trained. So a
run resumed mid-epoch sees the batches an uninterrupted run would (for a pipeline that is
a deterministic function of its seed). In-memory arrays have `steps_per_epoch` steps per
pass (`tapekit.input.data.InMemoryExamples`), each a permutation of the examples.
"""

from typing import Optional

import tensorflow as tf

from tapekit.checkpoint import state as state_lib
from tapekit.errors import TapekitError
from tapekit.input.run_input import read_and_drop
from tapekit.run.runner import LoopResult


class EpochPasses:
    """The passes of one run: `done` (finished) and `start_step` (where the pass in
    progress began), both checkpointed; and the iterator of the pass in progress. Eager."""

    def __init__(self, strategy: tf.distribute.Strategy):
        with strategy.scope():
            self.done = tf.Variable(0, dtype=tf.int64, trainable=False, name="epochs_done",
                                    aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
            self.start_step = tf.Variable(0, dtype=tf.int64, trainable=False,
                                          name="epoch_start_step",
                                          aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        self._data = None  # the distributed dataset every pass iterates
        self._source = None  # the `dataset` it was made of (None: train_dataset)
        self._passes_made = 0
        self._iterator = None

    def state(self):
        """What the checkpoint holds (named apart from the user's attributes)."""
        return {state_lib.EPOCHS_DONE_KEY: self.done,
                state_lib.EPOCH_START_STEP_KEY: self.start_step}

    @property
    def epochs_done(self) -> int:
        return int(self.done.numpy())

    def begin(self, run_input, dataset, in_memory, step: int) -> None:
        """Positions the input where the (restored) run is: in pass `done`, `step -
        start_step` steps in. Refuses data that never ends."""
        if getattr(in_memory, "makes_own_data", False):
            raise TapekitError("train_step makes its own data, which has no epochs: give "
                               "train_steps (--train_steps), not train_epochs.")
        self._iterator = None
        if in_memory is not None:
            return
        self._iterator = self._pass(run_input, dataset, self.epochs_done,
                                    step - int(self.start_step.numpy()))
        if run_input.train_endless:
            raise TapekitError(
                "train_epochs needs training data that ends (one pass is an epoch), but this "
                "train_dataset repeats forever; drop its .repeat(), or give train_steps instead.")

    def _pass(self, run_input, dataset, epoch: int, skip_steps: int):
        if self._data is None or self._source is not dataset or self._passes_made > epoch:
            self._data = run_input.epoch_data(dataset)
            self._source, self._passes_made = dataset, 0
        while self._passes_made < epoch:  # earlier passes: their iterators advance shuffles
            iter(self._data)
            self._passes_made += 1
        iterator = iter(self._data)
        self._passes_made += 1
        for _ in range(skip_steps):
            next(iterator)
        return iterator

    def read(self, run_input, in_memory, steps: int, step: int) -> int:
        """Reads and drops up to `steps` batches of the pass in progress, never past its end
        (`tapekit.faults.rollback`'s skipped steps); returns how many. The next loop ends a pass
        that was read to its end."""
        if in_memory is not None:  # batches are a function of the step
            return min(steps, in_memory.steps_per_epoch - (step - int(self.start_step.numpy())))
        if self._iterator is None:
            self._iterator = self._pass(run_input, self._source, self.epochs_done, 0)
        return read_and_drop(self._iterator, steps)

    def run_loop(self, call_loop, loop, run_input, num_steps: int, step: int,
                 stopped=lambda: False):
        """Runs `call_loop(loop, iterator, n)` for up to `num_steps` steps, never past the end
        of the pass in progress; at its end counts the pass (the next one is made when the
        next loop starts). A loop cut short because `stopped()` (a stop request) does not end
        the pass. Returns the LoopResult with `epoch_ended`."""
        left: Optional[int] = None
        if loop.in_memory is not None:
            left = loop.in_memory.steps_per_epoch - (step - int(self.start_step.numpy()))
            num_steps = min(num_steps, left)
        elif self._iterator is None:
            self._iterator = self._pass(run_input, self._source, self.epochs_done, 0)
        result = call_loop(loop, self._iterator if left is None else None, num_steps)
        ended = result.steps_run == left if left is not None else (
            result.steps_run < num_steps and not stopped())
        if ended:
            self.done.assign_add(1)
            self.start_step.assign(step + result.steps_run)
            self._iterator = None
        return LoopResult(result.metrics, result.steps_run, result.nonfinite_steps,
                          result.first_nonfinite_offset, result.first_nonfinite_metric, ended)
