"""The evaluator beside a training job: evaluates each new checkpoint of MODEL_DIR once.

GPU batch jobs keep evaluation off the training accelerators by running it in a process
of its own (TF Model Garden's `continuous_eval` mode, Keras' `SidecarEvaluator`). This
process watches MODEL_DIR/checkpoints (`tf.train.checkpoints_iterator`), restores each
new checkpoint (read-only: it never writes into checkpoints/), evaluates it, and writes:

* MODEL_DIR/eval_metrics.jsonl: one row per checkpoint (`split: "eval"`, its `step`), a
  file of its own, so that the training process and the evaluator never append to the
  same file;
* TensorBoard summaries to MODEL_DIR/summaries/eval;
* MODEL_DIR/best/ when `best_metric` is set.

A checkpoint deleted under it (`max_checkpoints_to_keep`) is skipped. Eager.
"""

import os
from typing import Optional

import tensorflow as tf
from absl import logging

from tapekit import callbacks as callbacks_lib
from tapekit.checkpoint import best, checkpointing
from tapekit.errors import TapekitError

EVAL_METRICS_FILE = "eval_metrics.jsonl"


def evaluate_checkpoints(engine, steps: Optional[int] = None, until_step: Optional[int] = None,
                         timeout_secs: Optional[float] = None, once: bool = False) -> int:
    """Evaluates new checkpoints of `engine.model_dir` until one at `until_step` or later
    was evaluated, or none came for `timeout_secs` (None: wait forever). With `once`,
    evaluates the latest checkpoint (or `restore_from`) and returns. Returns how many
    checkpoints were evaluated."""
    model_dir = engine.model_dir
    if model_dir is None:
        raise TapekitError("evaluating checkpoints needs the model_dir the training job writes.")
    directory = os.path.join(model_dir, "checkpoints")
    # KeepBest first: it adds best_METRIC and best_step to the logs the others write.
    keep_best = best.keep_best_of(engine, engine.input.evaluation())
    callbacks = ([keep_best] if keep_best else []) + [
        callbacks_lib.MetricsFile(os.path.join(model_dir, EVAL_METRICS_FILE)),
        callbacks_lib.TensorBoard(os.path.join(model_dir, "summaries"),
                                  writers=engine.summaries.writers)]
    if once:
        paths = [engine.options.restore_from or checkpointing.latest(directory)]
        if paths[0] is None:
            raise TapekitError(f"nothing to evaluate: {directory} has no checkpoint (train "
                               "first, or give --restore_from).")
    else:
        paths = tf.train.checkpoints_iterator(directory, min_interval_secs=0.5,
                                              timeout=timeout_secs)
    evaluated = 0
    for path in paths:
        try:
            step = engine.restore(path)
        except TapekitError:
            if once or tf.io.gfile.exists(path + ".index"):
                raise
            logging.warning("checkpoint %s was deleted before it could be evaluated (the "
                            "trainer keeps max_checkpoints_to_keep); waiting for the next", path)
            continue
        logs = engine.evaluate(steps)
        for callback in callbacks:
            callback.on_eval_end(step, logs)
        evaluated += 1
        logging.info("eval of %s (step %d): %s", os.path.basename(path), step,
                     callbacks_lib.format_logs(logs))
        if until_step is not None and step >= until_step:
            break
    return evaluated
