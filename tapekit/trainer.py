"""`Trainer`: the base class users subclass to write a GradientTape training step.

A subclass writes only the science:

* `build()` creates models and optimizers (runs once, eagerly, inside `strategy.scope()`);
* `train_dataset(input_context)` returns this input pipeline's per-replica batches;
* `train_step(batch)` runs the forward pass under a tape, computes losses with
  `compute_loss`, updates variables with `apply_gradients` and returns metrics.

The base class owns everything else: the strategy, the global step, building variables
and optimizer state before the first step, compiling `steps_per_loop` steps into one
`tf.function` (`tapekit.loop.CompiledLoop`), and the outer loop (`tapekit.controller`).
"""

import os
import sys
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import keras
import numpy as np
import tensorflow as tf

from absl import logging

from tapekit import build as build_lib
from tapekit import callbacks as callbacks_lib
from tapekit import checkpointing
from tapekit import data as data_lib
from tapekit import distribute
from tapekit import means
from tapekit import precision as precision_lib
from tapekit import state as state_lib
from tapekit.checkpointing import Checkpointer
from tapekit.controller import Controller
from tapekit.errors import TapekitError, user_message
from tapekit.loop import CompiledLoop, LoopResult
from tapekit.updates import GradientUpdater

NAN_POLICIES = ("stop", "skip_step")
PROGRESS_MODES = ("auto", "bar", "log", "none")
ModelsOrVariables = Union[keras.Model, keras.Layer, tf.Variable, Sequence[Any]]


class Trainer:
    """Base class for a custom GradientTape training loop run under `tf.distribute`.

    Args:
      model_dir: where the run writes `metrics.jsonl` (and, later, checkpoints and
        summaries). None writes nothing.
      strategy: a name from `tapekit.distribute.STRATEGY_NAMES` or a
        `tf.distribute.Strategy`.
      global_batch_size: examples per step, summed over replicas; None means the
        subclass's `default_global_batch_size`.
      learning_rate: None means the subclass's own default (`default_learning_rate`).
      seed: seeds Python, NumPy and TensorFlow (`keras.utils.set_random_seed`).
      jit_compile: compile the per-replica step with XLA.
      device: the device for `strategy="one_device"`.
      cpu_replicas: split the host CPU into this many logical devices (`mirrored`/`auto`).
      precision: "float32", "mixed_float16" (with tapekit's dynamic loss scaling) or
        "mixed_bfloat16"; the Keras dtype policy in force while `build()` creates models.
      checkpoint_every_steps: save a checkpoint when a loop ends past each multiple of this
        (and always at the end of `fit`); None: not by steps. Needs `model_dir`.
      checkpoint_every_secs: also save at the first loop end this many seconds after the
        last save (default 600: a killed run loses minutes, not the run); None or 0: not
        by time. Needs `model_dir`.
      max_checkpoints_to_keep: older checkpoints are deleted beyond this many.
      restore_from: start from this checkpoint instead of the latest in `model_dir`;
        checkpoints there newer than it are moved aside (never overwritten or deleted).
      deterministic: turn on TensorFlow op determinism (exact, bitwise resume).
      nan_policy: "stop" (error at the end of the loop, nothing bad checkpointed) or
        "skip_step" (updates whose gradients are not finite are not applied).
      clip_global_norm: clip each optimizer's global-batch gradient to this global norm.
      gradient_accumulation_steps: apply the mean gradient of this many steps at once.
      max_retraces: raise once the compiled loop is traced more than this many extra times
        (each retrace logs a warning naming the input that changed). None: never raise.
      profile_steps: (START, END) global steps to record a TensorBoard profiler trace of,
        written to MODEL_DIR/profile.
      progress: "bar" (a Keras progress bar), "log" (one absl line per loop), "none", or
        "auto" (bar on a terminal, log otherwise, e.g. in a batch job).
      sample_every_steps: with `model_dir`, write `sample_images` to MODEL_DIR/samples/ and
        image/histogram summaries to TensorBoard this often (and at the end).
    """

    default_learning_rate: float = 0.01
    default_global_batch_size: int = 32

    def __init__(
        self,
        model_dir: Optional[str] = None,
        strategy: Union[str, tf.distribute.Strategy] = "default",
        global_batch_size: Optional[int] = None,
        learning_rate: Optional[float] = None,
        seed: int = 0,
        jit_compile: bool = False,
        device: Optional[str] = None,
        cpu_replicas: int = 1,
        precision: str = "float32",
        checkpoint_every_steps: Optional[int] = None,
        checkpoint_every_secs: Optional[float] = 600.0,
        max_checkpoints_to_keep: int = 3,
        restore_from: Optional[str] = None,
        deterministic: bool = False,
        nan_policy: str = "stop",
        clip_global_norm: Optional[float] = None,
        gradient_accumulation_steps: int = 1,
        max_retraces: Optional[int] = None,
        profile_steps: Optional[Sequence[int]] = None,
        progress: str = "auto",
        sample_every_steps: Optional[int] = None,
    ):
        if global_batch_size is None:
            global_batch_size = self.default_global_batch_size
        _require(isinstance(global_batch_size, (int, np.integer)) and global_batch_size >= 1,
                 f"global_batch_size must be a positive integer, got {global_batch_size!r}.")
        _require(learning_rate is None or learning_rate > 0,
                 f"learning_rate must be positive, got {learning_rate}.")
        _require(checkpoint_every_steps is None or checkpoint_every_steps >= 1,
                 f"checkpoint_every_steps must be at least 1, got {checkpoint_every_steps}.")
        _require(checkpoint_every_secs is None or checkpoint_every_secs >= 0,
                 f"checkpoint_every_secs must be at least 0, got {checkpoint_every_secs}.")
        _require(max_checkpoints_to_keep >= 1,
                 f"max_checkpoints_to_keep must be at least 1, got {max_checkpoints_to_keep}.")
        _require(nan_policy in NAN_POLICIES,
                 f"nan_policy must be one of {', '.join(NAN_POLICIES)}, got {nan_policy!r}.")
        _require(clip_global_norm is None or clip_global_norm > 0,
                 f"clip_global_norm must be positive, got {clip_global_norm}.")
        _require(max_retraces is None or max_retraces >= 0,
                 f"max_retraces must be at least 0, got {max_retraces}.")
        if profile_steps is not None:
            profile_steps = tuple(int(x) for x in profile_steps)
            _require(len(profile_steps) == 2 and 1 <= profile_steps[0] <= profile_steps[1],
                     f"profile_steps must be START,END with 1 <= START <= END, got {profile_steps}.")
            _require(model_dir is not None, "profile_steps needs a model_dir to write the trace to.")
        _require(progress in PROGRESS_MODES,
                 f"progress must be one of {', '.join(PROGRESS_MODES)}, got {progress!r}.")
        _require(sample_every_steps is None or sample_every_steps >= 1,
                 f"sample_every_steps must be at least 1, got {sample_every_steps}.")
        _require(gradient_accumulation_steps >= 1,
                 f"gradient_accumulation_steps must be at least 1, got {gradient_accumulation_steps}.")
        self.global_batch_size = int(global_batch_size)
        self.learning_rate = float(learning_rate if learning_rate is not None
                                   else self.default_learning_rate)
        self.seed = int(seed)
        self.jit_compile = bool(jit_compile)
        self.checkpoint_every_steps = checkpoint_every_steps
        self.checkpoint_every_secs = checkpoint_every_secs or None
        self.max_checkpoints_to_keep = max_checkpoints_to_keep
        self.restore_from = restore_from
        self.nan_policy = nan_policy
        self.clip_global_norm = clip_global_norm
        self.gradient_accumulation_steps = int(gradient_accumulation_steps)
        self.max_retraces = max_retraces
        self.profile_steps = profile_steps
        self.progress = progress
        self.sample_every_steps = sample_every_steps
        # The strategy first: splitting the CPU must happen before TensorFlow starts its devices.
        self.strategy = distribute.resolve_strategy(strategy, device=device,
                                                    cpu_replicas=cpu_replicas)
        precision_lib.check_precision(precision, self.strategy)
        self.precision = precision
        replicas = self.strategy.num_replicas_in_sync
        _require(self.global_batch_size % replicas == 0,
                 f"global_batch_size={self.global_batch_size} is not divisible by the {replicas} "
                 f"replicas in sync; use a multiple of {replicas}.")
        if restore_from is not None:
            checkpointing.check_restorable(restore_from)
        # Last of the checks, and the first thing written.
        self.model_dir = checkpointing.prepare_model_dir(model_dir) if model_dir else None
        if deterministic:
            tf.config.experimental.enable_op_determinism()
        keras.utils.set_random_seed(self.seed)
        with self.strategy.scope():
            self.global_step = tf.Variable(
                0, dtype=tf.int64, trainable=False, name="global_step",
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
            # For randomness inside train_step that must resume exactly (checkpointed).
            self.rng = tf.random.Generator.from_seed(self.seed)
        self.stop_training = False
        self.preempted = False
        self.interrupted = False
        self.history: List[Dict[str, float]] = []
        self.last_loop: Optional[LoopResult] = None
        self.checkpointer: Optional[Checkpointer] = None
        self._built = False
        self._restored = False
        self._train_loop: Optional[CompiledLoop] = None
        self._eval_loop: Optional[CompiledLoop] = None
        self._train_iterator = None
        self._train_trace: Optional[build_lib.StepTrace] = None
        self._in_memory: Optional[data_lib.InMemoryExamples] = None
        self._in_memory_key = None
        self._updaters: Dict[Tuple[int, ...], GradientUpdater] = {}

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
            f"{type(self).__name__} must override train_dataset(input_context), "
            "or pass dataset= to fit().")

    def train_arrays(self):
        """In-memory training examples: an array or a tuple/dict of arrays (same length).

        Optional; when it returns arrays, `fit` uses the device-resident input path
        (examples copied once to every replica's device, each step's shuffled batch gathered
        inside the compiled loop: no per-step iterator) instead of `train_dataset`.
        Called eagerly. Default None.
        """
        return None

    def train_step(self, batch) -> Optional[Dict[str, tf.Tensor]]:
        """One training step on one replica's batch. Traced, never run eagerly.

        Returns a dict of scalar metrics; each is averaged over the loop's steps and over
        replicas. Use `compute_loss` for losses so that the reported value is the global
        mean whatever the number of replicas.
        """
        raise NotImplementedError(f"{type(self).__name__} must override train_step(batch).")

    def eval_dataset(self, input_context: tf.distribute.InputContext) -> tf.data.Dataset:
        """Per-replica evaluation batches; by default the training pipeline."""
        return self.train_dataset(input_context)

    def eval_step(self, batch) -> Optional[Dict[str, tf.Tensor]]:
        """One evaluation step on one replica's batch: traced, per replica, no updates."""
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

    @property
    def num_replicas(self) -> int:
        return self.strategy.num_replicas_in_sync

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
        losses = tf.cast(tf.convert_to_tensor(per_example_loss), tf.float32)
        if losses.shape.rank == 0:
            raise TapekitError(
                "compute_loss needs one loss per example (shape [batch, ...]), got a scalar; "
                "pass the unreduced loss, e.g. tf.square(y - prediction).")
        replicas = self.num_replicas
        regularization = (tf.add_n([tf.cast(loss, tf.float32) for loss in regularization_losses])
                          if regularization_losses else None)
        # The mean over extra axes, then over the global batch, is one sum over everything
        # divided by (global batch × extra sizes): with static shapes a multiply by a
        # constant, whose gradient is cheap (a reduce_mean over axes is not).
        if losses.shape.is_fully_defined():
            examples = losses.shape[0]
            share = tf.reduce_sum(losses) * (1.0 / (losses.shape.num_elements() * replicas))
            local_total = share * (examples * replicas)
        else:
            examples = tf.shape(losses)[0]
            extra = tf.cast(tf.reduce_prod(tf.shape(losses)[1:]), tf.float32)
            local_total = tf.math.divide_no_nan(tf.reduce_sum(losses), extra)
            global_examples = tf.cast(examples, tf.float32)
            if replicas > 1:  # replicas may hold batches of different sizes
                global_examples = tf.distribute.get_replica_context().all_reduce(
                    tf.distribute.ReduceOp.SUM, global_examples)
            share = tf.math.divide_no_nan(local_total, global_examples)
        if regularization is not None:
            share += regularization / replicas
            local_total += regularization * tf.cast(examples, tf.float32)
        value = share if replicas == 1 else share + tf.stop_gradient(share * (replicas - 1))
        means.record(value, local_total, examples)
        return value

    def compute_mean(self, values, sample_weight=None):
        """The mean of a per-example quantity (e.g. `correct` for accuracy), reported exactly.

        Call inside a step (per replica). `values` has shape [per_replica_batch, ...]; every
        element counts, weighted by `sample_weight` (broadcast to `values`) if given, e.g. a
        mask of real tokens. Returned from the step as a metric, it is reported as the mean
        over every value the loop (or evaluation) saw, on all replicas, whatever the batch
        sizes: sum(values × weight) / sum(weight). Returns this replica's mean (0 for no
        values); it is not differentiable through the weights.
        """
        values = tf.cast(tf.convert_to_tensor(values), tf.float32)
        if values.shape.rank == 0:
            raise TapekitError(
                "compute_mean needs one value per example (shape [batch, ...]), got a scalar; "
                "pass the unreduced values, e.g. tf.cast(correct, tf.float32).")
        if sample_weight is None:
            total = tf.reduce_sum(values)
            count = (values.shape.num_elements() if values.shape.is_fully_defined()
                     else tf.cast(tf.size(values), tf.float32))
        else:
            weight = tf.broadcast_to(tf.cast(sample_weight, tf.float32), tf.shape(values))
            total = tf.reduce_sum(values * weight)
            count = tf.reduce_sum(weight)
        value = tf.math.divide_no_nan(total, tf.cast(count, tf.float32))
        means.record(value, total, count)
        return value

    def apply_gradients(
        self,
        tape: tf.GradientTape,
        loss: tf.Tensor,
        models_or_variables: ModelsOrVariables,
        optimizer: keras.optimizers.Optimizer,
        allow_none_gradients: bool = False,
    ) -> None:
        """Computes d(loss)/d(variables) from `tape` and applies them with `optimizer`.

        Runs inside `train_step` (traced, per replica). `models_or_variables` is a Keras
        model or layer, a variable, or a list of these; their trainable variables are
        updated. A variable whose gradient is None (the loss does not depend on it) raises
        a `TapekitError` naming it, unless `allow_none_gradients=True`.
        """
        variables = trainable_variables(models_or_variables)
        if not variables:
            raise TapekitError(
                f"apply_gradients got no trainable variables from {models_or_variables!r}; "
                "pass the model (or its variables) that the loss should update.")
        if build_lib.record_update(optimizer, variables):  # building: remember what updates what
            return
        updater = self._updaters.get(_updater_key(optimizer, variables))
        if updater is None:
            raise TapekitError(
                "apply_gradients was called with an optimizer/variables pair that train_step did "
                "not use when tapekit built the trainer; call apply_gradients the same way every step.")
        # Seeding backprop with the loss scale is differentiating loss × scale (the tape has closed).
        gradients = tape.gradient(loss, variables, output_gradients=updater.backprop_seed(loss.dtype))
        missing = [variable_path(v) for g, v in zip(gradients, variables) if g is None]
        if missing and not allow_none_gradients:
            raise TapekitError(
                f"no gradient for {len(missing)} variable(s): {', '.join(missing)}; the loss does "
                "not depend on them. Run the forward pass inside the tape and pass only the models "
                "that loss trains (or apply_gradients(..., allow_none_gradients=True)).")
        if updater.is_plain:
            pairs = [(g, v) for g, v in zip(gradients, variables) if g is not None]
            updater.apply([g for g, _ in pairs], [v for _, v in pairs])
        else:
            updater.apply([tf.zeros_like(v) if g is None else g for g, v in zip(gradients, variables)],
                          variables)

    # ------------------------------------------------------------------ running

    @property
    def current_step(self) -> int:
        return int(self.global_step.numpy())

    @property
    def loss_scales(self) -> List[precision_lib.DynamicLossScale]:
        """The dynamic loss scales (one per optimizer) under mixed_float16, else empty."""
        return [u.loss_scale for u in self._updaters.values() if u.loss_scale is not None]

    @property
    def train_loop_trace_count(self) -> int:
        """How many times the compiled training loop was traced (1 after any number of loops)."""
        return self._train_loop.trace_count if self._train_loop else 0

    def fit(
        self,
        train_steps: int,
        steps_per_loop: int = 100,
        dataset=None,
        callbacks: Sequence[callbacks_lib.Callback] = (),
        eval_every_steps: Optional[int] = None,
        eval_steps: Optional[int] = None,
    ) -> List[Dict[str, float]]:
        """Trains until the global step reaches `train_steps`. Runs eagerly (the outer loop).

        On the first call, builds the models and optimizers, then resumes from `restore_from`
        or from the latest checkpoint in `MODEL_DIR/checkpoints` if there is one.

        Args:
          train_steps: the global step to stop at (a resumed run continues to it).
          steps_per_loop: steps per compiled loop; metrics are logged once per loop; the
            last loop is clamped to what is left.
          dataset: None uses `train_arrays()` or else `train_dataset`; a `tf.data.Dataset`
            of GLOBAL batches is split across replicas; arrays (or a tuple/dict of arrays)
            of examples take the device-resident path (`tapekit.data.InMemoryExamples`).
          callbacks: extra `tapekit.Callback`s, called after tapekit's own.
          eval_every_steps: evaluate (`evaluate(eval_steps)`) after each loop that passes a
            multiple of this, and at the end; None: never.
          eval_steps: steps per evaluation; None: the whole evaluation data (which must end).

        Returns:
          One dict per loop: `step`, the loop's mean metrics, `steps_per_sec`, `examples_per_sec`.
        """
        _require(train_steps >= 1, f"train_steps must be at least 1, got {train_steps}.")
        _require(steps_per_loop >= 1, f"steps_per_loop must be at least 1, got {steps_per_loop}.")
        _require(eval_every_steps is None or eval_every_steps >= 1,
                 f"eval_every_steps must be at least 1, got {eval_every_steps}.")
        if eval_every_steps and eval_steps is None:  # refuse endless evaluation before training
            self._distribute(None, self.eval_dataset, evaluation=True, must_end=True)
        in_memory = self._in_memory_examples(dataset)
        if not self._built:
            self._ensure_built(in_memory.element_spec if in_memory is not None
                               else self._distribute(dataset, self.train_dataset).element_spec)
        self._use_train_loop(in_memory)
        if not self._restored:
            self._restored = True
            self._train_iterator = self._restore_and_position(dataset, in_memory)
        elif in_memory is None and (dataset is not None or self._train_iterator is None):
            self._train_iterator = self._make_train_iterator(dataset, skip_steps=0)
        controller = Controller(self, self._default_callbacks(train_steps) + list(callbacks),
                                eval_every_steps=eval_every_steps, eval_steps=eval_steps,
                                profile_steps=self.profile_steps,
                                profile_dir=os.path.join(self.model_dir, "profile")
                                if self.model_dir else None)
        history = controller.train(int(train_steps), int(steps_per_loop),
                                   None if in_memory is not None else self._train_iterator)
        self.history.extend(history)
        if self.interrupted:  # Ctrl-C: saved (with a model_dir); stop the caller too
            raise KeyboardInterrupt(f"interrupted at step {self.current_step}")
        return history

    def restore(self, checkpoint: Optional[str] = None) -> int:
        """Builds the trainer as the first `fit` would and restores a checkpoint, training
        nothing and writing nothing. Eager; e.g. before `export` or `evaluate`.

        `checkpoint` defaults to `restore_from`, else the latest in MODEL_DIR/checkpoints.
        The restore is checked as in `fit` (every mismatch listed in one error). Returns the
        restored global step.
        """
        path = checkpoint or self.restore_from or (
            tf.train.latest_checkpoint(os.path.join(self.model_dir, "checkpoints"))
            if self.model_dir else None)
        _require(path is not None,
                 "nothing to restore: give a checkpoint, restore_from, or a model_dir that has "
                 "checkpoints (train first).")
        checkpointing.check_restorable(path)
        if not self._built:
            in_memory = self._in_memory_examples(None)
            self._ensure_built(in_memory.element_spec if in_memory is not None
                               else self._distribute(None, self.train_dataset).element_spec)
        Checkpointer(self._checkpoint_objects(), None, True).restore(path)
        logging.info("restored checkpoint %s at step %d", path, self.current_step)
        return self.current_step

    def evaluate(self, steps: Optional[int] = None, dataset=None) -> Dict[str, float]:
        """Runs `eval_step` over the evaluation data and returns its metrics. Eager; the
        steps run in one compiled loop.

        `steps=None` runs the data to its end (a data set that repeats forever is refused:
        give `steps`); otherwise at most `steps` steps. Metrics are exact means over every
        example evaluated (partial and empty final batches included, on any number of
        replicas); `keras.metrics` that `eval_step` updates are reset first and reported
        under their names.
        """
        _require(steps is None or steps >= 1, f"evaluation steps must be at least 1, got {steps}.")
        distributed = self._distribute(dataset, self.eval_dataset, evaluation=True,
                                       must_end=steps is None)
        if not self._built:
            in_memory = self._in_memory_examples(None)
            self._ensure_built(in_memory.element_spec if in_memory is not None
                               else self._distribute(None, self.train_dataset).element_spec)
        if self._eval_loop is None:
            trace = self._trace(self.eval_step, distributed.element_spec)
            self._eval_loop = CompiledLoop(self.strategy, self.eval_step, trace.metric_names,
                                           jit_compile=self.jit_compile, name="eval_loop",
                                           keras_metrics=trace.keras_metrics)
        return self._call_loop(self._eval_loop, iter(distributed), steps).metrics

    def any_worker(self, flag: bool) -> bool:
        """True if `flag` is True on any worker (eager; a collective only when multi-worker).

        Used at loop ends so that a SIGTERM sent to one worker stops all of them at the
        same step, where every worker then takes part in saving the checkpoint.
        """
        if not distribute.is_multi_worker(self.strategy):
            return bool(flag)
        votes = self.strategy.run(lambda: tf.constant(float(flag)))
        return float(self.strategy.reduce(tf.distribute.ReduceOp.SUM, votes, axis=None)) > 0

    def run_train_loop(self, iterator, num_steps: int) -> LoopResult:
        """Runs one compiled loop of up to `num_steps` training steps (eager call)."""
        self.last_loop = self._call_loop(self._train_loop, iterator, num_steps)
        return self.last_loop

    # ------------------------------------------------------------------ internals

    def _default_callbacks(self, train_steps: int) -> List[callbacks_lib.Callback]:
        # Order matters: the guard raises before anything records or saves a bad loop.
        result: List[callbacks_lib.Callback] = [callbacks_lib.NonFiniteGuard(self.nan_policy)]
        progress = self.progress
        if progress == "auto":
            progress = "bar" if sys.stderr.isatty() else "log"
        if progress == "bar":
            result.append(callbacks_lib.ProgressBar(train_steps))
        elif progress == "log":
            result.append(callbacks_lib.LogProgress(train_steps))
        if self.model_dir and distribute.is_chief(self.strategy):
            result.append(callbacks_lib.MetricsFile(os.path.join(self.model_dir, "metrics.jsonl")))
            result.append(callbacks_lib.TensorBoard(os.path.join(self.model_dir, "summaries"),
                                                    self.sample_every_steps))
            if self.sample_every_steps:
                result.append(callbacks_lib.SampleImages(os.path.join(self.model_dir, "samples"),
                                                         self.sample_every_steps))
        if self.checkpointer is not None:  # every worker saves (the chief into model_dir)
            result.append(callbacks_lib.SaveCheckpoints(
                self.checkpointer, self.checkpoint_every_steps, self.checkpoint_every_secs))
        return result

    def export(self, export_dir: str) -> str:
        """Writes `export_model()` as a SavedModel with a `serving_default` signature.

        Eager, after training (the chief's job). Raises a TapekitError if the trainer has
        nothing to export or `export_dir` exists and is not empty. Returns `export_dir`.
        """
        from tapekit.export import export_saved_model  # keeps `import tapekit` light
        exported = self.export_model()
        _require(exported is not None,
                 f"{type(self).__name__} has nothing to export: override export_model().")
        model, signature = exported
        export_saved_model(model, signature, export_dir)
        return export_dir

    def _distribute(self, dataset, dataset_fn, skip_steps: int = 0, evaluation: bool = False,
                    must_end: bool = False):
        """A distributed dataset; `skip_steps` global steps of it already consumed.
        `evaluation`: arrays are read once, in order; `must_end`: refuse data that repeats
        forever (where TensorFlow knows)."""
        strategy = self.strategy
        if dataset is None:
            return strategy.distribute_datasets_from_function(
                lambda context: _skip(self._checked_dataset(dataset_fn(context), must_end),
                                      context, skip_steps))
        if isinstance(dataset, tf.distribute.DistributedDataset):
            _require(skip_steps == 0, "cannot resume a tf.distribute.DistributedDataset at a "
                     "step; pass the tf.data.Dataset (or train_dataset) instead.")
            return dataset
        if isinstance(dataset, tf.data.Dataset):
            return strategy.experimental_distribute_dataset(
                self._checked_dataset(dataset, must_end).skip(skip_steps))
        if isinstance(dataset, (np.ndarray, tf.Tensor, tuple, list, dict)):
            examples = tf.data.Dataset.from_tensor_slices(
                tuple(dataset) if isinstance(dataset, list) else dataset)
            size = int(examples.cardinality())
            return strategy.distribute_datasets_from_function(
                lambda context: _skip(data_lib.per_replica_batches(
                    examples, context, self.global_batch_size,
                    shuffle_buffer_size=None if evaluation else size, seed=self.seed,
                    repeat=not evaluation), context, skip_steps))
        raise TapekitError(
            f"fit/evaluate got a dataset of type {type(dataset).__name__}; pass a tf.data.Dataset "
            "of global batches, NumPy arrays (or a tuple/dict of them), or None.")

    def _checked_dataset(self, dataset, must_end: bool = False):
        if not isinstance(dataset, tf.data.Dataset):
            raise TapekitError(
                f"{type(self).__name__}.train_dataset/eval_dataset must return a tf.data.Dataset, "
                f"got {type(dataset).__name__}.")
        if must_end and dataset.cardinality() == tf.data.INFINITE_CARDINALITY:
            raise TapekitError(
                "the evaluation data repeats forever, so evaluating 'to its end' would never end: "
                "give eval_steps (--eval_steps), or return one pass from eval_dataset (e.g. "
                "tapekit.per_replica_batches(..., repeat=False)).")
        if must_end and dataset.cardinality() == tf.data.UNKNOWN_CARDINALITY:
            logging.log_first_n(
                logging.INFO, "evaluating to the end of data of unknown length (e.g. a Python "
                "generator): it must end; otherwise give eval_steps (--eval_steps)", 1)
        return dataset

    def _ensure_built(self, element_spec) -> None:
        """Creates every model variable and optimizer slot before the first step.

        Runs eagerly, once. `build()` runs in the strategy scope under the precision policy;
        then `train_step` is traced once for real (`tapekit.build.trace_step`), which builds
        the models as a plain `tf.function` would. Every optimizer the step uses is then
        built on its variables in the strategy scope: building one inside a replica context
        fails under MirroredStrategy (keras-team/keras#19246), and unbuilt slots are skipped
        by restores (keras#19389). Last, the checkpoint's contents are checked to cover
        every variable the trainer owns.
        """
        with self.strategy.scope(), precision_lib.dtype_policy(self.precision), \
                tf.variable_creator_scope(build_lib.same_on_every_replica):
            self.build()
        self._train_trace = self._trace(self.train_step, element_spec)
        with self.strategy.scope():
            for optimizer, variables in self._train_trace.updates:
                self._add_updater(optimizer, variables)
        objects = self._checkpoint_objects()
        state_lib.check_coverage(self._owned_state(), objects)
        if self.model_dir:
            self.checkpointer = Checkpointer(
                objects, self.model_dir, distribute.is_chief(self.strategy),
                max_to_keep=self.max_checkpoints_to_keep, task_id=distribute.task_id(self.strategy))
        self._built = True

    def _trace(self, step_fn, element_spec) -> build_lib.StepTrace:
        attributes = vars(self)
        return build_lib.trace_step(self.strategy, step_fn, element_spec,
                                    list(state_lib.optimizers(attributes).values()),
                                    state_lib.keras_metrics(attributes))

    def _add_updater(self, optimizer, variables) -> None:
        key = _updater_key(optimizer, variables)
        if key in self._updaters:
            return
        if not optimizer.built:
            optimizer.build(variables)
        loss_scale = (precision_lib.DynamicLossScale() if self.precision == "mixed_float16"
                      else None)
        self._updaters[key] = GradientUpdater(
            optimizer, variables, loss_scale=loss_scale, clip_global_norm=self.clip_global_norm,
            accumulation_steps=self.gradient_accumulation_steps,
            skip_nonfinite=self.nan_policy == "skip_step", name=f"updater_{len(self._updaters)}")

    def _owned_state(self) -> Dict[str, Any]:
        """Everything a checkpoint holds (`tapekit.state`): the global step, the random
        generator, every model, optimizer, metric, variable and module the trainer holds in
        a public attribute, and tapekit's per-optimizer update state (loss scales, gradient
        accumulators)."""
        owned: Dict[str, Any] = {"global_step": self.global_step, "rng": self.rng}
        for name, value in state_lib.owned_state(vars(self)).items():
            owned.setdefault(name, value)
        for index, updater in enumerate(self._updaters.values()):
            if not updater.is_plain:
                owned[f"updater_{index}"] = updater
        return owned

    def _checkpoint_objects(self) -> Dict[str, Any]:
        return state_lib.checkpoint_objects(self._owned_state())

    def _in_memory_examples(self, dataset) -> Optional[data_lib.InMemoryExamples]:
        """The device-resident input for `dataset` arrays (or `train_arrays()`), else None."""
        arrays = dataset if data_lib.is_arrays(dataset) else (
            self.train_arrays() if dataset is None else None)
        if arrays is None:
            return None
        key = tuple(id(a) for a in tf.nest.flatten(arrays))
        if self._in_memory is None or self._in_memory_key != key:  # copy to the devices once
            self._in_memory = data_lib.InMemoryExamples(self.strategy, arrays,
                                                        self.global_batch_size, self.seed)
            self._in_memory_key = key
        return self._in_memory

    def _use_train_loop(self, in_memory) -> None:
        """Builds the compiled loop for this kind of input (once per trainer and input)."""
        if self._train_loop is not None and self._train_loop.in_memory is in_memory:
            return
        self._train_loop = CompiledLoop(
            self.strategy, self.train_step, self._train_trace.metric_names,
            step_counter=self.global_step, jit_compile=self.jit_compile, name="train_loop",
            in_memory=in_memory, max_retraces=self.max_retraces,
            finite_means=self.nan_policy == "skip_step",
            keras_metrics=self._train_trace.keras_metrics)

    def _make_train_iterator(self, dataset, skip_steps: int):
        return iter(self._distribute(dataset, self.train_dataset, skip_steps=skip_steps))

    def _restore_and_position(self, dataset, in_memory=None):
        """Restores `restore_from` or the latest checkpoint, and returns the training iterator
        positioned where that checkpoint left off.

        In-memory input needs no positioning (it is a function of the step). With one
        replica and a `tf.data` input the iterator itself is checkpointed when TensorFlow can
        save it (tried once, here); distributed iterators cannot be
        (tensorflow/tensorflow#24408), nor pipelines with Python code (`from_generator`,
        `py_function`), so their input is re-created and skipped to the restored step, which
        is exact when the input pipeline is a deterministic function of the seed.
        """
        checkpointer = self.checkpointer
        path = self.restore_from or (checkpointer.latest if checkpointer else None)
        if checkpointer is None:
            if path:  # no model_dir: restore the state, nothing is saved later
                Checkpointer(self._checkpoint_objects(), None, True).restore(path)
                logging.info("restored checkpoint %s at step %d", path, self.current_step)
            return None if in_memory else self._make_train_iterator(dataset, self.current_step)
        if in_memory is not None:  # the input is a function of the global step: nothing to position
            if path:
                self._resume_from(path)
            return None
        saved_step = checkpointing.saved_step(path) if path else None
        iterator = self._make_train_iterator(dataset, skip_steps=0)
        saveable = isinstance(iterator, tf.data.Iterator) and checkpointing.iterator_can_be_saved(iterator)
        if isinstance(iterator, tf.data.Iterator) and not saveable:
            logging.info("the input pipeline's iterator cannot be checkpointed (it runs Python "
                         "code: from_generator, py_function, ...); a resumed run re-creates the "
                         "input and skips to the restored step, which is exact only if the "
                         "pipeline yields the same batches every time (seeded, deterministic)")
        iterator_in_checkpoint = saveable and (path is None or checkpointing.has_iterator(path))
        if iterator_in_checkpoint:
            checkpointer.track_iterator(iterator)
        elif saved_step:
            iterator = self._make_train_iterator(dataset, skip_steps=saved_step)
        if path:
            self._resume_from(path)
        return iterator

    def _resume_from(self, path: str) -> None:
        self.checkpointer.restore(path)
        if self.restore_from:  # restarted from an older checkpoint: newer ones go aside
            self.checkpointer.set_aside_checkpoints_after(self.current_step)
        logging.info("resumed from checkpoint %s at step %d", path, self.current_step)

    def _call_loop(self, loop: CompiledLoop, iterator, num_steps: int) -> LoopResult:
        try:
            return loop(iterator, num_steps)
        except TapekitError as error:
            raise TapekitError(user_message(error)) from None


def trainable_variables(models_or_variables: ModelsOrVariables) -> List[tf.Variable]:
    """The trainable variables of a model/layer/variable or of a list of them, de-duplicated."""
    items = (models_or_variables if isinstance(models_or_variables, (list, tuple))
             else [models_or_variables])
    result, seen = [], set()
    for item in items:
        found = (item.trainable_variables if hasattr(item, "trainable_variables") else [item])
        for variable in found:
            if id(variable) not in seen:
                seen.add(id(variable))
                result.append(variable)
    return result


def variable_path(variable) -> str:
    return getattr(variable, "path", None) or getattr(variable, "name", repr(variable))


def _updater_key(optimizer, variables) -> Tuple[int, ...]:
    return (id(optimizer),) + tuple(id(v) for v in variables)


def _skip(dataset: tf.data.Dataset, context, steps: int) -> tf.data.Dataset:
    """Skips `steps` global steps of a per-replica dataset (each step takes one batch per
    local replica)."""
    if not steps:
        return dataset
    local_replicas = context.num_replicas_in_sync // context.num_input_pipelines if context else 1
    return dataset.skip(steps * local_replicas)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise TapekitError(message)

