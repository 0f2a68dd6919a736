"""XLA against no XLA, on 1 and 2 CPU replicas: the seed MLP and the ResNet-20 workload.

    .venv/bin/python benchmarks/xla_replicas.py [--repeats 3] [--json benchmarks/results.json]

Each configuration trains in a fresh process (the replica count splits the CPU before
TensorFlow starts), tapekit on the tf.data pipeline of `benchmarks/bench.py`'s workload;
its marginal cost per step (time for `long` steps minus `short` steps, over the difference)
is measured `--repeats` times after a warm-up, the median reported. On 2 replicas
`--jit_compile` compiles each replica's forward and backward pass (`tapekit/compiled/xla.py`); on 1,
the whole step. A noisy 2-core machine: compare within one run.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report_rows  # noqa: E402  (benchmarks/report_rows.py)

WORKLOADS = {"seed MLP": (1000, 4000), "ResNet-20": (3, 9)}  # (short, long) steps


def _worker(workload: str, replicas: int, jit: bool, repeats: int) -> float:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import bench  # noqa: E402  (benchmarks/bench.py)
    from absl import logging
    logging.set_verbosity(logging.ERROR)
    work = next(w for w in bench.workloads(quick=False) if w.name.startswith(workload))
    options = {"jit_compile": jit}
    if replicas > 1:
        options.update(strategy="mirrored", cpu_replicas=replicas)
    trainer = bench._BenchTrainer(work, progress="none", **options)
    short, long = WORKLOADS[workload]

    def run(steps):
        trainer.fit(train_steps=trainer.current_step + steps, steps_per_loop=100)
    run(short)
    return statistics.median(bench.marginal_us(run, short, long) for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="also put the rows into this bench report")
    parser.add_argument("--worker", nargs=3, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        workload, replicas, jit = args.worker
        print(json.dumps(_worker(workload, int(replicas), jit == "1", args.repeats)))
        return
    rows = []
    for workload in WORKLOADS:
        for replicas in (1, 2):
            figures = {}
            for jit in (False, True):
                output = subprocess.run(
                    [sys.executable, os.path.abspath(__file__), "--repeats", str(args.repeats),
                     "--worker", workload, str(replicas), "1" if jit else "0"],
                    check=True, capture_output=True, text=True).stdout
                figures[jit] = json.loads(output.strip().splitlines()[-1])
            rows.append({"workload": workload, "replicas": replicas, "us_plain": figures[False],
                         "us_xla": figures[True], "ratio": figures[True] / figures[False]})
            print(f"{workload}, {replicas} replica(s): no XLA {figures[False]:.1f} µs/step, XLA "
                  f"{figures[True]:.1f} µs/step; XLA / no XLA {figures[True] / figures[False]:.2f}",
                  flush=True)
    if args.json:
        report_rows.put(args.json, "xla_replicas", rows)


if __name__ == "__main__":
    main()
