"""One trainer, unchanged, on default / one_device / mirrored strategies; precision; errors."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tapekit
from tapekit.run import distribute
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


def test_a_step_that_reads_the_step_counter_sees_every_step_on_two_replicas():
    class Counting(RegressionTrainer):
        def train_step(self, batch):
            metrics = super().train_step(batch)
            return {**metrics, "step_seen": tf.cast(self.global_step, tf.float32)}

    trainer = Counting(model="linear", strategy="mirrored", cpu_replicas=2)
    history = trainer.fit(train_steps=8, steps_per_loop=4)
    # the counter reads 0..3 in the first loop and 4..7 in the second, on both replicas
    assert [h["step_seen"] for h in history] == [1.5, 5.5] and trainer.current_step == 8


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


# ------------------------------------------------------------------ errors


def test_unknown_strategy_lists_the_choices():
    with pytest.raises(tapekit.TapekitError,
                       match="strategy must be one of default, auto, one_device.*got 'tpu'"):
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


def test_a_stopped_worker_is_named_and_this_worker_never_is():
    """TensorFlow 2.16 lists the reporting task among the unhealthy ones; 2.21 does not."""
    import types

    from tapekit.run import distribute
    report = RuntimeError(
        "Collective ops is aborted by: ... The following tasks are unhealthy (stopped sending "
        "heartbeats): /job:worker/replica:0/task:1 and /job:worker/replica:0/task:0")
    this = types.SimpleNamespace(cluster_resolver=types.SimpleNamespace(task_type="worker",
                                                                        task_id=0))
    assert distribute.stopped_workers(report, this) == "worker 1"
    assert distribute.stopped_workers(report) == "worker 0, worker 1"  # no strategy given
    assert distribute.stopped_workers(RuntimeError("out of memory"), this) is None
