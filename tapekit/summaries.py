"""TensorBoard summaries written with TensorFlow alone (TensorBoard itself is optional).

Since TensorFlow 2.16 `tf.summary.scalar/image/histogram` need the `tensorboard` package
installed. These write the same records through the core `tf.summary.write` with the
metadata TensorBoard's scalar, image and histogram plugins read, so event files are
written without it and `pip install tensorboard` is only needed to look at them.
Eager, inside a `writer.as_default(step=…)` block.
"""

import numpy as np
import tensorflow as tf

from tapekit.compat import summary_metadata


def scalar(name: str, value: float, step: int) -> None:
    tf.summary.write(name, tf.constant(value, tf.float32), step=step,
                     metadata=summary_metadata("scalars", "scalar"))


def image(name: str, grid: np.ndarray, step: int) -> None:
    """One uint8 image [H, W, C] (e.g. `tapekit.images.image_grid`) as a PNG."""
    png = tf.io.encode_png(tf.convert_to_tensor(grid, tf.uint8))
    height, width = grid.shape[:2]
    tensor = tf.stack([tf.constant(str(width)), tf.constant(str(height)), png])
    tf.summary.write(name, tensor, step=step,
                     metadata=summary_metadata("images", "blob_sequence"))


def histogram(name: str, values, step: int, buckets: int = 30) -> None:
    """Values as TensorBoard's histogram tensor: [buckets, 3] rows of (left, right, count)."""
    values = np.asarray(values, np.float64).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        return
    counts, edges = np.histogram(values, bins=buckets)
    tensor = np.stack([edges[:-1], edges[1:], counts.astype(np.float64)], axis=1)
    tf.summary.write(name, tf.constant(tensor, tf.float64), step=step,
                     metadata=summary_metadata("histograms", "tensor"))
