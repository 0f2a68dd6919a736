"""Slow instances: how often one instance of a compiled loop runs much slower than its twins.

    .venv/bin/python benchmarks/instances.py [--workload "seed MLP"] [--instances 6] [--repeats 5]

On this 2-core machine an instance of a compiled training loop sometimes runs about 1.7×
slower than another instance of the same loop, and stays so over every repeat. This builds
`--instances` instances of each way of building the loop below, on the same workload and
`tf.data` pipeline as `bench.py`, measures them interleaved (marginal µs per step, 100 steps
per call) and counts, per way, the instances whose median is over SLOW × the median of all
instances.

  autograph   the hand-written loop (AutoGraph's `for ... in tf.range`), called through tf.function
  concrete    the same loop, called through its concrete function
  while       an explicit tf.while_loop (autograph=False), called through tf.function
  whilemax    the same with maximum_iterations (what AutoGraph's loop sets)
  tapekit     tapekit's trainer (explicit tf.while_loop, concrete function call)
"""

import argparse
import os
import statistics
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
from absl import logging  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

SLOW = 1.4


def hand_loop(work, kind):
    step = work.step_fn(*work.fresh())
    iterator = iter(bench.pipeline(work))
    if kind in ("while", "whilemax"):
        @tf.function(autograph=False)
        def loop(iterator, steps):
            def body(i, loss):
                return i + 1, step(*next(iterator))
            extra = {"maximum_iterations": tf.cast(steps, tf.int32)} if kind == "whilemax" else {}
            return tf.while_loop(lambda i, _: i < steps, body,
                                 (tf.constant(0, tf.int64), tf.constant(0.0)), **extra)[1]
    else:
        loop = bench.in_graph_loop(step)
    if kind == "concrete":
        concrete = loop.get_concrete_function(iterator, tf.constant(1, tf.int64))
        call = lambda steps: concrete(iterator, tf.constant(steps, tf.int64))  # noqa: E731
    else:
        call = lambda steps: loop(iterator, tf.constant(steps, tf.int64))  # noqa: E731

    def run(steps):
        for calls in bench.per_call(steps):
            float(call(calls))
    return run


KINDS = ("autograph", "concrete", "while", "whilemax", "tapekit")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="seed MLP")
    parser.add_argument("--instances", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", default="1000,4000", help="short,long steps per measurement")
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated, of: "
                        + ", ".join(KINDS))
    args = parser.parse_args(argv)
    logging.set_verbosity(logging.ERROR)
    work = next(w for w in bench.workloads(quick=True) if w.name.startswith(args.workload))
    short, long = (int(s) for s in args.steps.split(","))
    kinds = [k.strip() for k in args.kinds.split(",")]
    runs = {}
    for i in range(args.instances):
        for kind in kinds:
            runs[(kind, i)] = bench.tapekit_data(work) if kind == "tapekit" else hand_loop(work, kind)
            runs[(kind, i)](short)  # warm-up
    samples = {key: [] for key in runs}
    for _ in range(args.repeats):
        for key, run in runs.items():  # interleaved
            samples[key].append(bench.marginal_us(run, short, long))
    medians = {key: statistics.median(values) for key, values in samples.items()}
    typical = statistics.median(medians.values())
    if typical <= 0:
        print(f"{work.name}: the median marginal cost is {typical:.1f} µs, not a cost; use more "
              "steps (--steps)")
        return 1
    print(f"{work.name}: median of all instances {typical:.1f} µs per step; slow: > {SLOW} × that")
    for kind in kinds:
        mine = [medians[(kind, i)] for i in range(args.instances)]
        slow = sum(m > SLOW * typical for m in mine)
        print(f"  {kind:10s} {slow} of {len(mine)} slow   " + " ".join(f"{m:7.1f}" for m in mine))
    return 0


if __name__ == "__main__":
    sys.exit(main())
