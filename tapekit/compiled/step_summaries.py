"""`tf.summary` calls inside `train_step`/`eval_step`, written every `summary_every_steps`.

With `summary_every_steps` (and a model_dir) the compiled loop
(`tapekit.compiled.loop.CompiledLoop`) records what the user's step writes with
`tf.summary.scalar`, `histogram`, `image`, ... into the run's TensorBoard:

* training, into MODEL_DIR/summaries/train: the steps whose number is a multiple of
  `summary_every_steps`, each at its true global step, counting that step (the N-th step
  of the run writes at step N, where a loop ending after it logs its `loss`; inside the
  step `self.global_step` still reads N - 1, the steps completed before it);
* evaluation, into MODEL_DIR/summaries/eval: each evaluation's first step, at the global
  step the model is at (where the evaluation's `loss` is written), once per global step: an
  evaluation at the step of the one before it (of the EMA weights with `use_ema`, or an
  `evaluate()` after `fit`'s last) records nothing;
* on the chief's first replica only: other replicas and workers record nothing.

How: around each loop the writer is made the default (in the loop's cross-replica context;
its one flush runs as the loop ends); around each step, on each replica, the summary step is
set and recording is switched on by a condition (`tf.summary.record_if` with a callable)
that TensorFlow evaluates in the graph at each summary call. A step between those steps
therefore writes nothing, and a step without summary calls pays nothing. Off (the default),
a loop has no summary op at all: `tf.summary` calls without a default writer add none.
XLA cannot compile summary writes: `summary_every_steps` is refused with `jit_compile`.
"""

import contextlib
import os
from typing import Dict, Optional

import tensorflow as tf

from tapekit.run import distribute

TRAIN, EVAL = "train", "eval"


class SummaryWriters:
    """One `tf.summary` file writer per subdirectory of `logdir` ("train", "eval"), made at
    its first use and kept for the run: the in-step summaries and
    `tapekit.callbacks.TensorBoard` share it, so a process writes one event file per
    directory (two writers on one directory would make two). Eager."""

    def __init__(self, logdir: str):
        self.logdir = logdir
        self._writers: Dict[str, tf.summary.SummaryWriter] = {}

    def get(self, name: str) -> tf.summary.SummaryWriter:
        if name not in self._writers:
            self._writers[name] = tf.summary.create_file_writer(os.path.join(self.logdir, name))
        return self._writers[name]

    def flush(self) -> None:
        for writer in self._writers.values():
            writer.flush()


class LoopSummaries:
    """What one compiled loop (training or evaluation) records; see the module docstring.

    `loop` is entered around a loop's steps, in its cross-replica context (traced, or eager
    with `run_eagerly`); `step(offset)` around the step at `offset` in it, per replica.
    """

    def __init__(self, writer, every_steps: int, global_step: tf.Variable, training: bool):
        self.writer = writer
        self.every_steps = int(every_steps)
        self.global_step = global_step
        self.training = training
        self._first_step = None  # while a loop runs: the global step as it started
        self._local_replicas = 1
        self._first_at_step = None  # while an evaluation runs: the last one was at another step
        # Evaluation: the global step of the last evaluation (not checkpointed: per process).
        self._evaluated_step = None if training else tf.Variable(
            -1, dtype=tf.int64, trainable=False, name="summaries_evaluated_step")

    @contextlib.contextmanager
    def loop(self, strategy: tf.distribute.Strategy):
        """Around one loop's steps: the writer is the default (MirroredStrategy hands it to
        each replica's thread) and flushed as the loop ends."""
        self._first_step = self.global_step.read_value()
        self._local_replicas = max(
            1, strategy.num_replicas_in_sync // distribute.num_workers(strategy))
        if not self.training:
            self._first_at_step = tf.not_equal(self._first_step, self._evaluated_step.read_value())
        try:
            with self.writer.as_default():
                yield
            if not self.training:
                self._evaluated_step.assign(self._first_step)
        finally:
            self._first_step = self._first_at_step = None

    @contextlib.contextmanager
    def step(self, offset):
        """Around the step at `offset` (0-based) in the loop, on one replica: the summary step
        is its global step, and recording is on when it is due on the chief's first replica."""
        if self.training:
            step = self._first_step + tf.cast(offset, tf.int64) + 1  # counting this step

            def due():
                return tf.equal(step % self.every_steps, 0)
        else:
            step = self._first_step  # the evaluated model's step
            first_at_step = self._first_at_step

            def due():
                return tf.logical_and(tf.equal(offset, 0), first_at_step)
        previous = tf.summary.experimental.get_step()
        tf.summary.experimental.set_step(step)
        try:
            # The root name scope: a tag is what the step names it, not "while/cond/..." (a
            # summary's tag takes the name scope it is written in).
            with tf.name_scope(""), tf.summary.record_if(
                    lambda: tf.logical_and(due(), self._first_replica())):
                yield
        finally:
            tf.summary.experimental.set_step(previous)

    def _first_replica(self):
        """True on this worker's first replica (only the chief has a writer at all)."""
        context = tf.distribute.get_replica_context()
        if context is None or self._local_replicas == 1:
            return tf.constant(True)
        replica = tf.cast(context.replica_id_in_sync_group, tf.int64)
        return tf.equal(replica % self._local_replicas, 0)


class RunSummaries:
    """A run's in-step summaries: its writers (`SummaryWriters`, shared with the TensorBoard
    callback; None where nothing is written: no model_dir, or not the chief) and its
    `summary_every_steps`. Made once per engine; eager."""

    def __init__(self, logdir: Optional[str], every_steps: Optional[int],
                 global_step: tf.Variable):
        self.writers = SummaryWriters(logdir) if logdir else None
        self.every_steps = every_steps
        self.global_step = global_step

    @classmethod
    def of(cls, engine) -> "RunSummaries":
        """The run of `engine` (`tapekit.run.engine.Engine`): written by the chief only."""
        chief = engine.model_dir and distribute.is_chief(engine.strategy)
        logdir = os.path.join(engine.model_dir, "summaries") if chief else None
        return cls(logdir, engine.options.summary_every_steps, engine.global_step)

    def for_loop(self, name: str) -> Optional[LoopSummaries]:
        """What the `name` (TRAIN or EVAL) loop records, or None: off, at no cost."""
        if not self.every_steps or self.writers is None:
            return None
        return LoopSummaries(self.writers.get(name), self.every_steps, self.global_step,
                             training=name == TRAIN)
