"""Median per-step time of tapekit's compiled loop on the seed workloads (one process).

    python benchmarks/step_time.py [--repeats 7] [--steps 2000]

Prints µs/step per workload: the median over repeats of one loop of `--steps` steps,
after a warm-up loop. Used to check that a change does not slow the default path.
"""

import argparse
import statistics
import time

from tapekit.trainers import GANTrainer, RegressionTrainer


def median_step_us(trainer, steps, repeats):
    trainer.fit(train_steps=steps, steps_per_loop=steps)  # warm-up: trace and first loop
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        trainer.fit(train_steps=trainer.current_step + steps, steps_per_loop=steps)
        samples.append((time.perf_counter() - start) / steps * 1e6)
    return statistics.median(samples)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    workloads = {
        "seed linear (SGD, batch 100)": lambda: RegressionTrainer(model="linear"),
        "seed MLP (Adam, batch 100)": lambda: RegressionTrainer(model="mlp"),
        "seed GAN (2×Adam, batch 64)": lambda: GANTrainer(),
    }
    for name, make in workloads.items():
        print(f"{name:32s} {median_step_us(make(), args.steps, args.repeats):8.1f} µs/step", flush=True)


if __name__ == "__main__":
    main()
