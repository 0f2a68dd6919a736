"""Starting a run where it left off: the run record, the checkpoint, the input's position.

Called by the engine once, on a trainer's first `fit` (`start`), and by `Trainer.restore`
and the evaluator (`restore_read_only`). Eager, on every worker; only the chief writes.
"""

import os
from typing import Any, Dict, Optional

import tensorflow as tf
from absl import logging

from tapekit import compat
from tapekit import options as options_lib
from tapekit.checkpoint import checkpointing
from tapekit.checkpoint import damaged as damaged_lib
from tapekit.checkpoint import record as record_lib
from tapekit.checkpoint import state as state_lib
from tapekit.checkpoint.checkpointing import Checkpointer
from tapekit.errors import TapekitError
from tapekit.input import run_input
from tapekit.run import distribute


def start(engine, dataset, in_memory, fit_settings: Dict[str, Any], positioned: bool = True):
    """Checks and writes the run record (`tapekit.checkpoint.record`), restores `restore_from` or the
    latest checkpoint, and returns the training iterator positioned where the run left off
    (None for in-memory input, which is a function of the step, and when not `positioned`:
    training by epochs positions its own, `tapekit.input.epochs`). A learning rate given
    explicitly for a resumed run replaces the checkpoint's."""
    fallback = _fallback(engine)
    learning_rate_change = record_run(engine, fit_settings, fallback)  # may refuse: first
    if fallback:
        _set_aside(engine, fallback)
    iterator = _restore_and_position(engine, dataset, in_memory is None and positioned)
    if learning_rate_change:
        _override_learning_rates(engine, *learning_rate_change)
    return iterator


def restore(engine, checkpoint: Optional[str] = None) -> int:
    """`Trainer.restore`: builds, restores `checkpoint` (else `restore_from`, else the latest
    checkpoint of the model_dir), returns the step; trains and writes nothing."""
    path = checkpoint or engine.options.restore_from or (
        checkpointing.latest(os.path.join(engine.model_dir, "checkpoints"))
        if engine.model_dir else None)
    if path is None:
        raise TapekitError("nothing to restore: give a checkpoint, restore_from, or a model_dir "
                           "that has checkpoints (train first).")
    checkpointing.check_restorable(path)
    engine.ensure_built()
    engine.ema.swap_out()  # (the averages a fit or restore left in the models are dropped)
    restore_read_only(engine, path)
    engine.ema.swap_in()  # with use_ema, the models hold the averages, as after fit
    return engine.current_step


def restore_path(engine) -> Optional[str]:
    """`restore_from`, else the latest checkpoint of the run's model_dir, else None."""
    checkpointer = engine.checkpointer
    return engine.options.restore_from or (checkpointer.latest if checkpointer else None)


def restore_read_only(engine, path: str) -> None:
    """Restores `path` with a checkpointer that can never write (checked, see Checkpointer)."""
    Checkpointer(engine.checkpoint_objects(), None, True).restore(path)
    logging.info("restored checkpoint %s at step %d", path, engine.current_step)


def built_learning_rates(trainer):
    """(optimizer, its learning rate) for each optimizer without a schedule, as `build()`
    left it: what `_override_learning_rates` puts back."""
    return [(optimizer, float(tf.convert_to_tensor(optimizer.learning_rate)))
            for optimizer in state_lib.optimizers(vars(trainer)).values()
            if compat.learning_rate_schedule(optimizer) is None]


def _fallback(engine) -> Optional[Dict[str, Any]]:
    """When the newest checkpoint of the model_dir cannot be read whole (a torn write, a
    truncated copy), the newest one that can becomes the latest (`fall_back_to`), so that
    a requeued job restarts by itself; nothing is moved yet (`_set_aside`, once the run
    record allows the resume). Returns what it found, for run.json. The checkpoints on disk
    decide, not only the `checkpoint` file: one it names whose files are gone is damaged
    too, and a whole one it lost is found. An explicit `restore_from` never falls back;
    checkpoints of which none is whole are refused in one line that touches nothing."""
    checkpointer = engine.checkpointer
    if (engine.options.restore_from or checkpointer is None
            or not checkpointing.candidates(checkpointer.directory)):
        return None
    good, damaged = damaged_lib.newest_readable(checkpointer.directory)
    if not damaged:
        return None
    if good is None:  # never start from step 0 over checkpoints that could not be read
        path, why = damaged[0]
        more = f" (and {len(damaged) - 1} older)" if len(damaged) > 1 else ""
        raise TapekitError(
            f"{checkpointer.directory} has checkpoints but none is whole: {path}{more} cannot "
            f"be read ({why}). Nothing was restored, moved or written. Put the missing files "
            "back, resume from a copy with --restore_from, or use a new --model_dir.")
    checkpointer.fall_back_to(good)
    return {"damaged": [path for path, _ in damaged], "why": damaged[0][1],
            "resumed_from": good}


def _set_aside(engine, fallback: Dict[str, Any]) -> None:
    """Moves the damaged checkpoints aside, never deleting them, and says so in one line."""
    checkpointer, good = engine.checkpointer, fallback["resumed_from"]
    aside = damaged_lib.set_aside_after(checkpointer, checkpointing.saved_step(good))
    checkpointer.fall_back_to(good)
    logging.warning("checkpoint %s is damaged (%s); moved to %s and resuming from %s",
                    fallback["damaged"][0], fallback["why"], aside, good)


def record_run(engine, fit_settings: Dict[str, Any], fallback: Optional[Dict[str, Any]] = None):
    """Writes MODEL_DIR/run.json (the chief), or, when resuming a recorded run, first
    refuses settings that would silently change it. Returns (old, new) learning rates
    when one was given explicitly and differs from the record's, else None."""
    if engine.model_dir is None:
        return None
    options = engine.options
    settings = {name: getattr(options, name)
                for name in options_lib.names(options_lib.TRAINER_OPTIONS)}
    settings.update(global_batch_size=engine.global_batch_size,
                    learning_rate=engine.learning_rate, **fit_settings)
    new = record_lib.make_record(type(engine.trainer), engine.arguments, settings, engine.strategy)
    new["parameters"] = engine.parameters
    old = record_lib.read(engine.model_dir)
    path = restore_path(engine)
    change = None
    if old is not None and path is not None:
        step = checkpointing.saved_step(path)
        _check_same_measure(old, new, engine.model_dir, step)
        changes = record_lib.check_resume(
            old, new, options.allow_changes or (), engine.model_dir, step,
            safe=getattr(engine.trainer, "arguments_safe_to_change", ()))
        change = record_lib.explicit_learning_rate_change(old, options.learning_rate)
        new = record_lib.resumed(old, new, step, changes, fallback)
    if distribute.is_chief(engine.strategy):
        record_lib.write(engine.model_dir, new)
    return change


def _check_same_measure(old, new, model_dir: str, step: int) -> None:
    """Refuses to resume a run trained by train_steps with train_epochs, or the other way:
    an epoch's position is checkpointed only when training by epochs."""
    def by_epochs(record):
        return record.get("settings", {}).get("train_epochs") is not None
    if "settings" in old and by_epochs(old) != by_epochs(new):
        was, now = ("train_epochs", "train_steps") if by_epochs(old) else ("train_steps",
                                                                          "train_epochs")
        raise TapekitError(
            f"{model_dir} holds a run at step {step} trained by {was} "
            f"({was}={old['settings'].get(was)}); this one gives {now}. A run is measured in "
            f"one of them from its start (the epoch's position is checkpointed only by epochs): "
            f"resume with {was}, or use a new --model_dir. Nothing was restored or changed.")


def _restore_and_position(engine, dataset, needs_iterator: bool):
    checkpointer = engine.checkpointer
    path = restore_path(engine)
    if checkpointer is None:
        if path:  # no model_dir: restore the state, nothing is saved later
            restore_read_only(engine, path)
        return engine.input.train_iterator(dataset, engine.current_step) if needs_iterator else None
    iterator = None if not needs_iterator else run_input.positioned_iterator(
        lambda skip_steps: engine.input.train_iterator(dataset, skip_steps), checkpointer, path,
        may_save=engine.options.nan_policy != "rollback")
    if path:
        checkpointer.restore(path)
        if engine.options.restore_from:  # restarted from an older checkpoint: newer ones go aside
            damaged_lib.set_aside_after(checkpointer, engine.current_step)
        logging.info("resumed from checkpoint %s at step %d", path, engine.current_step)
    return iterator


def _override_learning_rates(engine, old, new) -> None:
    for optimizer, rate in engine.built_learning_rates:
        optimizer.learning_rate = rate
    logging.info("learning rate %s given for this resumed run replaces the checkpoint's %s",
                 new, old)
