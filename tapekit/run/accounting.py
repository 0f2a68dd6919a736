"""Where a loop's wall time and memory went: the row `Callback.on_loop_stats` gets.

`LoopClock` (the outer loop holds one per `fit`) splits the wall time from one loop's start
to the next's into the parts the outer loop can time on the host: `time/train_secs` (the
compiled loop call, which includes any waiting for tf.data inside the graph: only the
profiler, `--profile_steps`, can tell that apart), `time/eval_secs`, `time/checkpoint_secs`
(the `SaveCheckpoints` callback, the save at the end included), `time/callbacks_secs` (every
other callback), `time/input_wait_secs` (present only when the host read input outside the
compiled loop: batches of skipped steps) and `time/other_secs` (the rest: fault hooks,
votes between workers); `time/loop_secs` is their sum. `host_memory` reads the process's
memory; `device_memory` what TensorFlow reports per GPU (never a CPU). Imports no
TensorFlow but in `device_memory`, which the engine calls.
"""

import contextlib
import os
import sys
import time
from typing import Callable, Dict, Iterable, Optional

PARTS = ("train", "eval", "checkpoint", "callbacks", "input_wait")


class LoopClock:
    """Adds up the seconds of each part since `restart`; `stats` makes the row."""

    def __init__(self, now: Callable[[], float] = time.perf_counter):
        self._now = now
        self._started: Optional[float] = None
        self._seconds = dict.fromkeys(PARTS, 0.0)
        self._input_read = False  # whether `input_wait` was measured since the restart

    @property
    def running(self) -> bool:
        return self._started is not None

    def restart(self) -> None:
        self._started = self._now()
        self._seconds = dict.fromkeys(PARTS, 0.0)
        self._input_read = False

    @contextlib.contextmanager
    def timing(self, part: str):
        """Counts the block's seconds in `part` (one of `PARTS`); yields a dict whose
        "seconds" holds them once the block ends."""
        timed = {"seconds": 0.0}
        start = self._now()
        try:
            yield timed
        finally:
            timed["seconds"] = self._now() - start
            self._seconds[part] += timed["seconds"]
            self._input_read = self._input_read or part == "input_wait"

    def stats(self) -> Dict[str, float]:
        """`time/<part>_secs` for each part, `time/other_secs` and `time/loop_secs` (all
        seconds since `restart`, so that the parts add up to it)."""
        loop = self._now() - self._started
        parts = {part: seconds for part, seconds in self._seconds.items()
                 if part != "input_wait" or self._input_read}
        result = {f"time/{part}_secs": seconds for part, seconds in parts.items()}
        result["time/other_secs"] = max(0.0, loop - sum(parts.values()))
        result["time/loop_secs"] = max(loop, sum(parts.values()))
        return result


def host_memory() -> Dict[str, int]:
    """`memory/host_rss_bytes` (the process's resident memory now) and
    `memory/host_peak_rss_bytes` (its peak since it started), each where the system says."""
    result: Dict[str, int] = {}
    try:
        with open("/proc/self/statm") as statm:  # Linux: pages; the second field is resident
            result["memory/host_rss_bytes"] = int(statm.read().split()[1]) * os.sysconf(
                "SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:  # Windows
        return result
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = int(peak if sys.platform == "darwin" else peak * 1024)
    # Linux updates its high-water mark lazily: the peak is never below the current.
    result["memory/host_peak_rss_bytes"] = max(peak, result.get("memory/host_rss_bytes", 0))
    return result


def device_memory(devices: Optional[Iterable[str]] = None) -> Dict[str, int]:
    """`memory/<device>/current_bytes` and `peak_bytes` (the peak since the process started:
    never reset, so that another reader's numbers stay whole) for each device TensorFlow
    reports memory for: its GPUs (None: every logical GPU). CPUs are skipped (TensorFlow
    reports nothing useful for them). Eager."""
    import tensorflow as tf

    if devices is None:
        devices = [device.name for device in tf.config.list_logical_devices("GPU")]
    result: Dict[str, int] = {}
    for device in devices:
        name = device.split("device:")[-1].lstrip("/")  # "/device:GPU:0" -> "GPU:0"
        if name.upper().startswith("CPU"):
            continue
        try:
            info = tf.config.experimental.get_memory_info(name)
        except (ValueError, RuntimeError, tf.errors.OpError):  # not reported for this device
            continue
        result.update(memory_keys(name, info))
    return result


def memory_keys(device: str, info: Dict[str, int]) -> Dict[str, int]:
    """The row's keys for `tf.config.experimental.get_memory_info(device)`'s `info`:
    "GPU:0" becomes `memory/GPU_0/current_bytes` and `memory/GPU_0/peak_bytes` (a summary
    name has no ":")."""
    name = device.replace(":", "_")
    return {f"memory/{name}/current_bytes": int(info["current"]),
            f"memory/{name}/peak_bytes": int(info["peak"])}
