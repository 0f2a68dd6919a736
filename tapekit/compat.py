"""Where tapekit reaches into private TensorFlow/Keras code: each reach is one named function
here, with the versions it was checked on, so that an upgrade breaks in one place.

Nothing else in tapekit (nor in `tapekit.models`, `tapekit.trainers`) touches a private
TensorFlow/Keras name or patches a TensorFlow/Keras object: `tests/test_compat.py` reads
the sources and fails on any such line outside this file. A patch is a context manager
that undoes itself on exit. "Checked on" names the versions the test suite ran against.
"""

import contextlib
import threading
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import keras
import tensorflow as tf

from tapekit.errors import TapekitError

LearningRateSchedule = keras.optimizers.schedules.LearningRateSchedule

# ------------------------------------------------------------------ AutoGraph

# The AutoGraph context outside any tf.function ("unspecified"), captured at import.
_AUTOGRAPH_CONTEXT = tf.__internal__.autograph.control_status_ctx()


def autograph_converted(function: Callable) -> Callable:
    """`function` converted by AutoGraph when called, as a `tf.function` would convert it.

    `tf.__internal__.autograph.tf_convert` is the hook TensorFlow offers library code for
    converting one function inside a trace that is itself not converted. Checked on
    TensorFlow 2.16 and 2.21.
    """
    return tf.__internal__.autograph.tf_convert(function, _AUTOGRAPH_CONTEXT,
                                                convert_by_default=True, user_requested=True)


# ------------------------------------------------------------------ tf.distribute and graphs


def one_replica_spec(spec):
    """The spec of one replica's value for a `PerReplicaSpec` (its `_value_specs`), else
    `spec` itself. Checked on TensorFlow 2.16 and 2.21."""
    value_specs = getattr(spec, "_value_specs", None)
    return value_specs[0] if value_specs else spec


def captured_tensors(graph) -> List:
    """The outer tensors a `FuncGraph` being traced captures (`FuncGraph.captures`).
    Checked on TensorFlow 2.16 and 2.21."""
    return [external for external, _ in graph.captures]


def traced_operations() -> List:
    """The operations of the graph being traced so far, in the order they were made (the
    default graph inside a `tf.function`'s trace). Checked on TensorFlow 2.16 and 2.21."""
    return tf.compat.v1.get_default_graph().get_operations()


def traced_graph():
    """The graph being traced (a `tf.function`'s, or a branch's of `tf.cond` or body's of
    `tf.while_loop` inside it: each is a graph of its own), or None when running eagerly.
    Checked on TensorFlow 2.16 and 2.21."""
    return None if tf.executing_eagerly() else tf.compat.v1.get_default_graph()


def captured_as() -> dict:
    """outer tensor ref -> ref of the placeholder that stands for it inside the graph being
    traced (`FuncGraph.captures`: a variable's handle is read through it). Checked on
    TensorFlow 2.16 and 2.21."""
    graph = tf.compat.v1.get_default_graph()
    return {outer.ref(): inner.ref() for outer, inner in getattr(graph, "captures", ())}


def is_trackable(value) -> bool:
    """Whether `tf.train.Checkpoint` can hold `value` as it is (`tf.__internal__.tracking.
    Trackable`). Checked on TensorFlow 2.16 and 2.21."""
    return isinstance(value, tf.__internal__.tracking.Trackable)


def checkpoint_reader(path: str):
    """TensorFlow's reader of checkpoint `path` (a prefix such as .../ckpt-100), from the v1
    API. Not `tf.train.load_checkpoint`: it first asks whether `path` is a directory, and
    ram:// says yes to any prefix of a file's name (ckpt-100 of ckpt-100.index). Checked on
    TensorFlow 2.16 and 2.21."""
    return tf.compat.v1.train.NewCheckpointReader(path)


def write_checkpoint_state(directory: str, latest: str, all_paths: Sequence[str]) -> None:
    """Rewrites `directory/checkpoint` (TensorFlow's checkpoint state file) to list
    `all_paths`, `latest` last; TF 2 offers no API for it (`tf.compat.v1.train.
    update_checkpoint_state`). Checked on TensorFlow 2.16 and 2.21."""
    tf.compat.v1.train.update_checkpoint_state(directory, latest,
                                               all_model_checkpoint_paths=list(all_paths))


def async_checkpoint_error(checkpoint) -> Optional[BaseException]:
    """The error of `checkpoint`'s last background write (`CheckpointOptions(enable_async=
    True)`), cleared, or None. After `Checkpoint.sync()` TensorFlow keeps it (in its async
    helper) until the next save raises it; a run's last save has no next one. Checked on
    TensorFlow 2.16 and 2.21."""
    helper = getattr(checkpoint, "_async_checkpointer_impl", None)
    error = getattr(helper, "_async_error", None) if helper is not None else None
    if error is not None:
        helper._async_error = None
    return error


def summary_metadata(plugin: str, data_class: str):
    """The `SummaryMetadata` proto TensorBoard's `plugin` reads, for `data_class` "scalar",
    "blob_sequence" or "tensor" (`tensorflow.core.framework.summary_pb2`, which
    `tf.summary.write` takes but does not export). Checked on TensorFlow 2.16 and 2.21."""
    from tensorflow.core.framework import summary_pb2
    classes = {"scalar": summary_pb2.DATA_CLASS_SCALAR,
               "blob_sequence": summary_pb2.DATA_CLASS_BLOB_SEQUENCE,
               "tensor": summary_pb2.DATA_CLASS_TENSOR}
    return summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=plugin),
        data_class=classes[data_class])


# ------------------------------------------------------------------ Keras optimizers


def learning_rate_schedule(optimizer) -> Optional[LearningRateSchedule]:
    """The optimizer's schedule when its learning rate is one (Keras keeps it in
    `_learning_rate`; the public `learning_rate` is its current value), else None.
    Checked on Keras 3.10 and 3.15."""
    rate = getattr(optimizer, "_learning_rate", None)
    return rate if isinstance(rate, LearningRateSchedule) else None


@contextlib.contextmanager
def gradients_already_summed(optimizer):
    """While open, `optimizer.apply_gradients` in a replica context does not sum the
    gradients over replicas: tapekit hands it gradients already summed (the global-batch
    gradient, the same on every replica), so the optimizer's clipping sees what one device
    would see and sparse rows are not gathered again from every replica.

    Keras's TensorFlow optimizer sums in `TFOptimizer._all_reduce_sum_gradients`, called
    by `_backend_update_step` after clipping (checked on Keras 3.3 to 3.15; Keras 3.0-3.2
    never summed, so each replica applied its own gradient). The patch is an attribute of
    this one optimizer instance, undone on exit; the object behaves as before afterwards.
    Open it outside the replica threads (in cross-replica context): every replica sees it.
    """
    if not callable(getattr(type(optimizer), "_all_reduce_sum_gradients", None)):
        raise TapekitError(
            f"{type(optimizer).__name__} has no _all_reduce_sum_gradients: this Keras version "
            "sums gradients over replicas differently from the ones tapekit supports "
            "(Keras 3.10 and later); upgrade Keras.")
    with instance_attributes([(optimizer, {"_all_reduce_sum_gradients": list})]):
        yield  # list: the (gradient, variable) pairs as they are


# ------------------------------------------------------------------ patches


@contextlib.contextmanager
def instance_attributes(replacements: Sequence[Tuple[object, dict]]) -> Iterator[None]:
    """While open, each object of `replacements` ([(object, {name: value})]) has those
    instance attributes (e.g. a method of one optimizer replaced for a trace); on exit
    each is restored to what the instance had, or removed so the class's shows again."""
    missing = object()
    saved: List[Tuple[object, str, object]] = []
    try:
        for target, attributes in replacements:
            for name, value in attributes.items():
                saved.append((target, name, vars(target).get(name, missing)))
                setattr(target, name, value)
        yield
    finally:
        for target, name, previous in reversed(saved):
            if previous is missing:
                vars(target).pop(name, None)
            else:
                setattr(target, name, previous)


_COPY_TO_CPU_LOCK = threading.Lock()


@contextlib.contextmanager
def keras_variables_copied_in_place() -> Iterator[None]:
    """While open, TensorFlow's async checkpoint (`CheckpointOptions(enable_async=True)`)
    can save Keras variables more than once. It copies every variable to the host with a
    compiled function, from the second save on; Keras's `Variable._copy_trackable_to_cpu`
    (keras-team/keras#18749) makes a new `tf.Variable` on every call, which fails there
    ("tf.function only supports singleton tf.Variables created on the first call"). Here a
    Keras variable is saved as the host copy of the `tf.Variable` it wraps, which
    TensorFlow updates in place. Installed on the class for the save call only (the copy
    runs in the calling thread; the write in the background reads the copies). Checked on
    Keras 3.10 and 3.15 with TensorFlow 2.16 and 2.21."""
    klass = keras.Variable
    own = vars(klass).get("_copy_trackable_to_cpu")  # else inherited (the backend's)
    if getattr(klass, "_copy_trackable_to_cpu", None) is None:
        raise TapekitError(
            "this Keras version's variables do not copy themselves for TensorFlow's async "
            "checkpoint as Keras 3.10-3.15 do; turn --async_checkpoint off.")

    def copy_in_place(variable, object_map):
        variable.value._copy_trackable_to_cpu(object_map)
        object_map[variable] = object_map[variable.value]

    with _COPY_TO_CPU_LOCK:
        klass._copy_trackable_to_cpu = copy_in_place
        try:
            yield
        finally:
            if own is None:
                del klass._copy_trackable_to_cpu
            else:
                klass._copy_trackable_to_cpu = own


class _SeedPatch:
    """Bookkeeping of `seeds_transformed`: the patch is installed while anyone is inside."""

    lock = threading.Lock()
    users = 0
    original = None
    transform = None


@contextlib.contextmanager
def seeds_transformed(transform: Callable[[tf.Tensor], tf.Tensor]) -> Iterator[None]:
    """While open (in any thread), every seed a Keras `SeedGenerator` hands out
    (`SeedGenerator.next`) passes through `transform(seed)`. Installed on
    `keras.random.SeedGenerator` when the first user enters, removed when the last leaves
    (MirroredStrategy traces each replica in a thread of its own, so replicas enter and
    leave it one by one). Keras draws every seed of Dropout, `keras.random.*` and the
    augmentation layers through `next`. Checked on Keras 3.10 and 3.15."""
    klass = keras.random.SeedGenerator
    with _SeedPatch.lock:
        if _SeedPatch.users == 0:
            original = klass.next

            def next_seed(self, ordered=True):
                return transform(original(self, ordered=ordered))

            _SeedPatch.original, _SeedPatch.transform = original, transform
            klass.next = next_seed
        elif _SeedPatch.transform is not transform:
            raise TapekitError("internal: two different SeedGenerator transforms at once.")
        _SeedPatch.users += 1
    try:
        yield
    finally:
        with _SeedPatch.lock:
            _SeedPatch.users -= 1
            if _SeedPatch.users == 0:
                klass.next = _SeedPatch.original
                _SeedPatch.original = _SeedPatch.transform = None


def op_determinism_enabled() -> bool:
    """Whether TensorFlow's op determinism is on (`tensorflow.python.framework.config.
    is_op_determinism_enabled`; the public API can only turn it on). Checked on
    TensorFlow 2.16 and 2.21."""
    from tensorflow.python.framework import config
    return bool(config.is_op_determinism_enabled())


@contextlib.contextmanager
def op_determinism(enabled: bool) -> Iterator[None]:
    """While open, op determinism is on if `enabled` (otherwise as it was); on exit it is as
    it was (`disable_op_determinism` of the same private module, as `enable_op_determinism`
    has no public inverse). Checked on TensorFlow 2.16 and 2.21."""
    from tensorflow.python.framework import config
    was_enabled = op_determinism_enabled()
    if enabled and not was_enabled:
        tf.config.experimental.enable_op_determinism()
    try:
        yield
    finally:
        if enabled and not was_enabled:
            config.disable_op_determinism()
