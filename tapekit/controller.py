"""The outer loop: how long to train and what happens between compiled loops.

Separate from the inner loop (`tapekit.loop.CompiledLoop`, what one call runs in the
graph) in the spirit of Orbit's controller: this object decides loop lengths, times
them, evaluates on schedule, reacts to SIGTERM, Ctrl-C and to input that runs out, and
hands each loop's metrics to the callbacks (NaN guard, logging, metrics file,
checkpoints). Everything here runs eagerly in Python, once per loop.
"""

import signal
import threading
import time
from typing import Dict, List, Optional, Sequence, Tuple

import tensorflow as tf
from absl import logging

from tapekit.callbacks import Callback


class Controller:
    """Drives `trainer`'s compiled loop until its global step reaches `train_steps`."""

    def __init__(self, trainer, callbacks: Sequence[Callback] = (),
                 eval_every_steps: Optional[int] = None, eval_steps: Optional[int] = None,
                 profile_steps: Optional[Tuple[int, int]] = None, profile_dir: Optional[str] = None):
        self.trainer = trainer
        self.callbacks = list(callbacks)
        self.eval_every_steps = eval_every_steps
        self.eval_steps = eval_steps
        self.profiler = _Profiler(profile_steps, profile_dir) if profile_steps else None
        for callback in self.callbacks:
            callback.set_trainer(trainer)

    def train(self, train_steps: int, steps_per_loop: int, iterator) -> List[Dict[str, float]]:
        """Runs loops of `steps_per_loop` steps (the last one clamped) up to `train_steps`.

        Stops early, after the loop in progress, when a callback sets
        `trainer.stop_training`, when the input runs out, on SIGTERM (then a checkpoint is
        saved and `trainer.preempted` is True) or on a first Ctrl-C (SIGINT: a checkpoint
        is saved and `trainer.interrupted` is True; a second Ctrl-C aborts at once). Returns
        one dict per loop: the global `step` at its end, the loop's mean metrics,
        `steps_per_sec`, `examples_per_sec`.
        """
        trainer = self.trainer
        step = trainer.current_step
        trainer.stop_training = False
        trainer.preempted = False
        trainer.interrupted = False
        history: List[Dict[str, float]] = []
        for callback in self.callbacks:
            callback.on_train_begin(step)
        logs = None
        with _StopSignals() as signals:
            while step < train_steps and not trainer.stop_training:
                num_steps = min(steps_per_loop, train_steps - step)
                if self.profiler:
                    num_steps = self.profiler.before_loop(step, num_steps)
                start_step, start = step, time.perf_counter()
                result = trainer.run_train_loop(iterator, num_steps)
                seconds = max(time.perf_counter() - start, 1e-9)
                step += result.steps_run  # what the loop added to the global step
                if self.profiler:
                    self.profiler.after_loop(step)
                if result.steps_run < num_steps:
                    logging.warning(
                        "the training data ran out: %d of this loop's %d steps ran, training "
                        "stops at step %d of train_steps=%d", result.steps_run, num_steps, step,
                        train_steps)
                    trainer.stop_training = True
                if result.steps_run == 0:
                    break
                logs = dict(result.metrics)
                if result.nonfinite_steps:
                    logs["nonfinite_steps"] = float(result.nonfinite_steps)
                logs["steps_per_sec"] = result.steps_run / seconds
                logs["examples_per_sec"] = result.steps_run * trainer.global_batch_size / seconds
                history.append({"step": step, **logs})
                for callback in self.callbacks:
                    callback.on_loop_end(step, logs)
                if trainer.any_worker(signals.terminated or signals.interrupted):
                    trainer.stop_training = True
                    trainer.interrupted = signals.interrupted
                    trainer.preempted = not signals.interrupted
                elif self._evaluation_due(start_step, step, train_steps):
                    # (not when stopping on a signal: the grace period is for the checkpoint)
                    eval_logs = trainer.evaluate(self.eval_steps)
                    for callback in self.callbacks:
                        callback.on_eval_end(step, eval_logs)
        if self.profiler:
            self.profiler.stop()
        for callback in self.callbacks:
            callback.on_train_end(step, logs)
        saved = "checkpoint saved" if trainer.checkpointer is not None else "nothing saved (no model_dir)"
        if trainer.preempted:
            logging.warning("preempted at step %d, %s", step, saved)
        if trainer.interrupted:
            logging.warning("interrupted at step %d, %s", step, saved)
        return history

    def _evaluation_due(self, start_step: int, step: int, train_steps: int) -> bool:
        every = self.eval_every_steps
        if not every:
            return False
        return step // every > start_step // every or step >= train_steps or self.trainer.stop_training


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
    instead of dying at once; training stops at the end of the loop in progress.

    Installed only in the main thread (Python's rule); the previous handlers are put back.
    """

    def __init__(self):
        self.terminated = False
        self.interrupted = False
        self._previous = {}

    def _on_sigterm(self, signum, frame):
        self.terminated = True
        logging.warning("SIGTERM received: finishing this loop, then saving a checkpoint")

    def _on_sigint(self, signum, frame):
        self.interrupted = True
        logging.warning("Ctrl-C: finishing this loop, then saving a checkpoint; press Ctrl-C "
                        "again to abort at once")
        signal.signal(signal.SIGINT, signal.SIG_DFL if _second_interrupt_kills
                      else signal.default_int_handler)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_sigterm)
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
