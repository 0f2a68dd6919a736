"""`nan_policy=rollback`: go back to good state after a bad loop, find its bad batches, skip them.

A loop is bad when a metric is NaN or infinite, or (with `spike_threshold=K`) when a loss
(each metric named `loss` or `*_loss`) exceeds K times the median of the last `WINDOW` good
loops' means (judged once `MIN_LOOPS` are known, and only against a positive median).
Nothing records or saves a bad loop. Instead:

1. The state before it comes back: a copy kept in host memory at the start of every loop
   (`StateCopy`: one copy per loop, the state's size in host memory, no replay), or the last
   checkpoint (nothing until used; the steps since it are replayed, not recorded again).
   `rollback_from=auto` keeps the copy when the state is at most `MEMORY_LIMIT` bytes.
2. The bad loop's steps are replayed one step per loop. A step that is bad on its own is
   undone the same way, and skipped: its batch is read, it is not trained on, the global step
   still counts it (so step numbers stay positions in the data).
3. The skipped ranges go into run.json (`skipped`) and into the flags.txt of a command-line
   run (`--skip_steps`), so a resume or a rerun with `--flagfile` skips them too, and ends
   with the same weights.

A stretch of bad batches inside one loop is one rollback; after `max_rollbacks` in a row (no
good full-length loop between them) the run stops with one error. On several workers every
decision is voted (`Runner.any_worker`), as a SIGTERM is; the metrics it is made on are
already reduced over every replica and worker.
"""

import statistics
from typing import Dict, List, Optional, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tapekit.run import distribute
from tapekit import options as options_lib
from tapekit.checkpoint import record as record_lib
from tapekit.checkpoint import state as state_lib
from tapekit.errors import TapekitError

WINDOW = 20  # good loops whose median loss the spike threshold compares with
MIN_LOOPS = 5  # good loops known before a spike is judged
MEMORY_LIMIT = 1 << 30  # rollback_from=auto keeps a copy in memory up to this many bytes
WINDOW_KEY = "tapekit_loss_window"  # its checkpoint key (see checkpointing.OPTIONAL_KEYS)


def loss_names(metric_names: Sequence[str]) -> List[str]:
    """The metrics a spike is judged on: `loss` and every `*_loss`."""
    return [name for name in metric_names if name == "loss" or name.endswith("_loss")]


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


class LossWindow:
    """The mean losses of the last `WINDOW` good loops, per loss metric: checkpointed, so
    that a resumed run judges spikes as the uninterrupted one would."""

    def __init__(self, strategy, names: Sequence[str]):
        self.names = list(names)
        with strategy.scope():
            self.values = tf.Variable(tf.zeros([max(len(names), 1), WINDOW], tf.float64),
                                      trainable=False, name="loss_window",
                                      aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
            self.count = tf.Variable(0, dtype=tf.int64, trainable=False, name="loss_window_count",
                                     aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)

    def state(self) -> Dict[str, tf.Variable]:
        return {WINDOW_KEY + "_values": self.values, WINDOW_KEY + "_count": self.count}

    def medians(self) -> Optional[List[float]]:
        count = int(self.count.numpy())
        if count < MIN_LOOPS:
            return None
        values = self.values.numpy()[:, :min(count, WINDOW)]
        return [statistics.median(row) for row in values]

    def add(self, metrics: Dict[str, float]) -> None:
        count = int(self.count.numpy())
        values = self.values.numpy()
        for row, name in enumerate(self.names):
            values[row, count % WINDOW] = metrics[name]
        self.values.assign(values)
        self.count.assign(count + 1)


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


class Rollback:
    """The controller's side of skipped steps and `nan_policy=rollback` for `engine`'s run
    (every worker): made by its first `fit`, which the later ones reuse (`begin_fit`).

    The controller asks, before each loop, `skip_due` (steps to skip now) and `steps_for`
    (the loop's length: never into a skipped range; one step while replaying), calls
    `before_loop`, and after it `bad` (None, or why it was bad) then `roll_back`.
    """

    def __init__(self, engine):
        options = engine.options
        self.engine = engine
        self.by_epochs = engine.by_epochs  # what the state (and its copy) holds
        self.rolls_back = options.nan_policy == "rollback"  # else: only skips skip_steps
        self.max_rollbacks = options.max_rollbacks
        self.threshold = options.spike_threshold
        self.window = engine.loss_window
        self.skipped: List[Tuple[int, int]] = list(_known_skips(engine))
        self.copy = None
        self.probe: Optional[Tuple[int, int]] = None  # steps still to replay one per loop
        self._span = (0, 0)  # the bad loop being replayed
        self._data_at = None  # after a rollback: the step the input is at (None: in step)
        self.recorded_until = 0  # replayed loops up to here were recorded before: not again
        self.in_a_row = 0
        if self.skipped:
            logging.info("skipping the batches of steps %s (skip_steps / run.json 'skipped')",
                         options_lib.format_ranges(self.skipped))
        if self.rolls_back:
            self._keep_good_state(options.rollback_from)

    def _keep_good_state(self, source: str) -> None:
        engine = self.engine
        nbytes = _nbytes(state_lib.variables_of(engine.owned_state()))
        chosen = source
        if source == "auto":
            chosen = ("memory" if nbytes <= MEMORY_LIMIT or engine.checkpointer is None
                      else "checkpoint")
        self.source = chosen
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

    def begin_fit(self) -> None:
        """A new `fit` of the same run: no replay or row of rollbacks carries over, and the
        input is where the step is."""
        self.probe, self._data_at, self.in_a_row = None, None, 0
        self.recorded_until = self.engine.current_step

    # ------------------------------------------------------------------ before a loop

    def skip_due(self, step: int, train_steps: Optional[int]) -> int:
        """Steps to skip before the next loop (its first step is in a skipped range)."""
        for first, last in self.skipped:
            if first <= step + 1 <= last:
                return min(last, train_steps or last) - step
        return 0

    def skip(self, steps: int) -> int:
        """Skips `steps` steps (reads and drops their batches, counts them as global steps);
        returns how many there were. The batch of a bad step just undone was read already."""
        engine, step = self.engine, self.engine.current_step
        behind, self._data_at = self._data_at, None
        if behind == step + steps and not engine.by_epochs:
            done = steps
        else:
            if self._repositions(behind, step):
                engine.reposition_input(step)
            done = engine.read_batches(steps)
        engine.global_step.assign_add(done)
        return done

    def _repositions(self, behind: Optional[int], step: int) -> bool:
        # By epochs always: the pass a bad loop ended is counted again from the restored state.
        return behind is not None and (behind != step or self.engine.by_epochs)

    def steps_for(self, step: int, num_steps: int) -> int:
        """The next loop's length: up to the next skipped range, one step while replaying,
        and ending where a replay of recorded loops reaches the bad loop."""
        starts = [first for first, _ in self.skipped if first > step + 1]
        if starts:
            num_steps = min(num_steps, min(starts) - step - 1)
        if self.probe is not None:
            first, last = self.probe
            num_steps = 1 if step + 1 >= first else min(num_steps, first - 1 - step)
        return max(num_steps, 1)

    def before_loop(self, step: int) -> None:
        """Puts the input at `step` (after a rollback) and keeps the state in memory."""
        if self._repositions(self._data_at, step):
            self.engine.reposition_input(step)
        self._data_at = None
        if self.copy is not None:
            self.copy.keep(step)

    def records(self, step: int) -> bool:
        """Whether the loop that reached `step` is recorded (not a replay of a recorded one)."""
        return step > self.recorded_until

    # ------------------------------------------------------------------ after a loop

    def bad(self, result) -> Optional[str]:
        """Why the loop was bad (every worker agrees), or None. A good loop that is not a
        replayed step adds its losses to the window."""
        why = None
        if result.nonfinite_steps:
            why = f"non-finite {result.first_nonfinite_metric}"
        elif self.threshold is not None:
            why = self._spike(result.metrics)
        if self.engine.any_worker(why is not None):
            return why or "bad on another worker"
        if self.probe is None and self.threshold is not None:
            self.window.add(result.metrics)
        return None

    def _spike(self, metrics: Dict[str, float]) -> Optional[str]:
        medians = self.window.medians()
        if medians is None:
            return None
        for name, median in zip(self.window.names, medians):
            if median > 0 and metrics[name] > self.threshold * median:
                return (f"{name} {metrics[name]:.4g} over {self.threshold:g}x the median "
                        f"{median:.4g} of the last {min(int(self.window.count.numpy()), WINDOW)} "
                        "good loops")
        return None

    def good(self, step: int, full: bool) -> None:
        """After a good loop that reached `step` (`full`: of the length asked for, not one
        step of a replay): a replayed step is known good; a full loop ends a row of rollbacks."""
        if self.probe is not None:
            if step >= self.probe[0]:
                self._probed(step)
            return
        if full:
            self.in_a_row = 0

    def roll_back(self, step: int, steps_run: int, why: str) -> int:
        """Undoes the bad loop of `steps_run` steps that reached `step`; returns the step the
        run is back at. A bad step found while replaying is skipped; a bad loop starts a
        replay of its steps, one per loop (after `max_rollbacks` in a row: one error)."""
        first = step - steps_run + 1
        where = f"step {step}" if steps_run == 1 else f"steps {first}-{step}"
        replaying = self.probe is not None and steps_run == 1 and step == self.probe[0]
        if not replaying:
            self.in_a_row += 1
            if self.in_a_row > self.max_rollbacks:
                latest = self.engine.latest_checkpoint
                raise TapekitError(
                    f"{why} in {where}, after {self.max_rollbacks} rollbacks in a row "
                    f"(--max_rollbacks): the fault is not in a few batches. Training stopped and "
                    f"this state was not checkpointed (the last good checkpoint is "
                    f"{latest or 'none'}); lower the learning rate or check the data.")
        self._data_at = step  # where the input is: the restored state is behind it
        back_to = self._restore()
        self.recorded_until = max(self.recorded_until, first - 1)
        if steps_run == 1:  # the bad step is known: skip it
            self._add_skipped(step)
            logging.warning("%s%s: %s; went back to step %d (%s) and skip that step's batch",
                            "" if replaying else f"rollback {self.in_a_row}/{self.max_rollbacks}: ",
                            where, why, back_to, self._from())
            if replaying:
                self._probed(step)
        else:
            self.probe = (first, step)
            self._span = (first, step)
            logging.warning("rollback %d/%d: %s in %s; went back to step %d (%s) and replay "
                            "those steps one per loop to find the bad batches", self.in_a_row,
                            self.max_rollbacks, why, where, back_to, self._from())
        return back_to

    def _probed(self, step: int) -> None:
        """Steps up to `step` of the replay are known (good, or skipped)."""
        first, last = self.probe
        if step < last:
            self.probe = (step + 1, last)
            return
        self.probe = None
        found = options_lib.format_ranges(self._within(self._span))
        recorded = " (recorded in run.json 'skipped')" if self.engine.model_dir else ""
        logging.warning("replayed steps %d-%d one per loop; skipped: %s", *self._span,
                        f"{found}{recorded}" if found else "none (the fault did not recur)")

    # ------------------------------------------------------------------ helpers

    def _from(self) -> str:
        return ("the copy kept in memory" if self.copy is not None
                else f"checkpoint {self.engine.latest_checkpoint}")

    def _restore(self) -> int:
        engine = self.engine
        if self.copy is not None:
            return self.copy.put_back()
        engine.checkpointer.wait()  # a save in flight: the latest once it is written
        engine.checkpointer.restore(engine.latest_checkpoint, checked=False)  # this run's own
        return engine.current_step

    def _within(self, span: Tuple[int, int]) -> List[Tuple[int, int]]:
        return [(max(a, span[0]), min(b, span[1])) for a, b in self.skipped
                if a <= span[1] and b >= span[0]]

    def _add_skipped(self, step: int) -> None:
        self.skipped = list(options_lib.step_ranges(self.skipped + [(step, step)]))
        engine = self.engine
        if engine.model_dir and distribute.is_chief(engine.strategy):
            record_lib.record_skipped(engine.model_dir, self.skipped)


def _known_skips(engine) -> Sequence[Tuple[int, int]]:
    """`skip_steps`, and the run record's `skipped` (a resumed run skips them too)."""
    recorded = []
    if engine.model_dir:
        recorded = [tuple(pair) for pair in (record_lib.read(engine.model_dir) or {}).get(
            "skipped", [])]
    return options_lib.step_ranges(list(engine.options.skip_steps or ()) + recorded) or ()


def _nbytes(variables) -> int:
    return int(sum(np.prod(v.shape) * tf.as_dtype(v.dtype).size for v in variables))


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"
