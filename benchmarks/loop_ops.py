"""What tapekit's compiled loop runs per step beyond the hand-written loop: op counts.

    .venv/bin/python benchmarks/loop_ops.py ["seed GAN"]

Timing on a shared 2-core machine moves by ±15% between runs and between two instances of
the same loop; the graphs do not. This traces, for one workload of `bench.py`, the body of
the in-graph training loop of (a) tapekit's trainer on the tf.data pipeline and (b) the
hand-written loop (`graph+data`), and counts the ops of each body (nested function bodies
included) by type, before TensorFlow's graph optimizations. The difference is all that
tapekit adds per step; every op both share is TensorFlow's work for the step itself.
"""

import collections
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
from absl import logging  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402


def body_ops(graph) -> collections.Counter:
    """Op counts of the bodies of the while loops in `graph`, nested functions included."""
    graph_def = graph.as_graph_def()
    library = {f.signature.name: f for f in graph_def.library.function}
    counts = collections.Counter()

    def visit(name):
        for node in library[name].node_def:
            counts[node.op] += 1
            for attr in ("body", "cond", "f", "then_branch", "else_branch"):
                if attr in node.attr and node.attr[attr].func.name in library:
                    visit(node.attr[attr].func.name)

    for node in graph_def.node:
        if node.op in ("While", "StatelessWhile"):
            visit(node.attr["body"].func.name)
    return counts


def tapekit_loop_graph(work):
    trainer = bench._BenchTrainer(work)
    trainer.fit(train_steps=2, steps_per_loop=2)
    return trainer._engine.train_loop._concrete[1].graph


def hand_loop_graph(work):
    loop = bench.in_graph_loop(work.step_fn(*work.fresh()))
    return loop.get_concrete_function(iter(bench.pipeline(work)), tf.constant(2)).graph


def main(argv):
    logging.set_verbosity(logging.ERROR)
    prefix = argv[1] if len(argv) > 1 else "seed GAN"
    work = next(w for w in bench.workloads(quick=True) if w.name.startswith(prefix))
    ours, hand = body_ops(tapekit_loop_graph(work)), body_ops(hand_loop_graph(work))
    print(f"{work.name}: ops in the loop body per step: tapekit {sum(ours.values())}, "
          f"hand-written {sum(hand.values())}")
    print(f"{'op':28s}{'tapekit':>9s}{'hand':>7s}")
    for op in sorted(set(ours) | set(hand), key=lambda op: (ours[op] - hand[op], op)):
        if ours[op] != hand[op]:
            print(f"{op:28s}{ours[op]:9d}{hand[op]:7d}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
