"""Writes each loop's and evaluation's metrics, and samples, as TensorBoard summaries."""

import os
from typing import Dict, Optional

from tapekit.callbacks.base import EveryNSteps
from tapekit.callbacks.sample_images import Samples


class TensorBoard(EveryNSteps):
    """Writes TensorBoard summaries to LOGDIR/train and LOGDIR/eval (the chief only).

    Every loop: each metric, `steps_per_sec`, and each optimizer's learning rate. Every
    `sample_every_steps` (and at the end): the trainer's `sample_images` as an image grid
    and its `sample_histograms`. Eager, at loop boundaries. `samples` may be shared with
    `SampleImages`, which then writes the same images as PNG.
    """

    def __init__(self, logdir: str, sample_every_steps: Optional[int] = None,
                 num_images: int = 16, samples: Optional[Samples] = None):
        super().__init__(sample_every_steps)
        self.logdir = logdir
        self.samples = samples or Samples(num_images)
        self._train_writer = None  # each created at its first use: an evaluator
        self._eval_writer = None  # process writes only eval/

    def _learning_rates(self) -> Dict[str, float]:
        import tensorflow as tf
        from tapekit.checkpoint import state
        optimizers = state.optimizers(vars(self.trainer))
        # convert_to_tensor reads distributed (mirrored) variables too, where float() cannot
        return {("learning_rate" if len(optimizers) == 1 else f"learning_rate/{name}"):
                float(tf.convert_to_tensor(optimizer.learning_rate))
                for name, optimizer in optimizers.items()}

    @property
    def train_writer(self):
        import tensorflow as tf
        if self._train_writer is None:
            self._train_writer = tf.summary.create_file_writer(os.path.join(self.logdir, "train"))
        return self._train_writer

    def on_loop_end(self, step, logs):
        from tapekit import summaries
        with self.train_writer.as_default(step=step):
            for name, value in {**logs, **self._learning_rates()}.items():
                summaries.scalar(name, value, step)
        super().on_loop_end(step, logs)
        self.train_writer.flush()

    def on_eval_end(self, step, logs):
        import tensorflow as tf
        from tapekit import summaries
        if self._eval_writer is None:
            self._eval_writer = tf.summary.create_file_writer(os.path.join(self.logdir, "eval"))
        with self._eval_writer.as_default(step=step):
            for name, value in logs.items():
                summaries.scalar(name, value, step)
        self._eval_writer.flush()

    def on_train_end(self, step, logs):
        super().on_train_end(step, logs)
        if self._train_writer is not None:
            self._train_writer.flush()

    def act(self, step):
        if not self.every_steps:
            return
        from tapekit import summaries
        from tapekit.images import image_grid
        images = self.samples.at(self.trainer, step)
        with self.train_writer.as_default(step=step):
            if images is not None:
                summaries.image("samples", image_grid(images), step)
            for name, values in self.trainer.sample_histograms().items():
                summaries.histogram(name, values, step)
