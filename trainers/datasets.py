"""Data for the built-in trainers: the seed article's synthetic sets, or a user's .npz file.

Nothing is downloaded. Synthetic data is a deterministic function of the seed.
"""

import os
from typing import Dict, Optional, Sequence

import numpy as np

from tapekit.errors import TapekitError


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
        raise TapekitError(f"--data={path!r} does not exist; give an .npz file with arrays {', '.join(keys)}.")
    try:
        with np.load(path) as archive:
            arrays = {key: archive[key] for key in keys if key in archive}
            present = list(archive.keys())
    except Exception as error:  # not a zip, truncated, pickled objects, …
        raise TapekitError(f"cannot read --data={path!r} as .npz ({type(error).__name__}: {error}).") from None
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
