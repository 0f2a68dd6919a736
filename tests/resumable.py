"""Trainers for the subprocess fault-tolerance tests: print final weights; can run slowly."""

import json
import time

from absl import flags

import tapekit
from tapekit.trainers import GANTrainer, RegressionTrainer


class _Sleep(tapekit.Callback):
    def __init__(self, seconds):
        self.seconds = seconds

    def on_loop_end(self, step, logs):
        time.sleep(self.seconds)


class _Reporting:
    """Mixin: --sleep_per_loop slows the run down so a test can kill it mid-way."""

    arguments_safe_to_change = ("sleep_per_loop",)  # a resumed run may sleep differently

    @classmethod
    def define_flags(cls):
        super().define_flags()
        flags.DEFINE_float("sleep_per_loop", 0.0, "Seconds to sleep after each loop.")

    def __init__(self, sleep_per_loop=0.0, **kwargs):
        self.sleep_per_loop = sleep_per_loop
        super().__init__(**kwargs)

    def fit(self, *args, callbacks=(), **kwargs):
        extra = [_Sleep(self.sleep_per_loop)] if self.sleep_per_loop else []
        return super().fit(*args, callbacks=list(callbacks) + extra, **kwargs)

    def results_summary(self):
        models = [self.gan] if hasattr(self, "gan") else [self.model]
        weights = [v.numpy().tolist() for m in models for v in m.trainable_variables]
        return "WEIGHTS " + json.dumps({"step": self.current_step, "weights": weights})


class Regression(_Reporting, RegressionTrainer):
    pass


class GAN(_Reporting, GANTrainer):
    pass
