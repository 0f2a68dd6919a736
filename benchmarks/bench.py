"""Side-by-side speed of tapekit and the other ways to write the same training loop.

    .venv/bin/python benchmarks/bench.py [--quick] [--json benchmarks/results.json] \
        [--readme benchmarks/README.md]
    make bench            # the full run; rewrites benchmarks/results.json and benchmarks/README.md's tables

For each workload, in ONE process, every approach below trains the same model on the same
data with the same batch size; each is timed by its marginal cost per step (time for
`long` steps minus time for `short` steps, divided by the difference, so per-call set-up
cancels out), repeated after a warm-up with the approaches interleaved, and the median
over repeats is reported in µs per step.

  eager           the seed article's style: a Python loop of eager GradientTape steps
  tf.function     a compiled step called from a Python loop over a tf.data dataset
  graph+data      a hand-written in-graph loop (tf.range) reading a tf.data iterator
  graph+memory    a hand-written in-graph loop over tensors already in memory, on the same
                  input as tapekit_memory: each epoch a fresh permutation of the examples
                  (stateless_shuffle seeded by the epoch), made once per epoch, each step a
                  slice of it and a gather
  keras_fit       Keras 3 fit(steps_per_execution=100; 20 for the two heavy models) on the
                  tf.data pipeline (a train_step override for the GANs), compiled as
                  jit_compile="auto" resolves (without XLA on a machine without GPU: Keras
                  turns XLA off there; the report says which)
  keras_arrays    the same Keras model given the in-memory arrays: fit(x, y)
  tapekit         tapekit on the tf.data pipeline (train_dataset), steps_per_loop=100
  tapekit_memory  tapekit's device-resident path (fit(dataset=arrays)), steps_per_loop=100
  tapekit_xla     tapekit on the tf.data pipeline with jit_compile=True (XLA): compared with
                  keras_fit where Keras resolved "auto" to XLA

Start-up (command to the end of step 1, tapekit-train against a plain script) is measured
by `benchmarks/startup.py`, as part of the full run.

Every compiled approach runs the same number of steps per call from Python (100:
tapekit's steps_per_loop, Keras's steps_per_execution (20 for the two heavy models), the
hand-written loops' calls, whose loss is read after each call as a loop that logs reads it):
what a call costs (launching the function, reading results) is then shared alike.

Keras fit is timed inside one fit call (from the end of its first execution to the end of
its last, `keras_fit`): what one call of fit costs varies between calls by more than a
thousand of the small models' steps cost, and its marginal cost drowned in that.

An instance of a compiled loop can keep a speed of its own (see `median_instance`): each
approach a target compares is built INSTANCES times (HEAVY_INSTANCES on the heavy
workloads), and the median instance is measured.

The machine is shared and noisy: compare ratios from one run, never absolute numbers
across runs. Nothing here is tuned for tapekit: the baselines are written the way an
expert would write them for the same job.
"""

import argparse
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import logging  # noqa: E402

import tapekit  # noqa: E402
from tapekit.models import (  # noqa: E402
    MLP,
    DCGANDiscriminator,
    DCGANGenerator,
    Discriminator,
    Generator,
    LinearRegression,  # noqa: E402
)
from tapekit.trainers import datasets  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import startup  # noqa: E402  (benchmarks/startup.py, beside this file)

# ------------------------------------------------------------------ workloads: the science


class Supervised:
    """A regression/classification workload: one model, one optimizer, a per-example loss."""

    kind = "supervised"

    def __init__(self, name, x, y, batch, make_model, make_optimizer, per_example_loss):
        self.name, self.x, self.y, self.batch = name, x, y, batch
        self.make_model, self.make_optimizer = make_model, make_optimizer
        self.per_example_loss = per_example_loss

    def fresh(self):
        keras.utils.set_random_seed(0)
        model, optimizer = self.make_model(), self.make_optimizer()
        model(self.x[: self.batch])
        optimizer.build(model.trainable_variables)
        return model, optimizer

    def step_fn(self, model, optimizer):
        def step(x, y):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(self.per_example_loss(y, model(x, training=True)))
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return loss
        return step

    def arrays(self):
        return (self.x, self.y)

    def examples(self):
        return tf.data.Dataset.from_tensor_slices(self.arrays())


class Adversarial:
    """A GAN workload: generator and discriminator, two tapes, two Adam optimizers.

    Noise comes with the data (from the input pipeline), as in tapekit's GANTrainer.
    """

    kind = "gan"

    def __init__(self, name, real, batch, noise_dim, make_generator, make_discriminator):
        self.name, self.real, self.batch, self.noise_dim = name, real, batch, noise_dim
        self.make_generator, self.make_discriminator = make_generator, make_discriminator
        rng = np.random.default_rng(1)
        self.noise = rng.standard_normal((len(real), noise_dim)).astype(np.float32)

    def fresh(self):
        keras.utils.set_random_seed(0)
        generator, discriminator = self.make_generator(), self.make_discriminator()
        discriminator(generator(self.noise[: self.batch]))
        g_opt, d_opt = keras.optimizers.Adam(1e-3), keras.optimizers.Adam(1e-3)
        g_opt.build(generator.trainable_variables)
        d_opt.build(discriminator.trainable_variables)
        return (generator, discriminator), (g_opt, d_opt)

    def step_fn(self, models, optimizers):
        generator, discriminator = models
        g_opt, d_opt = optimizers
        bce = tf.nn.sigmoid_cross_entropy_with_logits

        def step(real, noise):
            with tf.GradientTape() as g_tape, tf.GradientTape() as d_tape:
                fake = generator(noise, training=True)
                real_logits = discriminator(real, training=True)
                fake_logits = discriminator(fake, training=True)
                g_loss = tf.reduce_mean(bce(tf.ones_like(fake_logits), fake_logits))
                d_loss = (tf.reduce_mean(bce(tf.ones_like(real_logits), real_logits))
                          + tf.reduce_mean(bce(tf.zeros_like(fake_logits), fake_logits)))
            g_grads = g_tape.gradient(g_loss, generator.trainable_variables)
            d_grads = d_tape.gradient(d_loss, discriminator.trainable_variables)
            g_opt.apply_gradients(zip(g_grads, generator.trainable_variables))
            d_opt.apply_gradients(zip(d_grads, discriminator.trainable_variables))
            return g_loss
        return step

    def arrays(self):
        return (self.real, self.noise)

    examples = Supervised.examples


REALISTIC = ("ResNet-20", "Transformer")  # models of the size people train (not in --quick)


def heavy(work) -> bool:
    """The workloads whose steps take milliseconds of kernels, not µs of overhead."""
    return work.name.startswith(("MLP 784", "conv GAN") + REALISTIC)


def realistic(work) -> bool:
    """The workloads of realistic size: steps of a second or so, a few measured per figure."""
    return work.name.startswith(REALISTIC)


def resnet20(classes=10):
    """A ResNet-20-style CNN for 32x32x3 images (He et al. 2016, CIFAR-10: three stages of
    three basic blocks, 16/32/64 filters, batch norm, projection shortcuts where the shape
    changes), as Keras's examples write it: about 0.27M parameters."""
    inputs = keras.Input((32, 32, 3))

    def conv_bn(x, filters, strides=1, relu=True):
        x = keras.layers.Conv2D(filters, 3, strides, padding="same", use_bias=False,
                                kernel_initializer="he_normal")(x)
        x = keras.layers.BatchNormalization()(x)
        return keras.layers.ReLU()(x) if relu else x

    x = conv_bn(inputs, 16)
    for stage, filters in enumerate((16, 32, 64)):
        for block in range(3):
            strides = 2 if stage and not block else 1
            shortcut = x
            y = conv_bn(x, filters, strides)
            y = conv_bn(y, filters, relu=False)
            if strides != 1 or shortcut.shape[-1] != filters:
                shortcut = keras.layers.Conv2D(filters, 1, strides, use_bias=False)(shortcut)
                shortcut = keras.layers.BatchNormalization()(shortcut)
            x = keras.layers.ReLU()(keras.layers.Add()([y, shortcut]))
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(classes)(x), name="resnet20")


def transformer_classifier(vocabulary=20000, length=128, width=128, heads=4, layers=4,
                           classes=2):
    """A Transformer encoder classifier as Keras's text-classification example writes it:
    token and position embeddings (sparse gradients), `layers` blocks of multi-head
    self-attention and a feed-forward net with residuals and layer norm, mean pooling."""
    tokens = keras.Input((length,), dtype="int32")
    x = keras.layers.Embedding(vocabulary, width)(tokens)
    positions = keras.layers.Embedding(length, width)(keras.ops.arange(length))
    x = x + positions
    for _ in range(layers):
        attended = keras.layers.MultiHeadAttention(heads, width // heads)(x, x)
        x = keras.layers.LayerNormalization(epsilon=1e-6)(x + attended)
        fed = keras.layers.Dense(4 * width, activation="relu")(x)
        x = keras.layers.LayerNormalization(epsilon=1e-6)(x + keras.layers.Dense(width)(fed))
    x = keras.layers.GlobalAveragePooling1D()(x)
    return keras.Model(tokens, keras.layers.Dense(classes)(x), name="transformer")


def workloads(quick):
    linear = datasets.seed_linear(0)
    mlp = datasets.seed_mlp(0)
    gaussian = datasets.gaussian_samples(0, 1024, 0.0, 1.0)["x"]
    rng = np.random.default_rng(0)
    wide_x = rng.standard_normal((2560, 784)).astype(np.float32)
    wide_y = rng.integers(0, 10, (2560,)).astype(np.int32)
    mse = lambda y, p: tf.square(y - p)  # noqa: E731
    result = [
        Supervised("seed linear (SGD, batch 100)", linear["x"], linear["y"], 100,
                   lambda: LinearRegression(), lambda: keras.optimizers.SGD(0.1), mse),
        Supervised("seed MLP 5-10-1 (Adam, batch 100)", mlp["x"], mlp["y"], 100,
                   lambda: MLP(10, 1, "sigmoid"), lambda: keras.optimizers.Adam(0.01), mse),
        Adversarial("seed GAN 1-D (2×Adam, batch 64)", gaussian, 64, 10,
                    lambda: Generator(10, 1), lambda: Discriminator(10)),
        Supervised("MLP 784-1024-1024-10 (Adam, batch 256)", wide_x, wide_y, 256,
                   lambda: MLP([1024, 1024], 10, "relu"), lambda: keras.optimizers.Adam(1e-3),
                   lambda y, p: keras.losses.sparse_categorical_crossentropy(
                       y, p, from_logits=True)),
    ]
    images = datasets.shapes_images(0, 512 if quick else 2048)["x"]
    result.append(Adversarial("conv GAN 28×28 (2×Adam, batch 64)", images, 64, 64,
                              lambda: DCGANGenerator(noise_dim=64),
                              lambda: DCGANDiscriminator()))
    if quick:
        return result
    sparse_ce = lambda y, p: keras.losses.sparse_categorical_crossentropy(  # noqa: E731
        y, p, from_logits=True)
    cifar_x = rng.standard_normal((1024, 32, 32, 3)).astype(np.float32)
    cifar_y = rng.integers(0, 10, (1024,)).astype(np.int32)
    result.append(Supervised("ResNet-20 32×32×3 (SGD+momentum, batch 128)", cifar_x, cifar_y,
                             128, resnet20, lambda: keras.optimizers.SGD(0.1, momentum=0.9),
                             sparse_ce))
    text_x = rng.integers(0, 20000, (256, 128)).astype(np.int32)
    text_y = rng.integers(0, 2, (256,)).astype(np.int32)
    result.append(Supervised("Transformer 4×128, vocab 20k, seq 128 (Adam, batch 32)", text_x,
                             text_y, 32, transformer_classifier,
                             lambda: keras.optimizers.Adam(1e-3), sparse_ce))
    return result


# ------------------------------------------------------------------ approaches


def pipeline(work):
    """The tf.data input every data-reading approach shares: shuffled, repeated, static batches."""
    return (work.examples().shuffle(len(work.arrays()[0]), seed=0).repeat()
            .batch(work.batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE))


def eager(work):
    models, optimizers = work.fresh()
    step = work.step_fn(models, optimizers)
    arrays = [tf.constant(a) for a in work.arrays()]
    count = len(arrays[0]) // work.batch

    def run(steps):
        for i in range(steps):
            j = (i % count) * work.batch
            loss = step(*(a[j:j + work.batch] for a in arrays))
        float(loss)
    return run


def function_step(work):
    models, optimizers = work.fresh()
    step = tf.function(work.step_fn(models, optimizers))
    iterator = iter(pipeline(work))

    def run(steps):
        for _ in range(steps):
            loss = step(*next(iterator))
        float(loss)
    return run


STEPS_PER_CALL = 100  # every compiled approach runs this many steps per call from Python


def per_call(steps):
    """`steps` cut into calls of at most STEPS_PER_CALL steps."""
    return [min(STEPS_PER_CALL, steps - done) for done in range(0, steps, STEPS_PER_CALL)]


def in_graph_loop(step):
    """The hand-written in-graph loop: `steps` calls of `step` on batches of `iterator`."""
    @tf.function
    def loop(iterator, steps):
        loss = tf.constant(0.0)
        for _ in tf.range(steps):
            loss = step(*next(iterator))
        return loss
    return loop


def graph_data(work):
    models, optimizers = work.fresh()
    loop = in_graph_loop(work.step_fn(models, optimizers))
    iterator = iter(pipeline(work))

    def run(steps):
        for calls in per_call(steps):
            float(loop(iterator, tf.constant(calls)))  # the loss, read as a loop that logs does
    return run


def graph_memory(work):
    """The same input as tapekit_memory (a fresh permutation each epoch), written by hand."""
    models, optimizers = work.fresh()
    step = work.step_fn(models, optimizers)
    arrays = [tf.constant(a) for a in work.arrays()]
    size = len(arrays[0])
    count = size // work.batch
    permutation = tf.Variable(tf.zeros([size], tf.int64), trainable=False)

    @tf.function
    def loop(start, steps):
        loss = tf.constant(0.0)
        for i in tf.range(start, start + steps):
            if i % count == 0 or i == start:  # a new epoch (or the first step of this call)
                permutation.assign(tf.random.experimental.stateless_shuffle(
                    tf.range(size, dtype=tf.int64), seed=tf.stack([tf.constant(0, tf.int64),
                                                                   i // count])))
            rows = permutation[(i % count) * work.batch:(i % count + 1) * work.batch]
            loss = step(*(tf.gather(a, rows) for a in arrays))
        return loss

    position = [0]

    def run(steps):
        for calls in per_call(steps):
            float(loop(tf.constant(position[0], tf.int64), tf.constant(calls, tf.int64)))
            position[0] += calls
    return run


class _KerasGAN(keras.Model):
    def __init__(self, work, models, optimizers):
        super().__init__()
        self.generator, self.discriminator = models
        self._step = work.step_fn(models, optimizers)

    def train_step(self, data):
        return {"generator_loss": self._step(*data)}


def keras_steps_per_execution(work):
    # 100 for small models; 20 (every measured run a whole number of executions) for the
    # heavy ones, where one execution already takes ~0.5 s and the setting cannot matter;
    # 4 for the realistic ones (steps of about a second).
    return 4 if realistic(work) else 20 if heavy(work) else 100


def _keras_model(work):
    models, optimizers = work.fresh()
    spe = keras_steps_per_execution(work)
    if work.kind == "gan":
        model = _KerasGAN(work, models, optimizers)
        model.compile(optimizer=optimizers[0], steps_per_execution=spe)
    else:
        model = models
        model.compile(optimizer=optimizers, loss=lambda y, p: work.per_example_loss(y, p),
                      steps_per_execution=spe)
    return model


class _ExecutionClock(keras.callbacks.Callback):
    """The time each execution ends (perf_counter): Keras calls on_train_batch_end once per
    execution of steps_per_execution steps."""

    def on_train_begin(self, logs=None):
        self.ends = []

    def on_train_batch_end(self, batch, logs=None):
        self.ends.append(time.perf_counter())


def keras_fit(work):
    """Keras fit on the tf.data pipeline. Timed inside one fit call (`run.steady_us`): the
    time from the end of its first execution to the end of its last, over the steps between.
    Like the marginal cost of the other columns it leaves out what one call of fit costs
    (callbacks, a new iterator and its shuffle buffer, ...), which on the small models varies
    between calls by more than a thousand steps cost, and keeps what each execution costs
    (a return to Python, the callbacks, the logs), as tapekit's per-loop cost is kept."""
    model = _keras_model(work)
    dataset = pipeline(work)
    execution = keras_steps_per_execution(work)
    clock = _ExecutionClock()

    def run(steps):
        model.fit(dataset, steps_per_epoch=steps, epochs=1, verbose=0, shuffle=False)

    def steady_us(steps):
        executions = max(1, round(steps / execution))
        model.fit(dataset, steps_per_epoch=(1 + executions) * execution, epochs=1, verbose=0,
                  shuffle=False, callbacks=[clock])
        return (clock.ends[-1] - clock.ends[0]) / (executions * execution) * 1e6
    run.model, run.clock, run.steady_us = model, clock, steady_us
    return run


def keras_uses_xla(work) -> bool:
    """What Keras 3's jit_compile="auto" resolves to for this workload on this machine."""
    return bool(_keras_model(work).jit_compile)


def keras_arrays(work):
    model = _keras_model(work)
    x, y = work.arrays()
    per_epoch = len(x) // work.batch

    def run(steps):
        model.fit(x, y, batch_size=work.batch, epochs=max(1, round(steps / per_epoch)),
                  shuffle=True, verbose=0)
    run.steps_of = lambda steps: max(1, round(steps / per_epoch)) * per_epoch
    return run


class _BenchTrainer(tapekit.Trainer):
    """The workload's science as a tapekit trainer (compute_loss / apply_gradients)."""

    def __init__(self, work, **kwargs):
        self.work = work
        super().__init__(global_batch_size=work.batch, **kwargs)

    def build(self):
        keras.utils.set_random_seed(0)
        if self.work.kind == "gan":
            self.generator = self.work.make_generator()
            self.discriminator = self.work.make_discriminator()
            self.g_opt, self.d_opt = keras.optimizers.Adam(1e-3), keras.optimizers.Adam(1e-3)
        else:
            self.model = self.work.make_model()
            self.optimizer = self.work.make_optimizer()

    def train_dataset(self, input_context):
        return tapekit.per_replica_batches(self.work.examples(), input_context,
                                           self.global_batch_size,
                                           shuffle_buffer_size=len(self.work.arrays()[0]))

    def train_step(self, batch):
        if self.work.kind != "gan":
            x, y = batch
            with tf.GradientTape() as tape:
                loss = self.compute_loss(self.work.per_example_loss(y, self.model(x, training=True)))
            self.apply_gradients(tape, loss, self.model, self.optimizer)
            return {"loss": loss}
        real, noise = batch
        bce = tf.nn.sigmoid_cross_entropy_with_logits
        with tf.GradientTape() as g_tape, tf.GradientTape() as d_tape:
            fake = self.generator(noise, training=True)
            real_logits = self.discriminator(real, training=True)
            fake_logits = self.discriminator(fake, training=True)
            g_loss = self.compute_loss(bce(tf.ones_like(fake_logits), fake_logits))
            d_loss = (self.compute_loss(bce(tf.ones_like(real_logits), real_logits))
                      + self.compute_loss(bce(tf.zeros_like(fake_logits), fake_logits)))
        self.apply_gradients(g_tape, g_loss, self.generator, self.g_opt)
        self.apply_gradients(d_tape, d_loss, self.discriminator, self.d_opt)
        return {"generator_loss": g_loss, "discriminator_loss": d_loss}


def tapekit_data(work, steps_per_loop=100):
    trainer = _BenchTrainer(work)

    def run(steps):
        trainer.fit(train_steps=trainer.current_step + steps, steps_per_loop=steps_per_loop)
    return run


def tapekit_xla(work, steps_per_loop=100):
    trainer = _BenchTrainer(work, jit_compile=True)

    def run(steps):
        trainer.fit(train_steps=trainer.current_step + steps, steps_per_loop=steps_per_loop)
    return run


def tapekit_memory(work, steps_per_loop=100):
    trainer = _BenchTrainer(work)
    arrays = work.arrays()

    def run(steps):
        trainer.fit(train_steps=trainer.current_step + steps, steps_per_loop=steps_per_loop,
                    dataset=arrays)
    run.trainer = trainer
    return run


APPROACHES = {
    "eager": eager,
    "tf.function": function_step,
    "graph+data": graph_data,
    "graph+memory": graph_memory,
    "keras_fit": keras_fit,
    "keras_arrays": keras_arrays,
    "tapekit": tapekit_data,
    "tapekit_memory": tapekit_memory,
    "tapekit_xla": tapekit_xla,
}


# ------------------------------------------------------------------ timing


def marginal_us(run, short, long):
    """µs per step from the time of `long` steps minus the time of `short` steps (or, for a
    run timed inside one call, `run.steady_us`, its cost per step over `long` steps)."""
    if hasattr(run, "steady_us"):
        return run.steady_us(long)
    steps_of = getattr(run, "steps_of", lambda s: s)
    if steps_of(long) <= steps_of(short):
        long = steps_of(short) * 3
    start = time.perf_counter()
    run(short)
    middle = time.perf_counter()
    run(long)
    end = time.perf_counter()
    extra_steps = steps_of(long) - steps_of(short)
    return ((end - middle) - (middle - start)) / extra_steps * 1e6


# (short, long) steps per measurement: enough work to rise above timer noise.
STEP_COUNTS = {
    # approach: (small model, heavy model)
    "eager": ((20, 60), (4, 12)),
    "tf.function": ((200, 600), (20, 60)),
    "keras_arrays": ((20, 60), (20, 60)),  # per-epoch overhead rules when an epoch is 1 step
}
DEFAULT_COUNTS = ((1000, 4000), (20, 60))


REALISTIC_COUNTS = (4, 12)
# On the realistic workloads: the hand-written loops, Keras fit and tapekit, on both inputs.
REALISTIC_APPROACHES = ("graph+data", "graph+memory", "keras_fit", "keras_arrays", "tapekit",
                        "tapekit_memory")


def step_counts(name, work, quick):
    if realistic(work):
        return REALISTIC_COUNTS
    counts = STEP_COUNTS.get(name, DEFAULT_COUNTS)[int(heavy(work))]
    if quick and name in ("eager", "tf.function"):  # slow per step, and not compared closely
        counts = tuple(max(3, c // 4) for c in counts)
    elif quick and not heavy(work):
        counts = tuple(c // 2 for c in counts)
    return counts


# A median marginal cost is trusted when it is positive and the spread of its repeats
# (max - min) is smaller than it; otherwise it is measured again, once, with RETRY_FACTOR
# times the steps, and if it stays that way it is reported as noisy (left out of ratios and
# targets). The columns a target compares it with are measured again with it, interleaved,
# at the same step counts: a cost per step need not be the same over 80 steps as over 20
# (Keras fit on the conv GAN slows down in longer calls), so a ratio always compares
# figures of one pass.
RETRY_FACTOR = 4
PARTNERS = {  # column: the columns the targets compare it with
    "graph+data": ("tapekit",), "graph+memory": ("tapekit_memory",),
    "tapekit": ("graph+data", "keras_fit"), "tapekit_memory": ("graph+memory",),
    "keras_fit": ("tapekit", "tapekit_xla"), "tapekit_xla": ("keras_fit",),
}


def trusted(values):
    median = statistics.median(values)
    return median > 0 and max(values) - min(values) < median


# Instances: on this machine one instance of a compiled training loop can run at another
# speed than its twins, and keeps it: on the seed MLP about one in six ~1.5x slower, some
# ~0.8x the time, the plain hand-written loop as often as tapekit's (benchmarks/
# instances.py counts them). The speed is dealt when TensorFlow instantiates the function,
# and dealt again after its kernel cache is cleared, which keras.utils.set_random_seed
# (called whenever a model is built here) does. So every approach is built (and warmed up)
# first; then each instance runs once more, its speed now dealt for good; then the
# instances of each approach a target compares (INSTANCES of them) are probed and the
# MEDIAN one measured: the same rule for every compared column. One instance per approach
# would compare whichever speeds came up. The probes are kept in the report.
INSTANCES = 5
# The heavy workloads' steps are kernels, not overhead: their instances agree closer (within
# 4%, one in 14 at 0.85x), and each is slower to build and probe.
HEAVY_INSTANCES = 3
PROBES = 2  # probes per instance; an instance's figure is its best probe (noise only slows)
ODD_INSTANCE = 1.25  # instances further apart than this are named in the output


def median_instance(instances, short, long):
    """The median of several built, warmed-up instances of one approach, by a probe of each
    (interleaved), and each instance's probe figure (µs per step), in order."""
    if len(instances) == 1:
        return instances[0], []
    probes = [[] for _ in instances]
    for _ in range(PROBES):
        for run, figures in zip(instances, probes):
            figures.append(marginal_us(run, short, long))
    best = [min(figures) for figures in probes]
    return instances[sorted(range(len(best)), key=best.__getitem__)[(len(best) - 1) // 2]], best


def instance_count(name, work, instances) -> int:
    if name not in PARTNERS:
        return 1
    return min(instances, HEAVY_INSTANCES) if heavy(work) else instances


def measure(work, repeats, quick, only=None, passes=None, instances=1, probes=None):
    """Median µs per step for each approach (from its first trusted pass); None where it
    stayed noisy.
    `passes` (a dict) receives, per approach, {pass: repeats} of its trusted passes, so that
    ratios can pair repeats of one pass, taken side by side. Each approach a target compares
    is built `instances` times and its median instance measured (`probes`, a dict, receives
    each instance's probe figure)."""
    names = [n for n in APPROACHES if only is None or n in only]
    if realistic(work):
        names = [n for n in names if n in REALISTIC_APPROACHES]
    if heavy(work) and quick:  # the slowest columns
        names = [n for n in names if n not in ("eager", "tf.function", "keras_arrays")]
    built = {}
    for name in names:  # every build first (each may clear TensorFlow's kernel cache)
        short, _ = step_counts(name, work, quick)
        built[name] = []
        for _ in range(instance_count(name, work, instances)):
            run = APPROACHES[name](work)
            run(short)  # warm-up: tracing, first iterator
            built[name].append(run)
    for name in names:  # then once more: each function instantiated for good
        for run in built[name]:
            run(step_counts(name, work, quick)[0])
    runs = {}
    for name in names:
        runs[name], figures = median_instance(built.pop(name), *step_counts(name, work, quick))
        if probes is not None and figures:
            probes[name] = figures
        if figures and max(figures) > ODD_INSTANCE * min(figures):
            print(f"  {work.name} / {name}: instances probed at "
                  + ", ".join(f"{f:.1f}" for f in figures)
                  + " µs per step; measuring the median one", flush=True)
    gc.collect()  # the instances not chosen

    def interleaved(group, factor):
        values = {name: [] for name in group}
        for _ in range(repeats):
            for name in group:  # interleaved, so slow phases of a noisy machine hit all alike
                short, long = step_counts(name, work, quick)
                values[name].append(marginal_us(runs[name], short * factor, long * factor))
        return values

    by_pass = {name: {0: values} for name, values in interleaved(names, 1).items()}
    noisy = [name for name in names if not trusted(by_pass[name][0])]
    if noisy:
        group = noisy + [p for name in noisy for p in PARTNERS.get(name, ())
                         if p in names and p not in noisy]
        group = list(dict.fromkeys(group))
        for name in noisy:
            short, long = step_counts(name, work, quick)
            values = by_pass[name][0]
            others = [n for n in group if n not in noisy]
            print(f"  {work.name} / {name}: {statistics.median(values):.1f} µs with spread "
                  f"{max(values) - min(values):.1f}; measuring again with "
                  f"{short * RETRY_FACTOR}/{long * RETRY_FACTOR} steps"
                  + (f" (with {', '.join(others)})" if others else ""), flush=True)
        for name, values in interleaved(group, RETRY_FACTOR).items():
            by_pass[name][1] = values
    result = {}
    for name in names:
        good = {k: v for k, v in by_pass[name].items() if trusted(v)}
        result[name] = statistics.median(good[min(good)]) if good else None
        if passes is not None:
            passes[name] = good
    return result


def steps_per_loop_table(work, repeats, quick):
    rows = {}
    for spl in ((1, 10, 100) if quick else (1, 10, 100, 1000)):
        for label, make in (("tf.data", tapekit_data), ("in-memory", tapekit_memory)):
            run = make(work, steps_per_loop=spl)
            short, long = (100, 400) if spl <= 10 else (1000, 4000)
            if quick:
                short, long = short // 5, long // 5
            short, long = max(short, spl), max(long, 2 * spl)
            run(short)
            values = [marginal_us(run, short, long) for _ in range(repeats)]
            rows.setdefault(spl, {})[label] = statistics.median(values)
    return rows


def resident_mb():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def memory_check(work, loops):
    run = tapekit_memory(work, steps_per_loop=100)
    readings = {}
    for loop in range(1, loops + 1):
        run(100)
        if loop in (10, loops):
            gc.collect()
            readings[loop] = resident_mb()
    return readings, run.trainer.train_loop_trace_count


# ------------------------------------------------------------------ report


RATIOS = [  # (numerator, denominator): the comparisons the project's targets are about
    ("tapekit", "graph+data"), ("tapekit_memory", "graph+memory"), ("keras_fit", "tapekit"),
    ("keras_fit", "tapekit_xla"), ("keras_arrays", "tapekit_memory"),
    ("eager", "tapekit_memory"),
]
HAND_WRITTEN_LIMIT = 1.05  # tapekit's time per step over the hand-written loop's, at most
TARGETS_PER_WORKLOAD = 3  # both input paths against the hand-written loop, and Keras fit


def ratios(name, times, passes=None):
    """Only between trusted figures (a noisy one is None and is left out). With `passes`
    (name -> {pass: repeats}), the median of the per-repeat ratios of the last pass in which
    both were measured and trusted (side by side, at the same steps: a slow phase of the
    machine hits both); else the ratio of the medians."""
    passes = passes or {}
    result = {}
    for a, b in RATIOS:
        if not (times.get(a) and times.get(b)):
            continue
        common = set(passes.get(a, {})) & set(passes.get(b, {}))
        if common:
            last = max(common)
            result[f"{a} / {b}"] = statistics.median(
                x / y for x, y in zip(passes[a][last], passes[b][last]))
        else:
            result[f"{a} / {b}"] = times[a] / times[b]
    return result


# Processes: beyond single instances, a whole process can deal one approach a speed of its
# own (on the seed linear workload, tapekit 1.24x the hand-written loop in one process and
# 0.98x in the next, with five instances each). So each small workload is measured in
# PROCESSES fresh processes, one after another, and every figure and ratio reported is the
# median over them.
PROCESSES = 3


def measure_here(work, repeats, quick, instances) -> dict:
    """This process's measurement of `work`: figures, ratios, probes and repeats."""
    passes, probes = {}, {}
    times = measure(work, repeats, quick, passes=passes, instances=instances, probes=probes)
    return {"us_per_step": times, "ratios": ratios(work.name, times, passes),
            "instance_probes_us": probes,
            "repeats_us": {name: {str(k): v for k, v in by_pass.items()}
                           for name, by_pass in passes.items()}}


def measure_in_processes(work, count, repeats, quick, instances) -> list:
    """`measure_here` in `count` fresh processes, one after another."""
    results = []
    for _ in range(count):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "result.json")
            subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", out,
                            "--worker_workload", work.name, "--repeats", str(repeats),
                            "--instances", str(instances)] + (["--quick"] if quick else []),
                           check=True)
            with open(out) as stream:
                results.append(json.load(stream))
    return results


def combine(results) -> dict:
    """The median over processes of every figure and ratio; a figure or ratio missing (noisy)
    in half the processes or more is left out."""
    def median_of(values):
        present = [v for v in values if v is not None]
        return statistics.median(present) if 2 * len(present) > len(values) else None

    times = {name: median_of([r["us_per_step"].get(name) for r in results])
             for name in results[0]["us_per_step"]}
    keys = [f"{a} / {b}" for a, b in RATIOS]
    combined = {key: median_of([r["ratios"].get(key) for r in results]) for key in keys}
    return {"us_per_step": times, "ratios": {k: v for k, v in combined.items() if v is not None},
            "processes": results}


def check_targets(name, r, keras_xla=False):
    """The targets for one workload (issue 12), each [(target, value, holds)]: on both input
    paths tapekit takes at most HAND_WRITTEN_LIMIT × the hand-written loop's time, and it is
    faster than Keras fit on the same pipeline with the same XLA setting (`keras_xla`: what
    Keras's jit_compile="auto" resolved to)."""
    checks = []
    for ours, hand, path in (("tapekit", "graph+data", "tf.data"),
                             ("tapekit_memory", "graph+memory", "in memory")):
        key = f"{ours} / {hand}"
        if key in r:
            checks.append((f"{path}: tapekit ≤ {HAND_WRITTEN_LIMIT:.2f} × the hand-written loop",
                           r[key], r[key] <= HAND_WRITTEN_LIMIT))
    ours = "tapekit_xla" if keras_xla else "tapekit"
    key = f"keras_fit / {ours}"
    if key in r:
        setting = "both with XLA" if keras_xla else "both without XLA"
        checks.append((f"tapekit faster than Keras fit on the same pipeline ({setting})",
                       r[key], r[key] > 1.0))
    return checks


def machine() -> str:
    """'<CPU model>, N cores, <OS>' for the report."""
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as info:
            found = re.search(r"^model name\s*:\s*(.+)$", info.read(), re.M)
            model = found.group(1).strip() if found else model
    except OSError:
        pass
    gpus = len(tf.config.list_physical_devices("GPU"))
    return (f"{model}, {os.cpu_count()} cores{f', {gpus} GPU(s)' if gpus else ', no GPU'}, "
            f"{platform.system()} {platform.release()}")


README_START, README_END = "<!-- bench:start -->", "<!-- bench:end -->"
README_COLUMNS = [("eager", "seed-style eager"), ("tf.function", "tf.function step"),
                  ("graph+data", "hand-written loop, tf.data"),
                  ("graph+memory", "hand-written loop, in memory"),
                  ("keras_fit", "Keras fit, tf.data"), ("tapekit", "tapekit, tf.data"),
                  ("tapekit_memory", "tapekit, in memory")]


def _latest_merges(merges):
    """(merge entry, its workloads no later merge measured again), oldest first, for the
    entries that still hold rows of the report."""
    result, later = [], set()
    for entry in reversed(merges):
        shown = [w for w in entry["workloads"] if w not in later]
        later.update(entry["workloads"])
        if shown:
            result.append((entry, shown))
    return result[::-1]


def readme_section(report) -> str:
    """benchmarks/README.md's block: the performance table, ratios, targets and side tables
    (checkpoint stall, XLA by replicas, build time, start-up), from one report."""
    lines = [README_START,
             f"One run of `make bench` on {report['machine']}; TensorFlow {report['tensorflow']}, "
             f"Keras {report['keras']}; {report['repeats']} interleaved repeats, medians"
             + (f", in each of {report['processes']} fresh processes per small workload (one "
                "for the two heavy ones), then the median over processes"
                if report.get("processes", 1) > 1 else "") + "; the whole report is "
             "`benchmarks/results.json`. Marginal µs per step, lower is better; same model, "
             "data and batch in every column."
             + (f" Each compared column (hand-written loops, Keras fit, tapekit) is measured on "
                f"the median of {report['instances']} instances of it (at most "
                f"{HEAVY_INSTANCES} on the heavy workloads), by a probe of each."
                if report.get("instances", 1) > 1 else ""), "",
             "| workload | " + " | ".join(label for _, label in README_COLUMNS) + " |",
             "|---|" + "---|" * len(README_COLUMNS)]
    for name, entry in report["workloads"].items():
        times = entry["us_per_step"]
        cells = ["noisy" if times.get(c, 0) is None else f"{times[c]:.0f}" if c in times else "–"
                 for c, _ in README_COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| workload | tapekit / hand-written, tf.data | tapekit / hand-written, in "
              "memory | Keras fit / tapekit | targets |", "|---|---|---|---|---|"]
    for name, entry in report["workloads"].items():
        r = entry["ratios"]
        fit_key = "keras_fit / tapekit_xla" if entry["keras_xla"] else "keras_fit / tapekit"
        held = sum(t["holds"] for t in entry["targets"])
        unjudged = TARGETS_PER_WORKLOAD - len(entry["targets"])
        cells = [f"{r[k]:.2f}" if k in r else "noisy" for k in
                 ("tapekit / graph+data", "tapekit_memory / graph+memory", fit_key)]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {held} of {TARGETS_PER_WORKLOAD}"
                     + (f" ({unjudged} not judged: noisy)" if unjudged else "") + " |")
    xla = {entry["keras_xla"] for entry in report["workloads"].values()}
    lines += ["", "Keras's `jit_compile=\"auto\"` resolved to " +
              ("XLA, so Keras fit is compared with tapekit under `--jit_compile`."
               if xla == {True} else "no XLA here (Keras turns it off without a GPU), so Keras "
               "fit is compared with tapekit without XLA.")]
    for entry, shown in _latest_merges(report.get("merged", [])):
        where = entry.get("machine") or report["machine"]
        lines += ["", "Measured later, in a `bench.py --merge` run on "
                  + ("the same machine" if where == report["machine"] else where)
                  + f" (TensorFlow {entry['tensorflow']}, Keras {entry['keras']}; "
                  f"{entry.get('repeats', '?')} interleaved repeats, the median of "
                  f"{entry.get('instances', '?')} instance(s), in "
                  f"{entry.get('processes', '?')} process(es) per small workload and one per "
                  "heavy one; compare within its rows): " + ", ".join(shown) + "."]
    extra_tables = [
        ("checkpoint_stall", "What a checkpoint save costs training, synchronous against "
         "`--async_checkpoint`: the stall is the extra time of loops of 5 steps with a save "
         "after each over loops without (median ms per save; `benchmarks/checkpoint_stall.py`"
         "; on this CPU machine the background writer shares the 2 cores with training):",
         ("state", "a loop of 5 steps", "sync stall", "async stall", "sync save call",
          "async save call"),
         lambda r: (f"{r['megabytes']} MB", f"{r['loop_ms']:.0f}", f"{r['sync_ms']:.0f}",
                    f"{r['async_ms']:.0f}", f"{r['sync_call_ms']:.0f}",
                    f"{r['async_call_ms']:.0f}")),
        ("xla_replicas", "tapekit with `--jit_compile` against without, on 1 and 2 CPU replicas "
         "(median µs per step, tf.data input; `benchmarks/xla_replicas.py`; on 2 replicas XLA "
         "compiles each replica's forward and backward pass):",
         ("workload", "replicas", "no XLA", "XLA", "XLA / no XLA"),
         lambda r: (r["workload"], str(r["replicas"]), f"{r['us_plain']:.0f}",
                    f"{r['us_xla']:.0f}", f"{r['ratio']:.2f}")),
        ("build_s", "Build and trace time against model depth (median s from `fit` to the end "
         "of step 1, in process; `benchmarks/build_time.py`):",
         ("Dense layers", "parameters", "build and trace"),
         lambda r: (str(r["layers"]), f"{r['parameters']:,}", f"{r['seconds']:.2f}")),
    ]
    for key, title, header, cells in extra_tables:
        if report.get(key):
            lines += ["", title, "", "| " + " | ".join(header) + " |",
                      "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(cells(row)) + " |" for row in report[key]]
    if report.get("startup_s"):
        lines += ["", "Start-up, from the command to the end of training step 1 (median s; "
                  "`benchmarks/startup.py`): `tapekit-train` against the same work as a plain "
                  "script.", "", "| workload | plain script | tapekit-train | difference |",
                  "|---|---|---|---|"]
        for name, row in report["startup_s"].items():
            lines.append(f"| {name} | {row['plain']:.2f} | {row['tapekit']:.2f} | "
                         f"{row['tapekit'] - row['plain']:+.2f} |")
    lines.append(README_END)
    return "\n".join(lines)


def write_readme(path, report) -> None:
    with open(path) as stream:
        text = stream.read()
    if README_START not in text or README_END not in text:
        raise SystemExit(f"{path} has no {README_START} ... {README_END} block to rewrite")
    before, rest = text.split(README_START, 1)
    after = rest.split(README_END, 1)[1]
    with open(path, "w") as stream:
        stream.write(before + readme_section(report) + after)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer repeats, instances and eager steps, one process, no start-up "
                             "(about 8 min)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--instances", type=int, default=None,
                        help="instances built of each compared approach, the median one "
                             f"measured (default {INSTANCES}, at most {HEAVY_INSTANCES} for the "
                             "heavy workloads; 3 in --quick mode)")
    parser.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results.json"))
    parser.add_argument("--workloads", default=None,
                        help="comma-separated prefixes of workload names to run")
    parser.add_argument("--readme", default=None,
                        help="rewrite the block between the bench markers in this file "
                             "(make bench: benchmarks/README.md)")
    parser.add_argument("--startup_repeats", type=int, default=None,
                        help="start-up runs per command (default 5; 0 in --quick mode)")
    parser.add_argument("--processes", type=int, default=None,
                        help=f"fresh processes per small workload (default {PROCESSES}; 1 in "
                             "--quick mode); figures and ratios are medians over them")
    parser.add_argument("--merge", action="store_true",
                        help="measure only --workloads and put them into the existing --json "
                             "report (and --readme), keeping its other workloads and tables")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker_workload", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.set_verbosity(logging.ERROR)  # here, not at import: importing it changes nothing
    repeats = args.repeats or (3 if args.quick else 5)
    instances = args.instances or (3 if args.quick else INSTANCES)
    processes = args.processes or (1 if args.quick else PROCESSES)
    if args.worker:  # one workload measured in this process, for measure_in_processes
        work = next(w for w in workloads(args.quick) if w.name == args.worker_workload)
        with open(args.worker, "w") as stream:
            json.dump(measure_here(work, repeats, args.quick, instances), stream)
        return 0
    started = time.perf_counter()
    report = {"machine": machine(), "tensorflow": tf.__version__, "keras": keras.__version__,
              "quick": args.quick, "repeats": repeats, "instances": instances,
              "processes": processes, "cpus": os.cpu_count(), "workloads": {}}
    print(f"{report['machine']}; TensorFlow {tf.__version__}, Keras {keras.__version__}")
    chosen = workloads(args.quick)
    if args.workloads:
        prefixes = [p.strip() for p in args.workloads.split(",")]
        chosen = [w for w in chosen if w.name.startswith(tuple(prefixes))]
    columns = list(APPROACHES)
    print("median µs per step (marginal cost; lower is better)")
    print(f"{'workload':40s}" + "".join(f"{c:>15s}" for c in columns))
    for work in chosen:
        count = 1 if heavy(work) else processes  # heavy workloads: steady kernels, slow to build
        result = combine(measure_in_processes(work, count, repeats, args.quick, instances))
        times, r = result["us_per_step"], result["ratios"]
        if count > 1:
            for key in r:
                print(f"  {work.name} / {key}: " + ", ".join(
                    f"{p['ratios'][key]:.2f}" if key in p["ratios"] else "noisy"
                    for p in result["processes"]) + f" in {count} processes", flush=True)
        keras_xla = keras_uses_xla(work)
        checks = check_targets(work.name, r, keras_xla)
        report["workloads"][work.name] = dict(
            result, keras_xla=keras_xla,
            targets=[{"target": t, "value": v, "holds": bool(ok)} for t, v, ok in checks])
        print(f"{work.name:40s}" + "".join(
            f"{'noisy':>15s}" if c in times and times[c] is None else
            f"{times[c]:15.1f}" if c in times else f"{'-':>15s}" for c in columns), flush=True)
    print("\nratios and targets")
    for name, entry in report["workloads"].items():
        shown = ", ".join(f"{k} = {v:.2f}" for k, v in entry["ratios"].items())
        print(f"  {name}: {shown}")
        for target in entry["targets"]:
            mark = "holds" if target["holds"] else "MISSED"
            print(f"      [{mark}] {target['target']} (measured {target['value']:.2f})")
    if args.merge:
        with open(args.json) as stream:
            merged = json.load(stream)
        merged["workloads"].update(report["workloads"])
        merged.setdefault("merged", []).append(
            {"workloads": list(report["workloads"]), "machine": report["machine"],
             "tensorflow": tf.__version__,
             "keras": keras.__version__, "seconds": time.perf_counter() - started,
             "repeats": repeats, "instances": instances, "processes": processes})
        _write(merged, args, f"merged {len(report['workloads'])} workload(s) into {args.json}")
        return 0
    mlp = next(w for w in workloads(args.quick) if w.name.startswith("seed MLP"))
    table = steps_per_loop_table(mlp, max(1, repeats // 2 + 1), args.quick)
    report["steps_per_loop"] = {str(k): v for k, v in table.items()}
    print("\ntapekit on the seed MLP by steps_per_loop (µs per step)")
    print(f"{'steps_per_loop':>16s}{'tf.data':>12s}{'in-memory':>12s}")
    for spl, row in table.items():
        print(f"{spl:16d}{row['tf.data']:12.1f}{row['in-memory']:12.1f}")
    loops = 30 if args.quick else 200
    readings, traces = memory_check(mlp, loops)
    report["memory_mb"] = {str(k): v for k, v in readings.items()}
    report["memory_trace_count"] = traces
    print(f"\nresident memory, tapekit seed MLP: after loop 10 {readings[10]:.1f} MB, after loop "
          f"{loops} {readings[loops]:.1f} MB (compiled loop traced {traces} time(s))")
    startup_repeats = args.startup_repeats
    if startup_repeats is None:
        startup_repeats = 0 if args.quick else 5
    if startup_repeats:
        report["startup_s"] = startup.measure(startup_repeats)
        print()
        startup.report(report["startup_s"])
    report["seconds"] = time.perf_counter() - started
    _write(report, args, f"wrote {args.json} in {report['seconds']:.0f} s")


def _write(report, args, done: str) -> None:
    """Writes `report` to --json and, with --readme, its block into that README."""
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as stream:
        json.dump(report, stream, indent=2)
    print(f"\n{done}")
    if args.readme:
        write_readme(args.readme, report)
        print(f"rewrote the performance section of {args.readme}")


if __name__ == "__main__":
    sys.exit(main())
