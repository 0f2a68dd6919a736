"""Appends each loop's and evaluation's metrics to MODEL_DIR/metrics.jsonl."""

import json
import os

from absl import logging

from tapekit.callbacks.base import Callback, Logs
from tapekit.checkpoint import files


class MetricsFile(Callback):
    """Appends one JSON object per loop (and per evaluation) to `MODEL_DIR/metrics.jsonl`.

    The file is opened, appended to and closed each time, so a killed job leaves
    every finished loop on disk. On an object store (gs://), which cannot append, each row
    rewrites the file whole (`files.append_line`): every finished loop's row is still there
    after a kill, and a reader sees whole rows only. Only the chief writes it.
    """

    def __init__(self, path: str):
        self.path = path

    def on_train_begin(self, step):
        """A run resumed from a checkpoint older than the file's last rows (killed between
        writing a loop's row and saving its checkpoint, or stopped while replaying loops
        for a rollback) redoes those loops: their rows are dropped, to be written again."""
        text = files.read_text(self.path)
        if text is None:
            return
        lines = text.splitlines()
        kept = [line for line in lines if not _row_after(line, step)]
        if len(kept) == len(lines):
            return
        files.write_text_atomically(self.path, "".join(line + "\n" for line in kept))
        logging.info("metrics.jsonl: %d row(s) after step %d, where this run resumes, were "
                     "dropped (those loops are trained again)", len(lines) - len(kept), step)

    def _append(self, split: str, step: int, logs: Logs) -> None:
        record = {"split": split, "step": int(step)}
        # Counts (best_step, epoch) stay integers; metrics are floats.
        record.update({key: value if isinstance(value, int) and not isinstance(value, bool)
                       else float(value) for key, value in logs.items()})
        files.makedirs(os.path.dirname(self.path) or ".")
        files.append_line(self.path, json.dumps(record))

    def on_loop_end(self, step, logs):
        self._append("train", step, logs)

    def on_eval_end(self, step, logs):
        self._append("eval", step, logs)

    def on_loop_stats(self, step, stats):
        """A row {"split": "stats", "step": S, "time/train_secs": ..., "memory/...": ...}
        (`tapekit.run.accounting`): seconds as floats, bytes as integers."""
        self._append("stats", step, stats)

    def on_profile(self, step, analysis):
        """A row {"split": "profile", "step": END, "step_time_ms", "input_wait_percent",
        "verdict", "top_ops": [{"op", "percent"}], ...}: the analysis as it is."""
        files.makedirs(os.path.dirname(self.path) or ".")
        files.append_line(self.path, json.dumps({"split": "profile", "step": int(step), **analysis}))


def _row_after(line: str, step: int) -> bool:
    try:
        return int(json.loads(line)["step"]) > step
    except (ValueError, KeyError, TypeError):  # a torn last line: kept as it is
        return False
