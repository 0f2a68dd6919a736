"""Exact means of what a step reports, whatever the batch sizes and the number of replicas.

A compiled loop reports, for each metric a step returns, sum(value × weight) / sum(weight)
over every step on every replica. The weight of a value that `Trainer.compute_loss` or
`Trainer.compute_mean` returned is the number of examples (or the total sample weight)
behind it, which they record in the step's trace (`tapekit.compiled.tracing`); any other value is weighted
by the size of the replica's batch. So a partial last batch, or an empty batch that
tf.distribute hands a replica at the end of the data, counts for exactly what it holds.
When every weight is a constant (static batch shapes) the loop keeps plain sums instead.
"""

from typing import Optional, Tuple

import tensorflow as tf
from absl import logging

from tapekit.compiled import tracing
from tapekit.errors import TapekitError


def record(value: tf.Tensor, total, count) -> None:
    """Remembers, in the step's trace (`tapekit.compiled.tracing`), that `value` (a scalar the step
    may return) stands for total / count (`total` None: value × count, computed only if the
    loop needs it). Outside a step's trace there is nothing to remember it for."""
    trace = tracing.current()
    if trace is not None:
        trace.means[value.ref()] = (total, count)


def recorded(value) -> Optional[Tuple]:
    """The (total, count) `record` noted for `value` in the current step's trace, or None."""
    trace = tracing.current()
    if trace is None or not isinstance(value, tf.Tensor):
        return None
    return trace.means.get(value.ref())


def weights(entries, batch) -> list:
    """The weight of each value given its `recorded` entry: the count recorded, else the
    size of the replica's batch (a Python number when static, else a tensor)."""
    size = batch_size(batch)
    return [entry[1] if entry else size for entry in entries]


def constant(weights_) -> bool:
    """True when every weight is a constant, so that plain sums of values make exact means."""
    return all(isinstance(weight, (int, float)) for weight in weights_)


def static_weights(outputs, names, batch) -> bool:
    """`constant` weights for the values `names` of `outputs`, inside the step's trace."""
    return constant(weights([recorded(outputs[name]) for name in names], batch))


def batch_size(batch):
    """The size of a batch: the leading dimension of its first tensor (a Python int when
    static, else a scalar tensor); 1 for a batch without one."""
    leaves = [t for t in tf.nest.flatten(batch) if isinstance(t, (tf.Tensor, tf.SparseTensor,
                                                                    tf.RaggedTensor))]
    if not leaves:
        return 1
    first = leaves[0]
    if isinstance(first, tf.RaggedTensor):
        return first.nrows()
    shape = first.shape
    if shape.rank is None or shape.rank == 0:
        return 1
    if shape[0] is not None:
        return int(shape[0])
    return tf.shape(first, out_type=tf.int64)[0] if not isinstance(first, tf.SparseTensor) \
        else first.dense_shape[0]


def global_batch_mean(per_example_loss, regularization_losses, num_replicas: int) -> tf.Tensor:
    """`Trainer.compute_loss`: the mean of a per-example loss over the GLOBAL batch, whose
    gradient is this replica's share. Runs per replica, traced; records (sum, count)."""
    losses = tf.cast(tf.convert_to_tensor(per_example_loss), tf.float32)
    if losses.shape.rank == 0:
        raise TapekitError(
            "compute_loss needs one loss per example (shape [batch, ...]), got a scalar; "
            "pass the unreduced loss, e.g. tf.square(y - prediction).")
    _warn_if_broadcast(losses.shape)
    replicas = num_replicas
    regularization = (tf.add_n([tf.cast(loss, tf.float32) for loss in regularization_losses])
                      if regularization_losses else None)
    # The mean over extra axes, then over the global batch, is one mean over everything
    # divided by the replicas: with static shapes the ops of a hand-written reduce_mean.
    if losses.shape.is_fully_defined():
        examples = losses.shape[0]
        mean = tf.reduce_mean(losses)
        share = mean if replicas == 1 else mean * (1.0 / replicas)
        local_total = None  # value × examples, as the value is this replica's mean
    else:
        examples = tf.shape(losses)[0]
        extra = tf.cast(tf.reduce_prod(tf.shape(losses)[1:]), tf.float32)
        local_total = tf.math.divide_no_nan(tf.reduce_sum(losses), extra)
        global_examples = tf.cast(examples, tf.float32)
        if replicas > 1:  # replicas may hold batches of different sizes
            global_examples = tf.distribute.get_replica_context().all_reduce(
                tf.distribute.ReduceOp.SUM, global_examples)
        share = tf.math.divide_no_nan(local_total, global_examples)
    if regularization is not None:
        share += regularization / replicas
        if local_total is not None:
            local_total += regularization * tf.cast(examples, tf.float32)
    value = share if replicas == 1 else share + tf.stop_gradient(share * (replicas - 1))
    record(value, local_total, examples)
    return value


def _warn_if_broadcast(shape: tf.TensorShape) -> None:
    """Warns (once per trace) about per-example losses whose second axis is as long as the
    batch: the classic y of shape [b] against a prediction of shape [b, 1], broadcast to
    [b, b], which averages every pair. Seen when the batch size is known (static batches,
    in-memory arrays, run_eagerly)."""
    if (shape.rank is not None and shape.rank >= 2 and shape[0] is not None and shape[0] > 1
            and shape[1] == shape[0]):
        logging.warning(
            "compute_loss got per-example losses of shape %s, whose second axis is as long as "
            "the batch: if y has shape [%d] and the prediction [%d, 1] (or the reverse), their "
            "difference broadcasts to [%d, %d] and averages every pair; give both the same "
            "shape (e.g. y[:, None] or tf.squeeze(prediction, -1)).", shape.as_list(),
            shape[0], shape[0], shape[0], shape[0])


def weighted_mean(values, sample_weight=None) -> tf.Tensor:
    """`Trainer.compute_mean`: this replica's (weighted) mean of `values`, recording
    (sum, weight) so that the loop reports the exact mean. Runs per replica, traced."""
    values = tf.cast(tf.convert_to_tensor(values), tf.float32)
    if values.shape.rank == 0:
        raise TapekitError(
            "compute_mean needs one value per example (shape [batch, ...]), got a scalar; "
            "pass the unreduced values, e.g. tf.cast(correct, tf.float32).")
    if sample_weight is None:
        total = tf.reduce_sum(values)
        count = (values.shape.num_elements() if values.shape.is_fully_defined()
                 else tf.cast(tf.size(values), tf.float32))
    else:
        weight = tf.broadcast_to(tf.cast(sample_weight, tf.float32), tf.shape(values))
        total = tf.reduce_sum(values * weight)
        count = tf.reduce_sum(weight)
    value = tf.math.divide_no_nan(total, tf.cast(count, tf.float32))
    record(value, total, count)
    return value
