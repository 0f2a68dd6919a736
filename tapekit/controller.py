"""The outer loop: how long to train and what happens between compiled loops.

Separate from the inner loop (`tapekit.loop.CompiledLoop`, what one call runs in the
graph) in the spirit of Orbit's controller: this object decides loop lengths, times
them and hands each loop's metrics to the callbacks (metrics file, logging, …).
Everything here runs eagerly in Python, once per loop.
"""

import time
from typing import Dict, List, Sequence

from tapekit.callbacks import Callback
from tapekit.errors import TapekitError


class Controller:
    """Drives `trainer`'s compiled loop until its global step reaches `train_steps`."""

    def __init__(self, trainer, callbacks: Sequence[Callback] = ()):
        self.trainer = trainer
        self.callbacks = list(callbacks)
        for callback in self.callbacks:
            callback.set_trainer(trainer)

    def train(self, train_steps: int, steps_per_loop: int, iterator) -> List[Dict[str, float]]:
        """Runs loops of `steps_per_loop` steps (the last one clamped) up to `train_steps`.

        Returns one dict per loop: the global `step` at its end and the loop's mean metrics,
        `steps_per_sec` and `examples_per_sec`.
        """
        if train_steps < 1:
            raise TapekitError(f"train_steps must be at least 1, got {train_steps}.")
        if steps_per_loop < 1:
            raise TapekitError(f"steps_per_loop must be at least 1, got {steps_per_loop}.")
        trainer = self.trainer
        step = trainer.current_step
        trainer.stop_training = False
        history: List[Dict[str, float]] = []
        for callback in self.callbacks:
            callback.on_train_begin(step)
        logs = None
        while step < train_steps and not trainer.stop_training:
            num_steps = min(steps_per_loop, train_steps - step)
            start = time.perf_counter()
            outputs = trainer.run_train_loop(iterator, num_steps)
            logs = {name: float(value) for name, value in outputs.items()}  # waits for the loop
            seconds = max(time.perf_counter() - start, 1e-9)
            step = trainer.current_step
            logs["steps_per_sec"] = num_steps / seconds
            logs["examples_per_sec"] = num_steps * trainer.global_batch_size / seconds
            history.append({"step": step, **logs})
            for callback in self.callbacks:
                callback.on_loop_end(step, logs)
        for callback in self.callbacks:
            callback.on_train_end(step, logs)
        return history
