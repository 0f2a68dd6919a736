"""How long a checkpoint save stalls training, synchronous against `--async_checkpoint`.

    .venv/bin/python benchmarks/checkpoint_stall.py [--sizes 10,100,300] [--loops 6] [--repeats 3] \
        [--json benchmarks/results.json]

For each state size (a Dense net under Adam, `tests/resumable.py`'s `Big`: weights and two
slots), one trainer per mode in one process trains `--loops` loops of 5 steps: without
checkpoints (no model_dir), saving after every loop synchronously, and saving after every
loop with `--async_checkpoint`. The stall per save is (the run's time - the run without
saves) / saves: what training loses to a save, wherever it pays it (the save call, the
copy-on-write of variables the next steps update, the background writer's share of the
CPU). Also reported: how long the save call itself blocks. Medians over `--repeats`,
interleaved; checkpoints go to a temporary directory on the disk of $TMPDIR. A noisy
2-core machine: compare within one run.
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from absl import logging  # noqa: E402

from resumable import Big  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report_rows  # noqa: E402  (benchmarks/report_rows.py)

STEPS_PER_LOOP = 5
MODES = ("none", "sync", "async")


def _trainer(megabytes: int, mode: str, directory: str):
    if mode == "none":
        return Big(megabytes=megabytes, progress="none")
    trainer = Big(megabytes=megabytes, progress="none", model_dir=directory,
                  checkpoint_every_steps=STEPS_PER_LOOP, checkpoint_every_secs=0,
                  max_checkpoints_to_keep=2, async_checkpoint=mode == "async")
    calls = []
    checkpointer_save = None

    def timed_save(step):  # the time the save call blocks
        start = time.perf_counter()
        checkpointer_save(step)
        calls.append(time.perf_counter() - start)
    trainer.fit(train_steps=STEPS_PER_LOOP, steps_per_loop=STEPS_PER_LOOP)  # builds
    checkpointer = trainer._engine.checkpointer
    checkpointer_save = checkpointer.save
    checkpointer.save = timed_save
    trainer.save_calls = calls
    return trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100,300")
    parser.add_argument("--loops", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None,
                        help="also put the rows into this bench report (checkpoint_stall)")
    args = parser.parse_args()
    logging.set_verbosity(logging.ERROR)
    rows = []
    for megabytes in [int(size) for size in args.sizes.split(",")]:
        directory = tempfile.mkdtemp(prefix="tapekit-stall-")
        try:
            trainers = {mode: _trainer(megabytes, mode, os.path.join(directory, mode))
                        for mode in MODES}
            for trainer in trainers.values():  # warm-up: the loop traced, a first save
                trainer.fit(train_steps=trainer.current_step + STEPS_PER_LOOP,
                            steps_per_loop=STEPS_PER_LOOP)
            times = {mode: [] for mode in MODES}
            for _ in range(args.repeats):
                for mode, trainer in trainers.items():
                    start = time.perf_counter()
                    trainer.fit(train_steps=trainer.current_step + args.loops * STEPS_PER_LOOP,
                                steps_per_loop=STEPS_PER_LOOP)
                    times[mode].append(time.perf_counter() - start)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        base = statistics.median(times["none"])
        stall = {mode: (statistics.median(times[mode]) - base) / args.loops
                 for mode in ("sync", "async")}
        call = {mode: statistics.median(trainers[mode].save_calls) for mode in ("sync", "async")}
        print(f"state {megabytes} MB: training {base / args.loops * 1e3:.0f} ms per loop; stall "
              f"per save sync {stall['sync'] * 1e3:.0f} ms, async {stall['async'] * 1e3:.0f} ms "
              f"(the save call blocks {call['sync'] * 1e3:.0f} ms and "
              f"{call['async'] * 1e3:.0f} ms)", flush=True)
        rows.append({"megabytes": megabytes, "loop_ms": base / args.loops * 1e3,
                     "sync_ms": stall["sync"] * 1e3, "async_ms": stall["async"] * 1e3,
                     "sync_call_ms": call["sync"] * 1e3, "async_call_ms": call["async"] * 1e3})
    if args.json:
        report_rows.put(args.json, "checkpoint_stall", rows)


if __name__ == "__main__":
    main()
