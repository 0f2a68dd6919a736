"""The DCGAN models, the procedural shape images, and GANTrainer(model="dcgan")."""

import numpy as np
import pytest
import tensorflow as tf

import tapekit
from tapekit.models import GAN, DCGANDiscriminator, DCGANGenerator
from tapekit.trainers import GANTrainer
from tapekit.trainers.datasets import as_gan_images, shapes_images
from tapekit.trainers.gan import _EVAL_NOISE_SEED, sliced_wasserstein_1

from conftest import REPO
from helpers import run_cli


def _ids(model):
    return [id(v) for v in model.variables]


def _weights(model):
    return [v.numpy().copy() for v in model.trainable_variables]


def test_generator_and_discriminator_shapes_and_variables_fixed_after_first_call():
    generator = DCGANGenerator(noise_dim=16, channels=3, base_filters=8)
    images = generator(tf.random.normal([5, 16]), training=True)
    assert images.shape == (5, 28, 28, 3)
    assert np.all(np.abs(images.numpy()) <= 1.0)  # tanh
    before = _ids(generator)
    assert generator(tf.random.normal([2, 16])).shape == (2, 28, 28, 3)
    assert _ids(generator) == before
    discriminator = DCGANDiscriminator(base_filters=8)
    assert discriminator(images).shape == (5, 1)
    before = _ids(discriminator)
    discriminator(tf.zeros([3, 28, 28, 3]))
    assert _ids(discriminator) == before
    assert DCGANGenerator.from_config(generator.get_config()).get_config() == generator.get_config()
    assert DCGANDiscriminator.from_config(discriminator.get_config()).base_filters == 8


def test_gan_container_builds_the_dcgan_pair_from_the_generator_output_spec():
    gan = GAN(DCGANGenerator(noise_dim=64), DCGANDiscriminator(), noise_dim=64)
    gan.build()
    generator, discriminator = gan.generator, gan.discriminator
    # Dense kernel, two BatchNorm (gamma, beta), two transposed-conv kernels, output bias.
    assert len(generator.trainable_variables) == 8 and len(generator.variables) == 12
    assert len(discriminator.trainable_variables) == 6  # two conv + dense, kernel and bias
    assert not set(map(id, generator.trainable_variables)) & set(
        map(id, discriminator.trainable_variables))
    count = len(gan.variables)
    assert gan(tf.zeros([4, 64])).shape == (4, 28, 28, 1)
    assert len(gan.variables) == count


def test_shapes_images_are_deterministic_in_range_and_shaped():
    images = shapes_images(seed=7, num_examples=500)["x"]
    assert images.shape == (500, 28, 28, 1) and images.dtype == np.float32
    assert set(np.unique(images)) == {-1.0, 1.0}
    foreground = (images > 0).mean(axis=(1, 2, 3))
    assert foreground.min() > 0.01 and foreground.max() < 0.6  # one visible shape each
    np.testing.assert_array_equal(images, shapes_images(seed=7, num_examples=500)["x"])
    assert not np.array_equal(images, shapes_images(seed=8, num_examples=500)["x"])
    assert shapes_images(seed=7, num_examples=3, size=16)["x"].shape == (3, 16, 16, 1)


def test_as_gan_images_maps_pixels_to_minus_one_one_with_a_channel_axis():
    pixels = np.array([0, 51, 255], dtype=np.uint8)[:, None, None] * np.ones((1, 28, 28), np.uint8)
    expected = np.array([-1.0, -0.6, 1.0], dtype=np.float32)[:, None, None, None]
    scaled = as_gan_images(pixels)
    assert scaled.shape == (3, 28, 28, 1) and scaled.dtype == np.float32
    np.testing.assert_allclose(scaled[:, :1, :1], expected, atol=1e-6)
    # load_npz returns float32: 0–255 and [0, 1] floats read the same way; [-1, 1] is kept
    np.testing.assert_allclose(as_gan_images(pixels.astype(np.float32)), scaled, atol=1e-6)
    np.testing.assert_allclose(as_gan_images(pixels / 255.0), scaled, atol=1e-6)
    np.testing.assert_array_equal(as_gan_images(scaled), scaled)
    assert as_gan_images(np.zeros((2, 28, 28, 3), np.uint8)).shape == (2, 28, 28, 3)
    for bad in (np.zeros((4, 784)), np.zeros((2, 32, 32)), np.zeros((2, 28, 28, 2)),
                np.full((2, 28, 28), 300.0), np.full((2, 28, 28), -3.0)):
        with pytest.raises(tapekit.TapekitError):
            as_gan_images(bad)


def test_dcgan_trainer_trains_a_few_steps_and_samples_fixed_images():
    trainer = GANTrainer(model="dcgan", num_examples=256, seed=1)
    assert trainer.noise_dim == 64 and trainer.arrays["x"].shape == (256, 28, 28, 1)
    trainer.fit(train_steps=1, steps_per_loop=1)
    before = _weights(trainer.gan.generator) + _weights(trainer.gan.discriminator)
    history = trainer.fit(train_steps=4, steps_per_loop=3)
    after = _weights(trainer.gan.generator) + _weights(trainer.gan.discriminator)
    assert all(not np.array_equal(a, b) for a, b in zip(before, after))
    for name in ("generator_loss", "discriminator_loss", "generated_mean"):
        assert np.isfinite(history[-1][name]), name
    images = trainer.sample_images(10)
    assert images.shape == (10, 28, 28, 1) and images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    np.testing.assert_array_equal(images, trainer.sample_images(10))  # fixed noise
    assert trainer.sample_histograms() == {}
    model, signature = trainer.export_model()
    assert model is trainer.gan.generator
    assert signature[0].shape.as_list() == [None, 64] and signature[0].name == "noise"
    assert "discriminator accuracy" in trainer.results_summary()


def test_dense_gan_keeps_its_defaults_and_gives_histograms_not_images():
    trainer = GANTrainer()
    assert trainer.noise_dim == 10 and trainer.arrays["x"].shape == (1024, 1)
    with pytest.raises(tapekit.TapekitError, match="call fit"):
        trainer.export_model()
    trainer.fit(train_steps=2, steps_per_loop=2)
    assert trainer.sample_images(4) is None
    histograms = trainer.sample_histograms()
    assert histograms["generated"].shape == (10000,) and histograms["real"].shape == (1024,)
    assert trainer.export_model()[1][0].shape.as_list() == [None, 10]


def test_dcgan_on_one_and_two_replicas_gives_the_same_losses():
    # BatchNorm synchronizes its batch statistics across replicas.
    histories = []
    for strategy, replicas in (("default", 1), ("mirrored", 2)):
        trainer = GANTrainer(model="dcgan", num_examples=128, strategy=strategy,
                             cpu_replicas=replicas, seed=2)
        histories.append(trainer.fit(train_steps=3, steps_per_loop=3)[-1])
    for name in ("generator_loss", "discriminator_loss", "generated_mean"):
        assert histories[1][name] == pytest.approx(histories[0][name], rel=1e-4), name


def _flat(images):
    return tf.reshape(tf.constant(images, tf.float32), [len(images), -1])


def test_sliced_w1_is_zero_for_one_set_and_grows_as_far_as_a_shift_moves_it():
    images = _flat(shapes_images(seed=3, num_examples=256)["x"])
    assert float(sliced_wasserstein_1(images, images)) == 0.0
    shuffled = tf.gather(images, np.random.default_rng(0).permutation(256))
    assert float(sliced_wasserstein_1(images, shuffled)) == pytest.approx(0.0, abs=1e-6)
    # A distance, not a squared one: moving every pixel 5× as far moves it 5× as far.
    near = float(sliced_wasserstein_1(images, images + 0.1))
    far = float(sliced_wasserstein_1(images, images + 0.5))
    assert near > 0.01 and far == pytest.approx(5 * near, rel=1e-4)
    assert float(sliced_wasserstein_1(images + 0.5, images)) == pytest.approx(far, rel=1e-6)
    # Two independent real sets of 1024 differ only by sampling: far below an untrained
    # generator's distance (below).
    other = _flat(shapes_images(seed=4, num_examples=256)["x"])
    assert 0.0 < float(sliced_wasserstein_1(images, other)) < 0.15


def test_dcgan_reports_the_sliced_wasserstein_distance_to_held_out_images():
    trainer = GANTrainer(model="dcgan", num_examples=128, seed=2)
    untrained = trainer.evaluate()["sliced_w1"]  # 128 held-out images against 128 generated
    held_out = shapes_images(seed=3, num_examples=128)["x"]  # the trainer's seed + 1
    noise = tf.random.stateless_normal([128, trainer.noise_dim], seed=_EVAL_NOISE_SEED)
    generated = trainer.gan.generator(noise, training=False)
    assert untrained == pytest.approx(
        float(sliced_wasserstein_1(_flat(held_out), _flat(generated))), rel=1e-5)
    assert 0.5 < untrained < 1.0  # results_summary: "untrained: about 0.76"
    trainer.fit(train_steps=40, steps_per_loop=20)
    # 0.75 -> 0.55 in 40 steps (0.66 with the generator never updated: BatchNorm alone)
    assert trainer.evaluate()["sliced_w1"] < untrained - 0.15


def test_dcgan_reads_user_images_from_npz(tmp_path):
    path = tmp_path / "digits.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.integers(0, 256, (96, 28, 28), dtype=np.uint8))
    trainer = GANTrainer(model="dcgan", data=str(path))
    x = trainer.arrays["x"]
    assert x.shape == (96, 28, 28, 1) and x.min() >= -1.0 and x.max() <= 1.0
    trainer.fit(train_steps=1, steps_per_loop=1)
    np.savez(path, x=np.zeros((96, 28, 28, 2)))
    with pytest.raises(tapekit.TapekitError, match="--data=.*channels|C = 1, 3 or 4"):
        GANTrainer(model="dcgan", data=str(path))


def test_command_line_trains_the_dcgan(cli_env):
    result = run_cli(["--trainer=gan", "--model=dcgan", "--num_examples=256", "--train_steps=4",
                      "--steps_per_loop=2"], cli_env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "discriminator accuracy" in result.stdout
