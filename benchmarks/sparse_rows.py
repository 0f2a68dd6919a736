"""What summing repeated sparse rows costs a step (`tapekit.compiled.updates.combined_rows`).

    .venv/bin/python benchmarks/sparse_rows.py [--repeats 5] [--quick]

Two workloads, on 2 CPU replicas, each trained with the rows of an index summed (what
tapekit does) and, for comparison, with that step left out (`combines_rows` patched to
False while the loop is traced: the numbers are then Keras's, not the dense update):

* the test suite's sparse_embedding family (Keras's collaborative-filtering example:
  user and item Embeddings under Adam), without the family's `clip_global_norm` and
  accumulation: left out, the optimizer runs per replica as in a plain Keras loop; summed,
  tapekit sums over replicas, sums rows and calls the optimizer on that;
* one Embedding of 1,000,000 rows × 64 under Adam, batches of 512 sequences of 8 tokens
  drawn from 1,000 frequent ids (so rows repeat), summed and read out by a Dense layer.

Prints the median µs per step of each (after a warm-up loop, over `--repeats` loops,
interleaved) and their ratio; a noisy 2-core machine: compare within one run.
"""

import argparse
import os
import statistics
import sys
import time
from unittest import mock

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tapekit  # noqa: E402
from tapekit.compiled import updates  # noqa: E402
from tapekit.run import distribute  # noqa: E402

TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")


class LargeTable(tapekit.Trainer):
    """One large Embedding under Adam; token ids repeat within every batch."""

    default_global_batch_size = 512

    def __init__(self, rows=1_000_000, width=64, **kwargs):
        self.rows, self.width = rows, width
        super().__init__(**kwargs)

    def build(self):
        tokens = keras.Input((8,), dtype="int32")
        embedded = keras.layers.Embedding(self.rows, self.width)(tokens)
        output = keras.layers.Dense(1)(keras.ops.sum(embedded, axis=1))
        self.model = keras.Model(tokens, output)
        self.optimizer = keras.optimizers.Adam(1e-3)

    def train_arrays(self):
        rng = np.random.default_rng(0)
        tokens = rng.integers(0, 1000, (8192, 8)).astype(np.int32)
        return tokens, rng.standard_normal((8192, 1)).astype(np.float32)

    def train_step(self, batch):
        tokens, targets = batch
        with tf.GradientTape() as tape:
            loss = self.compute_loss(tf.square(self.model(tokens) - targets))
        self.apply_gradients(tape, loss, self.model, self.optimizer)
        return {"loss": loss}


def family_trainer(**options):
    sys.path.insert(0, TESTS)
    from families import FAMILIES
    family = FAMILIES["sparse_embedding"]
    return family.trainer(**{**family.randomness_off, **options})  # Adam alone


def built(make, combine: bool, steps: int):
    """A trainer after its first loop (traced with or without combining rows)."""
    trainer = make(progress="none", strategy="mirrored", cpu_replicas=2)
    if combine:
        trainer.fit(steps, steps_per_loop=steps)
    else:
        with mock.patch.object(updates.GradientUpdater, "combines_rows",
                               lambda self, gradients: False):
            trainer.fit(steps, steps_per_loop=steps)
    return trainer


def loop_us(trainer, steps: int) -> float:
    start = time.perf_counter()
    trainer.fit(trainer.current_step + steps, steps_per_loop=steps)
    return (time.perf_counter() - start) / steps * 1e6


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="a 100,000-row table, fewer steps")
    args = parser.parse_args(argv)
    distribute.split_cpu(2)
    rows = 100_000 if args.quick else 1_000_000
    workloads = {
        "sparse_embedding family (2 replicas)": (family_trainer, 100),
        f"Embedding {rows:,} x 64, Adam (2 replicas)": (lambda **o: LargeTable(rows=rows, **o),
                                                        5 if args.quick else 10),
    }
    for name, (make, steps) in workloads.items():
        trainers = {combine: built(make, combine, steps) for combine in (False, True)}
        samples = {False: [], True: []}
        for _ in range(args.repeats):
            for combine, trainer in trainers.items():
                samples[combine].append(loop_us(trainer, steps))
        left_out, combined = (statistics.median(samples[c]) for c in (False, True))
        ratios = statistics.median(c / s for s, c in zip(samples[False], samples[True]))
        print(f"{name}: rows summed {combined:.0f} µs/step, left out {left_out:.0f} µs/step, "
              f"ratio {ratios:.3f} (median of {args.repeats} paired loops of {steps} steps)",
              flush=True)


if __name__ == "__main__":
    main()
