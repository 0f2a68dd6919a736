"""How far apart the weights end on 1 and 2 replicas: tapekit, and a hand-written loop.

    .venv/bin/python benchmarks/replica_agreement.py [--steps 10,100,1000] [--seeds 0,1,2]

For the seed MLP regression (`RegressionTrainer(model="mlp")`: 5-10-1 sigmoid, Adam 0.01,
batch 100) and the seed GAN (`GANTrainer` on N(4, 1.25²): two 10-unit ReLU networks, two
Adams 1e-3, batch 64), at each of `--steps`, the max |difference| over every weight of the
models between

- tapekit on 1 replica (`strategy="default"`) and on 2 (a `MirroredStrategy` over 2 logical
  CPUs, what `strategy="mirrored", cpu_replicas=2` makes; the one object the hand-written
  loop uses, as two over the same devices in one process would collide);
- the textbook hand-written `tf.distribute.MirroredStrategy` loop on 1 and on 2 replicas:
  `strategy.run` of a step that computes the per-example loss under a tape,
  `tf.nn.compute_average_loss` with the global batch size, and `optimizer.apply_gradients`
  (Keras sums the replicas' gradients), one `tf.function` call per step;
- tapekit and the hand-written loop on the same number of replicas.

Every run of a workload and seed starts from the same initial weights (tapekit's, which
depend on the seed alone; the hand-written models are assigned them) and reads the same
global batches (made with NumPy from the seed; tapekit gets them as `fit(dataset=...)`, the
hand-written loop through `strategy.experimental_distribute_dataset`, which split them
alike). Op determinism is on for the whole process, so each figure is the same in every
run on one machine; the seeds are repeated for the spread, and the median over them is
printed (the max in brackets). 0 means bit for bit.
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import logging  # noqa: E402

import tapekit  # noqa: E402
from tapekit.models import MLP, Discriminator, Generator  # noqa: E402
from tapekit.run import distribute  # noqa: E402
from tapekit.trainers import datasets  # noqa: E402
from tapekit.trainers.gan import GANTrainer  # noqa: E402
from tapekit.trainers.regression import RegressionTrainer  # noqa: E402

REAL_MEAN, REAL_STDDEV = 4.0, 1.25  # the seed's example 3
NOISE_DIM = 10


# ------------------------------------------------------------------ the data, as global batches

def mlp_batches(seed: int, steps: int, global_batch_size: int = 100):
    """The seed MLP's 100 examples, reshuffled every pass: (x [steps, b, 5], y [steps, b, 1])."""
    arrays = datasets.seed_mlp(seed)
    rng = np.random.default_rng(seed + 1)
    order = np.concatenate([rng.permutation(len(arrays["x"])) for _ in range(
        steps * global_batch_size // len(arrays["x"]) + 1)])[:steps * global_batch_size]
    order = order.reshape(steps, global_batch_size)
    return arrays["x"][order], arrays["y"][order]


def gan_batches(seed: int, steps: int, global_batch_size: int = 64):
    """Real samples of N(4, 1.25²) and the generator's noise: (real [steps, b, 1],
    noise [steps, b, 10])."""
    real = datasets.gaussian_samples(seed, 1024, REAL_MEAN, REAL_STDDEV)["x"]
    rng = np.random.default_rng(seed + 1)
    order = rng.integers(0, len(real), (steps, global_batch_size))
    noise = rng.standard_normal((steps, global_batch_size, NOISE_DIM)).astype(np.float32)
    return real[order], noise


def as_dataset(batches) -> tf.data.Dataset:
    return tf.data.Dataset.from_tensor_slices(batches)  # one element: one global batch


# ------------------------------------------------------------------ tapekit

class Snapshots(tapekit.Callback):
    """The models' weights at the start and after the loops that end at `steps`."""

    def __init__(self, weights_of, steps):
        self.weights_of, self.steps, self.taken = weights_of, set(steps), {}

    def on_train_begin(self, step):
        self.taken[step] = self.weights_of(self.trainer)

    def on_loop_end(self, step, logs):
        if step in self.steps:
            self.taken[step] = self.weights_of(self.trainer)


def mlp_weights(trainer):
    return [v.numpy() for v in trainer.model.weights]


def gan_weights(trainer):
    return [v.numpy() for v in trainer.gan.generator.weights + trainer.gan.discriminator.weights]


_STRATEGIES = {}


def mirrored(replicas: int) -> tf.distribute.MirroredStrategy:
    """One MirroredStrategy per device set, shared by every run of the process: two over
    the same devices would number their collective all-reduces alike and collide."""
    if replicas not in _STRATEGIES:
        _STRATEGIES[replicas] = tf.distribute.MirroredStrategy(
            [f"/cpu:{i}" for i in range(replicas)])
    return _STRATEGIES[replicas]


def tapekit_run(workload: str, seed: int, replicas: int, batches, steps):
    """{step: weights} of tapekit's trainer on `replicas` replicas, step 0 included."""
    devices = dict(strategy=mirrored(2) if replicas == 2 else "default")
    if workload == "mlp":
        trainer = RegressionTrainer(model="mlp", seed=seed, progress="none", **devices)
        snapshots = Snapshots(mlp_weights, steps)
    else:
        trainer = GANTrainer(real_mean=REAL_MEAN, real_stddev=REAL_STDDEV, seed=seed,
                             progress="none", **devices)
        snapshots = Snapshots(gan_weights, steps)
    assert trainer.num_replicas == replicas
    trainer.fit(train_steps=max(steps), steps_per_loop=10, dataset=as_dataset(batches),
                callbacks=[snapshots])
    return snapshots.taken


# ------------------------------------------------------------------ the hand-written loop

def handwritten_run(workload: str, replicas: int, batches, steps, initial_weights):
    """{step: weights} of the textbook MirroredStrategy loop on `replicas` logical CPUs."""
    strategy = mirrored(replicas)
    global_batch_size = batches[0].shape[1]
    with strategy.scope():
        if workload == "mlp":
            model = MLP(hidden_units=10, output_units=1, activation="sigmoid")
            model.build((None, 5))
            optimizer = keras.optimizers.Adam(0.01)
            optimizer.build(model.trainable_variables)  # slots made here, not in the step
            variables = model.weights
        else:
            generator, discriminator = Generator(10, 1), Discriminator(10)
            generator.build((None, NOISE_DIM))
            discriminator.build((None, 1))
            generator_optimizer = keras.optimizers.Adam(1e-3)
            discriminator_optimizer = keras.optimizers.Adam(1e-3)
            generator_optimizer.build(generator.trainable_variables)
            discriminator_optimizer.build(discriminator.trainable_variables)
            variables = generator.weights + discriminator.weights
    for variable, value in zip(variables, initial_weights, strict=True):
        variable.assign(value)

    def mlp_step(batch):
        x, y = batch
        with tf.GradientTape() as tape:
            per_example = tf.reduce_mean(tf.square(y - model(x, training=True)), axis=-1)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch_size)
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))

    def gan_step(batch):
        real, noise = batch

        def bce(labels, logits):
            per_example = tf.reduce_mean(
                tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits), axis=-1)
            return tf.nn.compute_average_loss(per_example, global_batch_size=global_batch_size)

        with tf.GradientTape() as generator_tape, tf.GradientTape() as discriminator_tape:
            fake = generator(noise, training=True)
            real_logits = discriminator(real, training=True)
            fake_logits = discriminator(fake, training=True)
            generator_loss = bce(tf.ones_like(fake_logits), fake_logits)
            discriminator_loss = (bce(tf.ones_like(real_logits), real_logits)
                                  + bce(tf.zeros_like(fake_logits), fake_logits))
        generator_gradients = generator_tape.gradient(generator_loss,
                                                      generator.trainable_variables)
        discriminator_gradients = discriminator_tape.gradient(
            discriminator_loss, discriminator.trainable_variables)
        generator_optimizer.apply_gradients(zip(generator_gradients,
                                                generator.trainable_variables))
        discriminator_optimizer.apply_gradients(zip(discriminator_gradients,
                                                    discriminator.trainable_variables))

    step_fn = mlp_step if workload == "mlp" else gan_step

    @tf.function
    def distributed_train_step(batch):
        strategy.run(step_fn, args=(batch,))

    taken = {0: [v.numpy() for v in variables]}
    dataset = strategy.experimental_distribute_dataset(as_dataset(batches))
    for step, batch in enumerate(dataset, start=1):
        distributed_train_step(batch)
        if step in steps:
            taken[step] = [v.numpy() for v in variables]
        if step == max(steps):
            break
    return taken


# ------------------------------------------------------------------ the table

def max_difference(a, b) -> float:
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b, strict=True))


def figure(values) -> str:
    return f"{statistics.median(values):.1e} [{max(values):.1e}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="10,100,1000", help="step counts, comma-separated")
    parser.add_argument("--seeds", default="0,1,2", help="seeds, comma-separated")
    args = parser.parse_args()
    steps = sorted(int(s) for s in args.steps.split(","))
    seeds = [int(s) for s in args.seeds.split(",")]
    distribute.split_cpu(2)  # before any TensorFlow op runs
    tf.config.experimental.enable_op_determinism()
    logging.set_verbosity(logging.ERROR)
    started = time.perf_counter()
    columns = {"tapekit 1 vs 2": ("tapekit", 1, "tapekit", 2),
               "hand-written 1 vs 2": ("hand", 1, "hand", 2),
               "tapekit vs hand-written, 1 replica": ("tapekit", 1, "hand", 1),
               "tapekit vs hand-written, 2 replicas": ("tapekit", 2, "hand", 2)}
    rows = []
    for workload, make_batches in (("mlp", mlp_batches), ("gan", gan_batches)):
        found = {(name, step): [] for name in columns for step in [0] + steps}
        for seed in seeds:
            batches = make_batches(seed, max(steps))
            runs = {("tapekit", r): tapekit_run(workload, seed, r, batches, steps) for r in (1, 2)}
            initial = runs[("tapekit", 1)][0]
            for replicas in (1, 2):
                runs[("hand", replicas)] = handwritten_run(workload, replicas, batches, steps,
                                                           initial)
            for name, (first, first_replicas, second, second_replicas) in columns.items():
                for step in [0] + steps:
                    found[(name, step)].append(max_difference(
                        runs[(first, first_replicas)][step], runs[(second, second_replicas)][step]))
        label = {"mlp": "seed MLP 5-10-1", "gan": "seed GAN 1-D"}[workload]
        for step in [0] + steps:
            rows.append(f"| {label} | {step} | "
                        + " | ".join(figure(found[(name, step)]) for name in columns) + " |")
            print(rows[-1], flush=True)
    print()
    print(f"Max |difference| of the models' weights, median over seeds {args.seeds} [max]; "
          f"TensorFlow {tf.__version__}, Keras {keras.__version__}; "
          f"{time.perf_counter() - started:.0f} s.")
    print()
    print("| workload | steps | " + " | ".join(columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
