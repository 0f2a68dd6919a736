"""`tapekit.compiled.precision`: mixed precision with tapekit's dynamic loss scaling, and its checks."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tapekit
from tapekit.compiled import precision
from tapekit.trainers import RegressionTrainer


def test_mixed_float16_under_mirrored_uses_tapekit_loss_scaling():
    trainer = RegressionTrainer(strategy="mirrored", cpu_replicas=2, precision="mixed_float16")
    trainer.fit(train_steps=600, steps_per_loop=200)
    assert trainer.model.compute_dtype == "float16" and trainer.model.w.dtype == "float32"
    (scale,) = trainer.loss_scales
    # Each skipped (overflowing) step halved the scale, from 2^15; 600 good steps are too few
    # to double it (every 2000): so the scale says exactly how many updates were skipped.
    skipped = 600 - int(trainer.optimizer.iterations.numpy())
    assert 0 <= skipped < 100
    assert float(scale.scale.numpy()) == max(2.0 ** 15 / 2.0 ** skipped, 1.0)
    assert trainer.model.w.numpy().item() == pytest.approx(3.0, abs=0.05)
    assert trainer.model.b.numpy().item() == pytest.approx(2.0, abs=0.05)


def test_loss_scaling_skips_overflowing_steps_on_every_replica_and_shrinks():
    """A huge loss overflows float16 gradients: the step is skipped and the scale halves."""

    class Overflowing(RegressionTrainer):
        def train_step(self, batch):
            x, y = batch
            with tf.GradientTape() as tape:
                prediction = tf.cast(self.model(x, training=True), tf.float32)
                loss = self.compute_loss(1e6 * tf.square(y - prediction))
            self.apply_gradients(tape, loss, self.model, self.optimizer)
            return {"loss": loss}

    trainer = Overflowing(strategy="mirrored", cpu_replicas=2, precision="mixed_float16")
    trainer.fit(train_steps=1, steps_per_loop=1)
    w_before = trainer.model.w.numpy().copy()
    (scale,) = trainer.loss_scales
    start_scale = float(scale.scale.numpy())
    trainer.fit(train_steps=3, steps_per_loop=2)
    assert float(scale.scale.numpy()) < start_scale
    np.testing.assert_array_equal(trainer.model.w.numpy(), w_before)
    assert int(trainer.optimizer.iterations.numpy()) == 0  # no update was applied


def test_mixed_bfloat16_trains_linear_regression_on_cpu():
    # bfloat16 keeps 8 significant bits (relative rounding 2^-8 ≈ 0.4%); the float32 master
    # weights average that rounding out, so the float32 bound (0.05) still holds. Seen: 0.01.
    trainer = RegressionTrainer(precision="mixed_bfloat16")
    trainer.fit(train_steps=1000, steps_per_loop=250)
    assert trainer.model.compute_dtype == "bfloat16"
    assert trainer.model.w.numpy().item() == pytest.approx(3.0, abs=0.05)
    assert trainer.model.b.numpy().item() == pytest.approx(2.0, abs=0.05)
    assert keras.config.dtype_policy().name == "float32"  # the policy is restored after build


def test_mixed_float16_refused_on_a_gpu_without_float16():
    old_gpu = tf.config.PhysicalDevice(name="/physical_device:GPU:0", device_type="GPU")
    with pytest.raises(tapekit.TapekitError, match="cannot work on GPU:0 .compute capability 3.7"):
        precision.check_precision("mixed_float16", tf.distribute.get_strategy(), gpus=[old_gpu],
                                  device_details=lambda gpu: {"compute_capability": (3, 7)})
    precision.check_precision("mixed_float16", tf.distribute.get_strategy(), gpus=[old_gpu],
                              device_details=lambda gpu: {"compute_capability": (8, 0)})
    with pytest.raises(tapekit.TapekitError, match="precision must be one of float32.*got 'float8'"):
        RegressionTrainer(precision="float8")
