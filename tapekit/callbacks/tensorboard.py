"""Writes each loop's and evaluation's metrics, and samples, as TensorBoard summaries."""

from typing import Dict, Optional

from tapekit.callbacks.base import EveryNSteps
from tapekit.callbacks.sample_images import Samples


class TensorBoard(EveryNSteps):
    """Writes TensorBoard summaries to LOGDIR/train and LOGDIR/eval (the chief only).

    Every loop: each metric, `steps_per_sec`, each optimizer's learning rate, and where the
    loop's time and memory went (`on_loop_stats`: `time/...`, `memory/...`). Every
    `sample_every_steps` (and at the end): the trainer's `sample_images` as an image grid
    and its `sample_histograms`. Eager, at loop boundaries. `samples` may be shared with
    `SampleImages`, which then writes the same images as PNG. `writers`: the run's
    `tapekit.compiled.step_summaries.SummaryWriters` for LOGDIR, shared with the summaries
    written inside steps (one event file per directory); None: its own.
    """

    def __init__(self, logdir: str, sample_every_steps: Optional[int] = None,
                 num_images: int = 16, samples: Optional[Samples] = None, writers=None):
        super().__init__(sample_every_steps)
        self.logdir = logdir
        self.samples = samples or Samples(num_images)
        # Each writer is made at its first use: an evaluator process writes only eval/.
        self.writers = writers

    def _writer(self, name: str):
        if self.writers is None:
            from tapekit.compiled.step_summaries import SummaryWriters
            self.writers = SummaryWriters(self.logdir)
        return self.writers.get(name)

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
        return self._writer("train")

    def on_loop_end(self, step, logs):
        from tapekit import summaries
        with self.train_writer.as_default(step=step):
            for name, value in {**logs, **self._learning_rates()}.items():
                summaries.scalar(name, value, step)
        super().on_loop_end(step, logs)
        self.train_writer.flush()

    def on_loop_stats(self, step, stats):
        """Where the loop's time and memory went, as scalars in LOGDIR/train (`time/...`
        seconds, `memory/...` bytes)."""
        from tapekit import summaries
        with self.train_writer.as_default(step=step):
            for name, value in stats.items():
                summaries.scalar(name, value, step)
        self.train_writer.flush()

    def on_eval_end(self, step, logs):
        from tapekit import summaries
        writer = self._writer("eval")
        with writer.as_default(step=step):
            for name, value in logs.items():
                summaries.scalar(name, value, step)
        writer.flush()

    def on_train_end(self, step, logs):
        super().on_train_end(step, logs)
        if self.writers is not None:
            self.writers.flush()

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
