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
  global norm of the weights before it (0 while the weights are all zero);
* `clipped_share`: the share of steps whose gradient clipping changed (0 to 1).

With one optimizer the names are as above; with several, each is followed by
`/<the trainer attribute holding the optimizer>` (`grad_norm/g_optimizer`). They join the
step's own metrics and flow through the loop's in-graph means
(`tapekit.compiled.loop.CompiledLoop`): no per-step read on the host.

A step that applies no update is left out of the means: a step skipped for a non-finite
gradient (`nan_policy=skip_step`, and every loss-scale overflow under mixed_float16), and
the micro-steps of `gradient_accumulation_steps` before the one that applies the update.
So a routine overflow never reads as a bad step, and a loop that applied no update reports
0. So is a step that does not run the optimizer's `apply_gradients`: one under a tensor
condition (`if self.global_step % 2 == 0:`, a `tf.cond`) counts the steps it ran in. Where
every step applies its update (no accumulation, no skipping), a non-finite norm stays in
the mean, as a non-finite loss does, and `nan_policy` sees it.

How: `tapekit.compiled.updates.GradientUpdater.apply` (per replica, traced) starts an
`UpdateWatch` on the global gradient just before the optimizer runs, and finishes it after,
into the step's `StepNorms` (carried by the step's `tapekit.compiled.tracing.StepTrace`).
Every replica holds the same global gradient and weights, so each computes the same numbers
(no communication is added); on several replicas the option makes the updater sum the
gradient over replicas itself, once, as it does for clipping. An update in the step's own
control flow adds to per-replica `Scratch` variables instead (its tensors cannot leave
the branch), read and zeroed as the step's metrics are built; such a step's weights are
known only when it runs, so its loop is traced again carrying counts. Off (the default),
the step has no `StepNorms` and no op of this module is traced.
"""

import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Tuple

import keras
import tensorflow as tf

from tapekit import compat
from tapekit.errors import TapekitError

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
    clipped: Any  # a bool tensor, or False (nothing clips)
    applied: Any  # True (unconditional) or a bool tensor


_SCRATCH = ("gradient", "clipped_gradient", "update", "weights", "clipped", "applied")


class Scratch:
    """Per-replica scratch variables: what updates inside the step's own control flow (an
    `apply_gradients` under `tf.cond` or in a `tf.while_loop`, e.g. `if self.global_step % 2
    == 0:` with AutoGraph) added in one step, per optimizer: the squared norms summed, and
    whether it clipped and whether it applied (1.0 or 0.0).

    Created eagerly in the strategy scope with the loop, only with `log_gradient_norms`; they
    belong to the loop, not to the trainer, so they are in no checkpoint. Each replica's
    copy (`synchronization=ON_READ`) is written by that replica only: no communication. They
    are 0 between steps: the step that adds to them reads and zeroes them as it builds its
    metrics (automatic control dependencies order the writes, the read, then the reset).
    """

    def __init__(self, plan: NormsPlan):
        self._variables = {
            id(optimizer): {key: tf.Variable(0.0, trainable=False, name=f"gradient_norms_{key}",
                                             synchronization=tf.VariableSynchronization.ON_READ,
                                             aggregation=tf.VariableAggregation.NONE)
                            for key in _SCRATCH}
            for _, optimizer in plan.optimizers}

    def add(self, optimizer, sums: "_Sums") -> None:
        """Adds one update's `sums` to this replica's copy (in whatever branch it runs)."""
        variables = self._variables[id(optimizer)]
        for key in ("gradient", "clipped_gradient", "update", "weights"):
            variables[key].assign_add(getattr(sums, key))
        for key in ("clipped", "applied"):
            value = getattr(sums, key)
            if value is True:
                variables[key].assign(1.0)
            elif value is not False:
                variables[key].assign(tf.maximum(variables[key].read_value(),
                                                  tf.cast(value, tf.float32)))

    def taken(self, optimizer) -> "_Sums":
        """This step's sums of `optimizer` (its `applied` a bool tensor); the variables are
        zeroed after they are read."""
        variables = self._variables[id(optimizer)]
        values = {key: tf.identity(variable.read_value()) for key, variable in variables.items()}
        for variable in variables.values():
            variable.assign(0.0)
        return _Sums(values["gradient"], values["clipped_gradient"], values["update"],
                     values["weights"], values["clipped"] > 0.0, values["applied"] > 0.0)


class StepNorms:
    """One replica's step: what each optimizer's updates added. Traced, per replica.

    Several `apply_gradients` calls of one optimizer in a step (two models, or two calls)
    add their squared norms: the norms of all their gradients (weights, updates) together.
    An update in the step's own control flow (a branch of `tf.cond`, the body of a
    `tf.while_loop`: another graph than the step's) cannot hand its tensors out of it: it
    adds to `scratch` instead, read as the step's metrics are built; a branch not taken adds
    nothing, so the step counts as one that applied no update for that optimizer.
    """

    def __init__(self, plan: NormsPlan, scratch: Optional[Scratch] = None):
        self.plan = plan
        self._scratch = scratch
        self._graph = compat.traced_graph()  # the step's; None: the step runs eagerly
        self._sums: Dict[int, _Sums] = {}
        self._in_control_flow: Dict[int, Any] = {}  # id -> optimizer: added to `scratch`

    @property
    def in_control_flow(self) -> bool:
        """Whether some update of this step ran in the step's own control flow (its weights
        are then known only when the step runs)."""
        return bool(self._in_control_flow)

    def add(self, optimizer, sums: _Sums) -> None:
        if self._graph is not None and compat.traced_graph() not in (None, self._graph):
            if self._scratch is None:
                raise TapekitError(
                    "internal: log_gradient_norms saw an update in the step's control flow "
                    "without scratch variables to add it to.")
            self._scratch.add(optimizer, sums)
            self._in_control_flow[id(optimizer)] = optimizer
            return
        before = self._sums.get(id(optimizer))
        if before is not None:
            sums = _added(before, sums)
        self._sums[id(optimizer)] = sums

    def _step_sums(self, optimizer) -> Optional[_Sums]:
        sums = self._sums.get(id(optimizer))
        if id(optimizer) in self._in_control_flow:
            taken = self._scratch.taken(optimizer)
            sums = taken if sums is None else _added(sums, taken)
        return sums

    def columns(self) -> List[Tuple[tf.Tensor, Any]]:
        """(value, weight) per metric of `plan.metric_names`: the weight is 1 where every
        step applies its update, else 1.0 or 0.0 (the step applied an update or not)."""
        columns = []
        for _, optimizer in self.plan.optimizers:
            sums = self._step_sums(optimizer)
            if sums is None:  # not applied through tapekit in this step (see `check`)
                columns += [(tf.zeros([]), 0)] * len(METRICS)
                continue
            weight = 1 if sums.applied is True else tf.cast(sums.applied, tf.float32)
            gradient_norm = tf.sqrt(sums.gradient)
            clipped_norm = (gradient_norm if sums.clipped_gradient is sums.gradient
                            else tf.sqrt(sums.clipped_gradient))
            ratio = tf.sqrt(tf.math.divide_no_nan(sums.update, sums.weights))
            for value in (gradient_norm, clipped_norm, ratio, tf.cast(sums.clipped, tf.float32)):
                columns.append((value, weight))
        return columns

    def missing(self) -> List[str]:
        """The names of the plan's optimizers this step did not apply through tapekit."""
        return [name for name, optimizer in self.plan.optimizers
                if id(optimizer) not in self._sums and id(optimizer) not in self._in_control_flow]


def _added(before: _Sums, sums: _Sums) -> _Sums:
    """Two updates' sums of one optimizer in one step, together."""
    applied = (True if before.applied is True and sums.applied is True
               else tf.logical_or(before.applied, sums.applied))
    unclipped = before.clipped_gradient is before.gradient and (
        sums.clipped_gradient is sums.gradient)
    gradient = before.gradient + sums.gradient
    clipped = (False if before.clipped is False and sums.clipped is False
               else tf.logical_or(before.clipped, sums.clipped))
    return _Sums(gradient, gradient if unclipped
                 else before.clipped_gradient + sums.clipped_gradient,
                 before.update + sums.update, before.weights + sums.weights, clipped, applied)


class UpdateWatch:
    """Started on the gradient an optimizer is about to get, finished once it has run.

    Traced, per replica. `gradients`: the global-batch gradient before any clipping (dense
    tensors, or `tf.IndexedSlices` with one row per index, whose norm is the dense
    gradient's: `tapekit.compiled.updates.combined_rows`); `clip_factor`: what tapekit's
    `clip_global_norm` multiplies it by (None: not set); the optimizer's own clipping is then
    computed as Keras does it. The weights are read here, before the update. A handful of
    ops per variable (each squared norm is one `l2_loss`): the cost is per-op overhead on a
    small model, a pass over the weights on a large one.
    """

    def __init__(self, optimizer, gradients: Sequence, variables: Sequence,
                 clip_factor: Optional[tf.Tensor] = None):
        self.optimizer = optimizer
        self.variables = list(variables)
        values = [_float(_values(g)) for g in gradients]
        halves = [tf.nn.l2_loss(v) for v in values]  # each sum(v²) / 2
        self.gradient = 2.0 * tf.add_n(halves)
        self.clipped_gradient, self.clipped = self.gradient, False
        if clip_factor is not None:
            clip_factor = tf.cast(clip_factor, tf.float32)
            self.clipped = clip_factor < 1.0
            self.clipped_gradient = self.gradient * tf.square(clip_factor)
            if _optimizer_clip(optimizer)[0] == "clipnorm":
                halves = [h * tf.square(clip_factor) for h in halves]
            elif _optimizer_clip(optimizer)[0] == "clipvalue":
                values = [v * clip_factor for v in values]
        self._optimizer_clipping(halves, values)
        self.weights_before = [_read(v) for v in self.variables]
        self.weights = 2.0 * tf.add_n([tf.nn.l2_loss(w) for w in self.weights_before])

    def _optimizer_clipping(self, halves, values) -> None:
        """The optimizer's own clipping, as Keras does it (clipnorm per variable, else
        global_clipnorm, else clipvalue): the squared norm after it, and whether it clipped."""
        kind, limit = _optimizer_clip(self.optimizer)
        if kind is None:
            return
        if kind == "clipnorm":
            half_limit = limit ** 2 / 2.0
            clipped = tf.reduce_any(tf.stack(halves) > half_limit)
            self.clipped_gradient = 2.0 * tf.add_n([tf.minimum(h, half_limit) for h in halves])
        elif kind == "global_clipnorm":
            clipped = self.clipped_gradient > limit ** 2
            self.clipped_gradient = tf.minimum(self.clipped_gradient, limit ** 2)
        else:
            clipped = tf.reduce_any(tf.stack([tf.reduce_any(tf.abs(v) > limit) for v in values]))
            self.clipped_gradient = 2.0 * tf.add_n(
                [tf.nn.l2_loss(tf.clip_by_value(v, -limit, limit)) for v in values])
        self.clipped = clipped if self.clipped is False else tf.logical_or(self.clipped, clipped)

    def finish(self, norms: StepNorms, applied=True) -> None:
        """After the update (`applied`: True, or a bool tensor: whether it was applied)."""
        update = 2.0 * tf.add_n([tf.nn.l2_loss(_read(v) - w)
                                 for v, w in zip(self.variables, self.weights_before)])
        norms.add(self.optimizer, _Sums(self.gradient, self.clipped_gradient, update,
                                        self.weights, self.clipped, applied))


def _optimizer_clip(optimizer) -> Tuple[Optional[str], float]:
    """How the optimizer clips its gradient itself, as Keras decides: (kind, limit) or
    (None, 0): one of clipnorm, global_clipnorm, clipvalue (Keras allows one)."""
    for kind in ("clipnorm", "global_clipnorm", "clipvalue"):
        limit = getattr(optimizer, kind, None)
        if limit and limit > 0:
            return kind, float(limit)
    return None, 0.0


def _values(gradient):
    return gradient.values if isinstance(gradient, tf.IndexedSlices) else gradient


def _float(tensor):
    return tf.cast(tensor, tf.float32)


def _read(variable):
    """The variable's value now (this replica's copy), as float32: a read that later
    updates of the variable are ordered after (and do not change: they copy first)."""
    if isinstance(variable, keras.Variable):
        variable = variable.value
    return _float(tf.convert_to_tensor(variable))
