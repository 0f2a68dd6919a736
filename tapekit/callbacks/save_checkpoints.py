"""Saves the run's checkpoints on a schedule of steps, seconds or epochs, and at the end."""

import time
from typing import Callable, Optional

from tapekit.callbacks.base import EveryNSteps


class SaveCheckpoints(EveryNSteps):
    """Saves at the first loop end past each multiple of `every_steps`, at the first loop end
    `every_secs` seconds or more after the last save (or the start), and at the end of
    training.

    Runs on every worker (saving is collective under multi-worker strategies); with
    `every_secs`, the workers agree on whether the time has come (one vote per loop), so
    they save at the same step.
    """

    def __init__(self, checkpointer, every_steps: Optional[int], every_secs: Optional[float] = None,
                 vote: Callable[[bool], bool] = bool, every_epochs: Optional[int] = None):
        super().__init__(every_steps)
        self.every_epochs = every_epochs  # also at the end of every this many epochs
        self.checkpointer = checkpointer
        self.every_secs = every_secs
        self.vote = vote  # True if any worker says True (`Runner.any_worker`)
        self._saved_at = time.monotonic()

    def on_train_begin(self, step):
        super().on_train_begin(step)
        self._saved_at = time.monotonic()

    def on_loop_end(self, step, logs):
        if self.every_secs and not self.due(step):
            overdue = time.monotonic() - self._saved_at >= self.every_secs
            if self.vote(overdue):
                self._run(step)
                return
        super().on_loop_end(step, logs)

    def on_epoch_end(self, step, epoch):
        if self.every_epochs and epoch % self.every_epochs == 0 and step != self._last:
            self._run(step)

    def act(self, step):
        self.checkpointer.save(step)
        self._saved_at = time.monotonic()

    def on_train_end(self, step, logs):
        super().on_train_end(step, logs)
        self.checkpointer.wait()  # --async_checkpoint: the last save is on disk when fit returns
