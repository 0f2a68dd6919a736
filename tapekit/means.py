"""Exact means of what a step reports, whatever the batch sizes and the number of replicas.

A compiled loop reports, for each metric a step returns, sum(value × weight) / sum(weight)
over every step on every replica. The weight of a value that `Trainer.compute_loss` or
`Trainer.compute_mean` returned is the number of examples (or the total sample weight)
behind it, which they record here while the step is traced; any other value is weighted
by the size of the replica's batch. So a partial last batch, or an empty batch that
tf.distribute hands a replica at the end of the data, counts for exactly what it holds.
When every weight is a constant (static batch shapes) the loop keeps plain sums instead.
"""

import contextlib
import threading
from typing import Optional, Tuple

import tensorflow as tf

# tensor.ref() -> (sum of per-example values, number of examples), per thread: under
# MirroredStrategy each replica's step is traced in a thread of its own, and the threads
# take turns at every merge_call, so each replica records and looks up in its own table.
_local = threading.local()


def record(value: tf.Tensor, total, count) -> None:
    """Remembers that `value` (a scalar the step may return) stands for total / count."""
    table = getattr(_local, "table", None)
    if table is not None:
        table[value.ref()] = (total, count)


def recorded(value) -> Optional[Tuple]:
    table = getattr(_local, "table", None)
    if table is None or not isinstance(value, tf.Tensor):
        return None
    return table.get(value.ref())


@contextlib.contextmanager
def recording():
    """Collects the `record` calls this thread makes while a step is traced."""
    previous = getattr(_local, "table", None)
    _local.table = {} if previous is None else previous
    try:
        yield
    finally:
        _local.table = previous


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
