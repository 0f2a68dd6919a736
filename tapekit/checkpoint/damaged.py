"""Checkpoints a run must not resume from, found and moved aside (never deleted).

A damaged checkpoint (a torn write, a truncated copy) is found by reading every tensor back
(`unreadable`, `newest_readable`), so that a requeued job restarts by itself from the newest
whole one (`tapekit.checkpoint.resume`). Checkpoints newer than where a run restarted (a
damaged one's successors, or those after an explicit `restore_from`) go into
checkpoints/set_aside-TIME/ (`set_aside_after`). Eager; only the chief moves files.
"""

import os
import time
from typing import List, Optional, Tuple

import tensorflow as tf
from absl import logging

from tapekit.checkpoint import checkpointing, files
from tapekit.checkpoint.checkpointing import candidates, step_of
from tapekit.errors import summarize


def unreadable(path: str) -> Optional[str]:
    """Why checkpoint `path` cannot be read whole ("IndexError: Read less bytes than
    requested", a missing file, ...), or None if every tensor in it reads back."""
    damage = (tf.errors.DataLossError, tf.errors.NotFoundError, tf.errors.OutOfRangeError,
              tf.errors.InvalidArgumentError, IndexError)  # not a transient failure to read
    try:
        reader = checkpointing.reader(path)
        for name, dtype in reader.get_variable_to_dtype_map().items():
            if dtype == tf.variant:  # a saved input position: read, but not as an array
                tf.raw_ops.RestoreV2(prefix=path, tensor_names=[name], shape_and_slices=[""],
                                     dtypes=[dtype])
            else:
                reader.get_tensor(name)
    except damage as error:
        return f"{type(error).__name__}: {summarize(error)}"
    return None


def newest_readable(directory: Optional[str]) -> Tuple[Optional[str], List[Tuple[str, str]]]:
    """(the newest checkpoint of `directory` whose every tensor reads back, or None;
    [(path, why) for each newer one that does not]). Reads the `candidates`, newest first,
    until one is whole: a torn or missing data file, or a listed checkpoint whose files are
    gone, fails here, not half-way through a restore."""
    damaged = []
    for path in reversed(candidates(directory)):
        why = unreadable(path)
        if why is None:
            return path, damaged
        damaged.append((path, why))
    return None, damaged


def set_aside_after(checkpointer, step: int) -> Optional[str]:
    """Moves the checkpoints of `checkpointer`'s directory newer than `step` into
    checkpoints/set_aside-TIME/, so later saves neither overwrite nor delete them, and the
    manager only knows the checkpoints up to `step`. Returns the directory they went to
    (None: nothing moved, or not the chief)."""
    directory = checkpointer.directory
    if not (checkpointer.is_chief and directory):
        return None
    kept, newer = [], []
    for path in candidates(directory):  # listed, or on disk unlisted: later saves reuse names
        (newer if step_of(path) > step else kept).append(path)
    if not newer:
        return None
    aside = os.path.join(directory, time.strftime("set_aside-%Y%m%d-%H%M%S"))
    files.makedirs(aside)
    for path in newer:
        for name in tf.io.gfile.glob(path + ".*"):
            files.replace(name, os.path.join(aside, os.path.basename(name)))
    checkpointer.relist(kept)
    logging.warning("moved %d checkpoint(s) newer than step %d to %s", len(newer), step, aside)
    return aside
