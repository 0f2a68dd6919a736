"""Saves the trainer's sample images as PNG grids."""

import os

from tapekit.callbacks.base import EveryNSteps


class SampleImages(EveryNSteps):
    """Saves the trainer's `sample_images` as a grid to DIR/step_NNNNNN.png every
    `every_steps` (at the first loop end past each multiple) and at the end. Chief only."""

    def __init__(self, directory: str, every_steps: int, num_images: int = 16):
        super().__init__(every_steps)
        self.directory = directory
        self.num_images = num_images

    def act(self, step):
        from tapekit.images import image_grid, write_png
        images = self.trainer.sample_images(self.num_images)
        if images is not None:
            write_png(os.path.join(self.directory, f"step_{step:06d}.png"), image_grid(images))
