"""The outer loop: how long to train and what happens between compiled loops.

Separate from the inner loop (`tapekit.compiled.loop.CompiledLoop`, what one call runs in
the graph) in the spirit of Orbit's controller: this object decides loop lengths, times
them, evaluates on schedule, stops on a request (SIGTERM, Ctrl-C, a callback) or when the
input runs out, and hands each loop's metrics to the callbacks (logging, metrics file,
TensorBoard, checkpoints). What goes wrong is not its business: fault policies (skipped
steps and rollbacks, the non-finite check) and the profiler are `LoopHook`s it calls
around each loop. It drives a `tapekit.run.runner.Runner` (the engine) and nothing else,
eagerly, once per loop; it imports no TensorFlow.
"""

import contextlib
import os
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

from absl import logging

from tapekit import callbacks as callbacks_lib
from tapekit.callbacks import Callback
from tapekit.callbacks.loggers import loggers_for
from tapekit.callbacks.progress import in_notebook
from tapekit.errors import TapekitError, WriteFailed, pass_through
from tapekit.faults.nonfinite import NonFiniteCheck
from tapekit.faults.stop import StopSignals
from tapekit.run.accounting import LoopClock, host_memory
from tapekit.run.hooks import LoopHook
from tapekit.run.profiler import Profiler, worker_profile_dir  # noqa: F401 (the engine's)
from tapekit.run.runner import LoopResult, Runner
from tapekit.run.time_budget import TimeBudget


def default_callbacks(runner: Runner, options, train_steps: Optional[int],
                      write_dir: Optional[str], checkpointer=None,
                      keep_best: Optional[Callback] = None,
                      checkpoint_every_epochs: Optional[int] = None,
                      summary_writers=None) -> List[Callback]:
    """tapekit's own callbacks for a `fit`, in the order they run (before the user's).

    Progress first, then `keep_best` (MODEL_DIR/best/, on every worker: it adds the best
    value to the evaluation's logs), then (with `write_dir`: the chief's model_dir) the
    loggers and sample images, and last the checkpoints (on every worker
    that has a `checkpointer`), so that a loop is recorded before it is saved. At the end
    the checkpoints go first (`Controller`). The loggers are
    those `options.loggers` names (`tapekit.callbacks.loggers`). The non-finite check
    is not a callback: the controller makes it before any of these runs. `summary_writers`:
    the run's (`tapekit.compiled.step_summaries.SummaryWriters`), which TensorBoard shares.
    """
    result: List[Callback] = []
    progress = options.progress
    if progress == "auto":  # a notebook shows no absl INFO lines: the bar there too
        progress = "bar" if sys.stderr.isatty() or in_notebook() else "log"
    if progress == "bar":
        result.append(callbacks_lib.ProgressBar(train_steps))
    elif progress == "log":
        result.append(callbacks_lib.LogProgress(train_steps))
    if keep_best is not None:
        result.append(keep_best)
    if write_dir:
        model_dir = write_dir
        samples = callbacks_lib.Samples()  # drawn once per sampling step, shown twice
        result.extend(loggers_for(options, model_dir, summary_writers, samples))
        if options.sample_every_steps:
            result.append(callbacks_lib.SampleImages(os.path.join(model_dir, "samples"),
                                                     options.sample_every_steps,
                                                     samples=samples))
    if checkpointer is not None:  # every worker saves (the chief into model_dir)
        result.append(callbacks_lib.SaveCheckpoints(
            checkpointer, options.checkpoint_every_steps, options.checkpoint_every_secs,
            vote=runner.any_worker, every_epochs=checkpoint_every_epochs))
    return result


class Controller:
    """Drives `runner`'s compiled training loop until its global step reaches `train_steps`.

    Args:
      runner: the engine (`tapekit.run.runner.Runner`).
      callbacks: called after each loop, in order; they are given `trainer`.
      trainer: what callbacks see as `self.trainer` (the user's trainer).
      eval_every_steps: evaluate after each loop that passes a multiple of this, and at the
        end; None: never.
      eval_steps: steps per evaluation; None: the evaluation data to its end.
      nan_policy: "stop" raises at the end of a loop that saw a non-finite metric, before
        any callback records or saves it; "skip_step" (the steps were skipped) warns
        (`tapekit.faults.nonfinite`).
      profile_steps, profile_dir: record a profiler trace of global steps START..END; its
        analysis goes to the callbacks' `on_profile`.
      rollback: with skipped steps or nan_policy="rollback", the
        `tapekit.faults.rollback.Rollback` that skips them, and rolls a bad loop back
        (before anything records or saves it).
    """

    def __init__(self, runner: Runner, callbacks: Sequence[Callback] = (), trainer=None,
                 eval_every_steps: Optional[int] = None, eval_steps: Optional[int] = None,
                 nan_policy: str = "stop", profile_steps: Optional[Tuple[int, int]] = None,
                 profile_dir: Optional[str] = None, rollback: Optional[LoopHook] = None):
        self.runner = runner
        self.callbacks = list(callbacks)
        self.eval_every_steps = eval_every_steps
        self.eval_steps = eval_steps
        self.profiler = Profiler(profile_steps, profile_dir, lambda *args: self._each(
            "on_profile", *args)) if profile_steps else None
        # In the order they act on a loop: undo it, then judge what is kept.
        self.hooks: List[LoopHook] = [hook for hook in (
            rollback, NonFiniteCheck(nan_policy, lambda: runner.latest_checkpoint), self.profiler)
            if hook is not None]
        for callback in self.callbacks:
            callback.set_trainer(trainer)
        self.clock = LoopClock()  # where each loop's time went: `on_loop_stats`
        self._stats_step: Optional[int] = None  # the recorded loop whose stats are due
        self._budget = TimeBudget(None)
        self._told: set = set()  # the callbacks told of an exception in this fit

    def train(self, train_steps: Optional[int], steps_per_loop: int,
              train_epochs: Optional[int] = None,
              eval_every_epochs: Optional[int] = None, max_time=None) -> List[Dict[str, float]]:
        """Runs loops of `steps_per_loop` steps (the last one clamped) up to `train_steps`.

        Stops early, after the loop in progress, when a callback sets
        `trainer.stop_training` (`runner.status.stop_training`), when the input runs out,
        on SIGTERM (then a checkpoint is saved and `status.preempted` is True) or on a first
        Ctrl-C (SIGINT: a checkpoint is saved and `status.interrupted` is True; a second
        Ctrl-C aborts at once), and at the next step once `max_time` is used up (saved;
        `status.stopped_by_time`; `tapekit.run.time_budget`). Returns one dict per loop: the
        global `step` at its end, the loop's mean metrics, `steps_per_sec`, `examples_per_sec`.

        With `train_epochs` (and `train_steps` None) it trains until the runner has finished
        that many passes over the data (`runner.epochs_done`); rows then carry `epoch` (the
        1-based epoch the loop ended in), callbacks get `on_epoch_end`, and evaluation also
        follows each `eval_every_epochs`-th epoch. The end: `_end`.
        """
        runner, status = self.runner, self.runner.status
        self._goal = (train_steps, train_epochs, eval_every_epochs)
        step, history, logs = runner.current_step, [], None
        status.stop_training = status.preempted = status.interrupted = status.stopped_by_time = False
        self._budget, self._told = TimeBudget.of(max_time, runner), set()
        with self._telling_of_exceptions():
            self._each("on_train_begin", step)
        with StopSignals(runner.request_stop) as signals, self._telling_of_exceptions(), \
                self._budget.watching(runner.request_stop):
            while self._more(step) and not status.stop_training:
                step, skipped = self._skip(step)
                if skipped:
                    continue
                num_steps = self._loop_length(step, steps_per_loop)
                start_step = step
                result, seconds = self._run_loop(num_steps)
                step += result.steps_run  # what the loop added to the global step
                epoch_ended = train_epochs is not None and result.epoch_ended
                if self._stopping(signals) and result.steps_run == 0:  # asked to stop before it began
                    self._stop_on_signal(signals)
                    break
                back_to = self._after_loop(step, result, num_steps, epoch_ended)
                if back_to is not None:  # undone before anything recorded or saved it
                    step = back_to
                    continue
                replayed = any(hook.replayed(step) for hook in self.hooks)
                if result.steps_run < num_steps and not epoch_ended and not self._stopping(signals):
                    logging.warning("the training data ran out: %d of this loop's %d steps ran, "
                                    "training stops at step %d", result.steps_run, num_steps, step)
                    status.stop_training = True
                if result.steps_run:
                    logs = self._logs(result, seconds, epoch_ended)
                    if not replayed:
                        history.append({"step": step, **logs})
                elif not epoch_ended:
                    break
                with self._between_loops(step):
                    self._after(step, start_step, logs if result.steps_run else None,
                                replayed, signals, epoch_ended)
        with self._telling_of_exceptions():
            self._end(step, logs)
        return history

    def _loop_length(self, step: int, steps_per_loop: int) -> int:
        train_steps = self._goal[0]
        num_steps = steps_per_loop if train_steps is None else min(steps_per_loop,
                                                                     train_steps - step)
        for hook in self.hooks:
            num_steps = hook.loop_length(step, num_steps)
        for hook in self.hooks:
            hook.before_loop(step)
        return num_steps

    def _after_loop(self, step: int, result: LoopResult, num_steps: int,
                    epoch_ended: bool) -> Optional[int]:
        """The hooks' say on a loop that ran, before anything records or saves it: the step
        the run went back to when one undid it (None: kept)."""
        for hook in self.hooks:
            back_to = hook.after_loop(step, result, result.steps_run == num_steps or epoch_ended)
            if back_to is not None:
                return back_to
        return None

    def _logs(self, result: LoopResult, seconds: float, epoch_ended: bool) -> Dict[str, float]:
        logs = dict(result.metrics)
        if result.nonfinite_steps:
            logs["nonfinite_steps"] = float(result.nonfinite_steps)
        logs["steps_per_sec"] = result.steps_run / seconds
        logs["examples_per_sec"] = result.steps_run * self.runner.examples_per_step / seconds
        if self._goal[1] is not None:
            logs["epoch"] = self.runner.epochs_done + (0 if epoch_ended else 1)
        return logs

    def _after(self, step: int, start_step: int, logs: Optional[Dict[str, float]],
               replayed: bool, signals: StopSignals, epoch_ended: bool) -> None:
        """Between loops: callbacks, then a stop on a signal (every worker agreeing), the end
        of an epoch, or the evaluation due. Not for a replay of loops already recorded."""
        if logs is not None:
            if not replayed:
                self._each("on_loop_end", step, logs)
                self._stats_step = step
            if self._stop_voted(signals, step):  # every worker stops at this step
                return  # not evaluating: the grace period is for the checkpoint
        if replayed:
            return
        if epoch_ended:
            self._end_epoch(step, start_step)
        elif self._evaluation_due(start_step, step):
            self._evaluate(step)
        else:
            return
        self._time_voted(step)  # the budget ran out during the evaluation: stop before the next loop

    def _run_loop(self, num_steps: int) -> Tuple[LoopResult, float]:
        """Runs one compiled loop, timed (its seconds, at least 1 ns), after handing the
        callbacks the stats of the loop before: a row ends where the next loop starts."""
        self._loop_stats()
        with self.clock.timing("train") as timed:
            result = self.runner.run_train_loop(num_steps)
        return result, max(timed["seconds"], 1e-9)

    def _loop_stats(self) -> None:
        """`on_loop_stats` for the loop recorded last, with all that followed it up to now
        (`tapekit.run.accounting`), once; the clock then times the next. The loops undone or
        replayed before a recorded one count in its row."""
        if self._stats_step is None:
            if not self.clock.running:  # rows start with the first loop
                self.clock.restart()
            return
        stats = self.clock.stats()
        self.clock.restart()
        stats.update({**host_memory(), **self.runner.device_memory()})
        step, self._stats_step = self._stats_step, None
        with self._between_loops(step):
            self._each("on_loop_stats", step, stats)

    def _end(self, step: int, logs: Optional[Dict[str, float]]) -> None:
        """After the last loop, timed as a whole (the time budget's reserve: `saw_end`): the
        hooks end (a capture stops), a max_time stop goes into run.json (before the loggers
        upload it), the checkpoint savers' `on_train_end` (the final save, and its wait)
        runs, then a capture's analysis (on a normal end only: a stop leaves the grace
        period to the save), the last loop's stats row (counting the final save), and last
        the other callbacks' `on_train_end`: a slow tracker's upload cannot use up a
        preemption's grace period before the checkpoint exists. An exception from
        `on_train_begin` to here reaches each callback's `on_exception` once (`_told`)."""
        started = time.monotonic()
        status = self.runner.status
        stopped = status.preempted or status.interrupted or status.stopped_by_time
        for hook in self.hooks:
            hook.end()
        if status.stopped_by_time:
            self.runner.record_stop(self._budget.stop_record(step))
        savers = [callback for callback in self.callbacks
                  if isinstance(callback, callbacks_lib.SaveCheckpoints)]
        with self._between_loops(step):
            self._each("on_train_end", step, logs, only=savers)
            if self.profiler is not None:
                self.profiler.finish(analyse=not stopped)
            self._loop_stats()  # the last loop's: after the final save, which it counts
            self._each("on_train_end", step, logs,
                       only=[callback for callback in self.callbacks if callback not in savers])
        latest = self.runner.latest_checkpoint
        saved = f"checkpoint {latest} saved" if latest else "nothing saved (no model_dir)"
        if status.preempted:
            logging.warning("preempted at step %d, %s", step, saved)
        if status.interrupted:
            logging.warning("interrupted at step %d, %s", step, saved)
        if status.stopped_by_time:
            logging.warning("max_time (%s s) used up: stopped at step %d, %s",
                            f"{self._budget.seconds:g}", step, saved)
        self._budget.saw_end(time.monotonic() - started, status.stopped_by_time)

    @contextlib.contextmanager
    def _telling_of_exceptions(self):
        """Calls each callback's `on_exception` when training stops with one (a logger marks
        its run failed), after ending the hooks (the profiler stops its trace, unanalysed),
        then lets it pass; a hook or callback failing there only logs. Each callback is
        told once per fit (`_told`), however many of these contexts the exception leaves."""
        try:
            yield
        except BaseException as error:
            for hook in self.hooks:
                try:
                    hook.end()
                except Exception:  # the first error is the one to report
                    logging.exception("%s.end failed", type(hook).__name__)
            if self.profiler is not None:
                self.profiler.finish(analyse=False)
            for callback in self.callbacks:
                if id(callback) in self._told:
                    continue
                self._told.add(id(callback))
                try:
                    getattr(callback, "on_exception", lambda *_: None)(self.runner.current_step, error)
                except Exception:  # the first error is the one to report
                    logging.exception("%s.on_exception failed", type(callback).__name__)
            raise

    def _each(self, hook: str, *args, only: Optional[Sequence[Callback]] = None) -> None:
        """Calls `hook` on each callback (of `only`, in order), timed: `SaveCheckpoints` as
        checkpoint time (its longest call also tells the time budget what a save takes), the
        rest as callbacks."""
        for callback in self.callbacks if only is None else only:
            saves = isinstance(callback, callbacks_lib.SaveCheckpoints)
            with self.clock.timing("checkpoint" if saves else "callbacks") as timed:
                getattr(callback, hook)(*args)
            if saves:
                self._budget.saw_save(timed["seconds"])

    def _skip(self, step: int) -> Tuple[int, bool]:
        """Skips the steps a hook says are due (their batches are read, not trained on) and
        makes the evaluation that falls in them. Returns the step, and whether to go round
        again before a loop (steps were skipped, or the data ran out while skipping)."""
        train_steps, train_epochs = self._goal[:2]
        for hook in self.hooks:
            due = hook.steps_to_skip(step, train_steps)
            if not due:
                continue
            with self.clock.timing("input_wait"):  # batches read outside the compiled loop
                skipped = hook.skip(due)
            if skipped:
                logging.info("skipped %s (read, not trained on)", f"step {step + 1}"
                             if skipped == 1 else f"steps {step + 1}-{step + skipped}")
                with self._between_loops(step + skipped):
                    if self._evaluation_due(step, step + skipped):
                        self._evaluate(step + skipped)
            step += skipped
            if skipped == due:
                return step, True
            if train_epochs is None:
                logging.warning("the training data ran out while skipping steps; training "
                                "stops at step %d", step)
                self.runner.status.stop_training = True
                return step, True
        return step, False

    def _stopping(self, signals: StopSignals) -> bool:
        """A signal arrived, or the time budget is used up (on this worker)."""
        return signals.stopping or self._budget.expired

    def _stop_voted(self, signals: StopSignals, step: int) -> bool:
        """Whether every worker stops at this step: a signal on any of them (one vote), or
        the time budget used up on any (a second, only with a budget)."""
        if self.runner.any_worker(signals.stopping):
            self._stop_on_signal(signals)
            return True
        return self._time_voted(step)

    def _time_voted(self, step: int) -> bool:
        """Whether every worker stops at `step` for the time budget: only when there is more
        to train (a budget used up after the last step stops nothing), and only with a budget
        (every worker decides both alike, so all vote or none)."""
        if (self._budget.seconds is None or not self._more(step)
                or not self.runner.any_worker(self._budget.check())):
            return False
        status = self.runner.status
        status.stop_training = status.stopped_by_time = True
        return True

    def _stop_on_signal(self, signals: StopSignals) -> None:
        status = self.runner.status
        status.stop_training = True
        if signals.stopping or not self._budget.expired:  # a signal, here or on another worker
            status.interrupted = signals.interrupted
            status.preempted = not signals.interrupted
        else:
            status.stopped_by_time = True

    @contextlib.contextmanager
    def _between_loops(self, step: int):
        """An exception from a callback, a hook or an evaluation after the loop that reached
        `step` stops the run: `Runner.stopped_by` saves that loop first (unless a write
        failed) and says so in one line. tapekit's own errors and failed writes (a full disk:
        `WriteFailed`, exit 74 from the command line) become that line; any other exception
        (the user's: a bug, or a sweep's `TrialPruned`) reaches the caller as the same object,
        carrying the line (`tapekit.errors.pass_through`)."""
        try:
            yield
        except Exception as error:  # KeyboardInterrupt (a second Ctrl-C) is not caught
            stopped = self.runner.stopped_by(error, step)
            if stopped is error:  # e.g. other workers stopped: explained further out
                raise
            if isinstance(error, TapekitError) or isinstance(stopped, WriteFailed):
                raise stopped from None
            raise pass_through(error, stopped)

    def _more(self, step: int) -> bool:
        train_steps, train_epochs, _ = self._goal
        if train_epochs is not None:
            return self.runner.epochs_done < train_epochs
        return step < train_steps

    def _evaluate(self, step: int) -> None:
        with self.clock.timing("eval"):
            eval_logs = self.runner.evaluate(self.eval_steps)
        self._each("on_eval_end", step, eval_logs)

    def _end_epoch(self, step: int, start_step: int) -> None:
        """After the loop that finished a pass: epoch callbacks, then the evaluation due
        (every `eval_every_epochs` epochs, after the last, or by `eval_every_steps`)."""
        _, train_epochs, eval_every_epochs = self._goal
        epoch = self.runner.epochs_done
        logging.info("epoch %d/%d ended at step %d", epoch, train_epochs, step)
        self._each("on_epoch_end", step, epoch)
        last = epoch >= train_epochs or self.runner.status.stop_training
        if ((eval_every_epochs and (epoch % eval_every_epochs == 0 or last))
                or (self.eval_every_steps and (last or step // self.eval_every_steps
                                               > start_step // self.eval_every_steps))):
            self._evaluate(step)

    def _evaluation_due(self, start_step: int, step: int) -> bool:
        every, train_steps = self.eval_every_steps, self._goal[0]
        if not every:
            return False
        return (step // every > start_step // every
                or (train_steps is not None and step >= train_steps)
                or self.runner.status.stop_training)
