"""Independent random numbers on every replica for Keras `SeedGenerator`s.

A Keras 3 `SeedGenerator` keeps its state in a variable; created in a strategy scope that
variable is mirrored, so every replica draws the same seed and the same numbers: the same
Dropout mask, noise or augmentation on every replica's slice of the global batch
(keras-team/keras#20611). tapekit's steps draw from a seed that also depends on the
replica: while a compiled tapekit step is traced on N > 1 replicas, each seed a
`SeedGenerator` hands out is folded with the replica's id
(`tf.random.experimental.stateless_fold_in`). The generator's state still advances the
same way on every replica, so it stays one mirrored, checkpointed value: a run is
reproducible from its seed and resumes exactly on the same number of replicas. With one
replica nothing changes. `tf.random.Generator`s created in a strategy scope (the trainer's
`rng`) already draw per replica (TensorFlow folds the replica id in itself).

Outside tapekit's steps (e.g. Keras `fit` in the same process) Keras behaves as it always
has: the patch of `SeedGenerator.next` is installed only while a step's trace is open
(`tapekit.compiled.tracing.step`), and folds only seeds drawn inside one.
"""

import tensorflow as tf


def fold_in_replica(seed):
    """`seed` folded with this replica's id when traced on N > 1 replicas, else `seed`."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return seed
    replica = tf.cast(context.replica_id_in_sync_group, tf.int32)
    folded = tf.random.experimental.stateless_fold_in(seed, replica)
    return tf.cast(folded, seed.dtype)

