"""`tapekit.input.tfrecords` and `--data=GLOB`: examples from TFRecord files, sharded per worker."""

import numpy as np
import pytest
import tensorflow as tf

import tapekit
from tapekit.input import tfrecords
from tapekit.trainers import GANTrainer, RegressionTrainer
from tapekit.trainers.datasets import seed_linear

from helpers import run_cli


def _line_npz(tmp_path, count=1000):
    arrays = seed_linear(0, count)
    path = tmp_path / "line.npz"
    np.savez(path, **arrays)
    return path, arrays


def test_the_converter_writes_shards_that_read_back_as_the_arrays(tmp_path):
    path, arrays = _line_npz(tmp_path, 10)
    tfrecords.main(["tapekit-data", "npz-to-tfrecord", f"--input={path}",
                    f"--output_pattern={tmp_path / 'shards' / 'part'}", "--num_shards=3"])
    files = tfrecords.find(str(tmp_path / "shards" / "part-*.tfrecord"))
    assert [f.rsplit("/", 1)[1] for f in files] == [
        "part-00000-of-00003.tfrecord", "part-00001-of-00003.tfrecord", "part-00002-of-00003.tfrecord"]
    shapes = tfrecords.feature_shapes(files, ("x", "y"))
    assert shapes == {"x": (1,), "y": (1,)}
    read = list(tfrecords.dataset(files, shapes, None).as_numpy_iterator())
    order = [0, 3, 6, 9, 1, 4, 7, 2, 5, 8]  # example i is in shard i mod 3
    np.testing.assert_array_equal(np.stack([e["x"] for e in read]), arrays["x"][order])
    np.testing.assert_array_equal(np.stack([e["y"] for e in read]), arrays["y"][order])


def test_each_worker_reads_only_its_files(tmp_path):
    files = tfrecords.write_shards({"x": np.arange(8, dtype=np.float32)[:, None]},
                                   str(tmp_path / "part"), 4)
    shares = []
    for worker in range(2):
        context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=worker,
                                             num_replicas_in_sync=2)
        shares.append(sorted(float(e["x"][0]) for e in tfrecords.dataset(
            files, {"x": (1,)}, context).as_numpy_iterator()))
    assert shares == [[0.0, 2.0, 4.0, 6.0], [1.0, 3.0, 5.0, 7.0]]


def test_bad_files_missing_features_and_mismatched_shapes_are_one_clear_error(tmp_path):
    (tmp_path / "notes.tfrecord").write_text("not a record file")
    with pytest.raises(tapekit.TapekitError, match="notes.tfrecord is not a TFRecord file of "
                                                   "tf.train.Example"):
        RegressionTrainer(data=str(tmp_path / "notes.tfrecord"))
    only_x = tfrecords.write_shards({"x": np.zeros([4, 2], np.float32)}, str(tmp_path / "x"), 1)
    with pytest.raises(tapekit.TapekitError, match=r"has no feature 'y' \(it has: x, x_shape\)"):
        RegressionTrainer(data=only_x[0])
    tfrecords.write_shards({"x": np.zeros([4, 3], np.float32), "y": np.zeros([4, 1], np.float32)},
                           str(tmp_path / "mixed-a"), 1)
    tfrecords.write_shards({"x": np.zeros([4, 2], np.float32), "y": np.zeros([4, 1], np.float32)},
                           str(tmp_path / "mixed-b"), 1)
    with pytest.raises(tapekit.TapekitError, match="all files must hold examples of one shape"):
        RegressionTrainer(data=str(tmp_path / "mixed-*"))
    with pytest.raises(tapekit.TapekitError, match="matches no file"):
        RegressionTrainer(data=str(tmp_path / "nothing-*.tfrecord"))


def test_regression_trains_from_tfrecord_shards_on_two_replicas(tmp_path):
    _, arrays = _line_npz(tmp_path)
    pattern = str(tmp_path / "part")
    tfrecords.write_shards(arrays, pattern, 4)
    trainer = RegressionTrainer(data=pattern + "-*", strategy="mirrored", cpu_replicas=2,
                                progress="none")
    trainer.fit(train_steps=300, steps_per_loop=100)
    assert trainer.model.w.numpy().item() == pytest.approx(3.0, abs=0.1)
    assert trainer.evaluate()["loss"] < 0.05


def _gaussian_records(tmp_path, name, mean):
    """512 samples of N(mean, 1.25²) in two shards: a mean far from the GAN's default 0."""
    samples = mean + 1.25 * np.random.default_rng(0).standard_normal((512, 1)).astype(np.float32)
    tfrecords.write_shards({"x": samples}, str(tmp_path / name), 2)
    return str(tmp_path / f"{name}-*"), samples


def test_the_gan_reads_tfrecords_from_the_command_line(tmp_path, cli_env):
    pattern, samples = _gaussian_records(tmp_path, "real", 4.0)
    result = run_cli(["--trainer=gan", f"--data={pattern}", "--train_steps=50",
                      "--steps_per_loop=25", "--eval_every_steps=50"], cli_env)
    assert result.returncode == 0, result.stderr[-2000:]
    # The summary's real data are the records' (the synthetic default is mean 0, stddev 1).
    assert (f"(real data: mean {samples.mean():.3f}, stddev {samples.std():.3f}); "
            "Wasserstein-1 to the real samples") in result.stdout


def test_the_gan_evaluates_and_trains_on_the_records_samples(tmp_path):
    from tapekit.trainers.gan import _EVAL_NOISE_SEED
    pattern, samples = _gaussian_records(tmp_path, "real", 4.0)
    trainer = GANTrainer(data=pattern)
    np.testing.assert_array_equal(np.sort(trainer.arrays["x"], 0), np.sort(samples, 0))
    # W1 of the untrained generator's output on the evaluation noise to exactly these samples.
    w1 = trainer.evaluate()["w1"]
    noise = tf.random.stateless_normal([len(samples), trainer.noise_dim], seed=_EVAL_NOISE_SEED)
    fake = trainer.gan.generator(noise, training=False).numpy()
    assert w1 == pytest.approx(np.abs(np.sort(samples, 0) - np.sort(fake, 0)).mean(), rel=1e-5)
    # Trained on records around +4 or around -4 (same seed: same initial networks and noise),
    # the discriminator learns to call the records' side of the line real.
    negated, _ = _gaussian_records(tmp_path, "negated", -4.0)
    preference = []
    for data in (pattern, negated):
        gan = GANTrainer(data=data, seed=0)
        gan.fit(train_steps=20, steps_per_loop=20)
        logits = gan.gan.discriminator(tf.constant([[4.0], [-4.0]]), training=False).numpy()
        preference.append(float(logits[0, 0] - logits[1, 0]))
    assert preference[0] > preference[1] + 0.2, preference


def _tapekit_data(tmp_path, name, images):
    """Writes `images` as x in NAME.npz, then tapekit-data's main turns it into two shards."""
    np.savez(tmp_path / f"{name}.npz", x=images)
    tfrecords.main(["tapekit-data", "npz-to-tfrecord", f"--input={tmp_path / name}.npz",
                    f"--output_pattern={tmp_path / name / 'part'}", "--num_shards=2"])
    return str(tmp_path / name / "part-*")


def test_the_dcgan_trains_on_image_records_written_by_tapekit_data(tmp_path):
    from tapekit.trainers.datasets import shapes_images
    from tapekit.trainers.gan import _EVAL_NOISE_SEED, sliced_wasserstein_1
    images = shapes_images(seed=5, num_examples=128)["x"]  # [128, 28, 28, 1] in {-1, 1}
    trainer = GANTrainer(model="dcgan", data=_tapekit_data(tmp_path, "shapes", images), seed=0)
    order = np.r_[0:128:2, 1:128:2]  # example i is in shard i mod 2, read file by file
    np.testing.assert_array_equal(trainer.arrays["x"], images[order])
    # Evaluated against the records' images: the distance computed here by hand.
    sliced_w1 = trainer.evaluate()["sliced_w1"]
    noise = tf.random.stateless_normal([128, trainer.noise_dim], seed=_EVAL_NOISE_SEED)
    generated = trainer.gan.generator(noise, training=False)
    assert sliced_w1 == pytest.approx(float(sliced_wasserstein_1(
        tf.reshape(images, [128, -1]), tf.reshape(generated, [128, -1]))), rel=1e-5)
    # Trained on the shapes or on their negatives (same seed: same networks and noise), the
    # discriminator rates the images it was shown as the more real.
    inverted = _tapekit_data(tmp_path, "inverted", -images)
    preference = []
    for data in (trainer.data_path, inverted):
        gan = GANTrainer(model="dcgan", data=data, seed=0)
        history = gan.fit(train_steps=2, steps_per_loop=2)
        assert np.isfinite(history[-1]["discriminator_loss"])
        logits = gan.gan.discriminator(tf.concat([images, -images], 0), training=False).numpy()
        preference.append(float(logits[:128].mean() - logits[128:].mean()))
    assert preference[0] > preference[1] + 0.2, preference


def test_dcgan_records_of_unscaled_pixels_are_refused_before_training(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (64, 28, 28, 1), dtype=np.uint8)
    data = _tapekit_data(tmp_path, "pixels", pixels)  # tapekit-data keeps the values 0-255
    with pytest.raises(tapekit.TapekitError, match=r"the first 64 images have values in \[0, 255\]; "
                                                   r"the dcgan reads TFRecord images unscaled"):
        GANTrainer(model="dcgan", data=data)
    GANTrainer(data=data)  # the dense GAN takes samples of any range
