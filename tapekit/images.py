"""Image grids: tile a batch of images into one picture and write it as a PNG.

Used for `Trainer.sample_images` (TensorBoard image summaries, MODEL_DIR/samples/*.png).
Eager, NumPy in and out; PNG encoding through TensorFlow (no image library needed).
"""

import math
import os
from typing import Optional

import numpy as np
import tensorflow as tf

from tapekit.checkpoint import files
from tapekit.errors import TapekitError

CHANNELS = (1, 3, 4)  # grey, RGB, RGBA: what PNG stores
SEPARATOR_PIXELS = 2  # between tiles only, no outer border
SEPARATOR_VALUE = 128  # mid grey: visible against black and white tiles


def grid_shape(num_images: int, columns: Optional[int] = None):
    """(rows, columns) of the grid: `columns` default ceil(sqrt(n)), the nearest to square;
    never more columns than images."""
    if columns is None:
        columns = math.ceil(math.sqrt(num_images))
    columns = max(1, min(columns, num_images))
    return math.ceil(num_images / columns), columns


def image_grid(images, columns: Optional[int] = None) -> np.ndarray:
    """Tiles images [n, h, w, c] with values in [0, 1] into one uint8 image [H, W, c].

    Tiles fill rows left to right; `columns` defaults to ceil(sqrt(n)) (and is at most n),
    rows are ceil(n / columns). Tiles are separated by `SEPARATOR_PIXELS` (2) grey pixels, with no
    outer border: H = rows·h + 2·(rows − 1), W = columns·w + 2·(columns − 1); e.g. 10
    images of 28×28 → 3 rows × 4 columns → 88×118. Unused cells are grey. Values outside
    [0, 1] are clipped, NaN becomes 0.
    """
    array = np.asarray(images.numpy() if hasattr(images, "numpy") else images)
    if array.ndim != 4 or array.shape[-1] not in CHANNELS or 0 in array.shape:
        raise TapekitError(
            f"image_grid needs images [n, height, width, channels] with channels 1, 3 or 4 and "
            f"n >= 1, got shape {list(array.shape)}; add a channel axis (x[..., None]) to "
            "grey images.")
    if columns is not None and columns < 1:
        raise TapekitError(f"image_grid columns must be at least 1, got {columns}.")
    num_images, height, width, channels = array.shape
    rows, columns = grid_shape(num_images, columns)
    pixels = np.round(np.clip(np.nan_to_num(array.astype(np.float32)), 0.0, 1.0) * 255.0)
    step_y, step_x = height + SEPARATOR_PIXELS, width + SEPARATOR_PIXELS
    grid = np.full((rows * step_y - SEPARATOR_PIXELS, columns * step_x - SEPARATOR_PIXELS,
                    channels), SEPARATOR_VALUE, dtype=np.uint8)
    for index in range(num_images):
        top, left = (index // columns) * step_y, (index % columns) * step_x
        grid[top:top + height, left:left + width] = pixels[index]
    return grid


def write_png(path: str, grid) -> None:
    """Writes a uint8 image [H, W, C] (C = 1, 3 or 4; e.g. from `image_grid`) as a PNG file,
    creating the parent directory. Any filesystem TensorFlow knows (local, gs://, …)."""
    array = np.asarray(grid)
    if array.ndim != 3 or array.shape[-1] not in CHANNELS or array.dtype != np.uint8:
        raise TapekitError(
            f"write_png needs a uint8 image [height, width, channels] with channels 1, 3 or 4, "
            f"got {array.dtype} {list(array.shape)}; pass image_grid(images).")
    parent = os.path.dirname(path)
    if parent:
        files.makedirs(parent)
    files.write_bytes(path, tf.io.encode_png(array).numpy())
