"""Wiring MODEL_DIR/best/ for a run: `tapekit.callbacks.KeepBest` with its own checkpointer."""

import os
from typing import Optional

from tapekit.run import distribute
from tapekit.callbacks import KeepBest, evaluation_metric
from tapekit.checkpoint.checkpointing import Checkpointer
from tapekit.errors import TapekitError


def keep_best_of(engine, eval_data) -> Optional[KeepBest]:
    """The keeper of MODEL_DIR/best/ for `engine`'s run when `best_metric` is set (else
    None), checking first, before any training, that the evaluation on `eval_data` (a
    distributed dataset) reports that metric."""
    options = engine.options
    if not options.best_metric or engine.model_dir is None:
        return None
    names = engine.eval_loop(eval_data.element_spec, eval_data).metric_names
    if evaluation_metric(options.best_metric, names) is None:
        raise TapekitError(
            f"best_metric={options.best_metric!r} is not a metric of the evaluation, which "
            f"reports: {', '.join(names) or 'nothing'}. Name one of those (eval_step's keys "
            "or keras.metrics names).")
    is_chief = distribute.is_chief(engine.strategy)
    checkpointer = Checkpointer(engine.checkpoint_objects(), engine.model_dir, is_chief,
                                # 2: the previous best stays until the new one is whole
                                max_to_keep=2, task_id=distribute.task_id(engine.strategy),
                                subdirectory="best")
    trainer = engine.trainer
    export = trainer.export if trainer.export_model() is not None else None
    return KeepBest(os.path.join(engine.model_dir, "best"), options.best_metric,
                    options.best_mode, checkpointer, export, is_chief)
