"""Data for the built-in trainers: the seed article's synthetic sets, or a user's .npz file.

Nothing is downloaded. Synthetic data is a deterministic function of the seed.
"""

import os
from typing import Dict, Optional, Sequence

import numpy as np

from tapekit.errors import TapekitError
from tapekit.input import tfrecords


def seed_linear(seed: int, num_examples: int = 1000) -> Dict[str, np.ndarray]:
    """The seed's example 1: x ~ N(0, 1), y = 3x + 2 + N(0, 0.1²), shape [n, 1] each."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num_examples, 1)).astype(np.float32)
    y = (3.0 * x + 2.0 + 0.1 * rng.standard_normal((num_examples, 1))).astype(np.float32)
    return {"x": x, "y": y}


def seed_mlp(seed: int, num_examples: int = 100) -> Dict[str, np.ndarray]:
    """The seed's example 2: 100 points x ~ U[0, 1)^5 with targets y ~ U[0, 1)."""
    rng = np.random.default_rng(seed)
    return {"x": rng.random((num_examples, 5), dtype=np.float32),
            "y": rng.random((num_examples, 1), dtype=np.float32)}


def gaussian_samples(seed: int, num_examples: int, mean: float, stddev: float) -> Dict[str, np.ndarray]:
    """The seed's example 3 "real images": 1-D samples of N(mean, stddev²), shape [n, 1]."""
    rng = np.random.default_rng(seed)
    x = mean + stddev * rng.standard_normal((num_examples, 1))
    return {"x": x.astype(np.float32)}


def load_npz(path: str, keys: Sequence[str]) -> Dict[str, np.ndarray]:
    """Loads float32 arrays `keys` from an .npz file, checking that they exist and agree in length."""
    if not os.path.isfile(path):
        raise TapekitError(
            f"--data={path!r} does not exist; give an .npz file with arrays {', '.join(keys)}.")
    try:
        with np.load(path) as archive:
            arrays = {key: archive[key] for key in keys if key in archive}
            present = list(archive.keys())
    except Exception as error:  # not a zip, truncated, pickled objects, …
        raise TapekitError(
            f"cannot read --data={path!r} as .npz ({type(error).__name__}: {error}).") from None
    missing = [key for key in keys if key not in arrays]
    if missing:
        raise TapekitError(f"--data={path!r} has arrays {present}, but needs {', '.join(missing)}.")
    lengths = {key: len(value) for key, value in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise TapekitError(f"--data={path!r}: arrays differ in length {lengths}; they must match.")
    result = {}
    for key, value in arrays.items():
        if not np.issubdtype(value.dtype, np.number):
            raise TapekitError(f"--data={path!r}: array {key!r} has dtype {value.dtype}, not numbers.")
        value = value.astype(np.float32)
        result[key] = value.reshape(len(value), -1) if value.ndim == 1 else value
    return result


def require_examples(arrays: Dict[str, np.ndarray], global_batch_size: int, source: Optional[str]) -> None:
    count = len(next(iter(arrays.values())))
    if count < global_batch_size:
        raise TapekitError(
            f"{source or 'the data'} has {count} examples, fewer than one global batch "
            f"({global_batch_size}); lower --global_batch_size.")


SHAPE_KINDS = ("circle", "rectangle", "triangle", "line")


def shapes_images(seed: int, num_examples: int, size: int = 28) -> Dict[str, np.ndarray]:
    """Procedural images of one white shape each on black: {"x": float32 [n, size, size, 1]}.

    Each image holds a filled circle, an axis-aligned rectangle, a rotated equilateral
    triangle or a thick line segment (equally likely), at a random position and size, with
    pixels +1 inside the shape and -1 (background) outside. A deterministic function of
    `seed`; vectorised over images (10 000 images of 28×28 take well under a second).
    """
    if num_examples < 1 or size < 8:
        raise TapekitError(f"shapes_images needs num_examples >= 1 and size >= 8, got "
                           f"{num_examples} and {size}.")
    rng = np.random.default_rng(seed)
    n = num_examples
    # Every parameter is drawn for every image, so the stream does not depend on the kinds.
    kinds = rng.integers(0, len(SHAPE_KINDS), n)
    radius = rng.uniform(0.15, 0.35, n) * size
    center = rng.uniform(0.0, 1.0, (n, 2)) * (size - 2 * radius[:, None]) + radius[:, None]
    aspect = rng.uniform(0.5, 1.0, n)
    tall = rng.random(n) < 0.5  # which side of a rectangle gets the aspect ratio
    angle = rng.uniform(0.0, 2 * np.pi, n)
    thickness = rng.uniform(0.07, 0.14, n) * size
    # float32 from here on: half the memory traffic of the [n, size, size] arithmetic
    radius, center, aspect, angle, thickness = (
        a.astype(np.float32) for a in (radius, center, aspect, angle, thickness))
    pixels = np.arange(size, dtype=np.float32) + 0.5
    ys, xs = np.meshgrid(pixels, pixels, indexing="ij")
    images = np.full((n, size, size), -1.0, dtype=np.float32)
    for kind, name in enumerate(SHAPE_KINDS):
        index = np.flatnonzero(kinds == kind)
        if not len(index):
            continue
        # [k, 1, 1] parameters against [size, size] pixel centres broadcast to [k, size, size].
        dx = xs - center[index, 0, None, None]
        dy = ys - center[index, 1, None, None]
        r = radius[index, None, None]
        if name == "circle":
            inside = dx * dx + dy * dy <= r * r
        elif name == "rectangle":
            narrow = r * aspect[index, None, None]
            half_w = np.where(tall[index, None, None], narrow, r)
            half_h = np.where(tall[index, None, None], r, narrow)
            inside = (np.abs(dx) <= half_w) & (np.abs(dy) <= half_h)
        elif name == "triangle":
            # inside a counter-clockwise triangle: left of (or on) each of its three edges
            turn = angle[index, None, None] + 2 * np.pi / 3 * np.arange(3)[None, :, None]
            vx, vy = r[:, 0, :, None] * np.cos(turn), r[:, 0, :, None] * np.sin(turn)
            inside = np.ones(dx.shape, dtype=bool)
            for i in range(3):
                ax, ay = vx[:, i, :, None], vy[:, i, :, None]
                bx, by = vx[:, (i + 1) % 3, :, None], vy[:, (i + 1) % 3, :, None]
                inside &= (bx - ax) * (dy - ay) - (by - ay) * (dx - ax) >= 0
        else:
            # distance to the segment from -r·u to +r·u (u at the random angle) ≤ half thickness
            ux = np.cos(angle[index])[:, None, None]
            uy = np.sin(angle[index])[:, None, None]
            along = np.clip(dx * ux + dy * uy, -r, r)
            distance2 = (dx - along * ux) ** 2 + (dy - along * uy) ** 2
            inside = distance2 <= (thickness[index, None, None] / 2) ** 2
        images[index] = np.where(inside, 1.0, -1.0)
    return {"x": images[..., None]}


def as_gan_images(x: np.ndarray, size: int = 28) -> np.ndarray:
    """Images [n, size, size] or [n, size, size, C] (C = 1, 3 or 4) → float32 in [-1, 1] with a
    channel axis, the range of a tanh generator.

    Integer arrays are read as 0–255. Float arrays (what `load_npz` returns) are read by
    their range: values above 1 as 0–255, values in [0, 1] as 0–1, values with negatives as
    already in [-1, 1]. Anything else raises a `TapekitError`.
    """
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[1:3] != (size, size) or x.shape[-1] not in (1, 3, 4):
        raise TapekitError(
            f"images must have shape [n, {size}, {size}] or [n, {size}, {size}, C] with C = 1, "
            f"3 or 4, got {list(x.shape)}; resize or reshape the array x.")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise TapekitError(f"images must be numbers, got dtype {x.dtype}.")
    integer = np.issubdtype(x.dtype, np.integer)
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise TapekitError("images contain NaN or infinite values; clean the array x.")
    low, high = (float(x.min()), float(x.max())) if x.size else (0.0, 1.0)
    if integer or high > 1.0:
        if low < 0.0 or high > 255.0:
            raise TapekitError(f"images have values in [{low:g}, {high:g}]; give pixels in "
                               "0–255, [0, 1] or [-1, 1].")
        return x / 127.5 - 1.0
    if low >= 0.0:
        return 2.0 * x - 1.0
    if low < -1.0:
        raise TapekitError(f"images have values in [{low:g}, {high:g}]; give pixels in "
                           "0–255, [0, 1] or [-1, 1].")
    return x


def is_file_pattern(data: Optional[str]) -> bool:
    """True when --data names TFRecord files (a glob), not an .npz."""
    return bool(data) and not data.endswith(".npz")


class FileData:
    """--data as a glob of TFRecord files of tf.train.Example (`tapekit.input.tfrecords`): read by
    each worker from its own files, never loaded whole into memory."""

    def __init__(self, pattern: str, names: Sequence[str]):
        self.files = tfrecords.find(pattern)
        self.names = tuple(names)
        self.shapes = tfrecords.feature_shapes(self.files, self.names)

    def examples(self, input_context):
        """This worker's examples: a tuple of tensors in the order of `names`."""
        names = self.names
        return tfrecords.dataset(self.files, self.shapes, input_context).map(
            lambda example: tuple(example[name] for name in names))

    def head(self, count: int) -> Dict[str, np.ndarray]:
        """The first `count` examples of all files, as arrays (for evaluation and summaries)."""
        rows = list(tfrecords.dataset(self.files, self.shapes, None).take(count).as_numpy_iterator())
        return {name: np.stack([row[name] for row in rows]) for name in self.names}
