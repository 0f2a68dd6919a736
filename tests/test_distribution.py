"""One trainer, unchanged, on default / one_device / mirrored strategies; precision; errors."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tapekit
from tapekit import data, distribute, precision
from tapekit.trainers import GANTrainer, RegressionTrainer


def _weights(trainer):
    return [
        v.numpy() for model in _models(trainer) for v in model.trainable_variables]


def _models(trainer):
    return [trainer.gan] if hasattr(trainer, "gan") else [trainer.model]


WORKLOADS = {
    "linear": lambda **kw: RegressionTrainer(model="linear", **kw),
    "mlp": lambda **kw: RegressionTrainer(model="mlp", **kw),
    "gan": lambda **kw: GANTrainer(**kw),
}


@pytest.mark.parametrize("workload", sorted(WORKLOADS))
def test_one_and_two_replicas_give_the_same_losses_and_weights(workload):
    make = WORKLOADS[workload]
    one = make(strategy="default", seed=3)
    history_one = one.fit(train_steps=200, steps_per_loop=50)
    two = make(strategy="mirrored", cpu_replicas=2, seed=3)
    assert two.num_replicas == 2
    history_two = two.fit(train_steps=200, steps_per_loop=50)
    metrics = [name for name in history_one[0] if name not in ("steps_per_sec", "examples_per_sec")]
    for loop_one, loop_two in zip(history_one, history_two):
        for name in metrics:
            assert loop_two[name] == pytest.approx(loop_one[name], rel=1e-5, abs=1e-6), name
    for a, b in zip(_weights(one), _weights(two)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


def test_one_device_strategy_trains_like_default():
    default = RegressionTrainer(strategy="default")
    default.fit(train_steps=100, steps_per_loop=50)
    pinned = RegressionTrainer(strategy="one_device", device="/cpu:1")
    assert isinstance(pinned.strategy, tf.distribute.OneDeviceStrategy)
    pinned.fit(train_steps=100, steps_per_loop=50)
    for a, b in zip(_weights(default), _weights(pinned)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_auto_on_cpu_is_default_or_mirrored_over_cpu_replicas():
    assert distribute.resolve_strategy("auto") is tf.distribute.get_strategy()
    mirrored = distribute.resolve_strategy("auto", cpu_replicas=2)
    assert isinstance(mirrored, tf.distribute.MirroredStrategy) and mirrored.num_replicas_in_sync == 2
    given = tf.distribute.OneDeviceStrategy("/cpu:0")
    assert RegressionTrainer(strategy=given).strategy is given


def test_reported_loss_is_the_global_mean_with_regularization_on_two_replicas():
    """compute_loss's value is the global mean (not 1/N of it) and regularization is counted once."""

    class Regularized(tapekit.Trainer):
        def build(self):
            self.model = keras.layers.Dense(
                1, use_bias=False, kernel_initializer="ones",
                kernel_regularizer=keras.regularizers.L2(0.5))
            self.model.build((None, 1))
            self.optimizer = keras.optimizers.SGD(0.0)

        def train_dataset(self, input_context):
            x = np.arange(1, 9, dtype=np.float32).reshape(-1, 1)  # one global batch of 8
            return tapekit.per_replica_batches(tf.data.Dataset.from_tensor_slices(x),
                                               input_context, 8)

        def train_step(self, x):
            with tf.GradientTape() as tape:
                loss = self.compute_loss(tf.square(self.model(x)), self.model.losses)
            self.apply_gradients(tape, loss, self.model, self.optimizer)
            return {"loss": loss, "mean_x": tf.reduce_mean(x)}

    expected = np.mean(np.arange(1, 9) ** 2) + 0.5  # mean of x² (w = 1) plus 0.5·w²
    for strategy, replicas in (("default", 1), ("mirrored", 2)):
        trainer = Regularized(strategy=strategy, cpu_replicas=replicas, global_batch_size=8)
        logs = trainer.fit(train_steps=1, steps_per_loop=1)[0]
        assert logs["loss"] == pytest.approx(expected), strategy
        assert logs["mean_x"] == pytest.approx(4.5), strategy


def test_mixed_float16_under_mirrored_uses_tapekit_loss_scaling():
    trainer = RegressionTrainer(strategy="mirrored", cpu_replicas=2, precision="mixed_float16")
    trainer.fit(train_steps=600, steps_per_loop=200)
    assert trainer.model.compute_dtype == "float16" and trainer.model.w.dtype == "float32"
    (scale,) = trainer.loss_scales
    assert 1.0 <= float(scale.scale.numpy()) <= 2.0 ** 15
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


# ------------------------------------------------------------------ errors


def test_unknown_strategy_lists_the_choices():
    with pytest.raises(tapekit.TapekitError, match="unknown strategy 'tpu'.*default, auto, one_device"):
        RegressionTrainer(strategy="tpu")


@pytest.mark.parametrize("tf_config, expected", [
    (None, "needs the TF_CONFIG environment variable"),
    ("{not json", "TF_CONFIG is not usable"),
    ('{"cluster": {"worker": ["localhost:1"]}, "task": {"type": "worker", "index": 3}}',
     "TF_CONFIG is not usable"),
])
def test_multi_worker_without_usable_tf_config(monkeypatch, tf_config, expected):
    if tf_config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", tf_config)
    with pytest.raises(tapekit.TapekitError, match=expected):
        RegressionTrainer(strategy="multi_worker")


def test_global_batch_not_divisible_by_replicas(tmp_path):
    with pytest.raises(tapekit.TapekitError, match="global_batch_size=33 is not divisible by the 2"):
        RegressionTrainer(strategy="mirrored", cpu_replicas=2, global_batch_size=33,
                          model_dir=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_one_device_naming_a_missing_device():
    with pytest.raises(tapekit.TapekitError, match="device '/gpu:0' does not exist.*available"):
        RegressionTrainer(strategy="one_device", device="/gpu:0")


def test_mixed_float16_refused_on_a_gpu_without_float16():
    old_gpu = tf.config.PhysicalDevice(name="/physical_device:GPU:0", device_type="GPU")
    with pytest.raises(tapekit.TapekitError, match="cannot work on GPU:0 .compute capability 3.7"):
        precision.check_precision("mixed_float16", tf.distribute.get_strategy(), gpus=[old_gpu],
                                  device_details=lambda gpu: {"compute_capability": (3, 7)})
    precision.check_precision("mixed_float16", tf.distribute.get_strategy(), gpus=[old_gpu],
                              device_details=lambda gpu: {"compute_capability": (8, 0)})
    with pytest.raises(tapekit.TapekitError, match="unknown precision 'float8'"):
        RegressionTrainer(precision="float8")


def test_shard_files_gives_each_worker_disjoint_files(tmp_path):
    names = [str(tmp_path / f"part-{i}.tfrecord") for i in range(5)]
    shares = []
    for worker in range(2):
        context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=worker,
                                             num_replicas_in_sync=2)
        shares.append([n.decode() for n in data.shard_files(names, context).as_numpy_iterator()])
    assert shares == [names[0::2], names[1::2]]
    with pytest.raises(tapekit.TapekitError, match="at least one file per worker"):
        data.shard_files(names[:1], tf.distribute.InputContext(2, 0, 2))
