"""Building a trainer before its first step: one real trace of its step.

`trace_step` traces the user's step exactly as the compiled loop will — in a
`tf.function`, under `strategy.run`, on placeholders of one replica's batch — so that
whatever runs in a plain `tf.function` also runs here: layers build their variables,
`add_loss`/`model.losses`, `keras.metrics` updates, SeedGenerators, BatchNorm updates.
Nothing is executed (tracing only), so no state changes.

Two things are only recorded while tracing, because they cannot happen in a replica
context: which optimizer updates which variables (through `Trainer.apply_gradients`, or
`optimizer.apply_gradients` called directly), so that the optimizers are built in the
strategy scope afterwards (keras-team/keras#19246); and which `keras.metrics` the step
updates, so that the loop resets and reports them.

An exception from the user's step becomes one `TapekitError` naming the user's line;
the data is blamed only when its shape or dtype is the cause. An exception of the user's
own class (not Python's, TensorFlow's or Keras's) is raised as it is (`own_exception`).
"""

import functools
from typing import Any, List, NamedTuple, Optional, Sequence, Tuple

import keras
import tensorflow as tf
from absl import logging

from tapekit import compat
from tapekit.checkpoint import state as state_lib
from tapekit.compiled import means, tracing
from tapekit.errors import (
    TapekitError,
    blames_data,
    describe_spec,
    needs_eager,
    own_exception,
    summarize,
    user_frame,
)


class BuildReport(NamedTuple):
    """What the build trace of a step found; the compiled loop is planned from it."""
    metric_names: List[str]  # the keys of the dict the step returns
    updates: List[Tuple[Any, List]]  # (optimizer, variables) in call order, once per replica
    keras_metrics: List[keras.metrics.Metric]  # the ones the step updates
    static_weights: bool  # on batches of `spec`, every value's weight is a constant (means)
    reads_step_counter: bool  # the step reads the step counter it was given
    spec: Any  # one replica's batch, as traced


def autographed(step_fn):
    """`step_fn` converted by AutoGraph when called, as a `tf.function` would convert it
    (tensor-dependent `if`/`for`/`while` become graph control flow; functions it calls are
    converted in turn, unless marked `do_not_convert`; code AutoGraph cannot convert runs
    as it is, with TensorFlow's warning).

    tapekit's own `tf.function`s are traced without AutoGraph: converting tapekit's code on
    every start cost about a second and gained nothing (it uses `tf.while_loop`/`tf.cond`
    directly). The user's step is converted on its own with this
    (`tapekit.compat.autograph_converted`).
    """
    return compat.autograph_converted(step_fn)


def record_update(optimizer, variables) -> bool:
    """Called by `apply_gradients`: True (and recorded) while a step is traced for building."""
    trace = tracing.current()
    if trace is None or not trace.building:
        return False
    trace.updates.append((optimizer, list(variables)))
    return True


def trace_step(strategy: tf.distribute.Strategy, step_fn, element_spec,
               optimizers: Sequence = (), keras_metrics: Sequence = (),
               step_counter: Optional[tf.Variable] = None, first_batch=None,
               variables: Sequence = ()) -> BuildReport:
    """Traces `step_fn` once on one replica's batch of `element_spec`. Eager, in the
    strategy's cross-replica context. Raises a TapekitError if the step fails.

    With `first_batch` (a distributed batch: `run_eagerly`, for a step that only runs
    eagerly, e.g. one calling `.numpy()`), the step is instead called once, eagerly, on it:
    its updates are recorded, not applied, and every variable it changes gets its value
    back (`variables`, the trainer's, and those the call creates), so the run starts from
    the same state as when the build is traced.
    """
    spec = per_replica_spec(element_spec)
    optimizers = list({id(o): o for o in optimizers}.values())
    keras_metrics = list({id(m): m for m in keras_metrics}.values())
    step_name = getattr(step_fn, "__name__", "step")
    outputs = []
    static_weights = []
    eagerly = first_batch is not None
    converted_step = step_fn if eagerly else autographed(step_fn)
    trace = tracing.StepTrace("build")  # one for every replica: they record into one list
    created: List[Tuple[Any, Any]] = []  # eagerly: (variable, its value when created)

    def replica_fn(batch):
        creator = functools.partial(_create_noted, created) if eagerly else _create_eagerly
        with tracing.step(trace), tf.variable_creator_scope(creator):
            result = converted_step() if batch is None else converted_step(batch)  # None: no data
            if isinstance(result, dict):
                static_weights.append(means.static_weights(result, list(result), batch))
        outputs.append(result)

    def record_direct(optimizer, grads_and_vars, *args, **kwargs):
        record_update(optimizer, [v for _, v in grads_and_vars])

    def record_metric(metric, original, *args, **kwargs):
        current = tracing.current()
        if current is not None and current.building:
            current.keras_metrics[id(metric)] = metric
        return original(*args, **kwargs)

    recorders = [(optimizer, {"apply_gradients": functools.partial(record_direct, optimizer)})
                 for optimizer in optimizers]
    recorders += [(metric, {"update_state": functools.partial(record_metric, metric,
                                                              metric.update_state)})
                  for metric in keras_metrics]
    try:
        traced = tf.function(lambda batch: strategy.run(replica_fn, args=(batch,)),
                             autograph=False)
        with strategy.scope(), compat.instance_attributes(recorders):
            if eagerly:
                saved = [(v, tf.identity(v)) for v in variables]
                strategy.run(replica_fn, args=(first_batch,))
                for variable, value in saved + created:
                    variable.assign(value)
            else:
                graph = traced.get_concrete_function(
                    tf.nest.map_structure(_placeholder_spec, spec)).graph
    except TapekitError:
        raise
    except Exception as error:  # from the user's step (or the model it calls)
        own = own_exception(error)
        if own is not None:  # the user's own exception class: theirs to catch, as raised
            raise own from None
        raise TapekitError(explain(error, step_name, spec)) from None
    names = metric_names(outputs[0] if outputs else None, step_name)
    used = [m for m in keras_metrics if id(m) in trace.keras_metrics]
    clashes = sorted(set(names) & {m.name for m in used})
    if clashes:
        raise TapekitError(
            f"{step_name} returns {', '.join(clashes)} and updates keras metrics of the same "
            "name; rename one (keras.metrics.X(name=...)) or stop returning it.")
    for metric in used:
        _check_metric_placement(metric, strategy)
    # Eagerly, whether the step reads the counter is not seen: counting every step is exact.
    reads_counter = (step_counter is not None if eagerly
                     else reads_variable(graph, strategy, step_counter))
    # Nor whether weights are constants on `spec` (an eager batch's sizes are all known).
    constant = all(static_weights) and not eagerly
    return BuildReport(names, trace.updates, used, constant, reads_counter, spec)


def trace_for(engine, step_fn, element_spec, step_counter=None, first_batch=None) -> BuildReport:
    """`trace_step` of one of `engine`'s trainer's steps, with the optimizers and metrics
    its trainer holds. Under `run_eagerly`, a step that cannot be traced (it calls
    `.numpy()`, say) is built by one eager call on `first_batch()` instead."""
    attributes = vars(engine.trainer)
    arguments = (engine.strategy, step_fn, element_spec,
                 list(state_lib.optimizers(attributes).values()),
                 state_lib.keras_metrics(attributes), step_counter)
    try:
        return trace_step(*arguments)
    except TapekitError:
        if not (engine.options.run_eagerly or tf.config.functions_run_eagerly()):
            raise
    logging.info("%s cannot be traced; run_eagerly: built by one eager call on the first "
                 "batch (its updates not applied, its variables restored)",
                 getattr(step_fn, "__name__", "the step"))
    return trace_step(*arguments, first_batch=first_batch(),
                      variables=state_lib.variables_of(engine.owned_state()))


def reads_variable(graph, strategy, variable: Optional[tf.Variable]) -> bool:
    """Whether the traced `graph` reads `variable` (captures one of its replicas' handles)."""
    if variable is None:
        return False
    handles = [v.handle for v in strategy.experimental_local_results(variable)]
    return any(captured is handle for captured in compat.captured_tensors(graph)
               for handle in handles)


def _create_eagerly(next_creator, **kwargs):
    """Variables a layer creates while the step is traced are created eagerly (Keras passes
    an initializer callable): every replica's copy starts from one eager value, as when
    they are created in the strategy scope."""
    with tf.init_scope():
        return same_on_every_replica(next_creator, **kwargs)


def _create_noted(created, next_creator, **kwargs):
    """A variable created while the step runs eagerly for building, noted with its value."""
    variable = same_on_every_replica(next_creator, **kwargs)
    created.append((variable, tf.identity(variable)))
    return variable


def same_on_every_replica(next_creator, **kwargs):
    """A variable creator for models: a non-trainable float variable that replicas would
    each assign on their own (Keras creates BatchNorm's moving statistics with aggregation
    "none") averages the replicas' assignments instead, so its mirrored copies never drift
    apart and the one copy a checkpoint holds is the model's state. tf.keras averaged them
    on read; Keras 3 under MirroredStrategy keeps each replica's own."""
    # A variable made from a tensor (`tf.Variable(tf.zeros([n]))`) names no dtype: its value's.
    dtype = kwargs.get("dtype") or getattr(kwargs.get("initial_value"), "dtype", None)
    if (kwargs.get("trainable") is False and dtype is not None
            and tf.as_dtype(dtype).is_floating
            and kwargs.get("aggregation") in (None, tf.VariableAggregation.NONE)
            and kwargs.get("synchronization") in (None, tf.VariableSynchronization.AUTO,
                                                  tf.VariableSynchronization.ON_WRITE)):
        kwargs["aggregation"] = tf.VariableAggregation.MEAN
    return next_creator(**kwargs)


def _placeholder_spec(spec):
    return tf.TensorSpec(spec.shape, spec.dtype) if isinstance(spec, tf.TensorSpec) else spec


def _check_metric_placement(metric, strategy) -> None:
    if strategy.num_replicas_in_sync == 1:
        return
    for variable in metric.variables:
        if not isinstance(variable.value, tf.distribute.DistributedValues):
            raise TapekitError(
                f"keras metric {metric.name!r} was created outside the strategy scope, so its "
                f"{strategy.num_replicas_in_sync} replicas cannot update it; create it in build().")


def metric_names(outputs, step_name: str) -> List[str]:
    """Validates what a step returned (a dict of scalars, or None) and lists its keys."""
    if outputs is None:
        return []
    if not isinstance(outputs, dict):
        raise TapekitError(
            f"{step_name} must return a dict of scalar metrics (or None), got "
            f"{type(outputs).__name__}; e.g. return {{'loss': loss}}.")
    for name, value in outputs.items():
        try:
            shape = tf.convert_to_tensor(value).shape
        except (TypeError, ValueError):
            shape = None
        if shape is None or shape.rank != 0:
            raise TapekitError(
                f"{step_name} returned metric {name!r} with shape {shape}; metrics must be "
                "scalars (reduce them, e.g. tf.reduce_mean).")
    return list(outputs)


def per_replica_spec(element_spec):
    """The spec of one replica's batch, from a (distributed) iterator's element spec."""
    return tf.nest.map_structure(compat.one_replica_spec, element_spec)


def explain(error: BaseException, step_name: str, spec) -> str:
    """One line for an exception raised while tracing `step_name` on batches of `spec`."""
    where = user_frame(error)
    at = f" at {where}" if where else ""
    if blames_data(error):
        return (f"{step_name} cannot run on this data: batches are {describe_spec(spec)}; "
                f"{type(error).__name__}{at}: {summarize(error)}")
    hint = (f" {step_name} is compiled (traced into a graph), where tensors have no values: "
            "to debug it step by step, run it eagerly with --run_eagerly (run_eagerly=True); "
            "compiled, use tf.print and tf.cond/tf.where instead."
            if needs_eager(error) else "")
    return (f"{step_name} raised {type(error).__name__}{at}: {summarize(error)}. The error is "
            f"in {step_name} or code it calls (traced once before step 1 to build the models; "
            f"batches are {describe_spec(spec)}).{hint}")
