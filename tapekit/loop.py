"""Turning a per-replica step into one compiled, in-graph loop (the inner loop).

Python runs once per loop, not once per step: the `tf.function` below holds a
`tf.range` loop that reads the distributed iterator, runs the step on every replica
and keeps per-replica running sums of the step's metrics, skipping non-finite values
but remembering the first one. Cross-replica reduction happens once, after the loop.
"""

from typing import Callable, Dict, NamedTuple, Optional, Sequence

import tensorflow as tf
from absl import logging

from tapekit.errors import TapekitError

NO_BAD_STEP = tf.int64.max


class LoopResult(NamedTuple):
    """What one compiled loop reports (eager values)."""

    metrics: Dict[str, float]  # mean over the loop's steps (finite values only), over replicas
    steps_run: int  # < steps asked for when the iterator ran out
    nonfinite_steps: int  # steps where some metric was NaN or infinite (on any replica)
    first_nonfinite_offset: Optional[int]  # 0-based step within the loop, or None
    first_nonfinite_metric: Optional[str]


class CompiledLoop:
    """Runs up to `num_steps` calls of `replica_step` under `strategy` in one `tf.function`.

    The contract of `replica_step(batch) -> dict[str, scalar tensor]`: it is traced (never
    run eagerly), runs once per replica per step, and returns replica-local values whose
    mean over replicas is the global value (what `Trainer.compute_loss` returns).

    The loop reads the iterator with `get_next_as_optional` and stops early, cleanly, when
    it runs out. It is traced once per iterator type; `trace_count` counts traces so that
    tests and the retrace guard can check it.
    """

    def __init__(
        self,
        strategy: tf.distribute.Strategy,
        replica_step: Callable,
        metric_names: Sequence[str],
        step_counter: Optional[tf.Variable] = None,
        jit_compile: bool = False,
        name: str = "train_loop",
        in_memory=None,
        max_retraces: Optional[int] = None,
    ):
        self.strategy = strategy
        self.metric_names = tuple(metric_names)
        self.step_counter = step_counter
        self.name = name
        self.in_memory = in_memory  # a tapekit.data.InMemoryExamples, or None: read an iterator
        self.max_retraces = max_retraces
        self.trace_count = 0
        self._traced_spec = None
        self._replica_step = (
            tf.function(replica_step, jit_compile=True) if jit_compile else replica_step)
        self._function = tf.function(self._loop)

    def _initial_state(self):
        zeros = {name: tf.zeros([], tf.float32) for name in self.metric_names}
        counts = {name: tf.zeros([], tf.float32) for name in self.metric_names}
        return {"sums": zeros, "counts": counts,
                "first_bad": tf.constant(NO_BAD_STEP, tf.int64),
                "bad_steps": tf.zeros([], tf.float32)}

    def _in_memory_step_and_accumulate(self, step, state, offset):
        return self._step_and_accumulate(self.in_memory.batch(step), state, offset)

    def _step_and_accumulate(self, batch, state, offset):
        outputs = self._replica_step(batch) or {}
        sums, counts = dict(state["sums"]), dict(state["counts"])
        bad = []
        for name in self.metric_names:
            value = tf.cast(outputs[name], tf.float32)
            finite = tf.math.is_finite(value)
            sums[name] = sums[name] + tf.where(finite, value, 0.0)
            counts[name] = counts[name] + tf.cast(finite, tf.float32)
            bad.append(tf.logical_not(finite))
        first_bad, bad_steps = state["first_bad"], state["bad_steps"]
        if bad:
            bad = tf.stack(bad)
            any_bad = tf.reduce_any(bad)
            # One int64 code per (step, metric): offset * num_metrics + metric index.
            code = offset * len(bad) + tf.argmax(tf.cast(bad, tf.int32), output_type=tf.int64)
            first_bad = tf.where(any_bad & tf.equal(first_bad, NO_BAD_STEP), code, first_bad)
            bad_steps = bad_steps + tf.cast(any_bad, tf.float32)
        return {"sums": sums, "counts": counts, "first_bad": first_bad, "bad_steps": bad_steps}

    def _loop(self, iterator, num_steps):
        self._count_trace(iterator)  # Python side effects: run only while tracing
        strategy = self.strategy
        state = strategy.run(self._initial_state)
        steps_run = tf.constant(0, tf.int64)
        if self.in_memory is not None:
            first_step = self.step_counter.read_value()
            for offset in tf.range(num_steps):
                state = strategy.run(self._in_memory_step_and_accumulate,
                                     args=(first_step + offset, state, offset))
                self.step_counter.assign_add(1)
            steps_run = num_steps
        else:
            for offset in tf.range(num_steps):
                batch = iterator.get_next_as_optional()
                if not batch.has_value():
                    break
                state = strategy.run(self._step_and_accumulate,
                                     args=(batch.get_value(), state, offset))
                if self.step_counter is not None:
                    self.step_counter.assign_add(1)
                steps_run += 1
        sums = {name: strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None)
                for name, value in state["sums"].items()}
        counts = {name: strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None)
                  for name, value in state["counts"].items()}
        means = {name: tf.math.divide_no_nan(sums[name], counts[name]) for name in sums}
        first_bad = _min_over_replicas(strategy, state["first_bad"])
        bad_steps = _max_over_replicas(strategy, state["bad_steps"])
        return means, steps_run, bad_steps, first_bad

    def _count_trace(self, iterator) -> None:
        """Counts traces; a retrace logs which input changed, and too many raise."""
        spec = None if iterator is None else iterator.element_spec
        self.trace_count += 1
        previous, self._traced_spec = self._traced_spec, spec
        if self.trace_count == 1:
            return
        changes = describe_spec_changes(previous, spec)
        logging.warning("%s traced again (%d traces): %s. Each retrace rebuilds the graph; feed "
                        "batches of one shape and dtype (drop_remainder=True).", self.name,
                        self.trace_count, changes)
        if self.max_retraces is not None and self.trace_count - 1 > self.max_retraces:
            raise TapekitError(
                f"{self.name} was traced {self.trace_count} times (more than max_retraces="
                f"{self.max_retraces} retraces); last change: {changes}. Give every batch the same "
                "shape and dtype (e.g. drop_remainder=True), or raise --max_retraces.")

    def __call__(self, iterator, num_steps: int) -> LoopResult:
        means, steps_run, bad_steps, first_bad = self._function(
            iterator, tf.constant(num_steps, tf.int64))
        first_bad = int(first_bad)
        offset = metric = None
        if first_bad != NO_BAD_STEP and self.metric_names:
            offset, index = divmod(first_bad, len(self.metric_names))
            metric = self.metric_names[index]
        return LoopResult({name: float(value) for name, value in means.items()},
                          int(steps_run), int(bad_steps), offset, metric)


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
        specs = getattr(leaf, "_value_specs", None)  # tf.distribute's PerReplicaSpec
        leaf = specs[0] if specs else leaf
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
