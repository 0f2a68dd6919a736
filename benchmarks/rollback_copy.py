"""What `--nan_policy=rollback` costs while nothing goes wrong: one copy of the state per loop.

    .venv/bin/python benchmarks/rollback_copy.py [--repeats 7] [--loops 20]

1. The seed's example 2 (the sigmoid MLP, Adam, batch 100, in memory) trained with
   nan_policy=stop and with nan_policy=rollback (rollback_from=memory) in one process, loops
   of 100 steps (the default), interleaved after a warm-up: median µs per step and the ratio.
2. The copy alone (`tapekit.faults.good_state.StateCopy.keep`) for 10, 100 and 300 MB of float32
   variables: median ms per copy, what a loop pays at that state size.
A noisy 2-core machine: compare within one run.
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

from tapekit.faults.good_state import StateCopy  # noqa: E402
from tapekit.trainers.regression import RegressionTrainer  # noqa: E402

STEPS_PER_LOOP = 100


def _per_step(args) -> None:
    trainers = {policy: RegressionTrainer(model="mlp", progress="none", nan_policy=policy)
                for policy in ("stop", "rollback")}
    steps = args.loops * STEPS_PER_LOOP
    for trainer in trainers.values():
        trainer.fit(train_steps=steps, steps_per_loop=STEPS_PER_LOOP)
    times = {name: [] for name in trainers}
    for _ in range(args.repeats):
        for name, trainer in trainers.items():
            start = time.perf_counter()
            trainer.fit(train_steps=trainer.current_step + steps, steps_per_loop=STEPS_PER_LOOP)
            times[name].append((time.perf_counter() - start) / steps * 1e6)
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"seed mlp, {STEPS_PER_LOOP} steps per loop: " + ", ".join(
        f"nan_policy={name} {value:.1f} µs/step" for name, value in medians.items())
        + f"; ratio {medians['rollback'] / medians['stop']:.3f}")


def _copies(args) -> None:
    for megabytes in (10, 100, 300):
        # a few variables of 1/4 of the state each, as a model's largest kernels are
        count = 4
        rows = megabytes * (1 << 20) // 4 // count // 1024
        variables = [tf.Variable(tf.random.normal([rows, 1024])) for _ in range(count)]
        copy = StateCopy(variables)
        copy.keep(0)  # traces
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            copy.keep(0)
            times.append((time.perf_counter() - start) * 1e3)
        print(f"state {copy.nbytes / (1 << 20):.0f} MB: keep a copy {statistics.median(times):.1f} "
              "ms (median)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--loops", type=int, default=20)
    args = parser.parse_args()
    _per_step(args)
    _copies(args)


if __name__ == "__main__":
    main()
