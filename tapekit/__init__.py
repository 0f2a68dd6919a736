"""tapekit: compiled tf.GradientTape training loops.

Write a `Trainer` subclass with `build`, `train_dataset` and `train_step`; tapekit
compiles the step into an in-graph loop, runs it under a `tf.distribute` strategy and
handles the outer loop (logging, metrics files, callbacks) and the command line.
"""

from tapekit.callbacks import Callback
from tapekit.errors import TapekitError

__version__ = "0.1.0"

__all__ = ["Callback", "TapekitError", "Trainer", "per_replica_batches", "__version__"]


def __getattr__(name):
    # TensorFlow is imported on first use of Trainer or per_replica_batches, so that the
    # TensorFlow-free parts (tapekit.run.controller, tapekit.options, ...) import without it.
    if name == "Trainer":
        from tapekit.trainer import Trainer
        return Trainer
    if name == "per_replica_batches":
        from tapekit.input.data import per_replica_batches
        return per_replica_batches
    raise AttributeError(f"module 'tapekit' has no attribute {name!r}")
