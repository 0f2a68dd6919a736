"""GANs: the seed article's toy 1-D GAN, working, and a small DCGAN on 28×28 images.

Two tapes, two optimizers, Keras models that own their variables; the same `train_step`
serves both models.
"""

from typing import Optional

import keras
import numpy as np
import tensorflow as tf
from absl import flags

import tapekit
from tapekit.models import GAN, DCGANDiscriminator, DCGANGenerator, Discriminator, Generator
from tapekit.trainers import datasets

MODELS = ("dense", "dcgan")
# Per model: noise_dim, num_examples, learning_rate defaults.
_DEFAULTS = {"dense": (10, 1024, 1e-3), "dcgan": (64, 4096, 2e-4)}
# Stateless seed of the noise behind sample_images: the same grid of latents all run long.
_SAMPLE_IMAGES_SEED = (20240, 7)
# Evaluation: at most this many real samples, against as many generated from fixed noise.
EVAL_EXAMPLES = 1024
# In units of the target's stddev, for 1024 samples: two samples of one normal distribution
# are about 0.057 apart (the mean over 200 pairs); below 0.2 the generator matches the
# target's mean and spread within about a fifth of a stddev ("learned"); an untrained
# generator is several stddevs away.
SAMPLING_W1_PER_STDDEV = 0.057
LEARNED_W1_PER_STDDEV = 0.2
_EVAL_NOISE_SEED = (20241, 11)


class GANTrainer(tapekit.Trainer):
    """A GAN: `model="dense"` on 1-D samples, `model="dcgan"` on 28×28 images.

    dense: the seed's 10-unit networks on N(real_mean, real_stddev²) samples (or `data`'s
    array `x` [n, d]), noise_dim 10, Adam 1e-3. dcgan: `DCGANGenerator`/`DCGANDiscriminator`
    on procedural shape images (`datasets.shapes_images`, or `data`'s `x` [n, 28, 28(, C)]
    images: an .npz is scaled to [-1, 1], TFRecords must hold [28, 28, C] in [-1, 1]
    already), noise_dim 64, Adam 2e-4 with beta_1 0.5 (the DCGAN paper's settings).

    Each step updates the generator and the discriminator simultaneously from one forward
    pass, each with its own tape and Adam optimizer (binary cross-entropy on logits). The
    noise is part of the input pipeline (stateless, seeded by example index), so a run is
    the same whatever the number of replicas and can be resumed exactly.

    `noise_dim`, `num_examples` and `learning_rate` left None take the model's defaults.
    """

    default_global_batch_size = 64
    default_learning_rate = 1e-3

    def __init__(self, model: str = "dense", data: Optional[str] = None, real_mean: float = 0.0,
                 real_stddev: float = 1.0, num_examples: Optional[int] = None,
                 noise_dim: Optional[int] = None, hidden_units: int = 10, **kwargs):
        if model not in MODELS:
            raise tapekit.TapekitError(
                f"model must be one of {', '.join(MODELS)} for this GAN, got {model!r}.")
        super().__init__(**kwargs)
        default_noise_dim, default_num_examples, self.default_learning_rate = _DEFAULTS[model]
        self.model_name = model
        self.data_path = data
        self.noise_dim = int(noise_dim or default_noise_dim)
        self.hidden_units = hidden_units
        self.real_mean, self.real_stddev = real_mean, real_stddev
        num_examples = num_examples or default_num_examples
        self.files = None
        if datasets.is_file_pattern(data):  # read per worker, never loaded whole
            self.files = datasets.FileData(data, ("x",))
            shape = self.files.shapes["x"]
            if model == "dcgan" and (len(shape) != 3 or shape[:2] != (28, 28)):
                raise tapekit.TapekitError(f"--data={data!r}: feature x has shape {shape}; the "
                                           "dcgan needs images [28, 28, C] with values in [-1, 1].")
            self.arrays = {"x": self.files.head(EVAL_EXAMPLES)["x"]}  # for evaluation, summaries
            low, high = float(self.arrays["x"].min()), float(self.arrays["x"].max())
            if model == "dcgan" and (low < -1.0 or high > 1.0):
                # Records are streamed as they are (an .npz is scaled whole by as_gan_images).
                raise tapekit.TapekitError(
                    f"--data={data!r}: the first {len(self.arrays['x'])} images have values in "
                    f"[{low:g}, {high:g}]; the dcgan reads TFRecord images unscaled, so they "
                    "must be in [-1, 1]: write datasets.as_gan_images(x) to the records, or "
                    "give the .npz (which is scaled).")
            return
        if model == "dense":
            self.arrays = (datasets.load_npz(data, ("x",)) if data else
                           datasets.gaussian_samples(self.seed, num_examples, real_mean,
                                                     real_stddev))
        elif data:
            x = datasets.load_npz(data, ("x",))["x"]
            try:
                self.arrays = {"x": datasets.as_gan_images(x)}
            except tapekit.TapekitError as error:
                raise tapekit.TapekitError(f"--data={data!r}: {error}") from None
        else:
            self.arrays = datasets.shapes_images(self.seed, num_examples)
        datasets.require_examples(self.arrays, self.global_batch_size, data)

    @classmethod
    def define_flags(cls):
        flags.DEFINE_enum("model", "dense", list(MODELS),
                          "dense: the seed's 10-unit ReLU networks on 1-D samples; dcgan: "
                          "convolutional networks on 28×28 images.")
        flags.DEFINE_string("data", None, ".npz file with array x of real samples: [n, d] for "
                            "dense, images [n, 28, 28] or [n, 28, 28, C] (0–255, [0, 1] or "
                            "[-1, 1]) for dcgan; unset: N(--real_mean, --real_stddev²) samples "
                            "(dense) or procedural shape images (dcgan).")
        flags.DEFINE_float("real_mean", 0.0, "Mean of the synthetic real samples (dense).")
        flags.DEFINE_float("real_stddev", 1.0,
                           "Standard deviation of the synthetic real samples (dense).",
                           lower_bound=0.0)
        flags.DEFINE_integer("num_examples", None, "How many synthetic real samples. Unset: "
                             "1024 (dense), 4096 (dcgan).", lower_bound=1)
        flags.DEFINE_integer("noise_dim", None, "Size of the generator's noise input. Unset: "
                             "10 (dense), 64 (dcgan).", lower_bound=1)
        flags.DEFINE_integer("hidden_units", 10, "Hidden units of each network (dense).",
                             lower_bound=1)

    def build(self):
        if self.model_name == "dense":
            data_dim = self.arrays["x"].shape[-1]
            generator = Generator(self.hidden_units, data_dim, name="generator")
            discriminator = Discriminator(self.hidden_units, name="discriminator")
            beta_1 = 0.9
        else:
            generator = DCGANGenerator(self.noise_dim, channels=self.arrays["x"].shape[-1],
                                       name="generator")
            discriminator = DCGANDiscriminator(name="discriminator")
            beta_1 = 0.5  # the DCGAN paper's: 0.9 makes its training oscillate
        self.gan = GAN(generator, discriminator, noise_dim=self.noise_dim, name="gan")
        self.generator_optimizer = keras.optimizers.Adam(self.learning_rate, beta_1=beta_1)
        self.discriminator_optimizer = keras.optimizers.Adam(self.learning_rate, beta_1=beta_1)

    def train_dataset(self, input_context):
        if self.files:  # this worker's files; its noise stream is its own too
            real = self.files.examples(input_context).map(lambda x: x)  # (x,) -> x
            real = real.shuffle(10_000, seed=self.seed).repeat()
            worker = input_context.input_pipeline_id if input_context else 0
            seed, noise_dim, block = self.seed + 1_000_003 * worker, self.noise_dim, 1024
            noise = tf.data.Dataset.counter().map(
                lambda k: tf.random.stateless_normal([block, noise_dim], seed=tf.stack([seed, k]))
            ).unbatch()
            return tapekit.per_replica_batches(tf.data.Dataset.zip((real, noise)), input_context,
                                               self.global_batch_size, repeat=False,
                                               already_sharded=True)
        real = tf.data.Dataset.from_tensor_slices(self.arrays["x"])
        real = real.shuffle(len(self.arrays["x"]), seed=self.seed).repeat()
        # Noise block k (of 1024 rows) is drawn from the stateless seed (seed, k): the same
        # rows at the same step however the batch is split, and cheap (one op per block).
        seed, noise_dim, block = self.seed, self.noise_dim, 1024
        noise = tf.data.Dataset.counter().map(
            lambda k: tf.random.stateless_normal([block, noise_dim], seed=tf.stack([seed, k]))
        ).unbatch()
        return tapekit.per_replica_batches(tf.data.Dataset.zip((real, noise)), input_context,
                                           self.global_batch_size, repeat=False)

    def train_step(self, batch):
        real, noise = batch
        generator, discriminator = self.gan.generator, self.gan.discriminator
        with tf.GradientTape() as generator_tape, tf.GradientTape() as discriminator_tape:
            fake = generator(noise, training=True)
            # logits in float32 whatever the precision policy: losses are computed in float32
            real_logits = tf.cast(discriminator(real, training=True), tf.float32)
            fake_logits = tf.cast(discriminator(fake, training=True), tf.float32)
            generator_loss = self.compute_loss(_bce(tf.ones_like(fake_logits), fake_logits))
            discriminator_loss = (
                self.compute_loss(_bce(tf.ones_like(real_logits), real_logits))
                + self.compute_loss(_bce(tf.zeros_like(fake_logits), fake_logits)))
        self.apply_gradients(generator_tape, generator_loss, generator, self.generator_optimizer)
        self.apply_gradients(discriminator_tape, discriminator_loss, discriminator,
                             self.discriminator_optimizer)
        return {"generator_loss": generator_loss, "discriminator_loss": discriminator_loss,
                "generated_mean": tf.reduce_mean(tf.cast(fake, tf.float32))}

    # ------------------------------------------------------------------ evaluation

    def eval_dataset(self, input_context):
        """One step over up to EVAL_EXAMPLES held-out real samples and as many fixed noise
        vectors (its own stateless seed), split across replicas: the distance below is
        computed over all of them at once."""
        real = self._eval_real()
        count = len(real)
        noise = tf.random.stateless_normal([count, self.noise_dim], seed=_EVAL_NOISE_SEED)
        examples = tf.data.Dataset.from_tensor_slices((real, noise))
        return tapekit.per_replica_batches(examples, input_context, count, repeat=False)

    def eval_step(self, batch):
        """dense: `w1`, the Wasserstein-1 distance between the generated and the real samples
        (exact for 1-D data, from sorted samples of equal size; the mean over dimensions of
        the marginal distances otherwise). dcgan: `sliced_w1`, the same distance averaged
        over 64 fixed random directions in pixel space (sliced Wasserstein), between
        generated and held-out real images. Both are 0 for identical samples."""
        real, noise = batch
        fake = tf.cast(self.gan.generator(noise, training=False), tf.float32)
        context = tf.distribute.get_replica_context()
        width = int(np.prod(real.shape[1:]))  # values per sample (pixels × channels)
        real = context.all_gather(tf.reshape(tf.cast(real, tf.float32), [-1, width]), 0)
        fake = context.all_gather(tf.reshape(fake, [-1, width]), 0)
        if self.model_name == "dense":
            return {"w1": wasserstein_1(real, fake)}
        return {"sliced_w1": sliced_wasserstein_1(real, fake)}

    def _eval_real(self) -> np.ndarray:
        """Real samples for evaluation: fresh ones from the synthetic target (another seed),
        or the first EVAL_EXAMPLES of --data; a multiple of the replicas. Made once."""
        if getattr(self, "_eval_samples", None) is None:
            count = min(EVAL_EXAMPLES, len(self.arrays["x"]))
            count -= count % self.num_replicas
            if self.data_path:
                samples = self.arrays["x"][:count]
            elif self.model_name == "dense":
                samples = datasets.gaussian_samples(self.seed + 1, count, self.real_mean,
                                                    self.real_stddev)["x"]
            else:
                samples = datasets.shapes_images(self.seed + 1, count)["x"]
            self._eval_samples = samples
        return self._eval_samples

    def sample(self, num_samples: int = 10000, seed: int = 12345) -> np.ndarray:
        """Generator samples for fixed noise (eager): [num_samples, d] for dense,
        images [num_samples, 28, 28, C] in [-1, 1] for dcgan."""
        self._require_built("sample")
        noise = tf.random.stateless_normal([num_samples, self.noise_dim], seed=[seed, 0])
        return tf.cast(self.gan.generator(noise, training=False), tf.float32).numpy()

    def results_summary(self):
        if self.model_name == "dense":
            samples = self.sample()
            real = self.arrays["x"]
            w1 = self.evaluate()["w1"]
            return (f"Generated samples: mean {samples.mean():.3f}, stddev {samples.std():.3f} "
                    f"(real data: mean {real.mean():.3f}, stddev {real.std():.3f}); "
                    f"Wasserstein-1 to the real samples: {w1:.3f} (learned: below "
                    f"{LEARNED_W1_PER_STDDEV * real.std():.2f}; two samples of the target: "
                    f"about {SAMPLING_W1_PER_STDDEV * real.std():.2f})")
        count = min(512, len(self.arrays["x"]))
        fake = self.sample(count)
        # A fixed random subset of the real images, not the first ones of the file.
        real = self.arrays["x"][np.random.default_rng(self.seed).permutation(
            len(self.arrays["x"]))[:count]]
        discriminator = self.gan.discriminator
        real_logits = tf.cast(discriminator(real, training=False), tf.float32).numpy()
        fake_logits = tf.cast(discriminator(fake, training=False), tf.float32).numpy()
        return (f"Generated pixels: mean {fake.mean():.3f}, stddev {fake.std():.3f} (real: "
                f"mean {real.mean():.3f}, stddev {real.std():.3f}); discriminator accuracy on "
                f"{count} real / {count} generated images: {(real_logits > 0).mean():.2f} / "
                f"{(fake_logits < 0).mean():.2f} (0.50 / 0.50 when it cannot tell them apart); "
                f"sliced Wasserstein-1 to held-out real images: {self.evaluate()['sliced_w1']:.3f} "
                "(two held-out real sets: about 0.03; untrained: about 0.76)")

    def export_model(self):
        """The generator, served on noise [batch, noise_dim] float32. Eager."""
        self._require_built("export_model")
        return self.gan.generator, [tf.TensorSpec([None, self.noise_dim], tf.float32,
                                                  name="noise")]

    def sample_images(self, num_images: int):
        """dcgan: generated images [num_images, 28, 28, C] in [0, 1] for the same noise on every
        call (a stateless seed), so grids can be compared over training. dense: None. Eager."""
        if self.model_name != "dcgan":
            return None
        self._require_built("sample_images")
        noise = tf.random.stateless_normal([num_images, self.noise_dim], seed=_SAMPLE_IMAGES_SEED)
        images = tf.cast(self.gan.generator(noise, training=False), tf.float32)
        return tf.clip_by_value((images + 1.0) / 2.0, 0.0, 1.0).numpy()

    def sample_histograms(self):
        """dense: {"generated": 10 000 generator samples, "real": the real data}, both
        flattened to 1-D. dcgan: {}. Eager."""
        if self.model_name != "dense":
            return {}
        return {"generated": self.sample().ravel(), "real": self.arrays["x"].ravel()}

    def _require_built(self, what: str) -> None:
        if not hasattr(self, "gan"):
            raise tapekit.TapekitError(
                f"{type(self).__name__}.{what} needs the networks, which are built by the first "
                "fit(); call fit() (or restore a checkpoint) first.")


def _bce(labels, logits):
    return tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits)


def wasserstein_1(real, fake):
    """The Wasserstein-1 distance between the empirical distributions of `real` and `fake`
    ([n, k] each, n equal), per column, averaged over columns: in 1-D, the optimal coupling
    pairs the i-th smallest of each, so W1 = mean |sort(real) - sort(fake)|."""
    real = tf.sort(real, axis=0)
    fake = tf.sort(fake, axis=0)
    return tf.reduce_mean(tf.abs(real - fake))


def sliced_wasserstein_1(real, fake, num_directions: int = 64):
    """The sliced Wasserstein-1 distance between `real` and `fake` ([n, width] each, n
    equal): `wasserstein_1` of their projections on `num_directions` random unit vectors
    of pixel space, fixed by a stateless seed (the same in every call), averaged."""
    width = real.shape[-1]
    directions = tf.random.stateless_normal([width, num_directions], seed=_EVAL_NOISE_SEED)
    directions /= tf.norm(directions, axis=0, keepdims=True)
    return wasserstein_1(real @ directions, fake @ directions)
