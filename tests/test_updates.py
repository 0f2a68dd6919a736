"""tapekit.compiled.updates: gradient accumulation and clipping, on one and two replicas."""

import numpy as np
import pytest
import tensorflow as tf

from small_trainers import LinearSGD, rows


@pytest.mark.parametrize("replicas", [1, 2])
def test_two_accumulated_micro_steps_equal_one_step_of_twice_the_batch(replicas):
    x, y = rows(16)
    strategy = {"strategy": "mirrored", "cpu_replicas": 2} if replicas == 2 else {}
    big = LinearSGD(global_batch_size=16, **strategy)
    big.fit(train_steps=1, dataset=tf.data.Dataset.from_tensors((x, y)))
    accumulating = LinearSGD(global_batch_size=8, gradient_accumulation_steps=2, **strategy)
    halves = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    accumulating.fit(train_steps=1, dataset=halves)
    np.testing.assert_array_equal(accumulating.model.kernel.numpy(), np.ones((3, 1)))  # not yet
    accumulating.fit(train_steps=2)
    for a, b in zip(big.model.trainable_variables, accumulating.model.trainable_variables):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-6, atol=1e-6)
    assert int(accumulating.optimizer.iterations.numpy()) == 1


@pytest.mark.parametrize("replicas", [1, 2])
def test_clipping_bounds_the_global_batch_gradient_norm(replicas):
    x, y = rows(16)
    strategy = {"strategy": "mirrored", "cpu_replicas": 2} if replicas == 2 else {}
    trainer = LinearSGD(global_batch_size=16, clip_global_norm=0.01, **strategy)
    trainer.fit(train_steps=1, dataset=tf.data.Dataset.from_tensors((x, y)))
    kernel, bias = (v.numpy() for v in trainer.model.trainable_variables)
    moved = np.sqrt(np.sum((kernel - 1.0) ** 2) + np.sum(bias ** 2))
    assert moved == pytest.approx(0.1 * 0.01, rel=1e-4)  # learning rate × clip norm
