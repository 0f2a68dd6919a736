"""Saves the trainer's sample images as PNG grids."""

import os
from typing import Optional

from tapekit.callbacks.base import EveryNSteps


class Samples:
    """The trainer's `sample_images` at one step, drawn once however many callbacks show
    them (the PNG and TensorBoard show the same batch: a generator's noise is drawn once)."""

    def __init__(self, num_images: int = 16):
        self.num_images = num_images
        self._step, self._images = None, None

    def at(self, trainer, step: int):
        if step != self._step:
            self._step, self._images = step, trainer.sample_images(self.num_images)
        return self._images


class SampleImages(EveryNSteps):
    """Saves the trainer's `sample_images` as a grid to DIR/step_NNNNNN.png every
    `every_steps` (at the first loop end past each multiple) and at the end. Chief only.
    `samples` may be shared with `TensorBoard`, which then shows the same images."""

    def __init__(self, directory: str, every_steps: int, num_images: int = 16,
                 samples: Optional[Samples] = None):
        super().__init__(every_steps)
        self.directory = directory
        self.samples = samples or Samples(num_images)

    def act(self, step):
        from tapekit.images import image_grid, write_png
        images = self.samples.at(self.trainer, step)
        if images is not None:
            write_png(os.path.join(self.directory, f"step_{step:06d}.png"), image_grid(images))
