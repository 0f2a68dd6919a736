"""What a person watching the run sees: a log line per loop, or a progress bar."""

import sys

from absl import logging

from tapekit.callbacks.base import Callback, format_logs


class LogProgress(Callback):
    """One absl log line per loop: step, metrics and speed (what a batch job's log shows)."""

    def __init__(self, train_steps: int):
        self.train_steps = train_steps

    def on_loop_end(self, step, logs):
        if self.train_steps is None:  # by epochs: the length of a pass may be unknown
            logging.info("step %d: %s", step, format_logs(logs))
        else:
            logging.info("step %d/%d: %s", step, self.train_steps, format_logs(logs))

    def on_eval_end(self, step, logs):
        logging.info("eval at step %d: %s", step, format_logs(logs))


def in_notebook() -> bool:
    """True inside a Jupyter kernel (Jupyter, JupyterLab, VS Code, Colab): IPython's shell is
    ipykernel's ZMQ shell. A terminal IPython, or a batch job that merely imported ipykernel,
    is not one. Imports nothing: a kernel has loaded both modules already."""
    zmqshell = sys.modules.get("ipykernel.zmqshell")
    if zmqshell is None:
        return False
    from IPython import get_ipython  # loaded: ipykernel.zmqshell imports it
    return isinstance(get_ipython(), zmqshell.ZMQInteractiveShell)


class ProgressBar(Callback):
    """A Keras `Progbar` on stdout: steps done, ETA, steps/s and the loop's metrics.

    Redrawn in place (a carriage return before each update) on a terminal and in a notebook
    cell: Keras draws in place when stdout is a terminal, ipykernel is loaded (a notebook) or
    the platform is POSIX (checked on Keras 3.10 and 3.15), and Jupyter renders the carriage
    return as a redraw of the line (`tests/test_notebook.py` checks this in a real kernel).
    """

    def __init__(self, train_steps: int):
        self.train_steps = train_steps
        self.bar = None
        self.line_open = False  # the bar's line has no newline yet

    def on_train_begin(self, step):
        import keras  # only where a bar is shown
        self.bar = keras.utils.Progbar(self.train_steps, unit_name="step")
        self.bar.update(step)
        self.line_open = True

    def on_loop_end(self, step, logs):
        shown = [(name, value) for name, value in logs.items() if name != "examples_per_sec"]
        self.bar.update(step, values=shown, finalize=False)
        self.line_open = True

    def on_eval_end(self, step, logs):
        import keras
        if self.bar is not None and self.line_open:  # drawn at this step, then its line ends
            self.bar.update(step, finalize=True)
            self.line_open = False
        line = f"eval at step {step}: {format_logs(logs)}"
        if keras.config.is_interactive_logging_enabled():  # where the bar is: stdout
            # a notebook shows no absl INFO line, and on a terminal stderr would tear the bar
            print(line, flush=True)
        else:
            logging.info("%s", line)

    def on_train_end(self, step, logs):
        if self.bar is not None and self.line_open:  # not when an evaluation ended the line
            self.bar.update(step, finalize=True)
