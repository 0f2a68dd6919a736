"""What `run_eagerly` costs a step: the seed MLP, eager against compiled, in one process.

    .venv/bin/python benchmarks/eager_step.py [--repeats 5] [--steps 50]

The seed's example 2 (`RegressionTrainer(model="mlp")`: 5 → 10 sigmoid → 1, Adam, batch
100, in memory) on the default strategy. Each repeat times one loop of `--steps` steps of
each trainer, interleaved, after a warm-up loop; prints the median ms per step of each and
their ratio. A noisy 2-core machine: compare within one run.
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tapekit.trainers.regression import RegressionTrainer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    trainers = {"compiled": RegressionTrainer(model="mlp", progress="none"),
                "eager": RegressionTrainer(model="mlp", progress="none", run_eagerly=True)}
    for trainer in trainers.values():  # build, trace, warm up
        trainer.fit(train_steps=args.steps, steps_per_loop=args.steps)
    times = {name: [] for name in trainers}
    for _ in range(args.repeats):
        for name, trainer in trainers.items():
            start = time.perf_counter()
            trainer.fit(train_steps=trainer.current_step + args.steps, steps_per_loop=args.steps)
            times[name].append((time.perf_counter() - start) / args.steps * 1e3)
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, value in medians.items():
        print(f"{name:9s} {value:8.3f} ms/step (median of {args.repeats} loops of {args.steps})")
    print(f"eager / compiled: {medians['eager'] / medians['compiled']:.0f}x")


if __name__ == "__main__":
    main()
