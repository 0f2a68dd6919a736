"""tapekit: compiled tf.GradientTape training loops.

Write a `Trainer` subclass with `build`, `train_dataset` and `train_step`; tapekit
compiles the step into an in-graph loop, runs it under a `tf.distribute` strategy and
handles the outer loop (logging, metrics files, callbacks) and the command line.
"""

from tapekit.callbacks import Callback
from tapekit.data import per_replica_batches
from tapekit.errors import TapekitError
from tapekit.trainer import Trainer

__version__ = "0.1.0"

__all__ = ["Callback", "TapekitError", "Trainer", "per_replica_batches", "__version__"]
