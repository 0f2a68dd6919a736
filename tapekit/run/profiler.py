"""`--profile_steps=START,END`: a TensorBoard profiler trace of those global steps."""

from typing import Tuple

from absl import logging

from tapekit.run.hooks import LoopHook


class Profiler(LoopHook):
    """Records a TensorBoard profiler trace of global steps START..END (inclusive) into
    `logdir`.

    Profiling starts and stops between loops, so loops are cut to begin at START and to
    end at END. Imports TensorFlow only when it starts.
    """

    def __init__(self, steps: Tuple[int, int], logdir: str):
        self.start, self.end_step = steps
        self.logdir = logdir
        self.active = False

    def loop_length(self, step: int, num_steps: int) -> int:
        if step < self.start - 1:
            return min(num_steps, self.start - 1 - step)
        if step < self.end_step:
            return min(num_steps, self.end_step - step)
        return num_steps

    def before_loop(self, step: int) -> None:
        if self.start - 1 <= step < self.end_step and not self.active:
            import tensorflow as tf
            tf.profiler.experimental.start(self.logdir)
            self.active = True
            logging.info("profiling steps %d to %d into %s", step + 1, self.end_step, self.logdir)

    def after_loop(self, step, result, full):
        if self.active and step >= self.end_step:
            self.end()
        return None

    def end(self) -> None:
        if self.active:
            import tensorflow as tf
            tf.profiler.experimental.stop()
            self.active = False
