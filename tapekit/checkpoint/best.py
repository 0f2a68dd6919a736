"""MODEL_DIR/best/: the checkpoint, and the exported model, of the best evaluation so far.

best/best.json says which: `{"metric", "value", "step", "checkpoint"}`. A resumed run, or
an evaluator process, continues from it. best/ has a checkpointer of its own, so
`max_checkpoints_to_keep` never touches it, and holds one checkpoint between saves. The
callback asking after each evaluation is `tapekit.callbacks.KeepBest`; the engine (during
`fit`) and the evaluator (`tapekit.run.evaluator`) make it with `keep_best_of`. Eager, on
every worker (the save may run collective ops); only the chief writes best.json and the
export.
"""

import json
import math
import os
from typing import Callable, Optional

import tensorflow as tf
from absl import logging

from tapekit.callbacks import KeepBest, evaluation_metric, resolve_mode
from tapekit.checkpoint import files
from tapekit.checkpoint.checkpointing import Checkpointer
from tapekit.errors import TapekitError
from tapekit.run import distribute

DIRECTORY = "best"  # in MODEL_DIR
RECORD = "best.json"


def read(directory: str) -> Optional[dict]:
    """What `directory`/best.json records, or None when there is none yet."""
    text = files.read_text(os.path.join(directory, RECORD))
    return None if text is None else json.loads(text)


class Best:
    """best/ (`directory`) for one `metric`: lower is better for `mode="min"`, higher for
    "max". `value` and `step` are the best so far (None: none yet), read from best.json when
    it records this metric. `checkpointer` saves into `directory`; `export(path)` writes the
    served model (None: the trainer does not export)."""

    def __init__(self, directory: str, metric: str, mode: str, checkpointer,
                 export: Optional[Callable[[str], None]] = None, is_chief: bool = True):
        self.directory, self.metric, self.checkpointer = directory, metric, checkpointer
        self.sign = -1.0 if mode == "max" else 1.0
        self.export, self.is_chief = export, is_chief
        self.value = self.step = None
        saved = read(directory)
        if saved is not None and saved.get("metric") == metric:
            self.value, self.step = saved["value"], saved["step"]

    def improves(self, value) -> bool:
        """Whether `value` (the metric's) beats the best so far; NaN never does."""
        return not math.isnan(value) and (self.value is None
                                          or self.sign * value < self.sign * self.value)

    def consider(self, step: int, value) -> bool:
        """Keeps the state at `step` (`keep`) if `value` improves; returns whether it did."""
        if not self.improves(value):
            return False
        self.keep(step, float(value))
        return True

    def keep(self, step: int, value: float) -> None:
        """Saves the new best so that a failure at any point (a full disk during the export)
        leaves best/ as it was: best.json naming a checkpoint that is there, and its model.
        The new checkpoint, the export and best.json.tmp are written first; then the model
        and best.json are renamed into place, and only then is the old checkpoint deleted."""
        previous = (read(self.directory) or {}).get("checkpoint")
        self.checkpointer.save(step)  # its manager keeps the previous one (max_to_keep=2)
        if self.is_chief:
            self._write(step, value, previous)
        _keep_only(self.checkpointer, self.checkpointer.latest)
        self.value, self.step = value, int(step)

    def _write(self, step: int, value: float, previous: Optional[str]) -> None:
        final = os.path.join(self.directory, "saved_model")
        partial, old = final + ".partial", final + ".old"
        record = os.path.join(self.directory, RECORD)
        try:
            if self.export is not None:
                files.remove_tree(partial)
                self.export(partial)
            files.write_text(record + ".tmp", json.dumps({
                "metric": self.metric, "value": value, "step": int(step),
                "checkpoint": self.checkpointer.latest}))
        except BaseException:
            files.remove_tree(partial)
            _drop_latest(self.checkpointer, previous)  # best/ stays at the previous best
            raise
        if self.export is not None:
            files.remove_tree(old)
            if files.exists(final):
                files.replace(final, old)
            files.replace(partial, final)
            files.remove_tree(old)
        files.replace(record + ".tmp", record)
        logging.info("new best %s=%.6g at step %d, kept in %s", self.metric, value, step,
                     self.directory)


def _keep_only(checkpointer, path: Optional[str]) -> None:
    """Deletes every checkpoint of best/ but `path`, listed or not (once best.json names it)."""
    found = {name.rsplit(".", 1)[0] for name in tf.io.gfile.glob(
        os.path.join(checkpointer.directory, "ckpt-*.index"))} if checkpointer.directory else set()
    checkpointer.relist([path] if path else [], delete=sorted(found - {path}))


def _drop_latest(checkpointer, previous: Optional[str]) -> None:
    """Deletes the checkpoint just saved and makes `previous` the latest again."""
    latest = checkpointer.latest
    if latest and latest != previous:
        checkpointer.relist([previous] if previous else [], delete=[latest])


def keep_best_of(engine, eval_data) -> Optional[KeepBest]:
    """The keeper of MODEL_DIR/best/ for `engine`'s run when `best_metric` is set (else
    None), checking first, before any training, that the evaluation on `eval_data` (a
    distributed dataset) reports that metric."""
    options = engine.options
    if not options.best_metric or engine.model_dir is None:
        return None
    names = engine.ema.metric_names(engine.eval_loop(eval_data.element_spec, eval_data).metric_names)
    if evaluation_metric(options.best_metric, names) is None:
        raise TapekitError(
            f"best_metric={options.best_metric!r} is not a metric of the evaluation, which "
            f"reports: {', '.join(names) or 'nothing'}. Name one of those (eval_step's keys "
            "or keras.metrics names).")
    is_chief = distribute.is_chief(engine.strategy)
    checkpointer = Checkpointer(engine.checkpoint_objects(), engine.model_dir, is_chief,
                                # 2: the previous best stays until the new one is whole
                                max_to_keep=2, task_id=distribute.task_id(engine.strategy),
                                subdirectory=DIRECTORY)
    trainer = engine.trainer
    export = None
    if trainer.export_model() is not None:
        def export(path):  # the served model: the averages, with use_ema (`tapekit.run.ema`)
            with engine.ema.averaged():
                trainer.export(path)
    return KeepBest(Best(os.path.join(engine.model_dir, DIRECTORY), options.best_metric,
                         resolve_mode(options.best_metric, options.best_mode), checkpointer,
                         export, is_chief))
