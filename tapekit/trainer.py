"""`Trainer`: the base class users subclass to write a GradientTape training step.

A subclass writes only the science:

* `build()` creates models and optimizers (runs once, eagerly, inside `strategy.scope()`);
* `train_dataset(input_context)` returns this input pipeline's per-replica batches;
* `train_step(batch)` runs the forward pass under a tape, computes losses with
  `compute_loss`, updates variables with `apply_gradients` and returns metrics.

This file is that contract. The machinery behind it — the strategy, building, the
compiled loops, input, checkpoints — is `tapekit.run.engine.Engine`, held in one private
attribute; the outer loop is `tapekit.run.controller`; the options are `tapekit.options`.
"""

from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import keras
import numpy as np
import tensorflow as tf

from tapekit import callbacks as callbacks_lib
from tapekit import options as options_lib
from tapekit.compiled import means
from tapekit.errors import TapekitError
from tapekit.namespace import TAPEKIT_ATTRIBUTES
from tapekit.run.engine import Engine
from tapekit.run.time_budget import TimeBudget

_OPTION_NAMES = frozenset(options_lib.names(options_lib.TRAINER_OPTIONS))
ModelsOrVariables = Union[keras.Model, keras.Layer, tf.Variable, Sequence[Any]]


class Trainer:
    """Base class for a custom GradientTape training loop run under `tf.distribute`.

    Keyword arguments are the options of `tapekit.options.TRAINER_OPTIONS`, where each is
    documented (the command line has a flag for each; `strategy` may also be a
    `tf.distribute.Strategy`). `global_batch_size` and `learning_rate` left None are the
    class's `default_global_batch_size` / `default_learning_rate`, read when first used, so
    a subclass may set them anywhere in its `__init__`. Each option is validated here, once,
    and readable as an attribute (`self.seed`, `self.precision`, ...); none can be assigned.
    """

    default_learning_rate: float = 0.01
    default_global_batch_size: int = 32
    # The subclass's own constructor arguments are recorded in MODEL_DIR/run.json, and a
    # resumed run may not change them (they define the model and data) unless named here.
    arguments_safe_to_change: Tuple[str, ...] = ()

    def __new__(cls, *args, **kwargs):
        trainer = super().__new__(cls)
        # The subclass's own constructor arguments, for the run record (`tapekit.checkpoint.record`).
        object.__setattr__(trainer, "_arguments", (args, kwargs))
        return trainer

    def __init__(self, **options):
        arguments = vars(self).pop("_arguments", ((), {}))
        object.__setattr__(self, "_engine", Engine(self, options_lib.resolve(options), arguments))

    def __setattr__(self, name: str, value) -> None:
        if name in TAPEKIT_ATTRIBUTES:
            raise TapekitError(
                f"{type(self).__name__}.{name} is tapekit's ({TAPEKIT_ATTRIBUTES[name]}) and "
                f"cannot be assigned; give your attribute another name (e.g. self.{name}_).")
        object.__setattr__(self, name, value)

    def __getattr__(self, name: str):  # only for names not found otherwise: the options
        if name in _OPTION_NAMES and "_engine" in vars(self):
            return getattr(self._engine.options, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # ------------------------------------------------------------------ the user contract

    @classmethod
    def define_flags(cls) -> None:
        """Declares this trainer's own absl flags (called by the command line before parsing).

        Name each flag like a keyword argument of `__init__`; the command line passes its
        value there. Call the parent's `define_flags` when extending a trainer.
        """

    def build(self) -> None:
        """Creates models and optimizers as attributes. Runs once, eagerly, in `strategy.scope()`."""
        raise NotImplementedError(f"{type(self).__name__} must override build().")

    def train_dataset(self, input_context: tf.distribute.InputContext) -> tf.data.Dataset:
        """Returns this input pipeline's per-replica batches (see `tapekit.per_replica_batches`).

        Called eagerly once per input pipeline (one per worker) by
        `strategy.distribute_datasets_from_function`.
        """
        raise NotImplementedError(
            f"{type(self).__name__} must override train_dataset(input_context) or "
            "train_arrays(), or pass dataset= to fit(); a step that makes its own data is "
            "written without a batch: def train_step(self).")

    def train_arrays(self):
        """In-memory training examples: an array or a tuple/dict of arrays (same length).

        Optional; when it returns arrays, `fit` uses the device-resident input path
        (examples copied once to every replica's device, each step's shuffled batch gathered
        inside the compiled loop: no per-step iterator) instead of `train_dataset`.
        Called eagerly. Default None.
        """
        return None

    def train_step(self, batch) -> Optional[Dict[str, tf.Tensor]]:
        """One training step on one replica's batch. Traced (run as Python with `run_eagerly`).

        Returns a dict of scalar metrics; each is averaged over the loop's steps and over
        replicas. Use `compute_loss` for losses so that the reported value is the global
        mean whatever the number of replicas.

        A step that makes its own data (RL rollouts, a PINN's collocation points, a replay
        buffer in variables) is written without a batch, `def train_step(self)`, on a
        trainer with no input method: its state lives in variables and `self.rng`, which
        checkpoints hold. Inside a step, `self.global_step` reads the steps completed before
        it (0 in the first step).
        """
        raise NotImplementedError(f"{type(self).__name__} must override train_step(batch).")

    def eval_dataset(self, input_context: tf.distribute.InputContext) -> tf.data.Dataset:
        """Per-replica evaluation batches; by default the training pipeline (`train_dataset`)."""
        if type(self).train_dataset is Trainer.train_dataset:
            raise TapekitError(
                f"{type(self).__name__} is evaluated but has no eval_dataset: override "
                "eval_dataset(input_context) (train_arrays() feed training only), or pass "
                "dataset= to evaluate().")
        return self.train_dataset(input_context)

    def eval_step(self, batch) -> Optional[Dict[str, tf.Tensor]]:
        """One evaluation step on one replica's batch: traced, per replica, no updates.
        `def eval_step(self)` makes its own data (then give `evaluate(steps=N)`)."""
        raise NotImplementedError(f"{type(self).__name__} must override eval_step(batch) to evaluate.")

    def results_summary(self) -> Optional[str]:
        """A human-readable line on what was learned, printed by the command line at the end."""
        return None

    def export_model(self) -> Optional[Tuple[keras.Model, List[tf.TensorSpec]]]:
        """The model to serve and its input signature, for `--export_dir` / `tapekit-export`.

        Eager. Default None: this trainer has nothing to export. E.g. a GAN returns
        `(self.gan.generator, [tf.TensorSpec([None, noise_dim], tf.float32)])`.
        """
        return None

    def sample_images(self, num_images: int) -> Optional[np.ndarray]:
        """Images [num_images, height, width, channels] with values in [0, 1] to show as a
        grid (TensorBoard and MODEL_DIR/samples/*.png). Eager. Default None: no images."""
        return None

    def sample_histograms(self) -> Dict[str, np.ndarray]:
        """Named 1-D arrays of values to write as TensorBoard histograms (e.g. generated vs
        real samples of a 1-D GAN). Eager. Default: none."""
        return {}

    # ------------------------------------------------------------------ helpers for train_step

    @tf.autograph.experimental.do_not_convert  # tapekit's code: no AutoGraph needed
    def compute_loss(self, per_example_loss, regularization_losses: Optional[Iterable] = None):
        """Averages a per-example loss over the GLOBAL batch. Call inside `train_step` (per replica).

        Args:
          per_example_loss: shape [per_replica_batch, ...]; extra axes are averaged first.
            Cast to float32 (losses are always computed in float32).
          regularization_losses: e.g. `model.losses`; added once for the whole step (each
            replica adds 1/num_replicas of them).

        Returns:
          A float32 scalar whose value is the mean over the global batch (plus
          regularization) and whose gradient is this replica's share of it, so that
          summing gradients over replicas (what Keras optimizers do) gives the gradient of
          the global mean. Returned from the step as a metric, it is reported as the exact
          mean over every example of the loop (or evaluation), whatever the batch sizes
          and the number of replicas. With a dynamic batch size on several replicas, the
          global batch is counted with one all-reduce.
        """
        return means.global_batch_mean(per_example_loss, regularization_losses, self.num_replicas)

    @tf.autograph.experimental.do_not_convert
    def compute_mean(self, values, sample_weight=None):
        """The mean of a per-example quantity (e.g. `correct` for accuracy), reported exactly.

        Call inside a step (per replica). `values` has shape [per_replica_batch, ...]; every
        element counts, weighted by `sample_weight` (broadcast to `values`) if given, e.g. a
        mask of real tokens. Returned from the step as a metric, it is reported as the mean
        over every value the loop (or evaluation) saw, on all replicas, whatever the batch
        sizes: sum(values × weight) / sum(weight). Returns this replica's mean (0 for no
        values); it is not differentiable through the weights.
        """
        return means.weighted_mean(values, sample_weight)

    @tf.autograph.experimental.do_not_convert
    def apply_gradients(self, tape: tf.GradientTape, loss: tf.Tensor,
                        models_or_variables: ModelsOrVariables,
                        optimizer: keras.optimizers.Optimizer,
                        allow_none_gradients: bool = False) -> None:
        """Computes d(loss)/d(variables) from `tape` and applies them with `optimizer`.

        Runs inside `train_step` (traced, per replica). `models_or_variables` is a Keras
        model or layer, a variable, or a list of these; their trainable variables are
        updated (with the run's loss scaling, clipping, accumulation and NaN policy). A
        variable whose gradient is None (the loss does not depend on it) raises a
        `TapekitError` naming it, unless `allow_none_gradients=True`.

        `optimizer` gets the gradient one device would see for the global batch, on any
        number of replicas (`tapekit.compiled.updates`): the rows of a sparse gradient (an
        Embedding's) that share an index are summed first, so Adam & co. update as on the
        dense gradient, and the optimizer's own `clipnorm`/`global_clipnorm`/`clipvalue`
        clip the sum over replicas, not each replica's part. The optimizer object is not
        changed (outside tapekit it behaves as before). Refused before step 1: a
        `LossScaleOptimizer` or a `loss_scale_factor` (use `precision="mixed_float16"`),
        the optimizer's own `gradient_accumulation_steps` (use the trainer's), and
        `global_clipnorm` together with `clip_global_norm`.
        """
        self._engine.apply_gradients(tape, loss, models_or_variables, optimizer,
                                     allow_none_gradients)

    # ------------------------------------------------------------------ running (eager)

    def fit(self, train_steps: Optional[int] = None, steps_per_loop: int = 100, dataset=None,
            callbacks: Sequence[callbacks_lib.Callback] = (),
            eval_every_steps: Optional[int] = None,
            eval_steps: Optional[int] = None, train_epochs: Optional[int] = None,
            eval_every_epochs: Optional[int] = None,
            checkpoint_every_epochs: Optional[int] = None,
            max_time=None) -> List[Dict[str, float]]:
        """Trains until the global step reaches `train_steps`. Runs eagerly (the outer loop).

        On the first call, builds the models and optimizers, then resumes from `restore_from`
        or from the latest checkpoint in `MODEL_DIR/checkpoints` if there is one.

        Args:
          train_steps: the global step to stop at (a resumed run continues to it).
          steps_per_loop: steps per compiled loop; metrics are logged once per loop; the
            last loop is clamped to what is left.
          dataset: None uses `train_arrays()` or else `train_dataset`; a `tf.data.Dataset`
            of GLOBAL batches is split across replicas; arrays (or a tuple/dict of arrays)
            of examples take the device-resident path (`tapekit.input.data.InMemoryExamples`).
          callbacks: extra `tapekit.Callback`s, called after tapekit's own.
          eval_every_steps: evaluate (`evaluate(eval_steps)`) after each loop that passes a
            multiple of this, and at the end; None: never.
          eval_steps: steps per evaluation; None: the whole evaluation data (which must end).
          train_epochs: instead of `train_steps`, train for this many passes over training
            data that ends (each pass re-iterates it; shuffled as its pipeline says; in-memory
            arrays: permuted). A resume mid-epoch sees the same batches (`tapekit.input.epochs`).
            Rows then carry `epoch`; callbacks get `on_epoch_end`.
          eval_every_epochs: with `train_epochs`, evaluate after every this many epochs and
            at the end.
          checkpoint_every_epochs: with `train_epochs`, also save at every this many epochs' end.
          max_time: a wall-time budget for this call ("3h50m", "90m", "45s" or seconds): stop
            at the next step once the budget, less the measured time of a checkpoint save, is
            used up; skip the evaluation due; save; return (`stopped_by_time` is then True, and
            run.json's `stopped` says where). A new call gets a fresh one.

        Returns:
          One dict per loop: `step`, the loop's mean metrics, `steps_per_sec`, `examples_per_sec`.
          After a first Ctrl-C, raises KeyboardInterrupt once the checkpoint is saved.
        """
        if (train_steps is None) == (train_epochs is None):
            raise TapekitError(
                "give train_steps (the global step to train to) or train_epochs (passes over data "
                f"that ends), not {'both' if train_steps is not None else 'neither'} "
                f"(got train_steps={train_steps}, train_epochs={train_epochs}).")
        by_epochs = {"train_epochs": train_epochs, "eval_every_epochs": eval_every_epochs,
                     "checkpoint_every_epochs": checkpoint_every_epochs}
        if train_epochs is None and (eval_every_epochs or checkpoint_every_epochs):
            raise TapekitError("eval_every_epochs and checkpoint_every_epochs need train_epochs.")
        for name, value in (("train_steps", train_steps), ("steps_per_loop", steps_per_loop),
                            ("eval_every_steps", eval_every_steps), ("eval_steps", eval_steps),
                            *by_epochs.items()):
            options_lib.check(name, value)
        budget = TimeBudget(options_lib.parse_duration(max_time))  # counts from this call
        history = self._engine.fit(train_steps, steps_per_loop, dataset, callbacks,
                                   eval_every_steps, eval_steps,
                                   by_epochs if train_epochs is not None else None,
                                   max_time=budget)
        if self.interrupted:  # Ctrl-C: saved (with a model_dir); stop the caller too
            raise KeyboardInterrupt(f"interrupted at step {self.current_step}")
        return history

    def evaluate(self, steps: Optional[int] = None, dataset=None) -> Dict[str, float]:
        """Runs `eval_step` over the evaluation data and returns its metrics. Eager; the
        steps run in one compiled loop.

        `steps=None` runs the data to its end (a data set that repeats forever is refused:
        give `steps`); otherwise at most `steps` steps. Metrics are exact means over every
        example evaluated (partial and empty final batches included, on any number of
        replicas); `keras.metrics` that `eval_step` updates are reset first and reported
        under their names.
        """
        if steps is not None and steps < 1:
            raise TapekitError(f"evaluation steps must be at least 1, got {steps}.")
        return self._engine.evaluate(steps, dataset)

    def evaluate_checkpoints(self, steps: Optional[int] = None, until_step: Optional[int] = None,
                             timeout_secs: Optional[float] = None, latest_only: bool = False) -> int:
        """Evaluates each new checkpoint a training job writes to MODEL_DIR/checkpoints, once
        (the evaluator beside a training job; `tapekit.run.evaluator`). Eager; writes
        MODEL_DIR/eval_metrics.jsonl, summaries/eval and best/, never checkpoints/. Returns
        after the checkpoint at `until_step`, or after `timeout_secs` without a new one (or,
        `latest_only`, after the latest or `restore_from`), with how many it evaluated."""
        from tapekit.run.evaluator import evaluate_checkpoints
        return evaluate_checkpoints(self._engine, steps, until_step, timeout_secs, latest_only)

    def restore(self, checkpoint: Optional[str] = None) -> int:
        """Builds the trainer as the first `fit` would and restores a checkpoint, training
        nothing and writing nothing. Eager; e.g. before `export` or `evaluate`.

        `checkpoint` defaults to `restore_from`, else the latest in MODEL_DIR/checkpoints.
        The restore is checked as in `fit` (every mismatch listed in one error). Returns the
        restored global step.
        """
        return self._engine.restore(checkpoint)

    def export(self, export_dir: str) -> str:
        """Writes `export_model()` as a SavedModel with a `serving_default` signature.

        Eager, after training (the chief's job). Raises a TapekitError if the trainer has
        nothing to export or `export_dir` exists and is not empty. Returns `export_dir`.
        """
        from tapekit.checkpoint.export import export_saved_model  # keeps `import tapekit` light
        exported = self.export_model()
        if exported is None:
            raise TapekitError(f"{type(self).__name__} has nothing to export: override export_model().")
        export_saved_model(*exported, export_dir)
        return export_dir

    # ------------------------------------------------------------------ the run, read-only

    @property
    def strategy(self) -> tf.distribute.Strategy:
        return self._engine.strategy

    @property
    def num_replicas(self) -> int:
        return self._engine.strategy.num_replicas_in_sync

    @property
    def global_batch_size(self) -> int:
        """Examples per step over all replicas (the option, else `default_global_batch_size`)."""
        return self._engine.global_batch_size

    @property
    def learning_rate(self) -> float:
        """The option, else `default_learning_rate`."""
        return self._engine.learning_rate

    @property
    def model_dir(self) -> Optional[str]:
        return self._engine.model_dir

    @property
    def options(self):
        """The validated options (`tapekit.options.Options`)."""
        return self._engine.options

    @property
    def global_step(self) -> tf.Variable:
        """The checkpointed step counter (int64, incremented inside the compiled loop)."""
        return self._engine.global_step

    @property
    def current_step(self) -> int:
        return self._engine.current_step

    @property
    def rng(self) -> tf.random.Generator:
        """A checkpointed generator for randomness inside `train_step` that resumes exactly."""
        return self._engine.rng

    @property
    def history(self) -> List[Dict[str, float]]:
        """One dict per loop of every `fit` so far (what `fit` returns)."""
        return self._engine.history

    @property
    def stop_training(self) -> bool:
        """Set it to True (e.g. from a callback) to stop after the loop in progress."""
        return self._engine.status.stop_training

    @stop_training.setter
    def stop_training(self, value: bool) -> None:
        self._engine.status.stop_training = bool(value)

    @property
    def preempted(self) -> bool:
        """True when the last `fit` stopped on SIGTERM (after saving a checkpoint)."""
        return self._engine.status.preempted

    @property
    def interrupted(self) -> bool:
        """True when the last `fit` stopped on a first Ctrl-C (after saving a checkpoint)."""
        return self._engine.status.interrupted

    @property
    def stopped_by_time(self) -> bool:
        """True when the last `fit` stopped because its `max_time` was used up (after saving
        a checkpoint, with a model_dir; run.json `stopped` says where)."""
        return self._engine.status.stopped_by_time

    @property
    def loss_scales(self) -> List[Any]:
        """The dynamic loss scales (one per optimizer) under mixed_float16, else empty."""
        return self._engine.loss_scales

    @property
    def train_loop_trace_count(self) -> int:
        """How many times the compiled training loop was traced (1 after any number of loops)."""
        loop = self._engine.train_loop
        return loop.trace_count if loop else 0


# What `help(Trainer)` and `inspect.signature` show: the options, from their table.
Trainer.__init__.__signature__ = options_lib.signature("self")
Trainer.__new__.__signature__ = options_lib.signature("cls")
