"""Mixed precision: Keras dtype policies plus tapekit's own dynamic loss scaling.

Keras 3's `LossScaleOptimizer` breaks under MirroredStrategy (keras-team/keras#18666: the
scale collapses to 0 and weights become inf; reproduced here with TF 2.21 / Keras 3.15),
and the old `get_scaled_loss`/`get_unscaled_gradients` are gone (keras#19479). So for
`mixed_float16` tapekit scales the loss itself: the scale is a variable, a step whose
gradients are not finite on any replica is skipped on all of them, the scale halves
then, and doubles after `growth_interval` finite steps in a row.
"""

from typing import Callable, Optional, Sequence

import keras
import tensorflow as tf

from tapekit.errors import TapekitError
from tapekit.options import PRECISIONS

# Below this compute capability GPUs have no float16 arithmetic worth the name.
MIN_FLOAT16_COMPUTE_CAPABILITY = (5, 3)


def check_precision(precision: str, strategy: tf.distribute.Strategy,
                    gpus: Optional[Sequence] = None,
                    device_details: Optional[Callable] = None) -> None:
    """Raises a TapekitError if `precision` is unknown or cannot work on `strategy`'s devices.

    `gpus` defaults to this machine's physical GPUs and `device_details(gpu)` to
    `tf.config.experimental.get_device_details` (parameters so a test can describe a GPU).
    """
    if precision not in PRECISIONS:
        raise TapekitError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}.")
    if precision != "mixed_float16":
        return
    details_of = device_details or tf.config.experimental.get_device_details
    try:
        used = set(strategy.extended.worker_devices)
    except RuntimeError:  # the default strategy: whatever device TensorFlow places ops on
        used = set()
    for gpu in tf.config.list_physical_devices("GPU") if gpus is None else gpus:
        name = gpu.name.replace("/physical_device:", "")
        if used and not any(name.lower() in device.lower() for device in used):
            continue
        capability = details_of(gpu).get("compute_capability")
        if capability is not None and tuple(capability) < MIN_FLOAT16_COMPUTE_CAPABILITY:
            raise TapekitError(
                f"precision 'mixed_float16' cannot work on {name} (compute capability "
                f"{capability[0]}.{capability[1]}, float16 needs at least 5.3); use "
                "--precision=float32 (or mixed_bfloat16 on hardware that has it).")


class DynamicLossScale(tf.Module):
    """A loss scale for one optimizer: variables created in the strategy scope, updated in-graph.

    `scale` and `good_steps` are ONLY_FIRST_REPLICA variables updated in cross-replica
    context (inside `merge_call`), so every replica sees the same scale.
    """

    def __init__(self, initial_scale: float = 2.0 ** 15, growth_interval: int = 2000,
                 name: str = "loss_scale"):
        super().__init__(name=name)
        self.growth_interval = growth_interval
        self.scale = tf.Variable(initial_scale, dtype=tf.float32, trainable=False,
                                 name="scale",
                                 aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        self.good_steps = tf.Variable(0, dtype=tf.int64, trainable=False,
                                      name="good_steps",
                                      aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)

    def update(self, finite) -> None:
        """Grows the scale after `growth_interval` finite steps; halves it after a bad step."""
        def on_finite():
            grow = self.good_steps + 1 >= self.growth_interval
            self.scale.assign(tf.where(grow, self.scale * 2.0, self.scale))
            self.good_steps.assign(tf.where(grow, tf.zeros_like(self.good_steps),
                                            self.good_steps + 1))

        def on_overflow():
            self.scale.assign(tf.maximum(self.scale / 2.0, 1.0))
            self.good_steps.assign(tf.zeros_like(self.good_steps))

        tf.cond(finite, on_finite, on_overflow)


class dtype_policy:
    """Context manager: Keras' global dtype policy is `precision` while models are created."""

    def __init__(self, precision: str):
        self.precision = precision

    def __enter__(self):
        self.previous = keras.config.dtype_policy()
        keras.config.set_dtype_policy(self.precision)

    def __exit__(self, *exc):
        keras.config.set_dtype_policy(self.previous)
