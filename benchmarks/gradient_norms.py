"""What `--log_gradient_norms` costs a step: the seed MLP and ResNet-20, with it on and off.

    .venv/bin/python benchmarks/gradient_norms.py [--repeats 7] [--replicas 1] [--quick]

Two workloads, each trained by two trainers built alike, one with `log_gradient_norms=True`:

* the seed MLP: `tapekit.trainers.RegressionTrainer(model="mlp")` (5 → 10 sigmoid → 1, Adam,
  batch 100, its in-memory path);
* ResNet-20 (`bench.resnet20`: CIFAR-style, 3 stages × 3 basic blocks, 16/32/64 filters,
  ~0.27M parameters) under SGD with momentum, on 512 seeded synthetic 32×32×3 images held
  in memory, batch 128 (`--quick`: 32).

Each figure is the time of one loop of `steps` steps over their number (a loop call costs
a fraction of a step of either), after a warm-up of two loops; on and off are measured in turn
(which goes first alternating), `--repeats` times. Prints, for each, the median µs per step
of wall time and of the process's CPU time (all threads: less moved by other processes on a
shared machine than the wall time), the medians of the repeats' ratios on/off, and the ops
the option adds to the compiled loop (its graph and the functions it calls). A noisy 2-core
machine: compare within one run.
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

    rng = np.random.default_rng(0)
    arrays = (rng.standard_normal((512, 32, 32, 3)).astype(np.float32),
              rng.integers(0, 10, (512,)).astype(np.int32))

    class ResNet20(tapekit.Trainer):
        """ResNet-20 on seeded synthetic CIFAR-sized images, in memory."""

        def build(self):
            self.model = bench.resnet20()
            self.optimizer = keras.optimizers.SGD(0.1, momentum=0.9)

        def train_arrays(self):
            return arrays  # the same arrays every call: kept on the devices, loop traced once

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
        for _ in range(2):  # warm-up: build, trace, first loops
            for trainer in trainers.values():
                _step_us(trainer, steps)
        samples = {False: [], True: []}
        for repeat in range(args.repeats):
            for on in ((False, True) if repeat % 2 == 0 else (True, False)):
                samples[on].append(_step_us(trainers[on], steps))
        ops = {on: _op_count(trainer) for on, trainer in trainers.items()}
        print(f"{name}: the option adds {ops[True] - ops[False]} ops to the loop's "
              f"{ops[False]}", flush=True)
        for clock, index in (("wall", 0), ("CPU", 1)):
            off = [sample[index] for sample in samples[False]]
            on = [sample[index] for sample in samples[True]]
            ratios = [b / a for a, b in zip(off, on)]
            print(f"  {clock:4s} µs/step: off {statistics.median(off):10.1f}  on "
                  f"{statistics.median(on):10.1f}  on/off {statistics.median(ratios):.3f} "
                  f"(repeats {min(ratios):.3f}–{max(ratios):.3f})", flush=True)
        assert "grad_norm" in trainers[True].history[-1]


def _step_us(trainer, steps):
    """(wall, CPU) µs per step of one loop of `steps` steps."""
    wall, cpu = time.perf_counter(), time.process_time()
    trainer.fit(train_steps=trainer.current_step + steps, steps_per_loop=steps)
    return ((time.perf_counter() - wall) / steps * 1e6,
            (time.process_time() - cpu) / steps * 1e6)


def _op_count(trainer) -> int:
    """The ops of the trainer's compiled training loop, with the functions it calls."""
    graph_def = trainer._engine.train_loop._concrete[1].graph.as_graph_def()
    return len(graph_def.node) + sum(len(f.node_def) for f in graph_def.library.function)


if __name__ == "__main__":
    main()
