"""How long a checkpoint save blocks training, synchronous against `--async_checkpoint`.

    .venv/bin/python benchmarks/checkpoint_stall.py [--sizes 10,100,300] [--saves 5] [--json benchmarks/results.json]

For each state size (a Dense net under Adam, `tests/resumable.py`'s `Big`: weights and two
slots), one trainer per mode in one process; each save is timed where the training loop
waits for it (`Checkpointer.save`, called between loops), then, for async, how long its
write goes on in the background (`Checkpointer.wait`, which the next save, a restore or
the end of fit would wait for). Medians over `--saves` saves after one warm-up save; the
checkpoints go to a temporary directory on the disk of $TMPDIR. A noisy 2-core machine:
compare within one run.
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

from resumable import Big  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report_rows  # noqa: E402  (benchmarks/report_rows.py)


def _measure(megabytes: int, async_save: bool, saves: int, directory: str):
    trainer = Big(megabytes=megabytes, model_dir=directory, progress="none",
                  async_checkpoint=async_save, checkpoint_every_secs=0)
    trainer.fit(train_steps=1, steps_per_loop=1)  # builds; its final save is the warm-up
    checkpointer = trainer._engine.checkpointer
    stalls, writes = [], []
    for number in range(saves):
        trainer.fit(train_steps=trainer.current_step + 1, steps_per_loop=1)  # (saves at its end)
        start = time.perf_counter()
        checkpointer.save(10_000 + number)
        middle = time.perf_counter()
        checkpointer.wait()
        end = time.perf_counter()
        stalls.append(middle - start)
        writes.append(end - middle)
    return statistics.median(stalls), statistics.median(writes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100,300")
    parser.add_argument("--saves", type=int, default=5)
    parser.add_argument("--json", default=None,
                        help="also put the rows into this bench report (checkpoint_stall)")
    args = parser.parse_args()
    rows = []
    for megabytes in [int(size) for size in args.sizes.split(",")]:
        results = {}
        for async_save in (False, True):
            directory = tempfile.mkdtemp(prefix="tapekit-stall-")
            try:
                results[async_save] = _measure(megabytes, async_save, args.saves, directory)
            finally:
                shutil.rmtree(directory, ignore_errors=True)
        sync_stall = results[False][0]
        async_stall, async_write = results[True]
        print(f"state {megabytes} MB: stall per save sync {sync_stall * 1e3:.0f} ms, async "
              f"{async_stall * 1e3:.0f} ms (then {async_write * 1e3:.0f} ms written in the "
              f"background); {sync_stall / max(async_stall, 1e-9):.1f}x less", flush=True)
        rows.append({"megabytes": megabytes, "sync_ms": sync_stall * 1e3,
                     "async_ms": async_stall * 1e3, "background_ms": async_write * 1e3})
    if args.json:
        report_rows.put(args.json, "checkpoint_stall", rows)


if __name__ == "__main__":
    main()
