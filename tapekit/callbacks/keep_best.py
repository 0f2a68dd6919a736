"""Keeps MODEL_DIR/best/ at the best evaluation value of a metric."""

import json
import os
import shutil
from typing import Callable, Optional

from absl import logging

from tapekit.checkpoint import files
from tapekit.callbacks.base import Callback, evaluation_metric, resolve_mode


class KeepBest(Callback):
    """Keeps `DIRECTORY` (MODEL_DIR/best/) at the best evaluation value of `metric`.

    After each evaluation that improves on the best so far (lower for `mode="min"`, higher
    for "max"), saves a checkpoint there with `checkpointer` (its own directory, one
    checkpoint: `max_checkpoints_to_keep` never touches it), has `export(path)` write the
    served model to best/saved_model (the chief, when the trainer exports), and records
    the value and step in best/best.json. Every evaluation's logs get `best_METRIC` and
    `best_step`, so the metrics file and TensorBoard (which run after it) record them. A
    resumed run, or an evaluator process, continues from best.json.
    """

    def __init__(self, directory: str, metric: str, mode: str, checkpointer,
                 export: Optional[Callable[[str], None]] = None, is_chief: bool = True):
        self.directory, self.metric, self.checkpointer = directory, metric, checkpointer
        self.sign = -1.0 if resolve_mode(metric, mode) == "max" else 1.0
        self.export, self.is_chief = export, is_chief
        self.best = self.best_step = None
        path = os.path.join(directory, "best.json")
        if os.path.exists(path):
            with open(path) as stream:
                saved = json.load(stream)
            if saved.get("metric") == metric:
                self.best, self.best_step = saved["value"], saved["step"]

    def _recorded_checkpoint(self) -> Optional[str]:
        """The checkpoint best.json names (None: none yet)."""
        path = os.path.join(self.directory, "best.json")
        if not os.path.exists(path):
            return None
        with open(path) as stream:
            return json.load(stream).get("checkpoint")

    def on_eval_end(self, step, logs):
        value = logs.get(evaluation_metric(self.metric, logs) or self.metric)
        if value is None:
            from tapekit.errors import TapekitError
            raise TapekitError(f"best_metric {self.metric!r} is not among the evaluation's "
                               f"metrics ({', '.join(sorted(logs))}).")
        if value == value and (self.best is None or self.sign * value < self.sign * self.best):
            self._keep(step, float(value))
        if self.best is not None:
            logs[f"best_{self.metric}"] = self.best
            logs["best_step"] = int(self.best_step)

    def _keep(self, step: int, value: float) -> None:
        """Saves the new best so that a failure at any point (a full disk during the export)
        leaves best/ as it was: best.json naming a checkpoint that is there, and its model.
        The new checkpoint, the export and best.json.tmp are written first; then the model
        and best.json are renamed into place, and only then is the old checkpoint deleted."""
        previous = self._recorded_checkpoint()
        self.checkpointer.save(step)  # the manager keeps the previous one (see best.py)
        if self.is_chief:
            final = os.path.join(self.directory, "saved_model")
            partial, old = final + ".partial", final + ".old"
            record = {"metric": self.metric, "value": value, "step": int(step),
                      "checkpoint": self.checkpointer.latest}
            try:
                if self.export is not None:
                    shutil.rmtree(partial, ignore_errors=True)
                    self.export(partial)
                with files.open_for_writing(os.path.join(self.directory, "best.json.tmp")) as stream:
                    json.dump(record, stream)
            except BaseException:
                shutil.rmtree(partial, ignore_errors=True)
                self.checkpointer.drop_latest(previous)  # best/ stays at the previous best
                raise
            if self.export is not None:
                shutil.rmtree(old, ignore_errors=True)
                if os.path.exists(final):
                    os.replace(final, old)
                os.replace(partial, final)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(os.path.join(self.directory, "best.json.tmp"),
                       os.path.join(self.directory, "best.json"))
            logging.info("new best %s=%.6g at step %d, kept in %s", self.metric, value, step,
                         self.directory)
        self.checkpointer.keep_only_latest()
        self.best, self.best_step = value, int(step)
