"""What listening for a stop request costs a step: the loop reads a flag once per step.

    .venv/bin/python benchmarks/stop_flag.py [--repeats 7] [--steps 2000]

The seed's example 2 (the sigmoid MLP, Adam, batch 100, in memory) and example 1 (linear,
SGD), each trained twice in one process: with the stop flag (what `fit` runs) and with the
loop built without it. Loops of `--steps` steps, interleaved, after a warm-up; prints the
median µs per step of each and their ratio. A noisy 2-core machine: compare within one run.
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tapekit.trainers.regression import RegressionTrainer  # noqa: E402


def _trainer(model: str, listening: bool) -> RegressionTrainer:
    trainer = RegressionTrainer(model=model, progress="none")
    if not listening:
        trainer._engine.stop.variable = None  # the loop is then built without the read
    return trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()
    for model in ("mlp", "linear"):
        trainers = {"listening": _trainer(model, True), "not listening": _trainer(model, False)}
        for trainer in trainers.values():
            trainer.fit(train_steps=args.steps, steps_per_loop=args.steps)
        times = {name: [] for name in trainers}
        for _ in range(args.repeats):
            for name, trainer in trainers.items():
                start = time.perf_counter()
                trainer.fit(train_steps=trainer.current_step + args.steps,
                            steps_per_loop=args.steps)
                times[name].append((time.perf_counter() - start) / args.steps * 1e6)
        medians = {name: statistics.median(values) for name, values in times.items()}
        print(f"seed {model}: " + ", ".join(f"{name} {value:.1f} µs/step"
                                            for name, value in medians.items())
              + f"; ratio {medians['listening'] / medians['not listening']:.3f}")


if __name__ == "__main__":
    main()
