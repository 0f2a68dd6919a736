"""`log_gradient_norms`: how big each optimizer's gradient and update are, as loop metrics.

With `log_gradient_norms=True` (`--log_gradient_norms`) each training loop reports, per
optimizer, means over the loop's steps of:

* `grad_norm`: the global norm of the gradient the optimizer is given, before clipping: the
  global-batch gradient (summed over replicas, loss scale divided out, sparse rows of one
  index summed; with `gradient_accumulation_steps`, the mean gradient that is applied);
* `grad_norm_clipped`: its global norm after tapekit's `clip_global_norm` and the
  optimizer's own `clipnorm`, `global_clipnorm` or `clipvalue` (as Keras clips);
* `update_ratio`: the global norm of the update the step made to the optimizer's variables
  (new weights minus old: the optimizer's whole update, weight decay included) over the
  global norm of the weights before it;
* `clipped_share`: the share of steps whose gradient clipping changed (0 to 1).

With one optimizer the names are as above; with several, each is followed by
`/<the trainer attribute holding the optimizer>` (`grad_norm/g_optimizer`). They join the
step's own metrics and flow through the loop's in-graph means
(`tapekit.compiled.loop.CompiledLoop`): no per-step read on the host.

A step that applies no update is left out of the means: a step skipped for a non-finite
gradient (`nan_policy=skip_step`, and every loss-scale overflow under mixed_float16), and
the micro-steps of `gradient_accumulation_steps` before the one that applies the update.
So a routine overflow never reads as a bad step, and a loop that applied no update reports
0. Where every step applies its update (no accumulation, no skipping), a non-finite norm
stays in the mean, as a non-finite loss does, and `nan_policy` sees it.

How: `tapekit.compiled.updates.GradientUpdater.apply` (per replica, traced) starts an
`UpdateWatch` on the global gradient just before the optimizer runs, and finishes it after,
into the step's `StepNorms` (carried by the step's `tapekit.compiled.tracing.StepTrace`).
Every replica holds the same global gradient and weights, so each computes the same numbers
(no communication is added); on several replicas the option makes the updater sum the
gradient over replicas itself, once, as it does for clipping. Off (the default), the step
has no `StepNorms` and no op of this module is traced.
"""

import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Tuple

import keras
import tensorflow as tf

METRICS = ("grad_norm", "grad_norm_clipped", "update_ratio", "clipped_share")


@dataclasses.dataclass(frozen=True)
class NormsPlan:
    """What a training loop reports: one block of `METRICS` per optimizer, in order.

    `optimizers`: (name, optimizer) pairs; the name suffixes the metrics when there are
    several. `conditional`: some update is conditional (accumulation or skipped steps), so
    the weights of the means are known only when the step runs.
    """

    optimizers: Tuple[Tuple[str, Any], ...]
    conditional: bool

    @property
    def metric_names(self) -> Tuple[str, ...]:
        if len(self.optimizers) == 1:
            return METRICS
        return tuple(f"{metric}/{name}" for name, _ in self.optimizers for metric in METRICS)


@dataclasses.dataclass
class _Sums:
    """One optimizer's squared norms in one step, over its `apply_gradients` calls."""

    gradient: tf.Tensor
    clipped_gradient: tf.Tensor
    update: tf.Tensor
    weights: tf.Tensor
    clipped: tf.Tensor  # bool
    applied: Any  # True (unconditional) or a bool tensor


class StepNorms:
    """One replica's step: what each optimizer's updates added. Traced, per replica.

    Several `apply_gradients` calls of one optimizer in a step (two models, or two calls)
    add their squared norms: the norms of all their gradients (weights, updates) together.
    """

    def __init__(self, plan: NormsPlan):
        self.plan = plan
        self._sums: Dict[int, _Sums] = {}

    def add(self, optimizer, sums: _Sums) -> None:
        before = self._sums.get(id(optimizer))
        if before is not None:
            applied = (True if before.applied is True and sums.applied is True
                       else tf.logical_or(before.applied, sums.applied))
            sums = _Sums(before.gradient + sums.gradient,
                         before.clipped_gradient + sums.clipped_gradient,
                         before.update + sums.update, before.weights + sums.weights,
                         tf.logical_or(before.clipped, sums.clipped), applied)
        self._sums[id(optimizer)] = sums

    def columns(self) -> List[Tuple[tf.Tensor, Any]]:
        """(value, weight) per metric of `plan.metric_names`: the weight is 1 where every
        step applies its update, else 1.0 or 0.0 (the step applied an update or not)."""
        columns = []
        for _, optimizer in self.plan.optimizers:
            sums = self._sums.get(id(optimizer))
            if sums is None:  # not applied through tapekit in this step (see `check`)
                columns += [(tf.zeros([]), 0)] * len(METRICS)
                continue
            weight = 1 if sums.applied is True else tf.cast(sums.applied, tf.float32)
            gradient_norm = tf.sqrt(sums.gradient)
            ratio = tf.math.divide_no_nan(tf.sqrt(sums.update), tf.sqrt(sums.weights))
            for value in (gradient_norm, tf.sqrt(sums.clipped_gradient), ratio,
                          tf.cast(sums.clipped, tf.float32)):
                columns.append((value, weight))
        return columns

    def missing(self) -> List[str]:
        """The names of the plan's optimizers this step did not apply through tapekit."""
        return [name for name, optimizer in self.plan.optimizers
                if id(optimizer) not in self._sums]


class UpdateWatch:
    """Started on the gradient an optimizer is about to get, finished once it has run.

    Traced, per replica. `gradients`: the global-batch gradient before any clipping (dense
    tensors, or `tf.IndexedSlices` with one row per index, whose norm is the dense
    gradient's: `tapekit.compiled.updates.combined_rows`); `clip_factor`: what tapekit's `clip_global_norm`
    multiplies it by (None: not set); the optimizer's own clipping is then computed as Keras
    does it. The weights are read here, before the update.
    """

    def __init__(self, optimizer, gradients: Sequence, variables: Sequence,
                 clip_factor: Optional[tf.Tensor] = None):
        self.optimizer = optimizer
        self.variables = list(variables)
        values = [_float(_values(g)) for g in gradients]
        squares = [tf.reduce_sum(tf.square(v)) for v in values]
        self.gradient = tf.add_n(squares)
        clipped = tf.constant(False)
        if clip_factor is not None:
            clip_factor = tf.cast(clip_factor, tf.float32)
            clipped = clip_factor < 1.0
            squares = [s * tf.square(clip_factor) for s in squares]
            values = [v * clip_factor for v in values] if _clips_values(optimizer) else values
        squares, clipped_here = _optimizer_clipping(optimizer, squares, values)
        self.clipped_gradient = tf.add_n(squares)
        self.clipped = tf.logical_or(clipped, clipped_here)
        self.weights_before = [_read(v) for v in self.variables]
        self.weights = tf.add_n([tf.reduce_sum(tf.square(w)) for w in self.weights_before])

    def finish(self, norms: StepNorms, applied=True) -> None:
        """After the update (`applied`: True, or a bool tensor: whether it was applied)."""
        update = tf.add_n([tf.reduce_sum(tf.square(_read(v) - w))
                           for v, w in zip(self.variables, self.weights_before)])
        norms.add(self.optimizer, _Sums(self.gradient, self.clipped_gradient, update,
                                        self.weights, self.clipped, applied))


def _optimizer_clipping(optimizer, squares, values):
    """The squared norms of each gradient after the optimizer's own clipping, and whether it
    changed the gradient (Keras: clipnorm per variable, else global_clipnorm, else clipvalue)."""
    clipnorm = getattr(optimizer, "clipnorm", None)
    global_clipnorm = getattr(optimizer, "global_clipnorm", None)
    clipvalue = getattr(optimizer, "clipvalue", None)
    if clipnorm and clipnorm > 0:
        limit = float(clipnorm) ** 2
        return ([tf.minimum(s, limit) for s in squares],
                tf.reduce_any(tf.stack(squares) > limit))
    if global_clipnorm and global_clipnorm > 0:
        total = tf.add_n(squares)
        factor = tf.minimum(1.0, float(global_clipnorm) ** 2 / tf.maximum(total, 1e-24))
        return [s * factor for s in squares], total > float(global_clipnorm) ** 2
    if clipvalue and clipvalue > 0:
        limit = float(clipvalue)
        return ([tf.reduce_sum(tf.square(tf.clip_by_value(v, -limit, limit))) for v in values],
                tf.reduce_any(tf.stack([tf.reduce_any(tf.abs(v) > limit) for v in values])))
    return squares, tf.constant(False)


def _clips_values(optimizer) -> bool:
    clipvalue = getattr(optimizer, "clipvalue", None)
    return bool(clipvalue and clipvalue > 0 and not getattr(optimizer, "clipnorm", None)
                and not getattr(optimizer, "global_clipnorm", None))


def _values(gradient):
    return gradient.values if isinstance(gradient, tf.IndexedSlices) else gradient


def _float(tensor):
    return tf.cast(tensor, tf.float32)


def _read(variable):
    """The variable's value now (this replica's copy), as float32: a read that later
    updates of the variable are ordered after."""
    if isinstance(variable, keras.Variable):
        variable = variable.value
    return _float(tf.identity(variable))
