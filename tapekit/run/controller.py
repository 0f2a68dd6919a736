"""The outer loop: how long to train and what happens between compiled loops.

Separate from the inner loop (`tapekit.compiled.loop.CompiledLoop`, what one call runs in the
graph) in the spirit of Orbit's controller: this object decides loop lengths, times
them, stops on a non-finite loop before anything records or saves it, evaluates on
schedule, reacts to SIGTERM, Ctrl-C and to input that runs out, and hands each loop's
metrics to the callbacks (logging, metrics file, TensorBoard, checkpoints). It drives a
`tapekit.run.runner.Runner` (the engine) and nothing else, eagerly, once per loop; it imports
no TensorFlow until it profiles.
"""

import contextlib
import os
import signal
import sys
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from absl import logging

from tapekit import callbacks as callbacks_lib
from tapekit.callbacks import Callback
from tapekit.errors import TapekitError
from tapekit.run.runner import LoopResult, Runner


def default_callbacks(runner: Runner, options, train_steps: Optional[int],
                      write_dir: Optional[str], checkpointer=None,
                      keep_best: Optional[Callback] = None,
                      checkpoint_every_epochs: Optional[int] = None) -> List[Callback]:
    """tapekit's own callbacks for a `fit`, in the order they run (before the user's).

    Progress first, then `keep_best` (MODEL_DIR/best/, on every worker: it adds the best
    value to the evaluation's logs), then (with `write_dir`: the chief's model_dir) the
    metrics file, TensorBoard and sample images, and last the checkpoints (on every worker
    that has a `checkpointer`), so that a loop is recorded before it is saved. The non-finite check
    is not a callback: the controller makes it before any of these runs.
    """
    result: List[Callback] = []
    progress = options.progress
    if progress == "auto":
        progress = "bar" if sys.stderr.isatty() else "log"
    if progress == "bar":
        result.append(callbacks_lib.ProgressBar(train_steps))
    elif progress == "log":
        result.append(callbacks_lib.LogProgress(train_steps))
    if keep_best is not None:
        result.append(keep_best)
    if write_dir:
        model_dir = write_dir
        result.append(callbacks_lib.MetricsFile(os.path.join(model_dir, "metrics.jsonl")))
        result.append(callbacks_lib.TensorBoard(os.path.join(model_dir, "summaries"),
                                                options.sample_every_steps))
        if options.sample_every_steps:
            result.append(callbacks_lib.SampleImages(os.path.join(model_dir, "samples"),
                                                     options.sample_every_steps))
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
        any callback records or saves it; "skip_step" (the steps were skipped) warns.
      profile_steps, profile_dir: record a profiler trace of global steps START..END.
      rollback: with skipped steps or nan_policy="rollback", the `tapekit.faults.rollback.Rollback`
        that skips them, and rolls a bad loop back (before anything records or saves it).
    """

    def __init__(self, runner: Runner, callbacks: Sequence[Callback] = (), trainer=None,
                 eval_every_steps: Optional[int] = None, eval_steps: Optional[int] = None,
                 nan_policy: str = "stop", profile_steps: Optional[Tuple[int, int]] = None,
                 profile_dir: Optional[str] = None, rollback=None):
        self.runner = runner
        self.rollback = rollback  # a tapekit.faults.rollback.Rollback: skipped steps, rollbacks
        self.callbacks = list(callbacks)
        self.eval_every_steps = eval_every_steps
        self.eval_steps = eval_steps
        self.nan_policy = nan_policy
        self.profiler = _Profiler(profile_steps, profile_dir) if profile_steps else None
        for callback in self.callbacks:
            callback.set_trainer(trainer)

    def train(self, train_steps: Optional[int], steps_per_loop: int,
              train_epochs: Optional[int] = None,
              eval_every_epochs: Optional[int] = None) -> List[Dict[str, float]]:
        """Runs loops of `steps_per_loop` steps (the last one clamped) up to `train_steps`.

        Stops early, after the loop in progress, when a callback sets
        `trainer.stop_training` (`runner.status.stop_training`), when the input runs out,
        on SIGTERM (then a checkpoint is saved and `status.preempted` is True) or on a first
        Ctrl-C (SIGINT: a checkpoint is saved and `status.interrupted` is True; a second
        Ctrl-C aborts at once). Returns one dict per loop: the global `step` at its end, the
        loop's mean metrics, `steps_per_sec`, `examples_per_sec`.

        With `train_epochs` (and `train_steps` None) it trains until the runner has finished
        that many passes over the data (`runner.epochs_done`); rows then carry `epoch` (the
        1-based epoch the loop ended in), callbacks get `on_epoch_end`, and evaluation also
        follows each `eval_every_epochs`-th epoch.
        """
        runner, status = self.runner, self.runner.status
        step = runner.current_step
        status.stop_training = status.preempted = status.interrupted = False
        history: List[Dict[str, float]] = []
        for callback in self.callbacks:
            callback.on_train_begin(step)
        logs = None
        with _StopSignals(getattr(runner, "request_stop", None)) as signals:
            while self._more(step, train_steps, train_epochs) and not status.stop_training:
                num_steps = (steps_per_loop if train_steps is None
                             else min(steps_per_loop, train_steps - step))
                rollback = self.rollback
                if rollback is not None:
                    step, skipped = self._skip(step, train_steps, train_epochs)
                    if skipped == "all":
                        continue
                    if skipped == "ran out":
                        break
                    num_steps = rollback.steps_for(step, num_steps)
                    rollback.before_loop(step)
                if self.profiler:
                    num_steps = self.profiler.before_loop(step, num_steps)
                start_step, start = step, time.perf_counter()
                result = runner.run_train_loop(num_steps)
                seconds = max(time.perf_counter() - start, 1e-9)
                step += result.steps_run  # what the loop added to the global step
                if self.profiler:
                    self.profiler.after_loop(step)
                epoch_ended = train_epochs is not None and result.epoch_ended
                stopping = signals.terminated or signals.interrupted  # the loop ended early
                if stopping and result.steps_run == 0:  # asked to stop before it began
                    self._stop_on_signal(signals)
                    break
                if rollback is not None and rollback.rolls_back and result.steps_run:
                    why = rollback.bad(result)  # before anything records or saves the loop
                    if why is not None:
                        step = rollback.roll_back(step, result.steps_run, why)
                        continue
                    rollback.good(step, full=result.steps_run == num_steps or epoch_ended)
                # A replay from a checkpoint of loops already recorded: not recorded again.
                replayed = rollback is not None and not rollback.records(step)
                if epoch_ended and result.steps_run == 0:  # the pass ended with the last loop
                    if not replayed:
                        with self._between_loops(step):
                            self._end_epoch(step, start_step, train_epochs, eval_every_epochs)
                    continue
                if result.steps_run < num_steps and not epoch_ended and not stopping:
                    logging.warning(
                        "the training data ran out: %d of this loop's %d steps ran, training "
                        "stops at step %d", result.steps_run, num_steps, step)
                    status.stop_training = True
                if result.steps_run == 0:
                    break
                self._check_finite(step, result)  # before anything records or saves the loop
                logs = dict(result.metrics)
                if result.nonfinite_steps:
                    logs["nonfinite_steps"] = float(result.nonfinite_steps)
                logs["steps_per_sec"] = result.steps_run / seconds
                logs["examples_per_sec"] = result.steps_run * runner.examples_per_step / seconds
                if train_epochs is not None:
                    logs["epoch"] = runner.epochs_done + (0 if epoch_ended else 1)
                if not replayed:
                    history.append({"step": step, **logs})
                with self._between_loops(step):
                    for callback in ([] if replayed else self.callbacks):
                        callback.on_loop_end(step, logs)
                    if runner.any_worker(signals.terminated or signals.interrupted):
                        self._stop_on_signal(signals)
                    elif epoch_ended and not replayed:
                        self._end_epoch(step, start_step, train_epochs, eval_every_epochs)
                    elif not replayed and self._evaluation_due(start_step, step, train_steps):
                        # (not when stopping on a signal: the grace period is for the checkpoint)
                        self._evaluate(step)
        if self.profiler:
            self.profiler.stop()
        with self._between_loops(step):
            for callback in self.callbacks:
                callback.on_train_end(step, logs)
        latest = runner.latest_checkpoint
        saved = f"checkpoint {latest} saved" if latest else "nothing saved (no model_dir)"
        if status.preempted:
            logging.warning("preempted at step %d, %s", step, saved)
        if status.interrupted:
            logging.warning("interrupted at step %d, %s", step, saved)
        return history

    def _skip(self, step: int, train_steps: Optional[int], train_epochs: Optional[int]):
        """Skips the steps due (`rollback.skip_due`: their batches are read, not trained on)
        and makes the evaluation that falls in them. Returns (the step, "all" when steps
        were skipped, "ran out" when the data ended, None when nothing or, by epochs, only
        the rest of the pass was: the next loop ends it)."""
        due = self.rollback.skip_due(step, train_steps)
        if not due:
            return step, None
        skipped = self.rollback.skip(due)
        if skipped:
            logging.info("skipped %s (read, not trained on)", f"step {step + 1}"
                         if skipped == 1 else f"steps {step + 1}-{step + skipped}")
            with self._between_loops(step + skipped):
                if self._evaluation_due(step, step + skipped, train_steps):
                    self._evaluate(step + skipped)
        if skipped == due:
            return step + skipped, "all"
        if train_epochs is None:
            logging.warning("the training data ran out while skipping steps; training stops "
                            "at step %d", step + skipped)
            return step + skipped, "ran out"
        return step + skipped, None

    def _stop_on_signal(self, signals) -> None:
        status = self.runner.status
        status.stop_training = True
        status.interrupted = signals.interrupted
        status.preempted = not signals.interrupted

    @contextlib.contextmanager
    def _between_loops(self, step: int):
        """An exception from a callback, a hook or an evaluation after the loop that reached
        `step` becomes the runner's one error (`Runner.stopped_by`: it saves that loop
        first, unless a write failed)."""
        try:
            yield
        except Exception as error:  # KeyboardInterrupt (a second Ctrl-C) is not caught
            stopped = self.runner.stopped_by(error, step)
            if stopped is error:  # e.g. other workers stopped: explained further out
                raise
            raise stopped from None

    def _more(self, step: int, train_steps: Optional[int], train_epochs: Optional[int]) -> bool:
        if train_epochs is not None:
            return self.runner.epochs_done < train_epochs
        return step < train_steps

    def _evaluate(self, step: int) -> None:
        eval_logs = self.runner.evaluate(self.eval_steps)
        for callback in self.callbacks:
            callback.on_eval_end(step, eval_logs)

    def _end_epoch(self, step: int, start_step: int, train_epochs: int,
                   eval_every_epochs: Optional[int]) -> None:
        """After the loop that finished a pass: epoch callbacks, then the evaluation due
        (every `eval_every_epochs` epochs, after the last, or by `eval_every_steps`)."""
        epoch = self.runner.epochs_done
        logging.info("epoch %d/%d ended at step %d", epoch, train_epochs, step)
        for callback in self.callbacks:
            callback.on_epoch_end(step, epoch)
        last = epoch >= train_epochs or self.runner.status.stop_training
        if ((eval_every_epochs and (epoch % eval_every_epochs == 0 or last))
                or (self.eval_every_steps and (last or step // self.eval_every_steps
                                               > start_step // self.eval_every_steps))):
            self._evaluate(step)

    def _check_finite(self, step: int, result: LoopResult) -> None:
        """With nan_policy="stop", one error for a loop that saw a NaN or infinite metric (the
        last good checkpoint stays the latest); with "skip_step", a warning."""
        if not result.nonfinite_steps:
            return
        first_step = step - result.steps_run + 1
        if result.first_nonfinite_offset is None:  # nan_policy=stop checks the loop's sums
            where = (f"at step {step}" if result.steps_run == 1 else
                     f"in steps {first_step}-{step} (one loop; --steps_per_loop=1 from the last "
                     "checkpoint finds the step)")
        else:
            where = f"at step {first_step + result.first_nonfinite_offset}"
        if self.nan_policy == "skip_step":  # checks every step: the first bad one is known
            logging.warning("%d step(s) with non-finite values were skipped (first: %s %s)",
                            result.nonfinite_steps, result.first_nonfinite_metric, where)
            return
        latest = self.runner.latest_checkpoint
        kept = f"the last good checkpoint {latest} is kept" if latest else "nothing was saved"
        raise TapekitError(
            f"non-finite {result.first_nonfinite_metric} {where}; training stopped "
            f"and this state was not checkpointed ({kept}). Check the data, lower the learning "
            "rate, or use --nan_policy=rollback (go back, skip the bad batches) or skip_step.")

    def _evaluation_due(self, start_step: int, step: int, train_steps: int) -> bool:
        every = self.eval_every_steps
        if not every:
            return False
        return (step // every > start_step // every
                or (train_steps is not None and step >= train_steps)
                or self.runner.status.stop_training)


class _Profiler:
    """Records a TensorBoard profiler trace of global steps START..END (inclusive).

    Profiling starts and stops between loops, so loops are cut to begin at START and to
    end at END.
    """

    def __init__(self, steps: Tuple[int, int], logdir: str):
        self.start, self.end = steps
        self.logdir = logdir
        self.active = False

    def before_loop(self, step: int, num_steps: int) -> int:
        if step < self.start - 1:
            return min(num_steps, self.start - 1 - step)
        if step < self.end:
            if not self.active:
                import tensorflow as tf
                tf.profiler.experimental.start(self.logdir)
                self.active = True
                logging.info("profiling steps %d to %d into %s", step + 1, self.end, self.logdir)
            return min(num_steps, self.end - step)
        return num_steps

    def after_loop(self, step: int) -> None:
        if self.active and step >= self.end:
            self.stop()

    def stop(self) -> None:
        if self.active:
            import tensorflow as tf
            tf.profiler.experimental.stop()
            self.active = False


# What a second Ctrl-C does: raise KeyboardInterrupt once Python runs again (the default,
# for notebooks and scripts), or kill the process at once, even inside a long TensorFlow
# call (the command line sets this).
_second_interrupt_kills = False


def kill_on_second_interrupt(kill: bool = True) -> None:
    """Makes a second Ctrl-C during `fit` end the process at once (as the command line does)."""
    global _second_interrupt_kills
    _second_interrupt_kills = kill


class _StopSignals:
    """Records SIGTERM (what schedulers send before preemption) and a first SIGINT (Ctrl-C)
    instead of dying at once; training stops at the next step and saves a checkpoint.

    Python runs a signal handler only between bytecodes, so not while a compiled loop runs:
    a watcher thread woken by the signal itself (`signal.set_wakeup_fd`) acknowledges it
    at once with a line, calls `on_stop` (the runner's `request_stop`: the loop ends at its
    next step) and, on a second Ctrl-C from the command line, ends the process at once.
    Installed only in the main thread (Python's rule); the previous handlers are put back.
    """

    def __init__(self, on_stop: Optional[Callable[[], None]] = None):
        self.terminated = False
        self.interrupted = False
        self._on_stop = on_stop or (lambda: None)
        self._previous = {}
        self._wakeup = None  # (read end, write end, the previous wakeup fd)
        self._watcher = None

    def _on_sigterm(self, signum, frame):
        self.terminated = True

    def _on_sigint(self, signum, frame):
        self.interrupted = True
        signal.signal(signal.SIGINT, signal.SIG_DFL if _second_interrupt_kills
                      else signal.default_int_handler)

    def _watch(self, read_end: int) -> None:
        try:
            self._relay(read_end)
        finally:
            os.close(read_end)  # here, not in __exit__: the thread may outlive its join

    def _relay(self, read_end: int) -> None:
        interrupts = 0
        while True:
            try:
                received = os.read(read_end, 64)
            except OSError:
                return
            if not received:  # the write end closed: training is over
                return
            for signum in received:
                if signum == signal.SIGTERM:
                    logging.warning("SIGTERM received: stopping at the next step, then saving "
                                    "a checkpoint")
                    self._on_stop()
                elif signum == signal.SIGINT:
                    interrupts += 1
                    if interrupts == 1:
                        logging.warning("Ctrl-C: stopping at the next step, then saving a "
                                        "checkpoint; press Ctrl-C again to abort at once")
                        self._on_stop()
                    elif _second_interrupt_kills:
                        sys.stderr.write("second Ctrl-C: aborted, nothing more saved\n")
                        sys.stderr.flush()
                        os._exit(130)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_sigterm)
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_sigint)
            read_end, write_end = os.pipe()
            os.set_blocking(write_end, False)
            previous = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
            self._wakeup = (write_end, previous)
            self._watcher = threading.Thread(target=self._watch, args=(read_end,),
                                             name="tapekit-signals", daemon=True)
            self._watcher.start()
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        if self._wakeup is not None:
            write_end, previous = self._wakeup
            signal.set_wakeup_fd(previous)
            os.close(write_end)  # the watcher reads the end of the pipe and closes its end
            self._watcher.join(timeout=5)
            self._wakeup = None
