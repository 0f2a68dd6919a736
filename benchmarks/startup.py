"""Start-up time: from the command to the end of training step 1, tapekit against a plain script.

    .venv/bin/python benchmarks/startup.py [--repeats 5]     # also part of `make bench`
    .venv/bin/python benchmarks/startup.py --plain linear    # one plain script, as timed

For each seed workload, two commands do the same work in a fresh process: import
TensorFlow and Keras, make the seed data, build the model(s) and optimizer(s), trace the
compiled training loop and run its first step (batch and learning rate of the seed).

  plain    this file run as `--plain WORKLOAD`: the work written as a short script, the way
           one writes it without a framework (a tf.data pipeline, Keras layers, a
           `tf.function` in-graph loop over `tf.range`), no strategy, no files written.
  tapekit  `tapekit-train --trainer=... --train_steps=1 --steps_per_loop=1` (no model_dir,
           so nothing is written), the command a user runs.

The time is taken from just before the process is started to the moment step 1 ended:
the plain script prints that moment; for tapekit it is the time stamp of the progress log
line "step 1/1", written when the first loop returns. What either does after step 1
(tapekit's closing summary, interpreter exit) is not counted. Commands are interleaved
and the median over repeats is reported.
"""

import argparse
import datetime
import os
import re
import statistics
import subprocess
import sys
import time

WORKLOADS = {  # name: tapekit-train flags
    "linear": ["--trainer=regression", "--model=linear"],
    "mlp": ["--trainer=regression", "--model=mlp"],
    "gan": ["--trainer=gan", "--model=dense"],
}
STEP_ONE = re.compile(r"^I\d{4} (\d\d):(\d\d):(\d\d\.\d+) .*\] step 1/1: ", re.M)


def plain(workload: str) -> None:
    """The seed workload as a plain script: data, model, optimizer, a compiled loop, step 1."""
    import keras
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    if workload == "gan":
        real = rng.standard_normal((1024, 1)).astype(np.float32)
        dataset = tf.data.Dataset.from_tensor_slices(real).shuffle(1024, seed=0).repeat().batch(
            64, drop_remainder=True).map(lambda x: (x, tf.random.normal([64, 10])))
        generator = keras.Sequential([keras.layers.Dense(10, "relu"), keras.layers.Dense(1)])
        discriminator = keras.Sequential([keras.layers.Dense(10, "relu"), keras.layers.Dense(1)])
        g_opt, d_opt = keras.optimizers.Adam(1e-3), keras.optimizers.Adam(1e-3)
        bce = tf.nn.sigmoid_cross_entropy_with_logits

        def step(batch):
            real, noise = batch
            with tf.GradientTape() as g_tape, tf.GradientTape() as d_tape:
                fake = generator(noise, training=True)
                real_logits = discriminator(real, training=True)
                fake_logits = discriminator(fake, training=True)
                g_loss = tf.reduce_mean(bce(tf.ones_like(fake_logits), fake_logits))
                d_loss = (tf.reduce_mean(bce(tf.ones_like(real_logits), real_logits))
                          + tf.reduce_mean(bce(tf.zeros_like(fake_logits), fake_logits)))
            g_opt.apply_gradients(zip(g_tape.gradient(g_loss, generator.trainable_variables),
                                      generator.trainable_variables))
            d_opt.apply_gradients(zip(d_tape.gradient(d_loss, discriminator.trainable_variables),
                                      discriminator.trainable_variables))
            return g_loss
    else:
        if workload == "linear":
            x = rng.standard_normal((1000, 1)).astype(np.float32)
            y = (3.0 * x + 2.0 + 0.1 * rng.standard_normal((1000, 1))).astype(np.float32)
            model, optimizer = keras.Sequential([keras.layers.Dense(1)]), keras.optimizers.SGD(0.1)
        else:
            x = rng.random((100, 5), dtype=np.float32)
            y = rng.random((100, 1), dtype=np.float32)
            model = keras.Sequential([keras.layers.Dense(10, "sigmoid"), keras.layers.Dense(1)])
            optimizer = keras.optimizers.Adam(0.01)
        dataset = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=0).repeat().batch(
            100, drop_remainder=True)

        def step(batch):
            x, y = batch
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(y - model(x, training=True)))
            gradients = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(gradients, model.trainable_variables))
            return loss

    iterator = iter(dataset.prefetch(tf.data.AUTOTUNE))

    @tf.function
    def loop(steps):
        loss = tf.constant(0.0)
        for _ in tf.range(steps):
            loss = step(next(iterator))
        return loss

    loss = float(loop(tf.constant(1)))
    print(f"step 1 ended at {time.time():.6f} (loss {loss:.4f})", flush=True)


def _time_of_day(seconds: float) -> float:
    moment = datetime.datetime.fromtimestamp(seconds)
    return moment.hour * 3600 + moment.minute * 60 + moment.second + moment.microsecond / 1e6


def time_plain(workload: str) -> float:
    started = time.time()
    output = subprocess.run([sys.executable, os.path.abspath(__file__), "--plain", workload],
                            check=True, capture_output=True, text=True).stdout
    return float(output.split("step 1 ended at ")[1].split()[0]) - started


def time_tapekit(workload: str) -> float:
    command = [os.path.join(os.path.dirname(sys.executable), "tapekit-train"),
               *WORKLOADS[workload], "--train_steps=1", "--steps_per_loop=1", "--progress=log"]
    started = time.time()
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    hours, minutes, seconds = STEP_ONE.search(result.stderr).groups()
    ended = int(hours) * 3600 + int(minutes) * 60 + float(seconds)  # absl: local time of day
    return (ended - _time_of_day(started)) % 86400


def measure(repeats: int) -> dict:
    """{workload: {"plain": median s, "tapekit": median s}}, commands interleaved."""
    samples = {w: {"plain": [], "tapekit": []} for w in WORKLOADS}
    for _ in range(repeats):
        for workload in WORKLOADS:
            samples[workload]["plain"].append(time_plain(workload))
            samples[workload]["tapekit"].append(time_tapekit(workload))
    return {w: {k: statistics.median(v) for k, v in s.items()} for w, s in samples.items()}


def report(result: dict) -> None:
    print("start-up: command to end of step 1 (median s)")
    print(f"{'workload':10s}{'plain':>10s}{'tapekit':>10s}{'tapekit - plain':>18s}")
    for workload, row in result.items():
        print(f"{workload:10s}{row['plain']:10.2f}{row['tapekit']:10.2f}"
              f"{row['tapekit'] - row['plain']:18.2f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plain", choices=sorted(WORKLOADS), help="run one plain script")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if args.plain:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        plain(args.plain)
        return 0
    report(measure(args.repeats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
