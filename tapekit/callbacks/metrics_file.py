"""Appends each loop's and evaluation's metrics to MODEL_DIR/metrics.jsonl."""

import json
import os

from absl import logging

from tapekit.checkpoint import files
from tapekit.callbacks.base import Callback, Logs


class MetricsFile(Callback):
    """Appends one JSON object per loop (and per evaluation) to `MODEL_DIR/metrics.jsonl`.

    The file is opened, appended to and closed each time, so a killed job leaves
    every finished loop on disk. Only the chief writes it.
    """

    def __init__(self, path: str):
        self.path = path

    def on_train_begin(self, step):
        """A run resumed from a checkpoint older than the file's last rows (killed between
        writing a loop's row and saving its checkpoint, or stopped while replaying loops
        for a rollback) redoes those loops: their rows are dropped, to be written again."""
        if not os.path.exists(self.path):
            return
        with open(self.path) as stream:
            lines = stream.read().splitlines()
        kept = [line for line in lines if not _row_after(line, step)]
        if len(kept) == len(lines):
            return
        with files.open_for_writing(self.path + ".tmp") as stream:
            stream.write("".join(line + "\n" for line in kept))
        os.replace(self.path + ".tmp", self.path)
        logging.info("metrics.jsonl: %d row(s) after step %d, where this run resumes, were "
                     "dropped (those loops are trained again)", len(lines) - len(kept), step)

    def _append(self, split: str, step: int, logs: Logs) -> None:
        record = {"split": split, "step": int(step)}
        # Counts (best_step, epoch) stay integers; metrics are floats.
        record.update({key: value if isinstance(value, int) and not isinstance(value, bool)
                       else float(value) for key, value in logs.items()})
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with files.open_for_writing(self.path, append=True) as stream:
            stream.write(json.dumps(record) + "\n")

    def on_loop_end(self, step, logs):
        self._append("train", step, logs)

    def on_eval_end(self, step, logs):
        self._append("eval", step, logs)


def _row_after(line: str, step: int) -> bool:
    try:
        return int(json.loads(line)["step"]) > step
    except (ValueError, KeyError, TypeError):  # a torn last line: kept as it is
        return False
