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
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import keras
import numpy as np
import tensorflow as tf

from absl import logging

from tapekit import callbacks as callbacks_lib
from tapekit import data as data_lib
from tapekit import distribute
from tapekit import precision as precision_lib
from tapekit.checkpointing import Checkpointer
from tapekit.controller import Controller
from tapekit.errors import TapekitError, user_message
from tapekit.loop import CompiledLoop

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
        (and always at the end of `fit`); None saves only at the end. Needs `model_dir`.
      max_checkpoints_to_keep: older checkpoints are deleted beyond this many.
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
        max_checkpoints_to_keep: int = 3,
    ):
        if global_batch_size is None:
            global_batch_size = self.default_global_batch_size
        if not isinstance(global_batch_size, (int, np.integer)) or global_batch_size < 1:
            raise TapekitError(f"global_batch_size must be a positive integer, got {global_batch_size!r}.")
        if learning_rate is not None and not learning_rate > 0:
            raise TapekitError(f"learning_rate must be positive, got {learning_rate}.")
        self.model_dir = model_dir
        self.global_batch_size = int(global_batch_size)
        self.learning_rate = float(learning_rate if learning_rate is not None
                                   else self.default_learning_rate)
        self.seed = int(seed)
        self.jit_compile = bool(jit_compile)
        # The strategy first: splitting the CPU must happen before TensorFlow starts its devices.
        self.strategy = distribute.resolve_strategy(strategy, device=device,
                                                    cpu_replicas=cpu_replicas)
        keras.utils.set_random_seed(self.seed)
        precision_lib.check_precision(precision, self.strategy)
        self.precision = precision
        if checkpoint_every_steps is not None and checkpoint_every_steps < 1:
            raise TapekitError(f"checkpoint_every_steps must be at least 1, got {checkpoint_every_steps}.")
        if max_checkpoints_to_keep < 1:
            raise TapekitError(f"max_checkpoints_to_keep must be at least 1, got {max_checkpoints_to_keep}.")
        self.checkpoint_every_steps = checkpoint_every_steps
        self.max_checkpoints_to_keep = max_checkpoints_to_keep
        replicas = self.strategy.num_replicas_in_sync
        if self.global_batch_size % replicas:
            raise TapekitError(
                f"global_batch_size={self.global_batch_size} is not divisible by the {replicas} "
                f"replicas in sync; use a multiple of {replicas}.")
        with self.strategy.scope():
            self.global_step = tf.Variable(
                0, dtype=tf.int64, trainable=False, name="global_step",
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        self.stop_training = False
        self.history: List[Dict[str, float]] = []
        self._built = False
        self._recording: Optional[List] = None
        self._train_loop: Optional[CompiledLoop] = None
        self._eval_loop: Optional[CompiledLoop] = None
        self._train_iterator = None
        self._loss_scales: Dict[int, precision_lib.DynamicLossScale] = {}
        self.checkpointer: Optional[Checkpointer] = None

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
          the global mean. Its mean over replicas, which tapekit reports, is exact for any
          number of replicas (the 1/N-of-the-loss report of plain `tf.distribute` loops
          does not happen).
        """
        losses = tf.cast(tf.convert_to_tensor(per_example_loss), tf.float32)
        if losses.shape.rank == 0:
            raise TapekitError(
                "compute_loss needs one loss per example (shape [batch, ...]), got a scalar; "
                "pass the unreduced loss, e.g. tf.square(y - prediction).")
        if losses.shape.rank > 1:
            losses = tf.reduce_mean(losses, axis=list(range(1, losses.shape.rank)))
        replicas = self.num_replicas
        global_batch = tf.cast(tf.shape(losses)[0] * replicas, tf.float32)
        share = tf.reduce_sum(losses) / global_batch
        if regularization_losses:
            regularization = [tf.cast(loss, tf.float32) for loss in regularization_losses]
            share += tf.add_n(regularization) / replicas
        if replicas == 1:
            return share
        # Value: this replica's estimate of the global loss; gradient: its share of it.
        return share + tf.stop_gradient(share * (replicas - 1))

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
        if self._recording is not None:  # the build probe: remember which optimizer updates what
            self._recording.append((optimizer, variables))
            return
        loss_scale = self._loss_scales.get(id(optimizer))
        # Seeding backprop with the scale is differentiating loss × scale (the tape has closed).
        gradients = tape.gradient(
            loss, variables,
            output_gradients=tf.cast(loss_scale.scale, loss.dtype) if loss_scale is not None else None)
        missing = [variable_path(v) for g, v in zip(gradients, variables) if g is None]
        if missing and not allow_none_gradients:
            raise TapekitError(
                f"no gradient for {len(missing)} variable(s): {', '.join(missing)}; the loss does "
                "not depend on them. Run the forward pass inside the tape and pass only the models "
                "that loss trains (or apply_gradients(..., allow_none_gradients=True)).")
        pairs = [(g, v) for g, v in zip(gradients, variables) if g is not None]
        if loss_scale is None:
            optimizer.apply_gradients(pairs)
            return
        gradients = [g / loss_scale.scale for g, _ in pairs]
        _apply_if_finite(optimizer, gradients, [v for _, v in pairs], loss_scale)

    # ------------------------------------------------------------------ running

    @property
    def current_step(self) -> int:
        return int(self.global_step.numpy())

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
    ) -> List[Dict[str, float]]:
        """Trains until the global step reaches `train_steps`. Runs eagerly (the outer loop).

        Args:
          train_steps: the global step to stop at (a resumed run continues to it).
          steps_per_loop: steps per compiled loop; metrics are logged once per loop.
          dataset: None uses `train_dataset`; a `tf.data.Dataset` of GLOBAL batches is split
            across replicas; arrays (or a tuple/dict of arrays) of examples are shuffled each
            epoch and batched by `global_batch_size`.
          callbacks: extra `tapekit.Callback`s, called after tapekit's own.

        Returns:
          One dict per loop: `step`, the loop's mean metrics, `steps_per_sec`, `examples_per_sec`.
        """
        if dataset is not None or self._train_iterator is None:
            self._train_iterator = iter(self._distribute(dataset, self.train_dataset))
        self._ensure_built(self._train_iterator)
        controller = Controller(self, self._default_callbacks(train_steps) + list(callbacks))
        history = controller.train(int(train_steps), int(steps_per_loop), self._train_iterator)
        self.history.extend(history)
        return history

    def evaluate(self, steps: int, dataset=None) -> Dict[str, float]:
        """Runs `eval_step` for `steps` steps and returns the mean metrics (eager, outer loop)."""
        if steps < 1:
            raise TapekitError(f"evaluation steps must be at least 1, got {steps}.")
        iterator = iter(self._distribute(dataset, self.eval_dataset))
        self._ensure_built(iterator)
        if self._eval_loop is None:
            names = self._probe_metric_names(self.eval_step, iterator)
            self._eval_loop = CompiledLoop(self.strategy, self.eval_step, names,
                                           jit_compile=self.jit_compile, name="eval_loop")
        outputs = self._call_loop(self._eval_loop, iterator, steps)
        return {name: float(value) for name, value in outputs.items()}

    def run_train_loop(self, iterator, num_steps: int) -> Dict[str, tf.Tensor]:
        """Runs one compiled loop of `num_steps` training steps; returns its mean metrics."""
        return self._call_loop(self._train_loop, iterator, num_steps)

    # ------------------------------------------------------------------ internals

    def _default_callbacks(self, train_steps: int) -> List[callbacks_lib.Callback]:
        result: List[callbacks_lib.Callback] = [callbacks_lib.LogProgress(train_steps)]
        if self.model_dir and distribute.is_chief(self.strategy):
            result.append(callbacks_lib.MetricsFile(os.path.join(self.model_dir, "metrics.jsonl")))
        if self.checkpointer is not None:  # every worker saves (the chief into model_dir)
            result.append(callbacks_lib.SaveCheckpoints(self.checkpointer, self.checkpoint_every_steps))
        return result

    def _distribute(self, dataset, dataset_fn):
        strategy = self.strategy
        if dataset is None:
            return strategy.distribute_datasets_from_function(
                lambda context: self._checked_dataset(dataset_fn(context)))
        if isinstance(dataset, tf.distribute.DistributedDataset):
            return dataset
        if isinstance(dataset, tf.data.Dataset):
            return strategy.experimental_distribute_dataset(dataset)
        if isinstance(dataset, (np.ndarray, tf.Tensor, tuple, list, dict)):
            examples = tf.data.Dataset.from_tensor_slices(
                tuple(dataset) if isinstance(dataset, list) else dataset)
            size = int(examples.cardinality())
            return strategy.distribute_datasets_from_function(
                lambda context: data_lib.per_replica_batches(
                    examples, context, self.global_batch_size,
                    shuffle_buffer_size=size, seed=self.seed))
        raise TapekitError(
            f"fit/evaluate got a dataset of type {type(dataset).__name__}; pass a tf.data.Dataset "
            "of global batches, NumPy arrays (or a tuple/dict of them), or None.")

    def _checked_dataset(self, dataset):
        if not isinstance(dataset, tf.data.Dataset):
            raise TapekitError(
                f"{type(self).__name__}.train_dataset/eval_dataset must return a tf.data.Dataset, "
                f"got {type(dataset).__name__}.")
        return dataset

    def _ensure_built(self, iterator) -> None:
        """Creates every model variable and optimizer slot before the first step.

        Runs eagerly, once. `build()` runs in the strategy scope; then `train_step` is traced
        once on placeholders in a scratch FuncGraph under `keras.StatelessScope` and
        `keras.SymbolicScope`, as Keras' own symbolic build does (no state is
        changed; Keras creates the models' variables on leaving the scope), and every
        optimizer passed to `apply_gradients` is built on its variables in the strategy
        scope. Building optimizers inside a replica context fails under MirroredStrategy
        (keras-team/keras#19246) and unbuilt slots are skipped by restores (keras#19389).
        """
        if self._built:
            return
        with self.strategy.scope(), precision_lib.dtype_policy(self.precision):
            self.build()
        names = self._probe_metric_names(self.train_step, iterator, record_optimizers=True)
        if self.model_dir:
            self.checkpointer = Checkpointer(
                self._state_objects(), self.model_dir, distribute.is_chief(self.strategy),
                max_to_keep=self.max_checkpoints_to_keep, task_id=distribute.task_id(self.strategy))
            self._resume()
        self._train_loop = CompiledLoop(self.strategy, self.train_step, names,
                                        step_counter=self.global_step,
                                        jit_compile=self.jit_compile, name="train_loop")
        self._built = True

    def _probe_metric_names(self, step_fn, iterator, record_optimizers=False) -> List[str]:
        spec = per_replica_spec(iterator.element_spec)
        self._recording = []
        try:
            with self.strategy.scope():
                with keras.StatelessScope(), keras.SymbolicScope():
                    # A scratch FuncGraph, as Keras' own symbolic build uses: it can capture
                    # variables that already exist, and nothing in it ever runs.
                    with tf.__internal__.FuncGraph("tapekit_probe").as_default():
                        batch = tf.nest.map_structure(
                            lambda s: tf.compat.v1.placeholder(s.dtype, s.shape), spec)
                        outputs = step_fn(batch)
                        names = metric_names(outputs, step_fn.__name__)
            if record_optimizers:
                with self.strategy.scope():
                    for optimizer, variables in self._recording:
                        if not optimizer.built:
                            optimizer.build(variables)
                        if self.precision == "mixed_float16" and id(optimizer) not in self._loss_scales:
                            self._loss_scales[id(optimizer)] = precision_lib.DynamicLossScale()
        finally:
            self._recording = None
        return names

    def _state_objects(self) -> Dict[str, Any]:
        """Everything a checkpoint holds: the global step and every model, optimizer, variable
        and module the trainer has as a public attribute (plus tapekit's loss scales)."""
        objects: Dict[str, Any] = {"global_step": self.global_step}
        names = {}
        for name, value in vars(self).items():
            if name.startswith("_") or name in objects:
                continue
            if isinstance(value, (keras.Layer, keras.optimizers.Optimizer, tf.Variable, tf.Module)):
                objects[name] = value
                names[id(value)] = name
        for key, scale in self._loss_scales.items():
            objects[f"loss_scale_{names.get(key, key)}"] = scale
        return objects

    def _resume(self) -> None:
        latest = self.checkpointer.latest
        if latest:
            self.checkpointer.restore(latest)
            logging.info("resumed from checkpoint %s at step %d", latest, self.current_step)

    def _call_loop(self, loop: CompiledLoop, iterator, num_steps: int):
        try:
            return loop(iterator, num_steps)
        except TapekitError as error:
            raise TapekitError(user_message(error)) from None


def _apply_if_finite(optimizer, gradients, variables, loss_scale=None) -> None:
    """Applies `gradients` only if they are finite on every replica; updates `loss_scale`.

    Runs per replica inside `train_step`. The replicas agree through an all-reduce, then one
    `merge_call` takes a `tf.cond` in cross-replica context around the optimizer update
    (a cond whose branch calls `merge_call` is not allowed in a replica context).
    """
    finite_here = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in gradients])
    context = tf.distribute.get_replica_context()
    bad_replicas = context.all_reduce(tf.distribute.ReduceOp.SUM,
                                      1.0 - tf.cast(finite_here, tf.float32))
    finite = tf.equal(bad_replicas, 0.0)

    def cross_replica(strategy, gradients, finite):
        finite = strategy.experimental_local_results(finite)[0]

        def apply():
            strategy.extended.call_for_each_replica(
                lambda grads: optimizer.apply_gradients(zip(grads, variables)), args=(gradients,))
            return tf.constant(True)

        tf.cond(finite, apply, lambda: tf.constant(False))
        if loss_scale is not None:
            loss_scale.update(finite)

    context.merge_call(cross_replica, args=(gradients, finite))


def metric_names(outputs, step_name: str) -> List[str]:
    """Validates what a step returned (a dict of scalars, or None) and lists its keys."""
    if outputs is None:
        return []
    if not isinstance(outputs, dict):
        raise TapekitError(
            f"{step_name} must return a dict of scalar metrics (or None), got "
            f"{type(outputs).__name__}; e.g. return {{'loss': loss}}.")
    for name, value in outputs.items():
        shape = getattr(value, "shape", None)
        if shape is None or shape.rank != 0:
            raise TapekitError(
                f"{step_name} returned metric {name!r} with shape {shape}; metrics must be "
                "scalars (reduce them, e.g. tf.reduce_mean).")
    return list(outputs)


def per_replica_spec(element_spec):
    """The spec of one replica's batch, from a (distributed) iterator's element spec."""
    def one_replica(spec):
        value_specs = getattr(spec, "_value_specs", None)  # tf.distribute's PerReplicaSpec
        return value_specs[0] if value_specs else spec
    return tf.nest.map_structure(one_replica, element_spec)


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
