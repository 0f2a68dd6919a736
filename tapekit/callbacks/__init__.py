"""Callbacks: plain objects whose hooks the outer loop calls between compiled loops.

One callback per module; `base` holds the contract (`Callback`). tapekit's own callbacks
are assembled, in order, by `tapekit.run.controller.default_callbacks`; a user's run after
them. Nothing here imports TensorFlow at import time.
"""

from tapekit.callbacks.base import Callback, EveryNSteps, Logs, evaluation_metric, format_logs, resolve_mode
from tapekit.callbacks.csv_logger import CsvLogger
from tapekit.callbacks.early_stopping import EarlyStopping
from tapekit.callbacks.hparams import HParams
from tapekit.callbacks.keep_best import KeepBest
from tapekit.callbacks.loggers import loggers_for, run_settings
from tapekit.callbacks.metrics_file import MetricsFile
from tapekit.callbacks.mlflow_logger import MlflowLogger
from tapekit.callbacks.progress import LogProgress, ProgressBar
from tapekit.callbacks.sample_images import SampleImages, Samples
from tapekit.callbacks.save_checkpoints import SaveCheckpoints
from tapekit.callbacks.tensorboard import TensorBoard

__all__ = ["Callback", "CsvLogger", "EarlyStopping", "EveryNSteps", "HParams", "KeepBest",
           "LogProgress", "Logs", "MetricsFile", "MlflowLogger", "ProgressBar", "SampleImages",
           "Samples", "SaveCheckpoints", "TensorBoard", "evaluation_metric", "format_logs",
           "loggers_for", "resolve_mode", "run_settings"]
