"""`max_time`: a wall-time budget for one `fit`, which stops it cleanly with a checkpoint.

The budget counts from the `fit` call. It is used up when what is left of it is the
`reserve`, the time kept for the end of the run after the stop (the hooks' end, every
callback's `on_train_end` including the loggers' uploads, the final save and with
`--async_checkpoint` the wait for it):

    reserve = max(min(DEFAULT_RESERVE_SECS, budget / 10), longest save, last end)

where "longest save" is the longest `SaveCheckpoints` call measured in this `fit` and "last
end" is how long the end of the same trainer's previous `fit` in this process took
(`saw_end`; 0 before one ended). So a first 3 s budget keeps 0.3 s, a first 4 h budget
30 s; once an end took 45 s, that trainer's later budgets keep 45 s. When the end takes
longer than the reserve, the run overruns its budget by the difference and the log says so.

Once the budget is used up, a watcher thread asks the running compiled loop to stop at its
next step (`Runner.request_stop`, as SIGTERM does); the outer loop (`Controller.train`)
also checks between loops (a budget used up during an evaluation), every worker agreeing
(`Runner.any_worker`), skips the evaluation due (what is left of a batch slot is for the
checkpoint; the resumed run or `--mode=evaluate` evaluates later), records the stop in
run.json (`record_stop`, before the loggers' end uploads it), saves and returns normally.
Several workers have no stop flag (they must stop at the same step): the loop in progress
ends first, so there `steps_per_loop` times the step time adds to the overrun.
A new `fit` gets a fresh budget. Imports no TensorFlow.
"""

import datetime
import threading
import time
import weakref
from typing import Any, Callable, Dict, Optional

from absl import logging

# Kept for the end of the run until an end is measured (a tenth of a shorter budget).
DEFAULT_RESERVE_SECS = 30.0

# How long the end of each trainer's last `fit` took (`saw_end`), by its runner.
_last_end_secs: "weakref.WeakKeyDictionary[Any, float]" = weakref.WeakKeyDictionary()


class TimeBudget:
    """`seconds` of wall time from now (None: no budget). `watching` starts the watcher."""

    def __init__(self, seconds: Optional[float], now: Callable[[], float] = time.monotonic):
        self.seconds = seconds
        self._now = now
        self.started = now()
        self.expired = False
        self._longest_save = 0.0
        self.runner: Any = None  # whose last end counts in the reserve (`of`)
        self._wake = threading.Condition()
        self._watching = False

    @classmethod
    def of(cls, max_time, runner=None) -> "TimeBudget":
        """`max_time` as given to `Controller.train`: a `TimeBudget` (started at the `fit`
        call), seconds (starting now) or None; `runner`'s last end counts in its reserve."""
        budget = max_time if isinstance(max_time, TimeBudget) else cls(max_time)
        budget.runner = runner
        return budget

    @property
    def reserve(self) -> float:
        """The seconds kept for the end of the run (the final save among it)."""
        last_end = _last_end_secs.get(self.runner, 0.0) if self.runner is not None else 0.0
        return max(min(DEFAULT_RESERVE_SECS, self.seconds / 10), self._longest_save, last_end)

    def remaining(self) -> float:
        """Seconds until the budget, less the reserve, is used up (inf: no budget)."""
        if self.seconds is None:
            return float("inf")
        return self.started + self.seconds - self.reserve - self._now()

    def saw_save(self, seconds: float) -> None:
        """A checkpoint save (or the callback that may save) took `seconds`."""
        with self._wake:
            if seconds > self._longest_save:
                self._longest_save = seconds
                self._wake.notify()  # the deadline moved closer

    def saw_end(self, seconds: float, stopped: bool) -> None:
        """The end of a `fit` (everything after its last loop) took `seconds`: part of the
        reserve of the same runner's later budgets. `stopped`: this budget stopped the run,
        so an end longer than its reserve overran it (a warning)."""
        reserve = self.reserve if self.seconds is not None else 0.0
        if self.runner is not None:
            _last_end_secs[self.runner] = seconds
        if stopped and seconds > reserve:
            logging.warning("max_time: the end of the run (callbacks, final save) took %.1f s, "
                            "more than the %.1f s kept for it: the budget overran by about "
                            "%.1f s; this trainer's later fits keep %.1f s", seconds, reserve,
                            seconds - reserve, seconds)

    def check(self) -> bool:
        """Whether the budget is used up (says so in a line, once). Eager, any thread."""
        with self._wake:
            return self._check()

    def _check(self) -> bool:  # holding self._wake
        if self.expired or self.remaining() > 0:
            return self.expired
        self.expired = True
        logging.warning("max_time: %.1f s of the %.1f s budget used (%.1f s kept for the "
                        "end of the run): stopping at the next step, then saving a checkpoint",
                        self._now() - self.started, self.seconds, self.reserve)
        return True

    def watching(self, on_stop: Callable[[], None]):
        """A context within which a thread calls `on_stop` once the budget is used up; on
        exit the thread is gone, so it never stops a later `fit`."""
        return _Watcher(self, on_stop)

    def _watch(self, on_stop: Callable[[], None]) -> None:
        with self._wake:  # held while stopping: the context's exit waits for it, then none comes
            while self._watching and self.remaining() > 0:
                self._wake.wait(self.remaining())
            if self._watching and self._check():
                on_stop()

    def stop_record(self, step: int) -> Dict[str, Any]:
        """run.json's entry for a stop at `step` (`Runner.record_stop`)."""
        return {"reason": "max_time", "step": int(step), "budget_secs": self.seconds,
                "used_secs": round(self._now() - self.started, 3),
                "reserve_secs": round(self.reserve, 3),
                "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


class _Watcher:
    def __init__(self, budget: TimeBudget, on_stop: Callable[[], None]):
        self.budget = budget
        self.on_stop = on_stop
        self.thread = None

    def __enter__(self):
        if self.budget.seconds is not None:
            self.budget._watching = True
            self.thread = threading.Thread(target=self.budget._watch, args=(self.on_stop,),
                                           name="tapekit-max-time", daemon=True)
            self.thread.start()
        return self.budget

    def __exit__(self, *exc):
        if self.thread is not None:
            with self.budget._wake:
                self.budget._watching = False
                self.budget._wake.notify()
            self.thread.join()


def record_stop(model_dir: Optional[str], entry: Dict[str, Any]) -> None:
    """Appends `entry` to run.json's `stopped` list (None: no model_dir, nothing written)."""
    if not model_dir:
        return
    from tapekit.checkpoint import record

    written = record.read(model_dir) or {}
    written["stopped"] = list(written.get("stopped", [])) + [entry]
    record.write(model_dir, written)
