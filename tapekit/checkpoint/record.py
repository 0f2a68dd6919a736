"""The record of a run (`MODEL_DIR/run.json`, and `flags.txt` from the command line), and
the check that a resumed run is still the same run.

`run.json` holds the versions, the trainer class and its own arguments, the strategy,
replicas, devices, workers and precision, the start time, the command line and every
setting (options with their resolved defaults, and `fit`'s arguments). When a run resumes
from a checkpoint, its settings are compared with the record before anything is restored:

* a change that breaks exact resume or the model (the trainer class or its own arguments,
  such as `--model` or `--data`; `global_batch_size`, `seed`, `precision`) is refused with
  one error listing each difference, unless named in `allow_changes`;
* any other change (`train_steps`, logging, evaluation, checkpoint cadence, ...) is logged.

Only the chief writes. Eager, once per `fit` that starts or resumes a run.
"""

import contextlib
import contextvars
import datetime
import json
import os
import platform
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

from absl import logging

from tapekit.checkpoint import files
from tapekit.errors import TapekitError

RECORD_FILE = "run.json"
FLAGS_FILE = "flags.txt"
# Settings whose change breaks exact resume or the model (besides the trainer's own arguments).
REFUSED = ("trainer", "global_batch_size", "seed", "precision")
# Where the run is written or restored from: never a change of the run itself.
IGNORED = ("model_dir", "restore_from", "allow_changes")

# The command line's argv and flags while it runs its trainer (`command_line`); outside it
# (the Python API, even later in the same process) the record has sys.argv and no flags.
_COMMAND_LINE: contextvars.ContextVar = contextvars.ContextVar("tapekit_command_line",
                                                               default={})


@contextlib.contextmanager
def command_line(argv: Sequence[str], flags_text: Optional[str], mode: Optional[str] = None):
    """Used by the command line around its run: its argv, every flag it used in flagfile
    format (written to MODEL_DIR/flags.txt with the record), and its --mode."""
    token = _COMMAND_LINE.set({"argv": list(argv), "flags": flags_text, "mode": mode})
    try:
        yield
    finally:
        _COMMAND_LINE.reset(token)


def make_record(trainer_class: type, arguments: Dict[str, Any], settings: Dict[str, Any],
                strategy) -> Dict[str, Any]:
    """The record of a run starting now (`settings`: options and `fit` arguments)."""
    import keras
    import tensorflow as tf

    import tapekit
    from tapekit.run import distribute
    try:
        devices = [str(d) for d in strategy.extended.worker_devices]
    except RuntimeError:  # the default strategy: TensorFlow's default device
        gpus = tf.config.list_logical_devices("GPU")
        devices = [(gpus or tf.config.list_logical_devices("CPU"))[0].name]
    return {
        "versions": {"tapekit": tapekit.__version__, "tensorflow": tf.__version__,
                     "keras": keras.__version__, "python": platform.python_version()},
        "trainer": f"{trainer_class.__module__}:{trainer_class.__qualname__}",
        "arguments": _jsonable(arguments),
        "strategy": type(strategy).__name__,
        "replicas": strategy.num_replicas_in_sync,
        "devices": devices,
        "workers": distribute.num_workers(strategy),
        "precision": settings.get("precision"),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": _COMMAND_LINE.get().get("argv", list(sys.argv)),
        "mode": _COMMAND_LINE.get().get("mode"),  # the command line's --mode; None: Python
        "settings": _jsonable(settings),
        "resumes": [],
    }


def read(model_dir: str) -> Optional[Dict[str, Any]]:
    path = os.path.join(model_dir, RECORD_FILE)
    try:
        text = files.read_text(path)
        return None if text is None else json.loads(text)
    except (OSError, ValueError) as error:
        raise TapekitError(f"the run record {path} is unreadable ({error}); move it aside to "
                           "resume without the check, or use a new --model_dir.") from None


def write(model_dir: str, record: Dict[str, Any]) -> None:
    """Writes run.json (atomically) and, from the command line, flags.txt."""
    files.write_text_atomically(os.path.join(model_dir, RECORD_FILE),
                                json.dumps(record, indent=1) + "\n")
    flags_text = _COMMAND_LINE.get().get("flags")
    if flags_text is not None:
        files.write_text_atomically(os.path.join(model_dir, FLAGS_FILE), flags_text)


def differences(old: Dict[str, Any], new: Dict[str, Any]) -> Dict[str, Tuple[Any, Any]]:
    """name -> (old, new) for each setting (or trainer argument) that differs."""
    def flat(record):
        values = {"trainer": record.get("trainer")}
        values.update(record.get("settings", {}))
        values.update(record.get("arguments", {}))
        return values
    before, after = flat(old), flat(new)
    return {name: (before.get(name), after.get(name))
            for name in sorted(set(before) | set(after))
            if name not in IGNORED and before.get(name) != after.get(name)}


def check_resume(old: Dict[str, Any], new: Dict[str, Any], allowed: Sequence[str],
                 model_dir: str, step: int, safe: Sequence[str] = ()) -> Dict[str, Tuple[Any, Any]]:
    """Raises if `new` changes a refused setting of `old` not in `allowed`; logs the rest.

    Refused: `REFUSED` and the trainer's own arguments except those in `safe` (its class's
    `arguments_safe_to_change`). Returns the differences (allowed or harmless too).
    """
    changes = differences(old, new)
    refused_names = (set(REFUSED) | set(old.get("arguments", {}))
                     | set(new.get("arguments", {}))) - set(safe)
    unknown = sorted(set(allowed) - refused_names - set(changes))
    if unknown:
        raise TapekitError(
            f"allow_changes names {', '.join(unknown)}, which is not a setting of this run; the "
            f"settings a resume may change only with it are: {', '.join(sorted(refused_names))}.")
    refused = {name: change for name, change in changes.items()
               if name in refused_names and name not in allowed}
    if refused:
        listed = "; ".join(f"{name} {_show(a)} → {_show(b)}" for name, (a, b) in refused.items())
        raise TapekitError(
            f"{model_dir} holds a run at step {step} that was started with other settings, and "
            f"resuming would silently change it: {listed}. Resume with the old values, use a new "
            f"--model_dir, or allow the change on purpose: --allow_changes={','.join(refused)}. "
            "Nothing was restored or changed.")
    if changes:
        logging.info("resuming at step %d with changed settings: %s", step,
                     "; ".join(f"{name} {_show(a)} → {_show(b)}" for name, (a, b) in changes.items()))
    return changes


def resumed(old: Dict[str, Any], new: Dict[str, Any], step: int,
            changes: Dict[str, Tuple[Any, Any]],
            fallback: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The record after a resume: the new settings, and the resume appended to `resumes`
    (with `fell_back`: the damaged checkpoints set aside, when it fell back on an older one)."""
    record = dict(new)
    record["started"] = old.get("started", new["started"])
    entry = {"time": new["started"], "step": step, "command": new["command"],
             "changes": {name: [a, b] for name, (a, b) in changes.items()}}
    if fallback:
        entry["fell_back"] = fallback
    record["resumes"] = list(old.get("resumes", [])) + [entry]
    if old.get("skipped"):  # nan_policy=rollback's: a resumed run skips them too
        record["skipped"] = old["skipped"]
    if old.get("stopped"):  # where max_time stopped earlier fits (`tapekit.run.time_budget`)
        record["stopped"] = old["stopped"]
    if old.get("logger_runs"):  # e.g. the MLflow run a resumed run continues
        record["logger_runs"] = old["logger_runs"]
    return record


def record_skipped(model_dir: str, ranges: Sequence[Tuple[int, int]]) -> None:
    """Records the global step ranges `nan_policy=rollback` skips: run.json `skipped`, and
    from the command line `--skip_steps` in flags.txt (a rerun with it skips them too)."""
    record = read(model_dir) or {}
    record["skipped"] = [[first, last] for first, last in ranges]
    command_line = _COMMAND_LINE.get()
    flags_text = command_line.get("flags")
    if flags_text is not None:
        value = ",".join(f"{a}-{b}" if a != b else str(a) for a, b in ranges)
        lines = [line for line in flags_text.splitlines()
                 if not line.startswith("--skip_steps=")]
        command_line["flags"] = "\n".join(lines + [f"--skip_steps={value}"]) + "\n"
    write(model_dir, record)


def record_logger(model_dir: str, name: str, values: Dict[str, Any]) -> None:
    """Keeps what logger `name` needs to continue this run after a resume (the MLflow run's
    id) in run.json `logger_runs`; a resume carries it over (`resumed`). Only run.json is written."""
    record = read(model_dir) or {}
    record["logger_runs"] = {**record.get("logger_runs", {}), name: values}
    files.write_text_atomically(os.path.join(model_dir, RECORD_FILE),
                                json.dumps(record, indent=1) + "\n")


def trainer_arguments(trainer_class: type, args: Sequence, kwargs: Dict[str, Any],
                      option_names: Sequence[str]) -> Dict[str, Any]:
    """The trainer class's own constructor arguments (defaults applied), without tapekit's
    options: what defines this trainer's model and data (e.g. `model`, `data`)."""
    import inspect
    signature = inspect.signature(trainer_class.__init__)
    try:
        bound = signature.bind(None, *args, **kwargs)
    except TypeError:  # the constructor will say what is wrong
        return {}
    bound.apply_defaults()
    result: Dict[str, Any] = {}
    for name, value in list(bound.arguments.items())[1:]:
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            result.update({k: v for k, v in value.items() if k not in option_names})
        elif kind is not inspect.Parameter.VAR_POSITIONAL and name not in option_names:
            result[name] = value
    return result


def _show(value) -> str:
    return "unset" if value is None else json.dumps(value)


def _jsonable(values: Dict[str, Any]) -> Dict[str, Any]:
    result = {}
    for name, value in values.items():
        if isinstance(value, tuple):
            value = list(value)
        try:
            json.dumps(value)
        except (TypeError, ValueError):  # e.g. a tf.distribute.Strategy object
            value = f"<{type(value).__name__}>"
        result[name] = value
    return result


def explicit_learning_rate_change(old: Dict[str, Any], new_learning_rate) -> Optional[List[float]]:
    """(old, new) when a learning rate was given explicitly and differs from the record's."""
    if new_learning_rate is None:
        return None
    previous = old.get("settings", {}).get("learning_rate")
    return None if previous == new_learning_rate else [previous, new_learning_rate]
