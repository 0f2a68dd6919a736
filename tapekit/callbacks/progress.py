"""What a person watching the run sees: a log line per loop, or a progress bar."""

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


class ProgressBar(Callback):
    """A Keras `Progbar` on the terminal: steps done, ETA, steps/s and the loop's metrics."""

    def __init__(self, train_steps: int):
        self.train_steps = train_steps
        self.bar = None

    def on_train_begin(self, step):
        import keras  # only where a bar is shown
        self.bar = keras.utils.Progbar(self.train_steps, unit_name="step")
        self.bar.update(step)

    def on_loop_end(self, step, logs):
        shown = [(name, value) for name, value in logs.items() if name != "examples_per_sec"]
        self.bar.update(step, values=shown, finalize=False)

    def on_eval_end(self, step, logs):
        logging.info("eval at step %d: %s", step, format_logs(logs))

    def on_train_end(self, step, logs):
        if self.bar is not None:
            self.bar.update(step, finalize=True)
