"""`--profile_steps=START,END`: a TensorBoard profiler trace of those global steps, each step
marked, and its analysis (`tapekit.run.profile_analysis`) in the log and to the callbacks.

One worker records into MODEL_DIR/profile; with several, each into
MODEL_DIR/profile/worker_<task index> (`worker_profile_dir`; chief_0 for a chief task), so that
none reads another's capture."""

import contextlib
import functools
import os
from typing import Callable, Dict, Optional, Tuple

from absl import logging

from tapekit.run import profile_analysis
from tapekit.run.hooks import LoopHook

Report = Callable[[int, Dict[str, object]], None]


class Profiler(LoopHook):
    """Records a TensorBoard profiler trace of global steps START..END (inclusive) into
    `logdir`, then analyses it and hands the analysis to `report(END, analysis)` (the
    controller's `on_profile` callbacks). Runs on every worker; eager.

    Profiling starts and stops between loops. Inside the window each compiled-loop call runs
    one step, with no in-graph loop (`tapekit.compiled.loop.one_step_per_call`), and that
    call alone (not the callbacks around it) inside a step marker
    (`tf.profiler.experimental.Trace("train", step_num=STEP, _r=1)`): what TensorBoard's
    Profile tab and xprof group a step's ops by. So does step START - 1, not
    recorded, so that the one-step function is traced before the first marked step (a run
    resumed inside the window runs one such step first, and records from the next). Outside
    that, loops keep their length, cut to end at START - 2 and at END. Imports TensorFlow
    only when it starts. An analysis that fails is a warning: it never stops training.

    A capture that reaches END is analysed at once. One that `fit` ends (`end`) is stopped
    and left for `finish`: the controller analyses it after the final save on a normal end,
    and on a stop (a signal, `max_time`, an exception) only says where the trace is.
    """

    def __init__(self, steps: Tuple[int, int], logdir: str, report: Optional[Report] = None):
        self.start, self.end_step = steps
        self.logdir = logdir
        self.report = report
        self.active = False
        self._marker = None  # `one_step_per_call` for the next call, entered
        self._runs_before: set = set()  # the trace folders there before this capture
        self._first = self._last = 0  # the steps captured
        self._warmed = False  # a one-step call ran in this fit (the function is traced)
        self._unanalysed = False  # a capture `end` stopped, for `finish`

    def _in_window(self, step: int) -> bool:
        """Whether the step after `step` is one of START..END."""
        return self.start - 1 <= step < self.end_step

    def loop_length(self, step: int, num_steps: int) -> int:
        if step < self.start - 2:
            return min(num_steps, self.start - 2 - step)
        return 1 if step < self.end_step else num_steps

    def before_loop(self, step: int) -> None:
        self._close_marker()  # left open when a hook before this one undid the last loop
        if self.active and not self._in_window(step):
            self._stop()
        if not self.start - 2 <= step < self.end_step:
            return
        import tensorflow as tf

        from tapekit.compiled import loop
        marker = contextlib.nullcontext  # START - 1: traces the one-step function, unrecorded
        if self._in_window(step) and (self._warmed or self.active):
            if not self.active:
                self._runs_before = set(_runs(self.logdir))
                tf.profiler.experimental.start(self.logdir)
                self.active, self._first = True, step + 1
                logging.info("profiling steps %d to %d into %s", step + 1, self.end_step,
                             self.logdir)
            marker = functools.partial(tf.profiler.experimental.Trace, "train",
                                       step_num=step + 1, _r=1)
        self._marker = loop.one_step_per_call(marker)
        self._marker.__enter__()
        self._warmed = True

    def after_loop(self, step, result, full):
        self._close_marker()
        if self.active:
            self._last = step
            if step >= self.end_step:
                self._stop()
        return None

    def end(self) -> None:
        """Stops a capture in progress (the trace is written) and leaves it for `finish`."""
        self._close_marker()
        if self.active:
            self._stop(analyse=False)

    def finish(self, analyse: bool) -> None:
        """The capture `end` stopped: analysed (`analyse`), else its folder in the log."""
        if not self._unanalysed:
            return
        self._unanalysed = False
        if analyse:
            self._analyse()
            return
        logging.info("profile of steps %d-%d is in %s, not analysed (training stopped early); "
                     "TensorBoard's Profile tab or tapekit.run.profile_analysis reads it",
                     self._first, max(self._last, self._first), self.logdir)

    def _close_marker(self) -> None:
        if self._marker is not None:
            marker, self._marker = self._marker, None
            marker.__exit__(None, None, None)

    def _stop(self, analyse: bool = True) -> None:
        import tensorflow as tf
        tf.profiler.experimental.stop()
        self.active = False
        if analyse:
            self._analyse()
        else:
            self._unanalysed = True

    def _analyse(self) -> None:
        first, last = self._first, max(self._last, self._first)
        try:
            traces = _new_traces(self.logdir, self._runs_before)
        except FileNotFoundError as error:
            logging.warning("profile of steps %d-%d: %s", first, last, error)
            return
        try:
            analysis = profile_analysis.analyse(traces)
        except profile_analysis.XprofMissing:
            logging.info("profile of steps %d-%d is in %s (TensorBoard's Profile tab opens it); "
                         "%s", first, last, self.logdir, profile_analysis.INSTALL_HINT)
            return
        except Exception as error:  # the analysis is a bonus: training goes on
            logging.warning("profile of steps %d-%d in %s could not be analysed: %s: %s",
                            first, last, self.logdir, type(error).__name__, error)
            return
        logging.info("%s", profile_analysis.describe(first, last, analysis))
        if self.report is not None:
            try:
                self.report(last, analysis)
            except Exception as error:
                logging.warning("recording the profile of steps %d-%d failed: %s: %s", first,
                                last, type(error).__name__, error)


def _runs(logdir: str):
    """The trace folders (one per capture) under `logdir`: logdir/plugins/profile/<time>."""
    import tensorflow as tf
    folder = os.path.join(logdir, "plugins", "profile")
    return [os.path.join(folder, name.rstrip("/")) for name in tf.io.gfile.listdir(folder)] \
        if tf.io.gfile.isdir(folder) else []


def _new_traces(logdir: str, runs_before: set):
    """The .xplane.pb files of the newest trace folder this capture made; raises
    FileNotFoundError when it made none (an older capture is never read instead)."""
    import tensorflow as tf
    new = sorted(set(_runs(logdir)) - runs_before)
    traces = tf.io.gfile.glob(os.path.join(new[-1], "*.xplane.pb")) if new else []
    if not traces:
        raise FileNotFoundError(f"no trace was written under {logdir}")
    return traces


def worker_profile_dir(model_dir: Optional[str], strategy) -> Optional[str]:
    """Where `strategy`'s worker records: MODEL_DIR/profile, or with several workers
    MODEL_DIR/profile/<task type>_<task index> (worker_1; chief_0 for a chief task) (None: no
    model_dir)."""
    if not model_dir:
        return None
    from tapekit.run import distribute
    if distribute.num_workers(strategy) > 1:
        task_type = strategy.cluster_resolver.task_type or "worker"
        return os.path.join(model_dir, "profile", f"{task_type}_{distribute.task_id(strategy)}")
    return os.path.join(model_dir, "profile")
