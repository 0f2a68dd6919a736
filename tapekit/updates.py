"""What happens between gradients and `optimizer.apply_gradients`, in the graph, per optimizer.

Loss-scale unscaling, skipping non-finite steps, clipping by global norm and gradient
accumulation all have to agree across replicas. The pattern used for every conditional
update: replicas agree on a flag through an all-reduce, then one `merge_call` takes a
`tf.cond` in cross-replica context whose branch runs the optimizer on every replica
(`call_for_each_replica`). A cond in a replica context whose branch calls `merge_call`
(Keras optimizers do, to all-reduce) is not allowed by tf.distribute.

Accumulated gradients are summed over replicas at every micro-step (as Keras 3's own
`gradient_accumulation_steps` does) and kept in mirrored variables: every replica holds
the same global sum, so a checkpoint taken between micro-steps restores it exactly and a
resumed run continues bitwise as the uninterrupted one would.
"""

from typing import List, Optional

import tensorflow as tf

from tapekit.errors import TapekitError
from tapekit.precision import DynamicLossScale

SUM = tf.distribute.ReduceOp.SUM


class GradientUpdater(tf.Module):
    """Applies one optimizer's gradients with the trainer's update options.

    Created eagerly in the strategy scope (its variables are checkpointed with the trainer);
    `apply` runs inside `train_step`, per replica.

    Args:
      optimizer: a built Keras optimizer; it sums gradients over replicas.
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

    @property
    def is_plain(self) -> bool:
        """True when this is just `optimizer.apply_gradients` (the fast path)."""
        return (self.loss_scale is None and self.clip_global_norm is None
                and self.accumulation_steps == 1 and not self.skip_nonfinite)

    def backprop_seed(self, dtype):
        """What to seed backprop with: the loss scale (differentiating loss × scale) or None."""
        return None if self.loss_scale is None else tf.cast(self.loss_scale.scale, dtype)

    def apply(self, gradients: List[tf.Tensor], variables: List[tf.Variable]) -> None:
        """Runs per replica: unscale, accumulate, check, clip and (maybe) apply `gradients`."""
        if self.is_plain:
            self.optimizer.apply_gradients(zip(gradients, variables))
            return
        context = tf.distribute.get_replica_context()
        replicas = context.num_replicas_in_sync
        if self.loss_scale is not None:
            gradients = [_scaled(g, 1.0 / self.loss_scale.scale) for g in gradients]
        accumulated = None
        if self.accumulation_steps > 1:
            summed = context.all_reduce(SUM, gradients) if replicas > 1 else gradients
            accumulated = [a.read_value() + tf.convert_to_tensor(g)
                           for a, g in zip(self.accumulators, summed)]
            # This replica's share of the mean global gradient (the optimizer sums shares).
            gradients = [a / (self.accumulation_steps * replicas) for a in accumulated]
        finite = tf.constant(True)
        if self.skip_nonfinite:
            finite_here = tf.reduce_all([tf.reduce_all(tf.math.is_finite(_values(g)))
                                         for g in gradients])
            bad_replicas = context.all_reduce(SUM, 1.0 - tf.cast(finite_here, tf.float32))
            finite = tf.equal(bad_replicas, 0.0)
        if self.clip_global_norm is not None:
            # Clip the gradient the optimizer will apply (the sum over replicas), not each
            # replica's share: scale every share by the factor computed from the sum.
            if accumulated is not None:
                total = [a / self.accumulation_steps for a in accumulated]
            else:
                total = context.all_reduce(SUM, gradients) if replicas > 1 else gradients
            norm = tf.linalg.global_norm(total)
            factor = tf.minimum(1.0, self.clip_global_norm / tf.maximum(norm, 1e-12))
            gradients = [_scaled(g, factor) for g in gradients]
        context.merge_call(self._cross_replica_apply,
                           args=(gradients, variables, finite, accumulated))

    def _cross_replica_apply(self, strategy, gradients, variables, finite, accumulated):
        finite = strategy.experimental_local_results(finite)[0]
        if self.accumulation_steps > 1:
            for accumulator, value in zip(self.accumulators, accumulated):
                strategy.extended.update(accumulator, lambda a, v: a.assign(v), args=(value,))
            self.micro_steps.assign_add(1)
            due = tf.equal(self.micro_steps % self.accumulation_steps, 0)
        else:
            due = tf.constant(True)

        def apply():
            strategy.extended.call_for_each_replica(
                lambda grads: self.optimizer.apply_gradients(zip(grads, variables)),
                args=(gradients,))
            return tf.constant(True)

        tf.cond(tf.logical_and(due, finite), apply, lambda: tf.constant(False))
        if self.accumulation_steps > 1:
            def reset():
                for accumulator in self.accumulators:
                    accumulator.assign(tf.zeros_like(accumulator))
                return tf.constant(True)
            tf.cond(due, reset, lambda: tf.constant(False))
        if self.loss_scale is not None:
            tf.cond(due, lambda: self.loss_scale.update(finite) or tf.constant(True),
                    lambda: tf.constant(False))


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
                    allow_none_gradients: bool = False) -> None:
    """`Trainer.apply_gradients` once the updater is known: d(loss)/d(variables) from `tape`,
    applied by `updater`. Traced, per replica. None gradients raise unless allowed."""
    # Seeding backprop with the loss scale is differentiating loss × scale (the tape has closed).
    gradients = tape.gradient(loss, variables, output_gradients=updater.backprop_seed(loss.dtype))
    missing = [_variable_path(v) for g, v in zip(gradients, variables) if g is None]
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


def _variable_path(variable) -> str:
    return getattr(variable, "path", None) or getattr(variable, "name", repr(variable))
