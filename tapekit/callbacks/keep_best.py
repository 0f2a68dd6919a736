"""Keeps MODEL_DIR/best/ at the best evaluation value of a metric."""

from tapekit.callbacks.base import Callback, evaluation_metric
from tapekit.errors import TapekitError


class KeepBest(Callback):
    """Offers each evaluation's value of `best.metric` to `best` (a
    `tapekit.checkpoint.best.Best`, which keeps MODEL_DIR/best/ and best.json when the value
    improves), and adds `best_METRIC` and `best_step` to the evaluation's logs, so that the
    metrics file and TensorBoard (which run after it) record them. Made by
    `tapekit.checkpoint.best.keep_best_of`."""

    def __init__(self, best):
        self.best = best

    def on_eval_end(self, step, logs):
        metric = self.best.metric
        value = logs.get(evaluation_metric(metric, logs) or metric)
        if value is None:
            raise TapekitError(f"best_metric {metric!r} is not among the evaluation's "
                               f"metrics ({', '.join(sorted(logs))}).")
        self.best.consider(step, value)
        if self.best.value is not None:
            logs[f"best_{metric}"] = self.best.value
            logs["best_step"] = int(self.best.step)
