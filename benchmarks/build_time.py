"""Build and trace time against model depth: from `fit` to the end of training step 1.

    .venv/bin/python benchmarks/build_time.py [--depths 2,8,32] [--repeats 3] [--json benchmarks/results.json]

A Dense ReLU net of `depth` layers of width 256 under Adam, trained for one step on
in-memory arrays, in a fresh trainer each time (the process warmed up by one run first):
`build()`, the build trace of `train_step`, the optimizers built, the compiled loop traced
and run once. Median seconds over `--repeats`. A noisy 2-core machine: compare within one run.
"""

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import logging  # noqa: E402

import tapekit  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report_rows  # noqa: E402  (benchmarks/report_rows.py)


class Deep(tapekit.Trainer):
    default_global_batch_size = 64

    def __init__(self, depth, **kwargs):
        self.depth = depth
        super().__init__(**kwargs)

    def build(self):
        self.model = keras.Sequential(
            [keras.Input((256,))] + [keras.layers.Dense(256, activation="relu")
                                     for _ in range(self.depth)] + [keras.layers.Dense(1)])
        self.optimizer = keras.optimizers.Adam(1e-3)

    def train_arrays(self):
        x = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)
        return x, x[:, :1]

    def train_step(self, batch):
        x, y = batch
        with tf.GradientTape() as tape:
            loss = self.compute_loss(tf.square(self.model(x) - y))
        self.apply_gradients(tape, loss, self.model, self.optimizer)
        return {"loss": loss}


def _seconds(depth: int) -> float:
    trainer = Deep(depth, progress="none")
    start = time.perf_counter()
    trainer.fit(train_steps=1, steps_per_loop=1)
    return time.perf_counter() - start, trainer.model.count_params()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", default="2,8,32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None,
                        help="also put the rows into this bench report (build_s)")
    args = parser.parse_args()
    logging.set_verbosity(logging.ERROR)
    _seconds(2)  # warm-up: TensorFlow's own first-use costs
    rows = []
    for depth in [int(d) for d in args.depths.split(",")]:
        runs = [_seconds(depth) for _ in range(args.repeats)]
        seconds = statistics.median(s for s, _ in runs)
        parameters = runs[0][1]
        rows.append({"layers": depth + 1, "parameters": parameters, "seconds": seconds})
        print(f"{depth + 1} Dense layers ({parameters:,} parameters): build and trace "
              f"{seconds:.2f} s (median of {args.repeats})", flush=True)
    if args.json:
        report_rows.put(args.json, "build_s", rows)


if __name__ == "__main__":
    main()
