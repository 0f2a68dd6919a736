"""Turning a per-replica step into one compiled, in-graph loop (the inner loop).

Python runs once per loop, not once per step: the `tf.function` below holds a
`tf.range` loop that reads the distributed iterator, runs the step on every replica
and keeps per-replica running sums of the step's metrics. Cross-replica reduction
happens once, after the loop.
"""

from typing import Callable, Dict, Optional, Sequence

import tensorflow as tf


class CompiledLoop:
    """Runs `num_steps` calls of `replica_step` under `strategy` in one `tf.function`.

    The contract of `replica_step(batch) -> dict[str, scalar tensor]`: it is traced (never
    run eagerly), runs once per replica per step, and returns replica-local values whose
    mean over replicas is the global value (what `Trainer.compute_loss` returns).

    Calling the loop returns the mean over the loop's steps of each metric, reduced
    across replicas, as eager scalar tensors. It is traced once per (iterator type);
    `trace_count` counts traces so tests and the retrace guard can check it.
    """

    def __init__(
        self,
        strategy: tf.distribute.Strategy,
        replica_step: Callable,
        metric_names: Sequence[str],
        step_counter: Optional[tf.Variable] = None,
        jit_compile: bool = False,
        name: str = "train_loop",
    ):
        self.strategy = strategy
        self.metric_names = tuple(metric_names)
        self.step_counter = step_counter
        self.trace_count = 0
        self._replica_step = (
            tf.function(replica_step, jit_compile=True) if jit_compile else replica_step)
        self._function = tf.function(self._loop)
        self.name = name

    def _zeros(self) -> Dict[str, tf.Tensor]:
        return {name: tf.zeros([], tf.float32) for name in self.metric_names}

    def _step_and_accumulate(self, batch, totals):
        outputs = self._replica_step(batch) or {}
        return {name: totals[name] + tf.cast(outputs[name], tf.float32)
                for name in self.metric_names}

    def _loop(self, iterator, num_steps):
        self.trace_count += 1  # Python side effect: runs only while tracing.
        strategy = self.strategy
        totals = strategy.run(self._zeros)
        for _ in tf.range(num_steps):
            totals = strategy.run(self._step_and_accumulate, args=(next(iterator), totals))
            if self.step_counter is not None:
                self.step_counter.assign_add(1)
        count = tf.cast(num_steps, tf.float32)
        return {name: strategy.reduce(tf.distribute.ReduceOp.MEAN, total, axis=None) / count
                for name, total in totals.items()}

    def __call__(self, iterator, num_steps: int) -> Dict[str, tf.Tensor]:
        return self._function(iterator, tf.constant(num_steps, tf.int64))
