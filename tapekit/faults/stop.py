"""Stopping a run on request: SIGTERM (what schedulers send before preemption) and Ctrl-C.

`StopSignals` (the outer loop holds it for a `fit`) turns a signal into a request; the
engine's `StopFlag` carries the request into the running compiled loop, which ends at its
next step; the outer loop then saves a checkpoint and returns (`Controller.train`). Eager.
"""

import contextlib
import contextvars
import os
import signal
import sys
import threading
from typing import Callable, Optional

from absl import logging

# What a second Ctrl-C does: raise KeyboardInterrupt once Python runs again (the default,
# for notebooks and scripts), or kill the process at once, even inside a long TensorFlow
# call (inside `second_interrupt_kills()`, as the command line runs).
_SECOND_INTERRUPT_KILLS: contextvars.ContextVar = contextvars.ContextVar(
    "tapekit_second_interrupt_kills", default=False)


@contextlib.contextmanager
def second_interrupt_kills():
    """Within it, a second Ctrl-C during `fit` ends the process at once (the command line)."""
    token = _SECOND_INTERRUPT_KILLS.set(True)
    try:
        yield
    finally:
        _SECOND_INTERRUPT_KILLS.reset(token)


class StopSignals:
    """Records SIGTERM (what schedulers send before preemption) and a first SIGINT (Ctrl-C)
    instead of dying at once; training stops at the next step and saves a checkpoint.

    Python runs a signal handler only between bytecodes, so not while a compiled loop runs:
    a watcher thread woken by the signal itself (`signal.set_wakeup_fd`) acknowledges it
    at once with a line, calls `on_stop` (the runner's `request_stop`: the loop ends at its
    next step) and, on a second Ctrl-C from the command line, ends the process at once.
    Installed only in the main thread (Python's rule); the previous handlers are put back.
    """

    def __init__(self, on_stop: Optional[Callable[[], None]] = None):
        self.terminated = False
        self.interrupted = False
        self._on_stop = on_stop or (lambda: None)
        self._kills = _SECOND_INTERRUPT_KILLS.get()  # read here: the watcher thread has its own
        self._previous = {}
        self._wakeup = None  # (read end, write end, the previous wakeup fd)
        self._watcher = None

    @property
    def stopping(self) -> bool:
        """A SIGTERM or a first Ctrl-C arrived."""
        return self.terminated or self.interrupted

    def _on_sigterm(self, signum, frame):
        self.terminated = True

    def _on_sigint(self, signum, frame):
        self.interrupted = True
        signal.signal(signal.SIGINT, signal.SIG_DFL if self._kills
                      else signal.default_int_handler)

    def _watch(self, read_end: int) -> None:
        try:
            self._relay(read_end)
        finally:
            os.close(read_end)  # here, not in __exit__: the thread may outlive its join

    def _relay(self, read_end: int) -> None:
        interrupts = 0
        while True:
            try:
                received = os.read(read_end, 64)
            except OSError:
                return
            if not received:  # the write end closed: training is over
                return
            for signum in received:
                if signum == signal.SIGTERM:
                    logging.warning("SIGTERM received: stopping at the next step, then saving "
                                    "a checkpoint")
                    self._on_stop()
                elif signum == signal.SIGINT:
                    interrupts += 1
                    if interrupts == 1:
                        logging.warning("Ctrl-C: stopping at the next step, then saving a "
                                        "checkpoint; press Ctrl-C again to abort at once")
                        self._on_stop()
                    elif self._kills:
                        sys.stderr.write("second Ctrl-C: aborted, nothing more saved\n")
                        sys.stderr.flush()
                        os._exit(130)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_sigterm)
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_sigint)
            read_end, write_end = os.pipe()
            os.set_blocking(write_end, False)
            previous = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
            self._wakeup = (write_end, previous)
            self._watcher = threading.Thread(target=self._watch, args=(read_end,),
                                             name="tapekit-signals", daemon=True)
            self._watcher.start()
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        if self._wakeup is not None:
            write_end, previous = self._wakeup
            signal.set_wakeup_fd(previous)
            os.close(write_end)  # the watcher reads the end of the pipe and closes its end
            self._watcher.join(timeout=5)
            self._wakeup = None


class StopFlag:
    """A stop request for the running compiled loop: set by the signal watcher
    (`StopSignals`), read by the loop once per step (`CompiledLoop.stop_flag`).
    None on several workers, which instead agree between loops (`Runner.any_worker`), as
    they must all stop at the same step."""

    def __init__(self, strategy):
        import tensorflow as tf

        from tapekit.run import distribute

        self.variable = None
        if not distribute.is_multi_worker(strategy):
            with tf.device("/CPU:0"):  # read by the loop's condition on the host, every step
                self.variable = tf.Variable(False, trainable=False, name="stop_requested")

    def request(self, requested: bool = True) -> None:
        if self.variable is not None:
            self.variable.assign(requested)

    def requested(self) -> bool:
        return self.variable is not None and bool(self.variable.numpy())
