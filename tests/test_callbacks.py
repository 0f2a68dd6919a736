"""Callbacks: evaluation records, the hooks' order, early stopping."""

import json

import numpy as np

import tapekit
from tapekit.callbacks import EarlyStopping
from tapekit.trainers import RegressionTrainer


def test_evaluation_is_written_beside_training_metrics(tmp_path):
    trainer = RegressionTrainer(model_dir=str(tmp_path))
    trainer.fit(train_steps=60, steps_per_loop=10, eval_every_steps=25, eval_steps=3)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [30, 50, 60]
    assert all(np.isfinite(r["loss"]) for r in evals)
    assert len([r for r in records if r["split"] == "train"]) == 6


def test_user_callbacks_see_every_hook_in_order():
    calls = []

    class Recorder(tapekit.Callback):
        def on_train_begin(self, step):
            calls.append(("begin", step))

        def on_loop_end(self, step, logs):
            calls.append(("loop", step, "loss" in logs))

        def on_eval_end(self, step, logs):
            calls.append(("eval", step))

        def on_train_end(self, step, logs):
            calls.append(("end", step))

    RegressionTrainer().fit(train_steps=20, steps_per_loop=10, eval_every_steps=20,
                            callbacks=[Recorder()])
    assert calls == [("begin", 0), ("loop", 10, True), ("loop", 20, True), ("eval", 20),
                     ("end", 20)]


def test_early_stopping_stops_when_the_metric_plateaus():
    stopper = EarlyStopping("loss", patience=3, min_delta=1e-3)
    trainer = RegressionTrainer(model="linear", learning_rate=1e-9)  # the loss cannot move
    history = trainer.fit(train_steps=1000, steps_per_loop=10, callbacks=[stopper])
    assert len(history) == 4 and stopper.stopped_at == 40 and trainer.current_step == 40
