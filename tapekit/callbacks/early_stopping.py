"""Stops training when a metric stops improving."""

from absl import logging

from tapekit.callbacks.base import Callback, evaluation_metric, resolve_mode


class EarlyStopping(Callback):
    """Stops training when `metric` has not improved by `min_delta` for `patience` checks.

    `metric` names a training metric ("loss", checked after every loop) or, with an "eval_"
    prefix, an evaluation metric ("eval_loss", checked after every evaluation). `mode` is
    "min", "max" or "auto" (`resolve_mode`: max for names with acc, auc, precision or recall
    in them, else min).
    """

    def __init__(self, metric: str = "loss", patience: int = 5, min_delta: float = 0.0,
                 mode: str = "auto"):
        if mode not in ("min", "max", "auto"):
            raise ValueError(f"mode must be min, max or auto, got {mode!r}")
        self.metric = metric
        self.patience = patience
        self.min_delta = abs(min_delta)
        self.sign = -1.0 if resolve_mode(metric, mode) == "max" else 1.0
        self.best = None
        self.wait = 0
        self.stopped_at = None

    def on_train_begin(self, step):
        self.best, self.wait, self.stopped_at = None, 0, None

    def _check(self, step, logs, name):
        if name is None or name not in logs:
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
            self._check(step, logs, self.metric)

    def on_eval_end(self, step, logs):
        if self.metric.startswith("eval_"):
            self._check(step, logs, evaluation_metric(self.metric, logs))
