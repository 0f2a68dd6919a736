"""The state a rollback goes back to (`tapekit.faults.rollback`), kept by the engine.

Either a copy of every variable in host memory, taken at the start of every loop (one
compiled assign per variable; the accelerators' memory is not doubled), or the last
checkpoint (nothing until used; the steps since it are replayed). `rollback_from=auto` keeps
the copy when the state is at most `MEMORY_LIMIT` bytes. Also the loss window that spikes
are judged against, which checkpoints carry. Eager, between loops, on every worker.
"""

from typing import Dict, List, Optional, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tapekit.checkpoint import record as record_lib
from tapekit.checkpoint import state as state_lib
from tapekit.errors import TapekitError
from tapekit.faults.rollback import WINDOW, Rollback, loss_names, median_losses
from tapekit.options import step_ranges

MEMORY_LIMIT = 1 << 30  # rollback_from=auto keeps a copy in memory up to this many bytes


class StateCopy:
    """A copy of `variables` in host memory (the accelerators' memory is not doubled):
    `keep()` takes it, `put_back()` assigns it back to every replica's copy. Each is one
    compiled function of one assign per variable."""

    def __init__(self, variables):
        self._variables = [v.value if isinstance(v, keras.Variable) else v for v in variables]
        with tf.device("/CPU:0"):
            self._copies = [tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False,
                                        name="rollback_copy") for v in self._variables]
        self.nbytes = _nbytes(self._variables)
        self.step = None  # the global step of the copy kept

    @tf.function(autograph=False)
    def _keep(self):
        for copy, variable in zip(self._copies, self._variables):
            copy.assign(variable.read_value())

    @tf.function(autograph=False)
    def _put_back(self):
        for copy, variable in zip(self._copies, self._variables):
            variable.assign(copy.read_value())

    def keep(self, step: int) -> None:
        self._keep()
        self.step = step

    def put_back(self) -> int:
        self._put_back()
        return self.step


class RunRollbacks:
    """The engine's side of `Rollback`: the run's one `Rollback` and the `GoodState` it goes
    back to, made by the first `fit` and again only if training by epochs changes what the
    state holds (the state copy is traced once)."""

    def __init__(self):
        self.rollback: Optional[Rollback] = None
        self.good_state: Optional[GoodState] = None

    def for_fit(self, engine, by_epochs: bool) -> Optional[Rollback]:
        """The `Rollback` hook for a `fit` of `engine`, or None when there is nothing to
        skip (`skip_steps`, run.json's `skipped`) or roll back (nan_policy=rollback)."""
        options = engine.options
        if self.rollback is None or self.rollback.by_epochs != by_epochs:
            recorded = ((record_lib.read(engine.model_dir) or {}).get("skipped", [])
                        if engine.model_dir else [])
            skipped = step_ranges(list(options.skip_steps or ())
                                  + [tuple(pair) for pair in recorded]) or ()
            self.rollback = Rollback(engine, options.nan_policy == "rollback",
                                     options.max_rollbacks, options.spike_threshold, skipped,
                                     by_epochs, engine.loss_window)
            self.good_state = (GoodState(engine, options.rollback_from)
                               if self.rollback.rolls_back else None)
        self.rollback.begin_fit()
        return self.rollback if self.rollback.rolls_back or self.rollback.skipped else None


class GoodState:
    """Where `engine`'s run goes back to after a bad loop: `keep(step)` before each loop,
    `restore()` after a bad one (returns the step restored and where it came from)."""

    def __init__(self, engine, source: str):
        self.engine = engine
        nbytes = _nbytes(state_lib.variables_of(engine.owned_state()))
        chosen = source
        if source == "auto":
            chosen = ("memory" if nbytes <= MEMORY_LIMIT or engine.checkpointer is None
                      else "checkpoint")
        self.copy = None
        if chosen == "memory":
            self.copy = StateCopy(state_lib.variables_of(engine.owned_state()))
            logging.info("nan_policy=rollback: a copy of the state (%s) is kept in host memory at "
                         "each loop's start, to go back to after a bad loop", _size(nbytes))
        else:
            logging.info("nan_policy=rollback: a bad loop goes back to the last checkpoint (the "
                         "state, %s, is %s)", _size(nbytes),
                         "over the 1 GiB kept in memory" if source == "auto"
                         else "not copied: rollback_from=checkpoint")
            if engine.latest_checkpoint is None:  # something to go back to
                engine.checkpointer.save(engine.current_step)

    def keep(self, step: int) -> None:
        if self.copy is not None:
            self.copy.keep(step)

    def restore(self) -> Tuple[int, str]:
        if self.copy is not None:
            return self.copy.put_back(), "the copy kept in memory"
        checkpointer = self.engine.checkpointer
        checkpointer.wait()  # a save in flight: the latest once it is written
        latest = checkpointer.latest
        checkpointer.restore(latest, checked=False)  # this run's own
        return self.engine.current_step, f"checkpoint {latest}"


class LossWindow:
    """The mean losses of the last `WINDOW` good loops, per loss metric: checkpointed, so
    that a resumed run judges spikes as the uninterrupted one would."""

    def __init__(self, strategy, names: Sequence[str]):
        self.names = list(names)
        with strategy.scope():
            self.values = tf.Variable(tf.zeros([max(len(names), 1), WINDOW], tf.float64),
                                      trainable=False, name="loss_window",
                                      aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
            self.counter = tf.Variable(0, dtype=tf.int64, trainable=False,
                                       name="loss_window_count",
                                       aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)

    def state(self) -> Dict[str, tf.Variable]:
        return {state_lib.LOSS_WINDOW_VALUES_KEY: self.values,
                state_lib.LOSS_WINDOW_COUNT_KEY: self.counter}

    def count(self) -> int:
        """Good loops added so far (the window holds the last `WINDOW`)."""
        return int(self.counter.numpy())

    def medians(self) -> Optional[List[float]]:
        return median_losses(self.values.numpy(), self.count())

    def add(self, metrics: Dict[str, float]) -> None:
        count = self.count()
        values = self.values.numpy()
        for row, name in enumerate(self.names):
            values[row, count % WINDOW] = metrics[name]
        self.values.assign(values)
        self.counter.assign(count + 1)


def loss_window(strategy, options, metric_names: Sequence[str]) -> Optional[LossWindow]:
    """The loss window of a run with `spike_threshold` (else None); refuses a step whose
    metrics name no loss."""
    if options.spike_threshold is None:
        return None
    names = loss_names(metric_names)
    if not names:
        raise TapekitError(
            f"spike_threshold judges metrics named loss or *_loss, but train_step returns "
            f"{sorted(metric_names)}; name the loss so, or leave spike_threshold unset.")
    return LossWindow(strategy, names)


def _nbytes(variables) -> int:
    return int(sum(np.prod(v.shape) * tf.as_dtype(v.dtype).size for v in variables))


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"
