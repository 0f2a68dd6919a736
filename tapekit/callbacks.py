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


class NonFiniteGuard(Callback):
    """Stops training with one error when a loop saw a NaN or infinite metric (`policy="stop"`).

    Detection is in the graph (`tapekit.loop`); this runs first at the loop's end, before
    anything records or checkpoints the loop, so the last good checkpoint stays the latest.
    With `policy="skip_step"` the updates of such steps were not applied; it only warns.
    """

    def __init__(self, policy: str = "stop"):
        self.policy = policy

    def on_loop_end(self, step, logs):
        result = self.trainer.last_loop
        if result is None or not result.nonfinite_steps:
            return
        bad_step = step - result.steps_run + result.first_nonfinite_offset + 1
        if self.policy == "skip_step":
            logging.warning("%d step(s) with non-finite values were skipped (first: %s at step %d)",
                            result.nonfinite_steps, result.first_nonfinite_metric, bad_step)
            return
        from tapekit.errors import TapekitError  # here to keep this module free of cycles
        checkpointer = self.trainer.checkpointer
        latest = checkpointer.latest if checkpointer else None
        kept = f"the last good checkpoint {latest} is kept" if latest else "nothing was saved"
        raise TapekitError(
            f"non-finite {result.first_nonfinite_metric} at step {bad_step}; training stopped "
            f"and this state was not checkpointed ({kept}). Check the data, lower the learning "
            "rate, or use --nan_policy=skip_step.")


class EarlyStopping(Callback):
    """Stops training when `metric` has not improved by `min_delta` for `patience` checks.

    `metric` names a training metric ("loss", checked after every loop) or, with an "eval_"
    prefix, an evaluation metric ("eval_loss", checked after every evaluation). `mode` is
    "min", "max" or "auto" (max for names containing "acc", else min).
    """

    def __init__(self, metric: str = "loss", patience: int = 5, min_delta: float = 0.0,
                 mode: str = "auto"):
        if mode not in ("min", "max", "auto"):
            raise ValueError(f"mode must be min, max or auto, got {mode!r}")
        self.metric = metric
        self.patience = patience
        self.min_delta = abs(min_delta)
        self.sign = -1.0 if (mode == "max" or (mode == "auto" and "acc" in metric)) else 1.0
        self.best = None
        self.wait = 0
        self.stopped_at = None

    def on_train_begin(self, step):
        self.best, self.wait, self.stopped_at = None, 0, None

    def _check(self, step, logs, prefix):
        name = self.metric[len(prefix):] if prefix else self.metric
        if name not in logs:
            return
        value = self.sign * logs[name]
        if self.best is None or value < self.best - self.min_delta:
            self.best, self.wait = value, 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            self.stopped_at = step
            self.trainer.stop_training = True
            logging.info("early stopping at step %d: %s has not improved by %g for %d checks "
                         "(best %.6g)", step, self.metric, self.min_delta, self.patience,
                         self.sign * self.best)

    def on_loop_end(self, step, logs):
        if not self.metric.startswith("eval_"):
            self._check(step, logs, "")

    def on_eval_end(self, step, logs):
        if self.metric.startswith("eval_"):
            self._check(step, logs, "eval_")


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
