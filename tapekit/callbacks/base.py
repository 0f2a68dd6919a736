"""The `Callback` contract, and what several callbacks share (`EveryNSteps`, how a metric
name is read).

Hooks run eagerly in Python on every worker, at loop boundaries only (never per step).
They get the loop's metrics (`logs`), may read the user's trainer (`self.trainer`: its
models and hooks) and ask the loop to stop by setting `self.trainer.stop_training = True`;
they never reach into the compiled step or tapekit's engine.
"""

from typing import Dict, Optional

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

    def on_loop_stats(self, step: int, stats: Logs) -> None:
        """After each loop and all that followed it (callbacks, evaluation, checkpoint
        saves), before the next: where the loop's wall time went (`time/...` seconds) and
        memory (`memory/...` bytes). The last loop's comes after `on_train_end`, so that the
        final save counts. The loggers record it; progress bars ignore it."""

    def on_profile(self, step: int, analysis: Dict[str, object]) -> None:
        """After a `--profile_steps` trace ending at global step `step` was analysed:
        `step_time_ms`, `input_wait_percent`, `verdict`, `top_ops`, ... (the loggers record
        the numbers)."""

    def on_epoch_end(self, step: int, epoch: int) -> None:
        """Training by epochs (`train_epochs`): after the loop that ended epoch `epoch`
        (1-based), before any evaluation of it."""

    def on_train_end(self, step: int, logs: Optional[Logs]) -> None:
        """After the last loop of `fit` (also when a callback stopped training)."""

    def on_exception(self, step: int, error: BaseException) -> None:
        """When `fit` stops with an exception (a step, an evaluation or a callback raised, or
        a second Ctrl-C) at global step `step`, instead of `on_train_end`; the exception then
        reaches the caller. A logger closes its run as failed here; what this raises is
        logged, not raised."""


class EveryNSteps(Callback):
    """Base for actions taken after the first loop end past each multiple of `every_steps`
    (None: never during training) and once more at the end of training."""

    def __init__(self, every_steps: Optional[int]):
        self.every_steps = every_steps
        self._last = None

    def on_train_begin(self, step):
        self._last = step

    def due(self, step: int) -> bool:
        """True when `step` is past a multiple of `every_steps` not acted on yet."""
        return bool(self.every_steps) and step // self.every_steps > self._last // self.every_steps

    def on_loop_end(self, step, logs):
        if self.due(step):
            self._run(step)

    def on_train_end(self, step, logs):
        if step != self._last:
            self._run(step)

    def _run(self, step):
        self._last = step
        self.act(step)

    def act(self, step: int) -> None:
        raise NotImplementedError


def resolve_mode(metric: str, mode: str) -> str:
    """"min" or "max"; "auto" is max for accuracy/AUC-like names, else min."""
    if mode != "auto":
        return mode
    name = metric.lower()
    return "max" if any(word in name for word in ("acc", "auc", "precision", "recall")) else "min"


def evaluation_metric(name: str, names) -> Optional[str]:
    """The evaluation metric among `names` that `name` means, in the one convention of
    `--best_metric` and `--early_stopping_metric`: "eval_X" is the evaluation's X (or its
    "eval_X" when the evaluation reports that name itself); `--best_metric`, always an
    evaluation metric, may also be written X. None if there is none."""
    if name in names:
        return name
    if name.startswith("eval_") and name[len("eval_"):] in names:
        return name[len("eval_"):]
    return None


def format_logs(logs: Logs) -> str:
    return ", ".join(f"{key}={value:.5g}" for key, value in logs.items())
