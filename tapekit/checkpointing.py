"""Checkpoints of a trainer's whole state with `tf.train.CheckpointManager`.

Every worker calls `save` (under MultiWorkerMirroredStrategy saving may run collective
ops); only the chief writes into `MODEL_DIR/checkpoints`, the others into a temporary
directory of their own that is deleted right after (TensorFlow's convention).
"""

import os
import shutil
import tempfile
from typing import Dict, Optional

import tensorflow as tf
from absl import logging

from tapekit.errors import TapekitError


class Checkpointer:
    """Saves and restores `objects` (name → trackable) for one trainer. Eager, outer loop only."""

    def __init__(self, objects: Dict[str, object], model_dir: str, is_chief: bool,
                 max_to_keep: int = 3, task_id: int = 0):
        self.checkpoint = tf.train.Checkpoint(**objects)
        self.directory = os.path.join(model_dir, "checkpoints")
        self.is_chief = is_chief
        self._temporary = None
        if is_chief:
            write_dir = self.directory
        else:
            self._temporary = tempfile.mkdtemp(prefix=f"tapekit-worker{task_id}-")
            write_dir = self._temporary
        self.manager = tf.train.CheckpointManager(self.checkpoint, write_dir,
                                                  max_to_keep=max_to_keep)

    @property
    def latest(self) -> Optional[str]:
        """The newest checkpoint in MODEL_DIR/checkpoints (the chief's), or None."""
        return tf.train.latest_checkpoint(self.directory)

    def restore(self, path: str) -> None:
        """Restores every object from `path`; all of the trainer's state must be found there."""
        try:
            status = self.checkpoint.restore(path)
            status.assert_existing_objects_matched()
        except (tf.errors.OpError, AssertionError, ValueError) as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise TapekitError(
                f"cannot restore checkpoint {path!r}: {first_line}. Point --restore_from at a "
                "checkpoint of this trainer, or use a new --model_dir.") from None

    def save(self, step: int) -> None:
        path = self.manager.save(checkpoint_number=step)
        if self.is_chief:
            logging.info("saved checkpoint %s", path)
        else:
            shutil.rmtree(self._temporary, ignore_errors=True)

    def close(self) -> None:
        if self._temporary:
            shutil.rmtree(self._temporary, ignore_errors=True)
