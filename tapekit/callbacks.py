"""Callbacks: plain objects whose hooks the outer loop calls between compiled loops.

Hooks run eagerly in Python on every worker, at loop boundaries only (never per step).
They get the loop's metrics (`logs`), may read the user's trainer (`self.trainer`: its
models and hooks) and ask the loop to stop by setting `self.trainer.stop_training = True`;
they never reach into the compiled step or tapekit's engine. tapekit's own callbacks
are assembled, in order, by `tapekit.run.controller.default_callbacks`.
"""

import json
import os
import shutil
import time
from typing import Callable, Dict, Optional

from absl import logging

from tapekit.checkpoint import files

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

    def on_epoch_end(self, step: int, epoch: int) -> None:
        """Training by epochs (`train_epochs`): after the loop that ended epoch `epoch`
        (1-based), before any evaluation of it."""

    def on_train_end(self, step: int, logs: Optional[Logs]) -> None:
        """After the last loop of `fit` (also when a callback stopped training)."""


class MetricsFile(Callback):
    """Appends one JSON object per loop (and per evaluation) to `MODEL_DIR/metrics.jsonl`.

    The file is opened, appended to and closed each time, so a killed job leaves
    every finished loop on disk. Only the chief writes it.
    """

    def __init__(self, path: str):
        self.path = path

    def on_train_begin(self, step):
        """A run resumed from a checkpoint older than the file's last rows (killed between
        writing a loop's row and saving its checkpoint, or stopped while replaying loops
        for a rollback) redoes those loops: their rows are dropped, to be written again."""
        if not os.path.exists(self.path):
            return
        with open(self.path) as stream:
            lines = stream.read().splitlines()
        kept = [line for line in lines if not _row_after(line, step)]
        if len(kept) == len(lines):
            return
        with files.open_for_writing(self.path + ".tmp") as stream:
            stream.write("".join(line + "\n" for line in kept))
        os.replace(self.path + ".tmp", self.path)
        logging.info("metrics.jsonl: %d row(s) after step %d, where this run resumes, were "
                     "dropped (those loops are trained again)", len(lines) - len(kept), step)

    def _append(self, split: str, step: int, logs: Logs) -> None:
        record = {"split": split, "step": int(step)}
        # Counts (best_step, epoch) stay integers; metrics are floats.
        record.update({key: value if isinstance(value, int) and not isinstance(value, bool)
                       else float(value) for key, value in logs.items()})
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with files.open_for_writing(self.path, append=True) as stream:
            stream.write(json.dumps(record) + "\n")

    def on_loop_end(self, step, logs):
        self._append("train", step, logs)

    def on_eval_end(self, step, logs):
        self._append("eval", step, logs)


def _row_after(line: str, step: int) -> bool:
    try:
        return int(json.loads(line)["step"]) > step
    except (ValueError, KeyError, TypeError):  # a torn last line: kept as it is
        return False


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


class SaveCheckpoints(EveryNSteps):
    """Saves at the first loop end past each multiple of `every_steps`, at the first loop end
    `every_secs` seconds or more after the last save (or the start), and at the end of
    training.

    Runs on every worker (saving is collective under multi-worker strategies); with
    `every_secs`, the workers agree on whether the time has come (one vote per loop), so
    they save at the same step.
    """

    def __init__(self, checkpointer, every_steps: Optional[int], every_secs: Optional[float] = None,
                 vote: Callable[[bool], bool] = bool, every_epochs: Optional[int] = None):
        super().__init__(every_steps)
        self.every_epochs = every_epochs  # also at the end of every this many epochs
        self.checkpointer = checkpointer
        self.every_secs = every_secs
        self.vote = vote  # True if any worker says True (`Runner.any_worker`)
        self._saved_at = time.monotonic()

    def on_train_begin(self, step):
        super().on_train_begin(step)
        self._saved_at = time.monotonic()

    def on_loop_end(self, step, logs):
        if self.every_secs and not self.due(step):
            overdue = time.monotonic() - self._saved_at >= self.every_secs
            if self.vote(overdue):
                self._run(step)
                return
        super().on_loop_end(step, logs)

    def on_epoch_end(self, step, epoch):
        if self.every_epochs and epoch % self.every_epochs == 0 and step != self._last:
            self._run(step)

    def act(self, step):
        self.checkpointer.save(step)
        self._saved_at = time.monotonic()

    def on_train_end(self, step, logs):
        super().on_train_end(step, logs)
        self.checkpointer.wait()  # --async_checkpoint: the last save is on disk when fit returns


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


class LogProgress(Callback):
    """One absl log line per loop: step, metrics and speed (what a batch job's log shows)."""

    def __init__(self, train_steps: int):
        self.train_steps = train_steps

    def on_loop_end(self, step, logs):
        if self.train_steps is None:  # by epochs: the length of a pass may be unknown
            logging.info("step %d: %s", step, format_logs(logs))
        else:
            logging.info("step %d/%d: %s", step, self.train_steps, format_logs(logs))

    def on_eval_end(self, step, logs):
        logging.info("eval at step %d: %s", step, format_logs(logs))


class ProgressBar(Callback):
    """A Keras `Progbar` on the terminal: steps done, ETA, steps/s and the loop's metrics."""

    def __init__(self, train_steps: int):
        self.train_steps = train_steps
        self.bar = None

    def on_train_begin(self, step):
        import keras  # only where a bar is shown
        self.bar = keras.utils.Progbar(self.train_steps, unit_name="step")
        self.bar.update(step)

    def on_loop_end(self, step, logs):
        shown = [(name, value) for name, value in logs.items() if name != "examples_per_sec"]
        self.bar.update(step, values=shown, finalize=False)

    def on_eval_end(self, step, logs):
        logging.info("eval at step %d: %s", step, format_logs(logs))

    def on_train_end(self, step, logs):
        if self.bar is not None:
            self.bar.update(step, finalize=True)


class TensorBoard(EveryNSteps):
    """Writes TensorBoard summaries to LOGDIR/train and LOGDIR/eval (the chief only).

    Every loop: each metric, `steps_per_sec`, and each optimizer's learning rate. Every
    `sample_every_steps` (and at the end): the trainer's `sample_images` as an image grid
    and its `sample_histograms`. Eager, at loop boundaries.
    """

    def __init__(self, logdir: str, sample_every_steps: Optional[int] = None, num_images: int = 16):
        super().__init__(sample_every_steps)
        self.logdir = logdir
        self.num_images = num_images
        self._train_writer = None  # each created at its first use: an evaluator
        self._eval_writer = None  # process writes only eval/

    def _learning_rates(self) -> Dict[str, float]:
        import tensorflow as tf
        from tapekit.checkpoint import state
        optimizers = state.optimizers(vars(self.trainer))
        # convert_to_tensor reads distributed (mirrored) variables too, where float() cannot
        return {("learning_rate" if len(optimizers) == 1 else f"learning_rate/{name}"):
                float(tf.convert_to_tensor(optimizer.learning_rate))
                for name, optimizer in optimizers.items()}

    @property
    def train_writer(self):
        import tensorflow as tf
        if self._train_writer is None:
            self._train_writer = tf.summary.create_file_writer(os.path.join(self.logdir, "train"))
        return self._train_writer

    def on_loop_end(self, step, logs):
        from tapekit import summaries
        with self.train_writer.as_default(step=step):
            for name, value in {**logs, **self._learning_rates()}.items():
                summaries.scalar(name, value, step)
        super().on_loop_end(step, logs)
        self.train_writer.flush()

    def on_eval_end(self, step, logs):
        import tensorflow as tf
        from tapekit import summaries
        if self._eval_writer is None:
            self._eval_writer = tf.summary.create_file_writer(os.path.join(self.logdir, "eval"))
        with self._eval_writer.as_default(step=step):
            for name, value in logs.items():
                summaries.scalar(name, value, step)
        self._eval_writer.flush()

    def on_train_end(self, step, logs):
        super().on_train_end(step, logs)
        if self._train_writer is not None:
            self._train_writer.flush()

    def act(self, step):
        if not self.every_steps:
            return
        from tapekit import summaries
        from tapekit.images import image_grid
        images = self.trainer.sample_images(self.num_images)
        with self.train_writer.as_default(step=step):
            if images is not None:
                summaries.image("samples", image_grid(images), step)
            for name, values in self.trainer.sample_histograms().items():
                summaries.histogram(name, values, step)


class SampleImages(EveryNSteps):
    """Saves the trainer's `sample_images` as a grid to DIR/step_NNNNNN.png every
    `every_steps` (at the first loop end past each multiple) and at the end. Chief only."""

    def __init__(self, directory: str, every_steps: int, num_images: int = 16):
        super().__init__(every_steps)
        self.directory = directory
        self.num_images = num_images

    def act(self, step):
        from tapekit.images import image_grid, write_png
        images = self.trainer.sample_images(self.num_images)
        if images is not None:
            write_png(os.path.join(self.directory, f"step_{step:06d}.png"), image_grid(images))


def format_logs(logs: Logs) -> str:
    return ", ".join(f"{key}={value:.5g}" for key, value in logs.items())
