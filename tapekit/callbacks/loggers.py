"""Where a run's metrics go: the loggers `--loggers` names, made here for `fit`.

A logger is a `Callback`: it is given each loop's metrics (`on_loop_end`), each
evaluation's (`on_eval_end`), where a loop's time and memory went (`on_loop_stats`) and a
profile's numbers (`on_profile`), between `on_train_begin` and `on_train_end` (or
`on_exception`). tapekit's own are chosen by name (`loggers_for`); a user's is any
`Callback` passed to `fit(callbacks=[...])` or returned by the trainer's `callbacks()`.
Only the chief logs. `run_settings` flattens MODEL_DIR/run.json into the scalar settings
that HParams and MLflow show.
"""

import os
from typing import Any, Dict, List, Optional, Union

from tapekit.callbacks.base import Callback

Setting = Union[str, int, float, bool]
# run.json's entries that are settings of the run (besides `settings` and `arguments`).
_RECORD_SETTINGS = ("trainer", "strategy", "replicas", "workers", "precision")


def loggers_for(options, model_dir: str, summary_writers=None, samples=None) -> List[Callback]:
    """The loggers `options.loggers` names, in that order, writing to `model_dir` (the
    chief's): tensorboard (`TensorBoard` into MODEL_DIR/summaries, sharing the run's
    `summary_writers` and the image `samples`, and the `HParams` session), jsonl
    (`MetricsFile`), csv (`CsvLogger`), mlflow (`MlflowLogger`; a missing MLflow is
    refused earlier, by `options.logger_names`)."""
    from tapekit.callbacks.csv_logger import CsvLogger
    from tapekit.callbacks.hparams import HParams
    from tapekit.callbacks.metrics_file import MetricsFile
    from tapekit.callbacks.tensorboard import TensorBoard
    result: List[Callback] = []
    for name in options.loggers:
        if name == "tensorboard":
            result.append(TensorBoard(os.path.join(model_dir, "summaries"),
                                      options.sample_every_steps, samples=samples,
                                      writers=summary_writers))
            result.append(HParams(model_dir))
        elif name == "jsonl":
            result.append(MetricsFile(os.path.join(model_dir, "metrics.jsonl")))
        elif name == "csv":
            result.append(CsvLogger(os.path.join(model_dir, "metrics.csv")))
        elif name == "mlflow":
            from tapekit.callbacks.mlflow_logger import MlflowLogger
            result.append(MlflowLogger(model_dir, experiment=options.mlflow_experiment))
    return result


def run_settings(model_dir: str, record: Optional[Dict[str, Any]] = None) -> Dict[str, Setting]:
    """The run's settings from MODEL_DIR/run.json (or `record`) as flat scalars: the trainer
    class, strategy, replicas, workers and precision, every option and `fit` argument, and
    the trainer's own arguments (a nested value's keys joined by "/", a list's items by ",";
    unset values left out). {} when there is no record."""
    from tapekit.checkpoint import record as record_lib
    record = record if record is not None else (record_lib.read(model_dir) or {})
    values: Dict[str, Any] = {name: record[name] for name in _RECORD_SETTINGS if name in record}
    values.update(record.get("settings", {}))
    values.update(record.get("arguments", {}))
    result: Dict[str, Setting] = {}
    _flatten("", values, result)
    return result


def _flatten(prefix: str, value: Any, into: Dict[str, Setting]) -> None:
    if isinstance(value, dict):
        for key, inner in value.items():
            _flatten(f"{prefix}/{key}" if prefix else str(key), inner, into)
    elif isinstance(value, (list, tuple)):
        into[prefix] = ",".join(str(item) for item in value)
    elif value is not None:
        into[prefix] = value if isinstance(value, (str, int, float, bool)) else str(value)


def numbers(values: Dict[str, Any]) -> Dict[str, float]:
    """The entries of `values` (a profile's analysis, say) that are numbers, as floats."""
    return {key: float(value) for key, value in values.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}
