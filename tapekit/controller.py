"""The outer loop: how long to train and what happens between compiled loops.

Separate from the inner loop (`tapekit.loop.CompiledLoop`, what one call runs in the
graph) in the spirit of Orbit's controller: this object decides loop lengths, times
them, evaluates on schedule, reacts to SIGTERM and to input that runs out, and hands
each loop's metrics to the callbacks (NaN guard, logging, metrics file, checkpoints).
Everything here runs eagerly in Python, once per loop.
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
                 eval_every_steps: Optional[int] = None, eval_steps: int = 10,
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
        `trainer.stop_training`, when the input runs out, or on SIGTERM (then a checkpoint
        is saved and `trainer.preempted` is True). Returns one dict per loop: the global
        `step` at its end, the loop's mean metrics, `steps_per_sec`, `examples_per_sec`.
        """
        trainer = self.trainer
        step = trainer.current_step
        trainer.stop_training = False
        trainer.preempted = False
        history: List[Dict[str, float]] = []
        for callback in self.callbacks:
            callback.on_train_begin(step)
        logs = None
        with _SigtermFlag() as sigterm:
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
                if self._evaluation_due(start_step, step, train_steps):
                    eval_logs = trainer.evaluate(self.eval_steps)
                    for callback in self.callbacks:
                        callback.on_eval_end(step, eval_logs)
                if trainer.any_worker(sigterm.raised):
                    trainer.preempted = trainer.stop_training = True
        if self.profiler:
            self.profiler.stop()
        for callback in self.callbacks:
            callback.on_train_end(step, logs)
        if trainer.preempted:
            logging.warning("preempted at step %d, checkpoint saved", step)
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


class _SigtermFlag:
    """Records SIGTERM (what schedulers send before preemption) instead of dying at once.

    Installed only in the main thread (Python's rule); the previous handler is put back.
    """

    def __init__(self):
        self.raised = False
        self._previous = None

    def _handle(self, signum, frame):
        self.raised = True
        logging.warning("SIGTERM received: finishing this loop, then saving a checkpoint")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
