"""`tf.summary` calls inside `train_step`/`eval_step` (`summary_every_steps`): written to
the run's TensorBoard at the true global step, every N steps, from the chief's first replica
only; off, the compiled loop has no summary op at all."""

import collections
import glob
import os
import types

import keras
import numpy as np
import pytest
import tensorflow as tf

import tapekit
from tapekit.errors import TapekitError

STEPS, PER_LOOP, EVERY = 20, 5, 4
DUE = [4, 8, 12, 16, 20]  # the global steps (counting the step) that are multiples of 4
# Ops of summaries in a graph: the writes, the writer, its flush.
SUMMARY_OPS = {"WriteSummary", "SummaryWriter", "CreateSummaryFileWriter", "FlushSummaryWriter",
               "WriteScalarSummary", "WriteHistogramSummary"}


class Summarizing(tapekit.Trainer):
    """y = 2x; the step counts its calls in a variable and writes the count (which is the
    global step of a fresh run, counting the step) as `my_metric`, and the kernel as a
    histogram. `reads_global_step`: it writes `self.global_step + 1` as well."""

    default_global_batch_size = 4

    def __init__(self, reads_global_step=False, **kwargs):
        super().__init__(**kwargs)
        self.reads_global_step = reads_global_step

    def build(self):
        self.model = keras.layers.Dense(1, kernel_initializer="ones")
        self.model.build((None, 1))
        self.optimizer = keras.optimizers.SGD(0.01)
        self.calls = tf.Variable(0.0, trainable=False,
                                 aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)

    def _examples(self, input_context):
        x = np.linspace(-1, 1, 64, dtype=np.float32).reshape(-1, 1)
        return tapekit.per_replica_batches(tf.data.Dataset.from_tensor_slices((x, 2 * x)),
                                           input_context, self.global_batch_size)

    def train_dataset(self, input_context):
        return self._examples(input_context)

    def eval_dataset(self, input_context):
        return self._examples(input_context).take(3)

    def train_step(self, batch):
        x, y = batch
        with tf.GradientTape() as tape:
            loss = self.compute_loss(tf.square(y - self.model(x)))
        self.apply_gradients(tape, loss, self.model, self.optimizer)
        self.calls.assign_add(1.0)
        tf.summary.scalar("my_metric", self.calls.read_value())
        tf.summary.histogram("my_kernel", self.model.kernel)
        if self.reads_global_step:
            tf.summary.scalar("global_step_seen", tf.cast(self.global_step, tf.float32))
        return {"loss": loss}

    def eval_step(self, batch):
        x, y = batch
        tf.summary.scalar("my_eval_metric", tf.cast(self.global_step, tf.float32))
        return {"loss": self.compute_loss(tf.square(y - self.model(x)))}


def _events(directory):
    """{tag: [(step, plugin, value)]} from the event files under `directory`."""
    tags = {}
    for path in glob.glob(os.path.join(str(directory), "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                tags.setdefault(value.tag, []).append(
                    (event.step, value.metadata.plugin_data.plugin_name,
                     tf.make_ndarray(value.tensor)))
    return tags


def _fit(tmp_path, **options):
    trainer = Summarizing(model_dir=str(tmp_path), progress="none", **options)
    trainer.fit(train_steps=STEPS, steps_per_loop=PER_LOOP)
    return trainer


@pytest.mark.parametrize("replicas", [1, 2])
def test_step_summaries_are_written_every_n_steps_at_the_global_step_once(tmp_path, replicas):
    options = {"strategy": "mirrored", "cpu_replicas": 2} if replicas == 2 else {}
    trainer = _fit(tmp_path, summary_every_steps=EVERY, **options)
    assert trainer.num_replicas == replicas
    train = _events(tmp_path / "summaries" / "train")
    # Once each (the chief's first replica only, not once per replica), at steps 4, 8, ...,
    # with the value the step computed at that step: its count is its global step.
    assert [(step, float(value)) for step, _, value in train["my_metric"]] == [
        (step, float(step)) for step in DUE]
    assert {plugin for _, plugin, _ in train["my_metric"]} == {"scalars"}
    assert [step for step, _, _ in train["my_kernel"]] == DUE
    assert {plugin for _, plugin, _ in train["my_kernel"]} == {"histograms"}
    # tapekit's own tags share the writer: one event file in summaries/train.
    assert [step for step, _, _ in train["loss"]] == [5, 10, 15, 20]
    assert len(glob.glob(str(tmp_path / "summaries" / "train" / "events.out.tfevents.*"))) == 1


def test_the_step_is_the_global_step_counting_the_step_that_wrote_it(tmp_path):
    # Inside step N, self.global_step reads N - 1 (the steps completed before it); its
    # summaries are written at N. A step that reads the counter is counted step by step.
    _fit(tmp_path, summary_every_steps=EVERY, reads_global_step=True)
    train = _events(tmp_path / "summaries" / "train")
    assert [(step, float(value)) for step, _, value in train["global_step_seen"]] == [
        (step, float(step - 1)) for step in DUE]
    assert [step for step, _, _ in train["my_metric"]] == DUE


def test_in_step_summaries_work_eagerly(tmp_path):
    _fit(tmp_path, summary_every_steps=EVERY, run_eagerly=True, strategy="mirrored",
         cpu_replicas=2)
    train = _events(tmp_path / "summaries" / "train")
    assert [(step, float(value)) for step, _, value in train["my_metric"]] == [
        (step, float(step)) for step in DUE]


@pytest.mark.parametrize("replicas", [1, 2])
def test_eval_step_summaries_go_to_summaries_eval_once_per_evaluation(tmp_path, replicas):
    options = {"strategy": "mirrored", "cpu_replicas": 2} if replicas == 2 else {}
    trainer = Summarizing(model_dir=str(tmp_path), progress="none", summary_every_steps=EVERY,
                          **options)
    trainer.fit(train_steps=STEPS, steps_per_loop=PER_LOOP, eval_every_steps=10, eval_steps=3)
    trainer.evaluate(steps=2)  # again at step 20: once per global step, so nothing new
    evaluation = _events(tmp_path / "summaries" / "eval")
    # The evaluation's first step, at the global step the evaluated model is at.
    assert [(step, float(value)) for step, _, value in evaluation["my_eval_metric"]] == [
        (10, 10.0), (20, 20.0)]
    assert "my_eval_metric" not in _events(tmp_path / "summaries" / "train")
    assert len(glob.glob(str(tmp_path / "summaries" / "eval" / "events.out.tfevents.*"))) == 1


def test_off_nothing_is_written(tmp_path):
    _fit(tmp_path)
    train = _events(tmp_path / "summaries" / "train")
    assert "loss" in train and "my_metric" not in train and "my_kernel" not in train


def _op_types(concrete):
    """Every op type in a concrete function's graph and the functions it calls (loop bodies,
    conds, the user's step)."""
    graph_def = concrete.graph.as_graph_def()
    types = [node.op for node in graph_def.node]
    for function in graph_def.library.function:
        types.extend(node.op for node in function.node_def)
    return types


def _traced_loop(tmp_path, **options):
    trainer = _fit(tmp_path, **options)
    return _op_types(trainer._engine.train_loop._concrete[1])


class Silent(Summarizing):
    """Summarizing without its tf.summary calls."""

    def train_step(self, batch):
        x, y = batch
        with tf.GradientTape() as tape:
            loss = self.compute_loss(tf.square(y - self.model(x)))
        self.apply_gradients(tape, loss, self.model, self.optimizer)
        self.calls.assign_add(1.0)
        return {"loss": loss}


def test_off_the_compiled_loop_has_no_summary_op(tmp_path):
    # Structural, not timed. Off, the loop (and every function it calls: the while bodies,
    # the conds, the user's step) has no write, no writer, no flush, no recording condition
    # and no read of the step for summaries: tapekit adds nothing to it, op for op, beside a
    # step without tf.summary calls. What those calls leave is TensorFlow's own, with no
    # default writer: each call's constant `False` and its argument (unused: pruned).
    off = _traced_loop(tmp_path / "off")
    assert not SUMMARY_OPS & set(off)
    silent = Silent(model_dir=str(tmp_path / "silent"), progress="none")
    silent.fit(train_steps=STEPS, steps_per_loop=PER_LOOP)
    silent = _op_types(silent._engine.train_loop._concrete[1])
    assert not collections.Counter(silent) - collections.Counter(off)
    assert set(collections.Counter(off) - collections.Counter(silent)) <= {
        "Const", "ReadVariableOp", "StopGradient", "Cast", "Identity"}
    # The same check sees the writes when the option is on.
    on = _traced_loop(tmp_path / "on", summary_every_steps=EVERY)
    assert {"WriteSummary", "FlushSummaryWriter"} <= set(on)


def test_summary_every_steps_is_checked_and_may_change_on_resume(tmp_path):
    with pytest.raises(TapekitError, match="summary_every_steps needs a model_dir"):
        Summarizing(summary_every_steps=4)
    with pytest.raises(TapekitError, match="summary_every_steps cannot be used with jit_compile"):
        Summarizing(summary_every_steps=4, jit_compile=True, model_dir=str(tmp_path))
    with pytest.raises(TapekitError, match="summary_every_steps must be a positive integer"):
        Summarizing(summary_every_steps=0, model_dir=str(tmp_path))
    first = Summarizing(model_dir=str(tmp_path), progress="none")
    first.fit(train_steps=8, steps_per_loop=4)
    resumed = Summarizing(model_dir=str(tmp_path), progress="none", summary_every_steps=3)
    resumed.fit(train_steps=STEPS, steps_per_loop=PER_LOOP)
    assert resumed.current_step == STEPS
    steps = [step for step, _, _ in _events(tmp_path / "summaries" / "train")["my_metric"]]
    assert steps == [9, 12, 15, 18]


def test_only_the_chief_has_a_writer(tmp_path, monkeypatch):
    # On a multi-worker run, a worker that is not the chief gets no writer, so its loops have
    # no summary op (and on the chief, only the first replica records: tested above).
    from tapekit.compiled import step_summaries
    engine = types.SimpleNamespace(model_dir=str(tmp_path), strategy=tf.distribute.get_strategy(),
                                   options=types.SimpleNamespace(summary_every_steps=EVERY),
                                   global_step=tf.Variable(0, dtype=tf.int64))
    chief = step_summaries.RunSummaries.of(engine)
    assert chief.writers.logdir == os.path.join(str(tmp_path), "summaries")
    assert chief.for_loop(step_summaries.TRAIN) is not None
    monkeypatch.setattr(step_summaries.distribute, "is_chief", lambda strategy: False)
    worker = step_summaries.RunSummaries.of(engine)
    assert worker.writers is None and worker.for_loop(step_summaries.TRAIN) is None
