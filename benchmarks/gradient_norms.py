"""What `--log_gradient_norms` costs a step: the seed MLP and ResNet-20, with it on and off.

    .venv/bin/python benchmarks/gradient_norms.py [--repeats 7] [--replicas 1] [--quick]

Two workloads, each trained by two trainers built alike, one with `log_gradient_norms=True`:

* the seed MLP: `tapekit.trainers.RegressionTrainer(model="mlp")` (5 → 10 sigmoid → 1, Adam,
  batch 100, its in-memory path);
* ResNet-20 (`bench.resnet20`: CIFAR-style, 3 stages × 3 basic blocks, 16/32/64 filters,
  ~0.27M parameters) under SGD with momentum, on 512 seeded synthetic 32×32×3 images held
  in memory, batch 128 (`--quick`: 32).

Each figure is the time of one loop of `steps` steps over their number (a loop call costs
a fraction of a step of either), after a warm-up loop; on and off are measured in turn
(which goes first alternating), `--repeats` times. Prints the median µs per step of each and
the median of the repeats' ratios on/off. A noisy 2-core machine: compare within one run.
"""

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--replicas", type=int, default=1, help="CPU replicas (mirrored)")
    parser.add_argument("--quick", action="store_true", help="fewer steps, ResNet batch 32")
    args = parser.parse_args()
    from tapekit.run import distribute
    if args.replicas > 1:  # before TensorFlow starts its devices
        distribute.split_cpu(args.replicas)

    import bench  # noqa: E402  (benchmarks/bench.py: its ResNet-20)
    import keras
    import numpy as np
    import tensorflow as tf
    from absl import logging

    import tapekit
    from tapekit.trainers import RegressionTrainer
    logging.set_verbosity(logging.ERROR)

    class ResNet20(tapekit.Trainer):
        """ResNet-20 on seeded synthetic CIFAR-sized images, in memory."""

        def build(self):
            self.model = bench.resnet20()
            self.optimizer = keras.optimizers.SGD(0.1, momentum=0.9)

        def train_arrays(self):
            rng = np.random.default_rng(0)
            images = rng.standard_normal((512, 32, 32, 3)).astype(np.float32)
            return images, rng.integers(0, 10, (512,)).astype(np.int32)

        def train_step(self, batch):
            images, labels = batch
            with tf.GradientTape() as tape:
                logits = self.model(images, training=True)
                loss = self.compute_loss(keras.losses.sparse_categorical_crossentropy(
                    labels, logits, from_logits=True))
            self.apply_gradients(tape, loss, self.model, self.optimizer)
            return {"loss": loss}

    options = {"progress": "none"}
    if args.replicas > 1:
        options.update(strategy="mirrored", cpu_replicas=args.replicas)
    resnet_batch = 32 if args.quick else 128
    workloads = {  # name: (make a trainer, steps per measured loop)
        "seed MLP (Adam, batch 100)": (
            lambda **kw: RegressionTrainer(model="mlp", **kw), 500 if args.quick else 2000),
        f"ResNet-20 (SGD+momentum, batch {resnet_batch})": (
            lambda **kw: ResNet20(global_batch_size=resnet_batch, **kw), 4 if args.quick else 8),
    }
    print(f"{args.replicas} replica(s), {args.repeats} repeats; µs per step (median)", flush=True)
    for name, (make, steps) in workloads.items():
        trainers = {on: make(log_gradient_norms=on, **options) for on in (False, True)}
        for trainer in trainers.values():
            _step_us(trainer, steps)  # warm-up: build, trace, first loop
        samples = {False: [], True: []}
        for repeat in range(args.repeats):
            for on in ((False, True) if repeat % 2 == 0 else (True, False)):
                samples[on].append(_step_us(trainers[on], steps))
        ratios = [on / off for off, on in zip(samples[False], samples[True])]
        off, on = statistics.median(samples[False]), statistics.median(samples[True])
        print(f"{name:42s} off {off:9.1f}  on {on:9.1f}  on/off {statistics.median(ratios):.3f} "
              f"(repeats' ratios {min(ratios):.3f}–{max(ratios):.3f})", flush=True)
        assert "grad_norm" in trainers[True].history[-1]


def _step_us(trainer, steps) -> float:
    """µs per step of one loop of `steps` steps."""
    start = time.perf_counter()
    trainer.fit(train_steps=trainer.current_step + steps, steps_per_loop=steps)
    return (time.perf_counter() - start) / steps * 1e6


if __name__ == "__main__":
    main()
