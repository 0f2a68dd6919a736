"""Callbacks: plain objects whose hooks the outer loop calls between compiled loops.

Hooks run eagerly in Python on every worker, at loop boundaries only (never per step).
They may read the trainer (`self.trainer`) and ask the loop to stop by setting
`self.trainer.stop_training = True`; they never reach into the compiled step.
"""

import json
import os
from typing import Dict, Optional

from absl import logging

Logs = Dict[str, float]


class Callback:
    """Base class: override any of the hooks below."""

    trainer = None

    def set_trainer(self, trainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, step: int) -> None:
        """Before the first loop of `fit`; `step` is the global step training starts from."""

    def on_loop_end(self, step: int, logs: Logs) -> None:
        """After each compiled loop; `logs` holds the loop's mean metrics and its speed."""

    def on_eval_end(self, step: int, logs: Logs) -> None:
        """After each evaluation, with the evaluation's metrics."""

    def on_train_end(self, step: int, logs: Optional[Logs]) -> None:
        """After the last loop of `fit` (also when a callback stopped training)."""


class MetricsFile(Callback):
    """Appends one JSON object per loop (and per evaluation) to `MODEL_DIR/metrics.jsonl`.

    The file is opened, appended to and closed each time, so a killed job leaves
    every finished loop on disk. Only the chief writes it.
    """

    def __init__(self, path: str):
        self.path = path

    def _append(self, split: str, step: int, logs: Logs) -> None:
        record = {"split": split, "step": int(step)}
        record.update({key: float(value) for key, value in logs.items()})
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path, "a") as stream:
            stream.write(json.dumps(record) + "\n")

    def on_loop_end(self, step, logs):
        self._append("train", step, logs)

    def on_eval_end(self, step, logs):
        self._append("eval", step, logs)


class SaveCheckpoints(Callback):
    """Saves after a loop that passes a multiple of `every_steps`, and at the end of training.

    Runs on every worker (saving is collective under multi-worker strategies).
    """

    def __init__(self, checkpointer, every_steps: Optional[int]):
        self.checkpointer = checkpointer
        self.every_steps = every_steps
        self._last_saved = None

    def on_train_begin(self, step):
        self._last_saved = step

    def _save(self, step):
        if step != self._last_saved:
            self.checkpointer.save(step)
            self._last_saved = step

    def on_loop_end(self, step, logs):
        if self.every_steps and step // self.every_steps > self._last_saved // self.every_steps:
            self._save(step)

    def on_train_end(self, step, logs):
        self._save(step)


class LogProgress(Callback):
    """One absl log line per loop: step, metrics and speed (what a batch job's log shows)."""

    def __init__(self, train_steps: int):
        self.train_steps = train_steps

    def on_loop_end(self, step, logs):
        logging.info("step %d/%d: %s", step, self.train_steps, format_logs(logs))

    def on_eval_end(self, step, logs):
        logging.info("eval at step %d: %s", step, format_logs(logs))


def format_logs(logs: Logs) -> str:
    return ", ".join(f"{key}={value:.5g}" for key, value in logs.items())
