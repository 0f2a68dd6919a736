"""`nan_policy=rollback`: go back to good state after a bad loop, find its bad batches, skip them.

A loop is bad when a metric is NaN or infinite, or (with `spike_threshold=K`) when a loss
(each metric named `loss` or `*_loss`) exceeds K times the median of the last `WINDOW` good
loops' means (judged once `MIN_LOOPS` are known, and only against a positive median).
Nothing records or saves a bad loop. Instead:

1. The state before it comes back (`Runner.restore_good_state`: a copy kept in host
   memory at the start of every loop, or the last checkpoint, whose later steps are
   replayed, not recorded again: `tapekit.faults.good_state`).
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

`Rollback` is a hook of the outer loop (`tapekit.run.controller`) and reaches the engine
only through the `Runner` protocol, so it imports no TensorFlow and is tested on a fake.
"""

import statistics
from typing import Dict, List, Optional, Sequence, Tuple

from absl import logging

from tapekit.errors import TapekitError
from tapekit.options import format_ranges, step_ranges
from tapekit.run.hooks import LoopHook

WINDOW = 20  # good loops whose median loss the spike threshold compares with
MIN_LOOPS = 5  # good loops known before a spike is judged


def loss_names(metric_names: Sequence[str]) -> List[str]:
    """The metrics a spike is judged on: `loss` and every `*_loss`."""
    return [name for name in metric_names if name == "loss" or name.endswith("_loss")]


def median_losses(rows: Sequence[Sequence[float]], count: int) -> Optional[List[float]]:
    """Per loss, the median of the last min(count, WINDOW) good loops (None before MIN_LOOPS)."""
    if count < MIN_LOOPS:
        return None
    return [statistics.median(row[:min(count, WINDOW)]) for row in rows]


class Rollback(LoopHook):
    """The outer loop's hook for skipped steps and `nan_policy=rollback` (every worker):
    made by a run's first `fit`, which the later ones reuse (`begin_fit`).

    The controller asks, before each loop, `steps_to_skip` (then `skip`) and `loop_length`
    (never into a skipped range; one step while replaying), calls `before_loop`, and after
    it `after_loop`, which judges the loop (`bad`) and undoes a bad one (`roll_back`).

    Args:
      runner: the engine, as `tapekit.run.runner.Runner`.
      rolls_back: nan_policy is "rollback" (else it only skips `skipped`).
      skipped: the step ranges to skip (`skip_steps`, and run.json's `skipped`).
      window: with `spike_threshold`, the loss window (`names`, `medians()`, `add()`,
        `count()`) a spike is judged against.
    """

    def __init__(self, runner, rolls_back: bool, max_rollbacks: int,
                 spike_threshold: Optional[float], skipped: Sequence[Tuple[int, int]],
                 by_epochs: bool = False, window=None):
        self.runner = runner
        self.by_epochs = by_epochs  # what the state holds
        self.rolls_back = rolls_back
        self.max_rollbacks = max_rollbacks
        self.threshold = spike_threshold
        self.window = window
        self.skipped: List[Tuple[int, int]] = list(skipped)
        self.probe: Optional[Tuple[int, int]] = None  # steps still to replay one per loop
        self._span = (0, 0)  # the bad loop being replayed
        self._data_at = None  # after a rollback: the step the input is at (None: in step)
        self.recorded_until = 0  # replayed loops up to here were recorded before: not again
        self.in_a_row = 0
        self._restored_from = None  # where the last rollback went back to
        self._recorded = False  # whether the skipped ranges are in run.json
        if self.skipped:
            logging.info("skipping the batches of steps %s (skip_steps / run.json 'skipped')",
                         format_ranges(self.skipped))

    def begin_fit(self) -> None:
        """A new `fit` of the same run: no replay or row of rollbacks carries over, and the
        input is where the step is."""
        self.probe, self._data_at, self.in_a_row = None, None, 0
        self.recorded_until = self.runner.current_step

    # ------------------------------------------------------------------ before a loop

    def steps_to_skip(self, step: int, train_steps: Optional[int]) -> int:
        """Steps to skip before the next loop (its first step is in a skipped range)."""
        for first, last in self.skipped:
            if first <= step + 1 <= last:
                return min(last, train_steps or last) - step
        return 0

    def skip(self, steps: int) -> int:
        """Skips `steps` steps (reads and drops their batches, counts them as global steps);
        returns how many there were. The batch of a bad step just undone was read already."""
        runner, step = self.runner, self.runner.current_step
        behind, self._data_at = self._data_at, None
        if behind == step + steps and not self.by_epochs:  # the input is past them already
            return runner.skip_steps(steps, read=False)
        if self._repositions(behind, step):
            runner.reposition_input(step)
        return runner.skip_steps(steps)

    def _repositions(self, behind: Optional[int], step: int) -> bool:
        # By epochs always: the pass a bad loop ended is counted again from the restored state.
        return behind is not None and (behind != step or self.by_epochs)

    def loop_length(self, step: int, num_steps: int) -> int:
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
            self.runner.reposition_input(step)
        self._data_at = None
        if self.rolls_back:
            self.runner.keep_good_state(step)

    def replayed(self, step: int) -> bool:
        """Whether the loop that reached `step` replays loops recorded before a rollback."""
        return step <= self.recorded_until

    # ------------------------------------------------------------------ after a loop

    def after_loop(self, step: int, result, full: bool) -> Optional[int]:
        """Judges a loop that ran (nan_policy=rollback) and undoes a bad one: returns the step
        the run is back at, or None for a good loop."""
        if not self.rolls_back or not result.steps_run:
            return None
        why = self.bad(result)
        if why is not None:
            return self.roll_back(step, result.steps_run, why)
        self.good(step, full)
        return None

    def bad(self, result) -> Optional[str]:
        """Why the loop was bad (every worker agrees), or None. A good loop that is not a
        replayed step adds its losses to the window."""
        why = None
        if result.nonfinite_steps:
            why = f"non-finite {result.first_nonfinite_metric}"
        elif self.threshold is not None:
            why = self._spike(result.metrics)
        if self.runner.any_worker(why is not None):
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
                        f"{median:.4g} of the last {min(self.window.count(), WINDOW)} "
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
                latest = self.runner.latest_checkpoint
                raise TapekitError(
                    f"{why} in {where}, after {self.max_rollbacks} rollbacks in a row "
                    f"(--max_rollbacks): the fault is not in a few batches. Training stopped and "
                    f"this state was not checkpointed (the last good checkpoint is "
                    f"{latest or 'none'}); lower the learning rate or check the data.")
        self._data_at = step  # where the input is: the restored state is behind it
        back_to, self._restored_from = self.runner.restore_good_state()
        self.recorded_until = max(self.recorded_until, first - 1)
        if steps_run == 1:  # the bad step is known: skip it
            self._add_skipped(step)
            logging.warning("%s%s: %s; went back to step %d (%s) and skip that step's batch",
                            "" if replaying else f"rollback {self.in_a_row}/{self.max_rollbacks}: ",
                            where, why, back_to, self._restored_from)
            if replaying:
                self._probed(step)
        else:
            self.probe = (first, step)
            self._span = (first, step)
            logging.warning("rollback %d/%d: %s in %s; went back to step %d (%s) and replay "
                            "those steps one per loop to find the bad batches", self.in_a_row,
                            self.max_rollbacks, why, where, back_to, self._restored_from)
        return back_to

    def _probed(self, step: int) -> None:
        """Steps up to `step` of the replay are known (good, or skipped)."""
        first, last = self.probe
        if step < last:
            self.probe = (step + 1, last)
            return
        self.probe = None
        found = format_ranges(self._within(self._span))
        recorded = " (recorded in run.json 'skipped')" if self._recorded else ""
        logging.warning("replayed steps %d-%d one per loop; skipped: %s", *self._span,
                        f"{found}{recorded}" if found else "none (the fault did not recur)")

    # ------------------------------------------------------------------ helpers

    def _within(self, span: Tuple[int, int]) -> List[Tuple[int, int]]:
        return [(max(a, span[0]), min(b, span[1])) for a, b in self.skipped
                if a <= span[1] and b >= span[0]]

    def _add_skipped(self, step: int) -> None:
        self.skipped = list(step_ranges(self.skipped + [(step, step)]))
        self._recorded = self.runner.record_skipped(self.skipped)
