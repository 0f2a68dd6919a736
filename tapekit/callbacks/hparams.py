"""Writes the run's settings as a TensorBoard HParams session, so that runs line up."""

import os

from absl import logging

from tapekit.callbacks.base import Callback
from tapekit.callbacks.loggers import run_settings


class HParams(Callback):
    """Writes MODEL_DIR/run.json's settings (`tapekit.callbacks.loggers.run_settings`) as
    the HParams session of run MODEL_DIR/summaries, at the start of each `fit`.

    The session's metrics are the scalars `TensorBoard` writes beneath it: each training
    metric as (tag, group "train"), each evaluation's, with `best_METRIC` when a best
    checkpoint is kept, as (tag, group "eval"); the dashboard shows each one's last value.
    So `tensorboard --logdir PARENT` shows the runs under PARENT side by side in its
    HParams tab. No experiment-level `hparams_config` is written: TensorBoard uses the
    first one it finds for the whole logdir, which would hide the settings and metrics of
    runs unlike that one; without it, TensorBoard lists those of every session.
    Needs the `tensorboard` package (not a dependency of TensorFlow 2.21); without it this
    logs one line and writes nothing. Eager, on the chief.
    """

    def __init__(self, model_dir: str):
        self.model_dir = model_dir
        self.logdir = os.path.join(model_dir, "summaries")

    def on_train_begin(self, step):
        try:
            from tensorboard.plugins.hparams import api as hp
        except ImportError:
            logging.info("HParams: the run's settings are not written for TensorBoard's "
                         "HParams tab without the tensorboard package: pip install tensorboard")
            return
        import tensorflow as tf
        settings = run_settings(self.model_dir)
        if not settings:
            return
        writer = tf.summary.create_file_writer(self.logdir)
        with writer.as_default():
            hp.hparams(settings)
        writer.close()
