"""Turning a per-replica step into one compiled, in-graph loop (the inner loop).

Python runs once per loop, not once per step: the `tf.function` below holds a
`tf.while_loop` that reads the distributed iterator, runs the step on every replica
and keeps per-replica running sums of the step's metrics (weighted by the examples behind
them, `tapekit.compiled.means`) and, with `skip_step`, the steps where one was not finite. Cross-replica
reduction happens once, after the loop. `keras.metrics` objects the step updates are reset
when the loop starts and read (exactly, across replicas) when it ends.

Per step the loop adds to the user's step only a stack and an add (the sums). A NaN or
infinity keeps a sum non-finite, so with `nan_policy=stop` the loop checks its sums once,
as it ends; `skip_step` checks every step (it must leave bad values out). The step counter
is advanced once per loop unless the step reads it; per-step counts are carried only when
some weight is known only at run time. Both are decided before the loop is traced, from
what the build trace found (`LoopPlan`). The loop's own code is traced
without AutoGraph; the user's step is converted by AutoGraph as a `tf.function` would
(`tapekit.compiled.build.autographed`). With `summary_every_steps` the step's own
`tf.summary` calls are recorded every N steps (`tapekit.compiled.step_summaries`); without
it the loop has no summary op.
"""

import contextlib
import contextvars
import dataclasses
from typing import Any, Callable, Optional, Sequence, Tuple

import tensorflow as tf
from absl import logging

from tapekit import compat
from tapekit.compiled import build, means, step_summaries, tracing, xla
from tapekit.compiled.gradient_norms import NormsPlan, Scratch, StepNorms
from tapekit.errors import TapekitError, user_message
from tapekit.run.runner import LoopResult

NO_BAD_STEP = tf.int64.max
# Below this many steps per epoch, in-memory input checks its epoch at every step rather
# than looping over stretches of one epoch (whose set-up would cost more than it saves).
SHORT_EPOCH = 8
# Set by `one_step_per_call` (the profiler, around each marked step): the step marker.
_ONE_STEP_PER_CALL = contextvars.ContextVar("tapekit_one_step_per_call", default=None)


@contextlib.contextmanager
def one_step_per_call(marker: Callable[[], Any] = contextlib.nullcontext):
    """Within: a `CompiledLoop` call of one step runs it with no `tf.while_loop` around it,
    in a function traced for that once (not counted as a retrace), inside `marker()` (a
    context: the profiler's step marker) entered around that call only. xprof takes a TF
    loop's iterations for the steps and then ignores the step markers, so a marked step must
    not be inside one (`tapekit.run.profiler`). Eager."""
    token = _ONE_STEP_PER_CALL.set(marker)
    try:
        yield
    finally:
        _ONE_STEP_PER_CALL.reset(token)


@dataclasses.dataclass(frozen=True)
class LoopPlan:
    """How a `CompiledLoop` runs its step: what the step's build trace found
    (`tapekit.compiled.build.BuildReport`) and the run's options that change the loop."""

    metric_names: Sequence[str]  # the keys of the dict the step returns
    keras_metrics: Sequence = ()  # keras.metrics the step updates
    # Every metric's weight is a constant on batches of `spec` (one replica's batch): plain
    # sums, no per-step counts. Batches of any other spec carry counts (exact either way).
    static_weights: bool = False
    spec: Any = None
    reads_step_counter: bool = False  # the step reads the counter: count every step
    finite_means: bool = False  # nan_policy=skip_step: non-finite values are left out
    jit_compile: bool = False  # the step (not the loop) is compiled with XLA
    run_eagerly: bool = False  # the loop runs as Python, op by op (also if TensorFlow's switch is on)
    max_retraces: Optional[int] = None  # more retraces raise
    name: str = "train_loop"
    # tf.summary calls in the step, recorded every summary_every_steps; None: off, no op added
    summaries: Optional[step_summaries.LoopSummaries] = None
    # log_gradient_norms: the updates' norms, metrics after the step's own; None: off, no op added
    gradient_norms: Optional[NormsPlan] = None

    @classmethod
    def from_build(cls, report, **options) -> "LoopPlan":
        """The plan for a step whose build trace gave `report`, with the run's `options`."""
        return cls(tuple(report.metric_names), tuple(report.keras_metrics),
                   report.static_weights, report.spec, report.reads_step_counter, **options)

    @classmethod
    def for_training(cls, report, options, summaries=None, updaters=None) -> "LoopPlan":
        """The training loop's plan, with the run's `nan_policy`, `jit_compile`, `max_retraces`,
        its in-step summaries (`summaries`: a `step_summaries.RunSummaries`) and, with
        `log_gradient_norms`, the norms of the updates of `updaters` (`updates.Updaters`)."""
        norms = (updaters.norms_plan() if updaters is not None
                 and getattr(options, "log_gradient_norms", False) else None)
        if norms is not None:
            norms = _checked_norms(norms, report) if norms.optimizers else None
        return cls.from_build(report, finite_means=options.nan_policy == "skip_step",
                              jit_compile=options.jit_compile, max_retraces=options.max_retraces,
                              run_eagerly=options.run_eagerly, name="train_loop",
                              summaries=summaries and summaries.for_loop(step_summaries.TRAIN),
                              gradient_norms=norms)

    @classmethod
    def for_evaluation(cls, report, options, summaries=None) -> "LoopPlan":
        """The evaluation loop's plan: no skipped steps, no retrace limit."""
        return cls.from_build(report, jit_compile=options.jit_compile,
                              run_eagerly=options.run_eagerly, name="eval_loop",
                              summaries=summaries and summaries.for_loop(step_summaries.EVAL))

    def static_weights_for(self, spec) -> bool:
        """Whether batches of `spec` (one replica's) have constant weights, as traced."""
        if self.gradient_norms is not None and self.gradient_norms.conditional:
            return False  # a step that applies no update does not count
        return self.static_weights and _same_spec(spec, self.spec)

    @property
    def step_metric_names(self) -> Tuple[str, ...]:
        """The metrics each step reports: the step's own, then the updates' norms."""
        norms = self.gradient_norms.metric_names if self.gradient_norms is not None else ()
        return tuple(self.metric_names) + norms


def _checked_norms(norms, report):
    """`norms`, once its names are known not to be the step's own metrics' names."""
    taken = set(report.metric_names) | {metric.name for metric in report.keras_metrics}
    clashes = [name for name in norms.metric_names if name in taken]
    if clashes:
        raise TapekitError(
            f"train_step reports {', '.join(clashes)}, which log_gradient_norms "
            "(--log_gradient_norms) reports too; rename the step's metric or turn the option off.")
    return norms


class CompiledLoop:
    """Runs up to `num_steps` calls of `replica_step` under `strategy` in one `tf.function`.

    The contract of `replica_step(batch) -> dict[str, scalar tensor]`: it is traced (never
    run eagerly), runs once per replica per step, and returns replica-local values. Each is
    averaged over the loop weighted by the examples behind it (see `tapekit.compiled.means`).
    `plan.keras_metrics` are `keras.metrics.Metric`s the step updates: reset as the loop
    starts, their `result()` reported under their names as it ends.

    The loop reads the iterator with `get_next_as_optional` and stops early, cleanly, when
    it runs out (`num_steps=None`: run to the end of the data); with `endless` (data that
    provably never ends) it reads it with `next`, without that check. It is traced once per
    iterator type; `trace_count` counts traces so that tests and the retrace guard can
    check it.
    """

    def __init__(self, strategy: tf.distribute.Strategy, replica_step: Callable, plan: LoopPlan,
                 step_counter: Optional[tf.Variable] = None, in_memory=None,
                 endless: bool = False, stop_flag: Optional[tf.Variable] = None):
        self.strategy = strategy
        self.stop_flag = stop_flag  # a bool variable: True ends the loop at the next step
        self.plan = plan
        self.step_metric_names = plan.step_metric_names
        self.keras_metrics = tuple(plan.keras_metrics)
        self.metric_names = self.step_metric_names + tuple(m.name for m in self.keras_metrics)
        self.step_counter = step_counter
        self.name = plan.name
        # a tapekit.input.data.InMemoryExamples (or NoData: the step makes its own data), or
        # None: read an iterator
        self.in_memory = in_memory
        self.endless = endless  # the iterator never runs out: no per-step end-of-data check
        self.trace_count = 0
        self._traced_spec = None
        self._concrete = self._concrete_one_step = None
        self._carries_counts = plan.finite_means  # decided as each trace starts (_loop)
        self._user_step = build.autographed(replica_step)
        self._eager_step = replica_step  # as written: breakpoint() stops in the user's source
        self._eager = False  # while a loop runs eagerly (`run_eagerly`)
        self._eager_noted = False
        self._measured_step = self._measure
        self._norms_warned = False
        # log_gradient_norms: per-replica variables for updates in the step's control flow
        # (outside any checkpoint); once one is seen, the loop carries counts (retraced).
        self._norms_scratch = None
        if plan.gradient_norms is not None:
            with strategy.scope():
                self._norms_scratch = Scratch(plan.gradient_norms)
        self._norms_in_control_flow = False
        if plan.jit_compile and strategy.num_replicas_in_sync > 1:  # updates outside XLA
            self._measured_step = xla.SplitStep(
                self._measure, self._updates_measured if plan.gradient_norms else None)
        elif plan.jit_compile:
            self._measured_step = tf.function(self._measure, jit_compile=True, autograph=False)
        self._function = tf.function(self._loop, autograph=False)
        self._one_step_function = tf.function(self._one_step_loop, autograph=False)

    @property
    def carries_counts(self) -> bool:
        """Whether the last trace carries per-step counts (some weight known only at run
        time, or skip_step), rather than plain sums."""
        return self._carries_counts

    def _initial_state(self):
        # Only what this loop needs: each value carried through the loop costs every step.
        count = len(self.step_metric_names)
        state = {"sums": tf.zeros([count], tf.float32)}
        if self._carries_counts:
            state["counts"] = tf.zeros([count], tf.float32)
        if self.plan.finite_means:
            state["first_bad"] = tf.constant(NO_BAD_STEP, tf.int64)
            state["bad_steps"] = tf.zeros([], tf.float32)
        return state

    def _measure(self, batch, deferred=None):
        """Runs the step on one replica's batch. Returns its metric values [k] and, unless
        every weight is a constant, their weighted sums [k] and weights [k]. `deferred`:
        its updates are recorded there, not applied (`tapekit.compiled.xla`)."""
        step = self._eager_step if self._eager else self._user_step
        purpose = "eager" if self._eager else "loop"
        norms = self._step_norms() if deferred is None else None  # deferred: after the step
        with tracing.step(tracing.StepTrace(purpose, deferred=deferred, gradient_norms=norms)):
            outputs = (step() if batch is None else step(batch)) or {}  # None: makes its own
            columns = [(tf.cast(outputs[name], tf.float32), means.recorded(outputs[name]))
                       for name in self.plan.metric_names]
        if norms is not None:
            columns += self._norm_columns(norms)
        return self._stacked(columns, batch)

    def _step_norms(self) -> Optional[StepNorms]:
        norms = self.plan.gradient_norms
        return None if norms is None else StepNorms(norms, self._norms_scratch)

    def _norm_columns(self, norms):
        """(value, recorded entry) of the step's gradient metrics: each weighted by whether
        the step applied the update (`tapekit.compiled.gradient_norms`)."""
        missing = norms.missing()
        if missing and not self._norms_warned:
            self._norms_warned = True
            logging.warning("log_gradient_norms: %s reported as 0: train_step does not apply its "
                            "gradients with self.apply_gradients(tape, loss, model, optimizer)",
                            ", ".join(missing))
        if norms.in_control_flow and not self._carries_counts:
            # Planned with constant weights; the step's gradient metrics now have weights
            # known only when it runs: traced again, carrying counts (`__call__`).
            self._norms_in_control_flow = True
            raise _TracedAgain()
        return [(value, (None, weight)) for value, weight in norms.columns()]

    def _updates_measured(self, apply_updates, measured):
        """jit_compile on several replicas (`xla.SplitStep`): runs the step's updates, after
        its compiled part, and adds their gradient metrics to what it `measured`."""
        norms = self._step_norms()
        with tracing.step(tracing.StepTrace("loop", gradient_norms=norms)):
            apply_updates()
        added = self._stacked(self._norm_columns(norms), None)
        return tuple(None if mine is None else tf.concat([mine, more], 0)
                     for mine, more in zip(measured, added))

    def _stacked(self, columns, batch):
        """The values [k] of (value, recorded entry) `columns` and, unless every weight is a
        constant, their weighted sums [k] and weights [k] (`tapekit.compiled.means`)."""
        if not columns:
            empty = tf.zeros([0])
            return (empty, empty, empty) if self._carries_counts else (empty, None, None)
        values = [value for value, _ in columns]
        recorded = [entry for _, entry in columns]
        weights = means.weights(recorded, batch)
        if not self._carries_counts:
            if not means.constant(weights):  # the build trace said otherwise for this spec
                raise TapekitError(
                    f"internal: {self.name} was planned with constant weights, but "
                    f"{self.step_metric_names} have weights known only at run time.")
            return tf.stack(values), None, None
        weights = [tf.cast(w, tf.float32) for w in weights]
        totals = [tf.cast(entry[0], tf.float32) if entry and entry[0] is not None
                  else value * weight
                  for entry, value, weight in zip(recorded, values, weights)]
        return tf.stack(values), tf.stack(totals), tf.stack(weights)

    def _in_memory_step_and_accumulate(self, step, state, offset, prepare=False):
        if prepare:
            self.in_memory.prepare(step // self.in_memory.steps_per_epoch)
        return self._step_and_accumulate(self.in_memory.batch(step), state, offset)

    def _step_and_accumulate(self, batch, state, offset):
        # All metrics as one vector: a handful of ops per step, whatever their number.
        with self._summaries_of_step(offset):
            values, totals, weights = (self._measure if self._eager else self._measured_step)(batch)
        if not self.step_metric_names:
            return state
        state = dict(state)
        if not self.plan.finite_means:
            # nan_policy=stop: every value goes into the sums, where a NaN or infinity stays
            # (NaN + x is NaN, inf + x is inf or NaN): the loop checks them once, as it ends.
            if weights is None:
                state["sums"] = state["sums"] + values
                return state
            counted = weights > 0.0  # a value over no examples (an empty batch) does not count
            state["sums"] = state["sums"] + tf.where(counted, totals, 0.0)
            state["counts"] = state["counts"] + tf.where(counted, weights, 0.0)
            return state
        # nan_policy=skip_step: each step's values are checked, and bad ones left out.
        finite = tf.math.is_finite(values)
        if weights is not None:  # a value over no examples (an empty batch) does not count
            finite = tf.logical_or(finite, weights <= 0.0)
        all_finite = tf.reduce_all(finite)
        state["first_bad"] = tf.minimum(state["first_bad"],
                                        tf.where(all_finite, NO_BAD_STEP, offset))
        state["bad_steps"] = state["bad_steps"] + 1.0 - tf.cast(all_finite, tf.float32)
        if weights is None:  # average the finite values only
            state["sums"] = state["sums"] + tf.where(finite, values, 0.0)
            state["counts"] = state["counts"] + tf.cast(finite, tf.float32)
            return state
        counted = tf.logical_and(finite, weights > 0.0)
        state["sums"] = state["sums"] + tf.where(counted, totals, 0.0)
        state["counts"] = state["counts"] + tf.where(counted, weights, 0.0)
        return state

    def _loop(self, iterator, num_steps):
        # Traced without AutoGraph (its conversion of tapekit's own code cost ~1 s of start-up);
        # the user's step is converted on its own (`autographed`).
        return self._traced_loop(iterator, num_steps, one_step=False)

    def _one_step_loop(self, iterator, num_steps):
        """`_loop` of one step, with no `tf.while_loop` (`one_step_per_call`)."""
        return self._traced_loop(iterator, num_steps, one_step=True)

    def _traced_loop(self, iterator, num_steps, one_step):
        # Python side effects: run only while tracing. A one-step trace is not a retrace.
        spec = self._input_spec(iterator) if one_step else self._count_trace(iterator)
        self._carries_counts = (self.plan.finite_means or self._norms_in_control_flow
                                or not self.plan.static_weights_for(
                                    self._delivered(build.per_replica_spec(spec))))
        with self._summaries_of_loop():
            return self._run(iterator, num_steps, one_step)

    def _summaries_of_loop(self):
        """Around a loop's steps: its summary writer is the default (`plan.summaries`)."""
        summaries = self.plan.summaries
        return summaries.loop(self.strategy) if summaries else contextlib.nullcontext()

    def _summaries_of_step(self, offset):
        """Around the step at `offset`, per replica: its summary step and whether it records."""
        summaries = self.plan.summaries
        return summaries.step(offset) if summaries else contextlib.nullcontext()

    def _run(self, iterator, num_steps, one_step=False):
        """The loop itself: traced by `_loop`, or run as Python by `_run_eagerly`."""
        strategy = self.strategy
        for metric in self.keras_metrics:
            metric.reset_state()
        state = strategy.run(self._initial_state)
        if one_step:
            steps_run, state = self._one_step(iterator, state)
        elif self.in_memory is not None:
            steps_run, state = self._in_memory_steps(state, num_steps)
        elif self.endless:
            steps_run, state = self._endless_steps(iterator, state, num_steps)
        else:
            state, steps_run = self._steps_until_the_end(iterator, state, num_steps)
        self._count_steps(steps_run)
        sums = strategy.reduce(tf.distribute.ReduceOp.SUM, state["sums"], axis=None)
        if self._carries_counts:
            counts = strategy.reduce(tf.distribute.ReduceOp.SUM, state["counts"], axis=None)
        else:
            counts = tf.cast(steps_run, tf.float32) * strategy.num_replicas_in_sync
        means = tf.concat([tf.math.divide_no_nan(sums, counts),
                           self._keras_metric_results()], 0)
        if self.plan.finite_means:
            first_bad = _min_over_replicas(strategy, state["first_bad"])
            bad_steps = _max_over_replicas(strategy, state["bad_steps"])
            first_bad = tf.where(first_bad == NO_BAD_STEP, tf.constant(-1, tf.int64), first_bad)
        else:  # a sum that is not finite had a bad value in it; which step is not tracked
            bad_steps = 1.0 - tf.cast(tf.reduce_all(tf.math.is_finite(sums)), tf.float32)
            first_bad = tf.constant(-1, tf.int64)
        return {"means": means, "steps_run": steps_run, "first_bad": first_bad,
                "bad_steps": bad_steps}

    def _delivered(self, spec):
        """The spec of the batches the step is handed, from one replica's input `spec`: read
        with `get_next_as_optional` on several replicas, each replica's batch has an
        unknown size (one may get a partial or empty batch as the data ends)."""
        if self.in_memory is not None or self.endless or self.strategy.num_replicas_in_sync == 1:
            return spec
        leaves = tf.nest.flatten(spec)
        if not all(isinstance(leaf, tf.TensorSpec) for leaf in leaves):
            return None  # counts are carried: exact for any input
        return tf.nest.pack_sequence_as(spec, [
            tf.TensorSpec([None] + leaf.shape[1:].as_list(), leaf.dtype)
            if leaf.shape.rank else leaf for leaf in leaves])

    def _counts_each_step(self) -> bool:
        # Eagerly always: a step being debugged sees the global step move (and it is cheap).
        return self.step_counter is not None and (self.plan.reads_step_counter or self._eager)

    def _count_step(self) -> None:
        """Counts a step from inside the loop if the step reads the counter (it then sees
        the steps done before it); otherwise the loop counts its steps once, as it ends
        (`_count_steps`): a variable update every step costs a few ops a step."""
        if self._counts_each_step():
            self.step_counter.assign_add(1)

    def _count_steps(self, steps_run) -> None:
        if self.step_counter is not None and not self._counts_each_step():
            self.step_counter.assign_add(steps_run)

    def _going_on(self, offset, stop):
        """Whether the step at `offset` runs: before `stop`, and no stop was requested (the
        `stop_flag` a signal sets while the loop runs: read once per step)."""
        if self.stop_flag is None:
            return offset < stop
        return tf.logical_and(offset < stop, tf.logical_not(self.stop_flag.read_value()))

    def _steps(self, start, stop, state, replica_fn, arguments):
        """Steps `start` to `stop` (offsets in this loop): each runs `replica_fn` on every
        replica with `arguments(offset, state)` and counts the step. Returns (the offset
        reached: `stop` unless a stop was requested, state)."""
        def body(offset, state):
            state = self.strategy.run(replica_fn, args=arguments(offset, state))
            self._count_step()
            return offset + 1, state

        return tf.while_loop(lambda offset, _: self._going_on(offset, stop), body, (start, state))

    def _one_step(self, iterator, state):
        """One step with no `tf.while_loop` (`one_step_per_call`), unless a stop was requested
        or the data has ended. Returns (steps run: 0 or 1, state)."""
        offset = tf.constant(0, tf.int64)

        def run(replica_fn, arguments):
            new_state = self.strategy.run(replica_fn, args=arguments)
            self._count_step()
            return tf.constant(1, tf.int64), new_state

        def none():
            return tf.constant(0, tf.int64), state

        def step():
            if self.in_memory is not None:
                first_step = (self.step_counter.read_value() if self.step_counter is not None
                              else tf.constant(0, tf.int64))
                return run(self._in_memory_step_and_accumulate, (first_step, state, offset, True))
            if self.endless:
                return run(self._step_and_accumulate, (next(iterator), state, offset))
            batch = iterator.get_next_as_optional()
            return tf.cond(batch.has_value(), lambda: run(
                self._step_and_accumulate, (batch.get_value(), state, offset)), none)

        return tf.cond(self._going_on(offset, 1), step, none)

    def _endless_steps(self, iterator, state, num_steps):
        """`num_steps` steps of data that provably never ends: read with `next`, without the
        per-step end-of-data check (get_next_as_optional/has_value: ~35 µs a step on CPU
        for the seed GAN). Returns (steps run, state)."""
        return self._steps(tf.constant(0, tf.int64), num_steps, state, self._step_and_accumulate,
                           lambda offset, state: (next(iterator), state, offset))

    def _steps_until_the_end(self, iterator, state, num_steps):
        """Up to `num_steps` steps, stopping cleanly where the data ends: (state, steps run)."""
        def body(offset, ended, state):
            batch = iterator.get_next_as_optional()

            def step():
                new_state = self.strategy.run(self._step_and_accumulate,
                                              args=(batch.get_value(), state, offset))
                self._count_step()
                return new_state

            has_value = batch.has_value()
            state = tf.cond(has_value, step, lambda: state)
            return offset + tf.cast(has_value, tf.int64), tf.logical_not(has_value), state

        steps_run, _, state = tf.while_loop(
            lambda offset, ended, _: tf.logical_and(self._going_on(offset, num_steps),
                                                    tf.logical_not(ended)),
            body, (tf.constant(0, tf.int64), tf.constant(False), state))
        return state, steps_run

    def _in_memory_steps(self, state, num_steps):
        """`num_steps` steps of in-memory examples (`tapekit.input.data.InMemoryExamples`).
        Returns (steps run, state)."""
        first_step = (self.step_counter.read_value() if self.step_counter is not None
                      else tf.constant(0, tf.int64))  # an evaluation of generated data
        steps_per_epoch = self.in_memory.steps_per_epoch

        def steps(start, stop, state, prepare):
            return self._steps(start, stop, state, self._in_memory_step_and_accumulate,
                               lambda offset, state: (first_step + offset, state, offset, prepare))

        if steps_per_epoch < SHORT_EPOCH:  # few steps per epoch: check the epoch at every step
            return steps(tf.constant(0, tf.int64), num_steps, state, True)

        def stretch(start, state):
            # Steps within one epoch: its permutation is checked once per stretch; each step
            # is then a slice and a gather.
            step = first_step + start
            self.strategy.run(self.in_memory.prepare, args=(step // steps_per_epoch,))
            stop = tf.minimum(num_steps, start + steps_per_epoch - step % steps_per_epoch)
            return steps(start, stop, state, False)

        return tf.while_loop(lambda start, _: self._going_on(start, num_steps), stretch,
                             (tf.constant(0, tf.int64), state))

    def _keras_metric_results(self):
        """The keras.metrics' results (cross-replica: their states summed over replicas)."""
        results = []
        for metric in self.keras_metrics:
            result = tf.convert_to_tensor(metric.result())
            if result.shape.rank != 0:
                raise TapekitError(
                    f"keras metric {metric.name!r} has a result of shape {result.shape}; tapekit "
                    "reports scalars: configure it to return one (e.g. average='macro').")
            results.append(tf.cast(result, tf.float32))
        return tf.stack(results) if results else tf.zeros([0])

    def _input_spec(self, iterator):
        return (iterator.element_spec if iterator is not None
                else self.in_memory.element_spec if self.in_memory is not None else None)

    def _count_trace(self, iterator):
        """Counts traces; a retrace logs which input changed, and too many raise. Returns
        the spec of the input traced."""
        spec = self._input_spec(iterator)
        self.trace_count += 1
        previous, self._traced_spec = self._traced_spec, spec
        if self.trace_count == 1:
            return spec
        changes = describe_spec_changes(previous, spec)
        logging.warning("%s traced again (%d traces): %s. Each retrace rebuilds the graph; feed "
                        "batches of one shape and dtype (drop_remainder=True).", self.name,
                        self.trace_count, changes)
        max_retraces = self.plan.max_retraces
        if max_retraces is not None and self.trace_count - 1 > max_retraces:
            raise TapekitError(
                f"{self.name} was traced {self.trace_count} times (more than max_retraces="
                f"{max_retraces} retraces); last change: {changes}. Give every batch the same "
                "shape and dtype (e.g. drop_remainder=True), or raise --max_retraces.")
        return spec

    @property
    def runs_eagerly(self) -> bool:
        """`plan.run_eagerly`, or TensorFlow's `tf.config.run_functions_eagerly(True)`."""
        return self.plan.run_eagerly or tf.config.functions_run_eagerly()

    def _run_eagerly(self, iterator, num_steps, one_step=False):
        """The same loop as Python: `tf.while_loop` and `tf.cond` run their bodies eagerly,
        so the user's step runs once per step (per replica) with eager tensors."""
        if self.plan.jit_compile and not self._eager_noted:
            logging.info("%s runs eagerly (run_eagerly): jit_compile is off while it does",
                         self.name)
            self._eager_noted = True
        carries_counts = self._carries_counts
        self._eager, self._carries_counts = True, True  # counts: exact for any input
        try:
            with self._summaries_of_loop():
                return self._run(iterator, num_steps)
        finally:
            self._eager, self._carries_counts = False, carries_counts

    def __call__(self, iterator, num_steps: Optional[int]) -> LoopResult:
        """Runs up to `num_steps` steps (None: until the iterator runs out). Eager."""
        marker = _ONE_STEP_PER_CALL.get() if num_steps == 1 else None
        num_steps = tf.constant(NO_BAD_STEP if num_steps is None else num_steps, tf.int64)
        run = self._run_eagerly if self.runs_eagerly else self._call
        with marker() if marker else contextlib.nullcontext():
            try:
                results = run(iterator, num_steps, marker is not None)
            except _TracedAgain:  # the first trace, abandoned: it ran nothing
                self.trace_count -= 1
                self._concrete = self._concrete_one_step = None
                results = run(iterator, num_steps, marker is not None)
            results = {name: value.numpy() for name, value in results.items()}
        means = [float(value) for value in results["means"]]
        steps_run, first_bad = int(results["steps_run"]), int(results["first_bad"])
        bad_steps = int(results["bad_steps"])
        offset = metric = None
        if bad_steps:
            offset = first_bad if first_bad >= 0 else None  # known with skip_step
            # The metric named is the first whose loop mean is not finite (with stop, the sums
            # keep every value), else the first metric.
            metric = next((name for name, value in zip(self.metric_names, means)
                           if value != value or abs(value) == float("inf")), self.metric_names[0])
        return LoopResult(dict(zip(self.metric_names, means)), steps_run, bad_steps, offset, metric)

    def _call(self, iterator, num_steps, one_step=False):
        # The concrete function for this iterator, called directly: it skips tf.function's
        # per-call binding of the arguments to a signature and its cache lookup (~0.3 ms a
        # loop, ~3 µs a step at 100 steps a loop). Looked up again for a new iterator.
        attribute, function = (("_concrete_one_step", self._one_step_function) if one_step
                               else ("_concrete", self._function))
        cached = getattr(self, attribute)
        if cached is None or cached[0] is not iterator:
            cached = (iterator, function.get_concrete_function(iterator, num_steps))
            setattr(self, attribute, cached)
        concrete = cached[1]
        return concrete(num_steps) if iterator is None else concrete(iterator, num_steps)


class _TracedAgain(Exception):
    """Raised while a loop is traced with constant weights for a step whose gradient
    metrics (`log_gradient_norms`, an update in the step's control flow) turn out to have
    weights known only when it runs; `CompiledLoop.__call__` traces it again, carrying counts."""


def call_loop(loop: CompiledLoop, iterator, num_steps) -> LoopResult:
    """`loop(iterator, num_steps)`, an error of tapekit's from inside it (AutoGraph's echo of
    the trace removed) as its one line."""
    try:
        return loop(iterator, num_steps)
    except TapekitError as error:
        raise TapekitError(user_message(error)) from None


def _same_spec(a, b) -> bool:
    try:
        tf.nest.assert_same_structure(a, b)
    except (TypeError, ValueError):
        return False
    return all(x == y for x, y in zip(tf.nest.flatten(a), tf.nest.flatten(b)))


def describe_spec_changes(old, new) -> str:
    """'input[0]: float32[100, 5] -> float32[50, 5]' for each input whose spec changed."""
    def leaves(spec, path="input"):
        if spec is None:
            return {}
        if isinstance(spec, (tuple, list)):
            return {k: v for i, item in enumerate(spec) for k, v in leaves(item, f"{path}[{i}]").items()}
        if isinstance(spec, dict):
            return {k: v for key in sorted(spec) for k, v in leaves(spec[key], f"{path}[{key!r}]").items()}
        return {path: spec}

    def show(leaf):
        leaf = compat.one_replica_spec(leaf)
        shape = getattr(leaf, "shape", None)
        dtype = getattr(getattr(leaf, "dtype", None), "name", "?")
        return f"{dtype}{list(shape) if shape is not None and shape.rank is not None else '[?]'}"

    before, after = leaves(old), leaves(new)
    changed = [f"{path}: {show(before[path]) if path in before else 'absent'} -> "
               f"{show(after[path]) if path in after else 'absent'}"
               for path in sorted(set(before) | set(after))
               if path not in before or path not in after or show(before[path]) != show(after[path])]
    return "; ".join(changed) or "the input's type changed (same shapes and dtypes)"


def _gather(strategy, value):
    per_replica = strategy.run(lambda v: tf.expand_dims(v, 0), args=(value,))
    return strategy.gather(per_replica, axis=0)


def _min_over_replicas(strategy, value):
    if strategy.num_replicas_in_sync == 1:
        return strategy.experimental_local_results(value)[0]
    return tf.reduce_min(_gather(strategy, value))


def _max_over_replicas(strategy, value):
    if strategy.num_replicas_in_sync == 1:
        return strategy.experimental_local_results(value)[0]
    return tf.reduce_max(_gather(strategy, value))
