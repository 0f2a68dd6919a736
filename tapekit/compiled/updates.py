"""What happens between gradients and `optimizer.apply_gradients`, in the graph, per optimizer.

The promise: the optimizer the user configured sees the gradient one device would see
for the global batch, whatever the number of replicas. Keras's own path breaks it three
ways, so tapekit takes the gradient there itself when any of them applies:

* a sparse gradient (`tf.IndexedSlices`, e.g. from `keras.layers.Embedding`) whose rows
  repeat an index: Keras's Adam, AdamW, RMSprop, Adagrad, ... square each row on its own,
  so two rows of one index count as two gradients, not as their sum. On several replicas
  every row of a learned position table arrives once per replica. tapekit sums the rows of
  each index (after the sum over replicas), keeping the gradient sparse;
* the optimizer's own `clipnorm`, `global_clipnorm` and `clipvalue`: Keras clips each
  replica's partial gradient before summing over replicas. tapekit hands the optimizer the
  sum, so its clipping acts on the global gradient;
* tapekit's own mechanisms (loss-scale unscaling, skipping non-finite steps, clipping by
  global norm, gradient accumulation), which need the global gradient too.

Then the gradient is summed over replicas once, here (`all_reduce`), and the optimizer runs
per replica on that sum (`merge_call`, then `call_for_each_replica`) with Keras's own sum
left out for that call (`tapekit.compat.gradients_already_summed`, opened in cross-replica
context, so every replica thread sees it). The user's optimizer object is not changed
otherwise: outside tapekit it behaves as before. Otherwise (dense gradients, no clipping by
the optimizer, nothing of tapekit's) `optimizer.apply_gradients` runs per replica as in a
hand-written loop: Keras's own sum over replicas is exact there, and it is the fast path.

A conditional update (accumulation, skipped steps) is one `tf.cond` in cross-replica
context: tf.distribute does not allow a cond in replica context whose branch calls
`merge_call` (Keras optimizers do). Accumulated gradients are kept in mirrored variables
holding the global sum, so a checkpoint between micro-steps restores it exactly.

The optimizer's own `gradient_accumulation_steps` and `loss_scale_factor`, and a
`keras.optimizers.LossScaleOptimizer`, are refused before step 1 (`check_optimizer`):
tapekit's options do the same exactly.
"""

from typing import Any, Callable, Dict, List, Optional

import keras
import tensorflow as tf

from tapekit import compat, errors
from tapekit.compiled import build, gradient_norms, tracing
from tapekit.compiled.precision import DynamicLossScale
from tapekit.errors import TapekitError

SUM = tf.distribute.ReduceOp.SUM


def check_optimizer(optimizer, clip_global_norm: Optional[float] = None) -> None:
    """Raises a TapekitError, before any step, for an optimizer set-up tapekit cannot make
    exact: the optimizer's own gradient accumulation or loss scaling (`LossScaleOptimizer`,
    `loss_scale_factor`; tapekit has options for both), or the optimizer's `global_clipnorm`
    together with `clip_global_norm`."""
    name = type(optimizer).__name__
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        raise TapekitError(
            f"{name} is not supported: tapekit scales the loss itself, on every strategy "
            "(Keras's breaks under MirroredStrategy); pass its inner optimizer and set "
            "precision='mixed_float16' (--precision=mixed_float16).")
    factor = getattr(optimizer, "loss_scale_factor", None)
    if factor is not None:
        raise TapekitError(
            f"{name}(loss_scale_factor={factor}) is not supported: Keras divides the gradients "
            "by it, but tapekit's apply_gradients differentiates the loss as given; scale the "
            "loss with precision='mixed_float16' (--precision=mixed_float16) instead.")
    steps = getattr(optimizer, "gradient_accumulation_steps", None)
    if steps:
        raise TapekitError(
            f"{name}(gradient_accumulation_steps={steps}) is not supported: tapekit "
            "accumulates over every replica and resumes exactly between micro-steps; remove "
            f"it from the optimizer and set gradient_accumulation_steps={steps} on the "
            f"trainer (--gradient_accumulation_steps={steps}).")
    if clip_global_norm is not None and getattr(optimizer, "global_clipnorm", None):
        raise TapekitError(
            f"{name}(global_clipnorm={optimizer.global_clipnorm}) and "
            f"clip_global_norm={clip_global_norm} (--clip_global_norm) both clip the global "
            "gradient norm; keep one of them.")


def optimizer_clips(optimizer) -> bool:
    """Whether the optimizer clips gradients itself (`clipnorm`, `global_clipnorm`, `clipvalue`)."""
    return any(getattr(optimizer, name, None) for name in ("clipnorm", "global_clipnorm",
                                                           "clipvalue"))


def is_linear(optimizer) -> bool:
    """Whether the optimizer's update is linear in the gradient (Keras's SGD, with or without
    momentum, unclipped): then repeated sparse rows need no combining, their sum is what
    the update adds anyway. A subclass may override the update, so only SGD itself counts."""
    return type(optimizer) is keras.optimizers.SGD and not optimizer_clips(optimizer)


class GradientUpdater(tf.Module):
    """Applies one optimizer's gradients with the trainer's update options.

    Created eagerly in the strategy scope (its variables are checkpointed with the trainer);
    `apply` runs inside `train_step`, per replica.

    Args:
      optimizer: a built Keras optimizer (see `check_optimizer`).
      variables: the variables this optimizer updates (accumulators mirror them).
      loss_scale: a `DynamicLossScale` for mixed_float16, else None.
      clip_global_norm: clip the global-batch gradient to this global norm, else None.
      accumulation_steps: apply the mean gradient of this many micro-steps (1: every step).
      skip_nonfinite: do not apply an update whose gradients are not all finite.
    """

    def __init__(self, optimizer, variables, loss_scale: Optional[DynamicLossScale] = None,
                 clip_global_norm: Optional[float] = None, accumulation_steps: int = 1,
                 skip_nonfinite: bool = False, name: str = "updater"):
        super().__init__(name=name)
        self.optimizer = optimizer
        self.loss_scale = loss_scale
        self.clip_global_norm = clip_global_norm
        self.accumulation_steps = int(accumulation_steps)
        self.skip_nonfinite = skip_nonfinite or loss_scale is not None
        self.variable_ids = [id(v) for v in variables]
        if self.accumulation_steps > 1:
            # Mirrored: the running sum over micro-steps of the global-batch gradient.
            self.accumulators = [
                tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False, name="accumulator",
                            aggregation=tf.VariableAggregation.NONE)
                for v in variables]
            self.micro_steps = tf.Variable(
                0, dtype=tf.int64, trainable=False, name="micro_steps",
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)

    def _accumulators_of(self, variables) -> List[tf.Variable]:
        return [self.accumulators[self.variable_ids.index(id(v))] for v in variables]

    @property
    def is_plain(self) -> bool:
        """True when tapekit adds none of its own options (no state of its own to keep)."""
        return (self.loss_scale is None and self.clip_global_norm is None
                and self.accumulation_steps == 1 and not self.skip_nonfinite)

    def backprop_seed(self, dtype):
        """What to seed backprop with: the loss scale (differentiating loss × scale) or None."""
        return None if self.loss_scale is None else tf.cast(self.loss_scale.scale, dtype)

    def combines_rows(self, gradients) -> bool:
        """Whether repeated rows of sparse `gradients` must be summed before the update:
        when there are sparse gradients and anything but a linear update sees them, and
        they are not accumulated (the accumulator's scatter-add sums them already)."""
        if self.accumulation_steps > 1:  # scattered into a dense sum, which adds them
            return False
        return (any(isinstance(g, tf.IndexedSlices) for g in gradients)
                and not (is_linear(self.optimizer) and self.clip_global_norm is None))

    def apply(self, gradients: List[tf.Tensor], variables: List[tf.Variable]) -> None:
        """Runs per replica: hands the optimizer the gradient one device would see. With
        `log_gradient_norms` (the step's trace holds a `StepNorms`) it notes the gradient's
        and the update's norms there (`tapekit.compiled.gradient_norms`)."""
        context = tf.distribute.get_replica_context()
        replicas = context.num_replicas_in_sync
        norms = _step_norms()
        combine = self.combines_rows(gradients)
        # The norms need the global gradient: on several replicas it is summed here.
        if self.is_plain and (replicas == 1 or not (combine or optimizer_clips(self.optimizer)
                                                    or norms is not None)):
            if combine:
                gradients = [combined_rows(g) for g in gradients]
            watch = None if norms is None else self._watch(gradients, variables, combine)
            self.optimizer.apply_gradients(zip(gradients, variables))
            if watch is not None:
                watch.finish(norms)
            return
        if self.loss_scale is not None:
            gradients = [_scaled(g, 1.0 / self.loss_scale.scale) for g in gradients]
        if replicas > 1:  # the global-batch gradient, on every replica
            gradients = context.all_reduce(SUM, gradients)
        if combine:
            gradients = [combined_rows(g) for g in gradients]
        accumulated = None
        if self.accumulation_steps > 1:
            accumulators = self._accumulators_of(variables)
            accumulated = [_added(a.read_value(), g) for a, g in zip(accumulators, gradients)]
            gradients = [a / self.accumulation_steps for a in accumulated]
        finite = tf.constant(True)
        if self.skip_nonfinite:
            finite_here = tf.reduce_all([tf.reduce_all(tf.math.is_finite(_values(g)))
                                         for g in gradients])
            # Every replica holds the same sum; the vote makes sure they take one branch.
            bad_replicas = (context.all_reduce(SUM, 1.0 - tf.cast(finite_here, tf.float32))
                            if replicas > 1 else 1.0 - tf.cast(finite_here, tf.float32))
            finite = tf.equal(bad_replicas, 0.0)
        unclipped, factor = gradients, None
        if self.clip_global_norm is not None:  # factor exactly 1 below the threshold
            norm = tf.linalg.global_norm(gradients)
            factor = tf.minimum(1.0, self.clip_global_norm / tf.maximum(norm, 1e-12))
            gradients = [_scaled(g, factor) for g in gradients]
        watch = (None if norms is None
                 else self._watch(unclipped, variables, combine or accumulated is not None, factor))
        applied = context.merge_call(self._cross_replica_apply,
                                     args=(gradients, variables, finite, accumulated))
        if watch is not None:
            watch.finish(norms, True if applied is None else applied)

    def _watch(self, gradients, variables, combined: bool, clip_factor=None):
        """An `UpdateWatch` of the global gradient (its sparse rows summed unless `combined`)."""
        if not combined:
            gradients = [combined_rows(g) for g in gradients]
        return gradient_norms.UpdateWatch(self.optimizer, gradients, variables, clip_factor)

    def _cross_replica_apply(self, strategy, gradients, variables, finite, accumulated):
        """The update, in cross-replica context. Returns whether it was applied (a bool
        tensor), or None where it always is."""
        finite = strategy.experimental_local_results(finite)[0]
        if self.accumulation_steps > 1:
            accumulators = self._accumulators_of(variables)
            for accumulator, value in zip(accumulators, accumulated):
                strategy.extended.update(accumulator, lambda a, v: a.assign(v), args=(value,))
            self.micro_steps.assign_add(1)
            due = tf.equal(self.micro_steps % self.accumulation_steps, 0)
        else:
            due = tf.constant(True)

        def apply():
            with compat.gradients_already_summed(self.optimizer):
                strategy.extended.call_for_each_replica(
                    lambda grads: self.optimizer.apply_gradients(zip(grads, variables)),
                    args=(gradients,))
            return tf.constant(True)

        applied = None
        if self.accumulation_steps == 1 and not self.skip_nonfinite:
            apply()  # unconditional: no cond to build
        else:
            applied = tf.logical_and(due, finite)
            tf.cond(applied, apply, lambda: tf.constant(False))
        if self.accumulation_steps > 1:
            def reset():
                for accumulator in self.accumulators:
                    accumulator.assign(tf.zeros_like(accumulator))
                return tf.constant(True)
            tf.cond(due, reset, lambda: tf.constant(False))
        if self.loss_scale is not None:
            tf.cond(due, lambda: self.loss_scale.update(finite) or tf.constant(True),
                    lambda: tf.constant(False))
        return applied


def _step_norms() -> Optional[gradient_norms.StepNorms]:
    """The running step's `StepNorms` (log_gradient_norms), else None."""
    trace = tracing.current()
    return None if trace is None else trace.gradient_norms


def combined_rows(gradient):
    """A sparse gradient with one row per index (the sum of its rows of that index), in
    order of first appearance; a dense gradient as it is. Costs O(rows of the gradient),
    never a dense copy of the table."""
    if not isinstance(gradient, tf.IndexedSlices):
        return gradient
    indices, positions = tf.unique(gradient.indices)
    values = tf.math.unsorted_segment_sum(gradient.values, positions, tf.shape(indices)[0])
    return tf.IndexedSlices(values, indices, gradient.dense_shape)


def _added(dense, gradient):
    """`dense` + `gradient`, scattering a sparse gradient's rows into it."""
    if isinstance(gradient, tf.IndexedSlices):
        return tf.tensor_scatter_nd_add(dense, tf.expand_dims(gradient.indices, -1),
                                        gradient.values)
    return dense + gradient


def _values(gradient):
    """The numbers of a dense or sparse (tf.IndexedSlices) gradient."""
    return gradient.values if isinstance(gradient, tf.IndexedSlices) else gradient


def _scaled(gradient, factor):
    """`gradient` × `factor`, keeping a sparse gradient sparse."""
    if isinstance(gradient, tf.IndexedSlices):
        return tf.IndexedSlices(gradient.values * tf.cast(factor, gradient.values.dtype),
                                gradient.indices, gradient.dense_shape)
    return gradient * tf.cast(factor, gradient.dtype)


def trainable_variables(models_or_variables) -> List[tf.Variable]:
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


def updater_key(optimizer, variables) -> tuple:
    """Identifies one optimizer/variables pair (one `GradientUpdater`)."""
    return (id(optimizer),) + tuple(id(v) for v in variables)


def apply_from_tape(updater: GradientUpdater, tape: tf.GradientTape, loss, variables,
                    allow_none_gradients: bool = False,
                    describe: Callable[[], str] = lambda: "") -> None:
    """`Trainer.apply_gradients` once the updater is known: d(loss)/d(variables) from `tape`,
    applied by `updater`. Traced, per replica. None gradients raise unless allowed; the
    error names what `describe()` says (the model and the call)."""
    # Seeding backprop with the loss scale is differentiating loss × scale (the tape has closed).
    gradients = tape.gradient(loss, variables, output_gradients=updater.backprop_seed(loss.dtype))
    missing = [_variable_path(v) for g, v in zip(gradients, variables) if g is None]
    if missing and not allow_none_gradients:
        raise TapekitError(
            f"no gradient for {len(missing)} variable(s){describe()}: {', '.join(missing)}; the "
            "loss does not depend on them. Run the forward pass inside the tape and pass only "
            "the models that loss trains (or apply_gradients(..., allow_none_gradients=True)).")
    # A variable without a gradient is left out, as Keras leaves it out: no momentum or
    # weight decay moves it (and its accumulator, if any, keeps its sum).
    pairs = [(g, v) for g, v in zip(gradients, variables) if g is not None]
    trace = tracing.current()
    if trace is not None and trace.deferred is not None:  # XLA part of a step: apply after it
        trace.deferred.add(updater, [v for _, v in pairs], [g for g, _ in pairs])
        return
    updater.apply([g for g, _ in pairs], [v for _, v in pairs])


def _variable_path(variable) -> str:
    return getattr(variable, "path", None) or getattr(variable, "name", repr(variable))


class Updaters:
    """The run's `GradientUpdater`s, one per optimizer/variables pair the step updates.

    Added eagerly, in the strategy scope, after the build trace recorded the pairs
    (`tapekit.compiled.build.BuildReport.updates`); each optimizer is built on its variables here
    (building one in a replica context fails under MirroredStrategy, keras-team/keras#19246).
    """

    def __init__(self, options, attribute_name: Callable[[Any], Optional[str]] = lambda v: None):
        self._options = options
        self._attribute_name = attribute_name  # the trainer attribute holding a model, if any
        self._by_key: Dict[tuple, GradientUpdater] = {}
        self.built: List[tuple] = []  # (optimizer, the variables it was built on, in order)

    def add(self, optimizer, variables) -> None:
        key = updater_key(optimizer, variables)
        if key in self._by_key:
            return
        if not optimizer.built:
            optimizer.build(variables)
        if all(built is not optimizer for built, _ in self.built):
            self.built.append((optimizer, list(variables)))
        options = self._options
        loss_scale = DynamicLossScale() if options.precision == "mixed_float16" else None
        self._by_key[key] = GradientUpdater(
            optimizer, variables, loss_scale=loss_scale, clip_global_norm=options.clip_global_norm,
            accumulation_steps=options.gradient_accumulation_steps,
            skip_nonfinite=options.nan_policy == "skip_step", name=f"updater_{len(self._by_key)}")

    def apply(self, tape, loss, models_or_variables, optimizer, allow_none_gradients: bool) -> None:
        """`Trainer.apply_gradients` (traced, per replica): recorded while the step is traced
        to build the trainer (`tapekit.compiled.tracing`), applied by the pair's updater otherwise."""
        variables = trainable_variables(models_or_variables)
        if not variables:
            raise TapekitError(
                f"apply_gradients got no trainable variables from {models_or_variables!r}; "
                "pass the model (or its variables) that the loss should update.")
        check_optimizer(optimizer, self._options.clip_global_norm)
        if build.record_update(optimizer, variables):  # building: remember what updates what
            return
        updater = self._by_key.get(updater_key(optimizer, variables))
        if updater is None:
            raise TapekitError(
                "apply_gradients was called with an optimizer/variables pair that train_step did "
                "not use when tapekit built the trainer; call apply_gradients the same way every step.")
        apply_from_tape(updater, tape, loss, variables, allow_none_gradients,
                        lambda: self._describe(models_or_variables))

    def _describe(self, models_or_variables) -> str:
        """' of self.generator (in apply_gradients at gan.py:40)' for the error of a call."""
        held = models_or_variables if isinstance(models_or_variables, (list, tuple)) else [
            models_or_variables]
        names = [f"self.{name}" for name in map(self._attribute_name, held) if name]
        where = errors.calling_user_frame()
        return ((f" of {', '.join(names)}" if names else "")
                + (f" (in apply_gradients at {where})" if where else ""))

    def norms_plan(self) -> gradient_norms.NormsPlan:
        """What `log_gradient_norms` reports: the optimizers in the order the step first
        applies them, each named by the trainer attribute holding it."""
        named = tuple((self._attribute_name(optimizer) or optimizer.name, optimizer)
                      for optimizer, _ in self.built)
        conditional = any(u.accumulation_steps > 1 or u.skip_nonfinite
                          for u in self._by_key.values())
        return gradient_norms.NormsPlan(named, conditional)

    @property
    def loss_scales(self) -> List[DynamicLossScale]:
        return [u.loss_scale for u in self._by_key.values() if u.loss_scale is not None]

    def checkpointed(self) -> Dict[str, GradientUpdater]:
        """The updaters that hold state (loss scales, accumulators), by checkpoint name."""
        return {f"updater_{index}": updater
                for index, updater in enumerate(self._by_key.values()) if not updater.is_plain}
