"""nan_policy=rollback: poisoned batches are found, skipped, recorded, and skipped again."""

import json

import numpy as np
import pytest
import tensorflow as tf

import tapekit

from helpers import TESTS, run_cli
from resumable import Poisoned

POISONED = (23, 24, 25)  # labels x 1e30: the loss is infinite there
STEPS = dict(train_steps=60, steps_per_loop=10)


def _same_weights(a, b):
    return all(np.array_equal(x.numpy(), y.numpy())
               for x, y in zip(a.model.weights + a.optimizer.variables,
                               b.model.weights + b.optimizer.variables))


def _skipped(model_dir):
    return json.loads((model_dir / "run.json").read_text()).get("skipped")


def test_poisoned_batches_are_skipped_and_the_run_ends_near_a_clean_one(caplog):
    clean = Poisoned(progress="none")
    clean_loss = clean.fit(**STEPS)[-1]["loss"]
    with pytest.raises(tapekit.TapekitError, match="non-finite loss in steps 21-30"):
        Poisoned(poison=POISONED, progress="none").fit(**STEPS)  # nan_policy=stop

    caplog.set_level("INFO")
    trainer = Poisoned(poison=POISONED, nan_policy="rollback", progress="none")
    history = trainer.fit(**STEPS)
    assert trainer.current_step == 60
    assert int(trainer.optimizer.iterations.numpy()) == 57  # 3 batches read, not trained on
    assert history[-1]["loss"] < 2 * clean_loss
    assert all(np.isfinite(v.numpy()).all() for v in trainer.model.weights)
    # the bad loop is not in the history; its replay is, one step per row, without 23-25
    assert [row["step"] for row in history] == [10, 20, 21, 22, 26, 27, 28, 29, 30, 40, 50, 60]
    log = caplog.text
    assert ("rollback 1/3: non-finite loss in steps 21-30; went back to step 20 (the copy kept "
            "in memory)") in log
    assert "replayed steps 21-30 one per loop; skipped: 23-25" in log

    rerun = Poisoned(poison=POISONED, skip_steps="23-25", progress="none")
    rerun.fit(**STEPS)
    assert _same_weights(trainer, rerun)  # bitwise: skipping is what a rollback did


def test_two_replicas_rolled_back_to_an_older_checkpoint_record_the_steps_once(tmp_path):
    two = dict(strategy="mirrored", cpu_replicas=2, progress="none")
    from_checkpoint = Poisoned(poison=(33,), nan_policy="rollback", rollback_from="checkpoint",
                               model_dir=str(tmp_path), checkpoint_every_steps=20, **two)
    from_checkpoint.fit(**STEPS)
    assert _skipped(tmp_path) == [[33, 33]]
    rows = [row["step"] for row in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
            if row["split"] == "train"]
    # steps 31-40 were bad: back to ckpt-20, 21-30 replayed (not written again), 31-40 one by one
    assert rows == [10, 20, 30, 31, 32, 34, 35, 36, 37, 38, 39, 40, 50, 60]

    from_memory = Poisoned(poison=(33,), nan_policy="rollback", **two)
    from_memory.fit(**STEPS)
    assert _same_weights(from_checkpoint, from_memory)


def test_a_resumed_run_skips_the_recorded_steps_and_ends_bitwise(tmp_path):
    settings = dict(poison=POISONED, nan_policy="rollback", progress="none")
    uninterrupted = Poisoned(**settings)
    uninterrupted.fit(**STEPS)

    Poisoned(model_dir=str(tmp_path), checkpoint_every_steps=10, **settings).fit(
        train_steps=40, steps_per_loop=10)
    assert _skipped(tmp_path) == [[23, 25]]
    # resumed before the poisoned steps' checkpoint too: from ckpt-20 the steps are skipped
    # because run.json says so, not found again (its nan_policy is stop)
    resumed = Poisoned(poison=POISONED, model_dir=str(tmp_path), progress="none",
                       restore_from=str(tmp_path / "checkpoints" / "ckpt-20"))
    resumed.fit(**STEPS)
    assert _skipped(tmp_path) == [[23, 25]]
    assert _same_weights(uninterrupted, resumed)


def test_a_loss_spike_over_the_threshold_is_rolled_back_too(tmp_path):
    settings = dict(poison=(33, 34), factor=30.0, progress="none")  # finite: 900x the loss
    plain = Poisoned(nan_policy="rollback", **settings)
    plain.fit(train_steps=50, steps_per_loop=5)
    assert int(plain.optimizer.iterations.numpy()) == 50  # nothing non-finite: nothing skipped

    judged = Poisoned(nan_policy="rollback", spike_threshold=10.0, model_dir=str(tmp_path),
                      **settings)
    history = judged.fit(train_steps=50, steps_per_loop=5)
    assert _skipped(tmp_path) == [[33, 34]]
    assert int(judged.optimizer.iterations.numpy()) == 48
    assert max(row["loss"] for row in history if row["step"] > 30) < 10 * history[5]["loss"]


def test_after_max_rollbacks_in_a_row_it_stops_with_one_error(tmp_path):
    trainer = Poisoned(poison=range(21, 100), nan_policy="rollback", max_rollbacks=2,
                       model_dir=str(tmp_path), checkpoint_every_steps=10, progress="none")
    with pytest.raises(tapekit.TapekitError) as raised:
        trainer.fit(train_steps=60, steps_per_loop=5)
    message = str(raised.value)
    assert "non-finite loss in steps 31-35, after 2 rollbacks in a row (--max_rollbacks)" in message
    assert "ckpt-20" in message  # the last good checkpoint, kept
    assert tf.train.latest_checkpoint(str(tmp_path / "checkpoints")).endswith("ckpt-20")
    # bad steps with good full loops between them are not rollbacks in a row
    apart = Poisoned(poison=(3, 13, 23, 33), nan_policy="rollback", max_rollbacks=1,
                     progress="none")
    apart.fit(train_steps=40, steps_per_loop=5)
    assert int(apart.optimizer.iterations.numpy()) == 36


def test_rollback_settings_are_checked_before_anything_runs():
    with pytest.raises(tapekit.TapekitError, match="spike_threshold applies only with"):
        Poisoned(spike_threshold=5.0)
    with pytest.raises(tapekit.TapekitError, match="skip_steps must be FIRST-LAST"):
        Poisoned(skip_steps="9-3")
    with pytest.raises(tapekit.TapekitError, match="rollback_from=checkpoint needs a model_dir"):
        Poisoned(nan_policy="rollback", rollback_from="checkpoint")


def test_a_rerun_with_the_flagfile_skips_the_recorded_steps(tmp_path, cli_env):
    run = tmp_path / "run"
    common = ["--trainer=resumable:Poisoned", "--poison=23,24,25", "--train_steps=40",
              "--steps_per_loop=10", "--progress=none"]
    first = run_cli(common + ["--nan_policy=rollback", f"--model_dir={run}"], cli_env, cwd=TESTS)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "replayed steps 21-30 one per loop; skipped: 23-25" in first.stderr
    assert "--skip_steps=23-25" in (run / "flags.txt").read_text().splitlines()

    rerun = run_cli([f"--flagfile={run / 'flags.txt'}", f"--model_dir={tmp_path / 'rerun'}",
                     "--nan_policy=stop"], cli_env, cwd=TESTS)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "rollback 1/" not in rerun.stderr  # nothing was bad: the steps were skipped up front
    assert "skipped steps 23-25 (read, not trained on)" in rerun.stderr
    weights = [next(out for out in r.stdout.splitlines() if out.startswith("WEIGHTS "))
               for r in (first, rerun)]
    assert weights[0] == weights[1]


def test_by_epochs_a_bad_range_across_the_end_of_a_pass_is_skipped_in_both(tmp_path):
    # every pass is the same 10 batches; its first and last are poisoned: global steps 1,
    # 10-11 (across the end of pass 1), 20-21 and 30
    settings = dict(poison=(1, 10), steps_per_epoch=10, progress="none")
    trainer = Poisoned(nan_policy="rollback", model_dir=str(tmp_path), **settings)
    history = trainer.fit(train_epochs=3, steps_per_loop=4)
    assert _skipped(tmp_path) == [[1, 1], [10, 11], [20, 21], [30, 30]]
    assert trainer.current_step == 30 and history[-1]["epoch"] == 3
    assert int(trainer.optimizer.iterations.numpy()) == 24
    rerun = Poisoned(skip_steps="1,10-11,20-21,30", **settings)
    rerun.fit(train_epochs=3, steps_per_loop=4)
    assert _same_weights(trainer, rerun)


def test_a_run_may_start_judging_spikes_when_it_resumes(tmp_path):
    Poisoned(model_dir=str(tmp_path), progress="none").fit(train_steps=20, steps_per_loop=5)
    resumed = Poisoned(model_dir=str(tmp_path), nan_policy="rollback", spike_threshold=10.0,
                       poison=(48, 49), factor=30.0, allow_changes="poison,factor",
                       progress="none")
    # the checkpoint had no loss window: it starts empty, and judges from 5 loops on
    resumed.fit(train_steps=60, steps_per_loop=5)
    assert _skipped(tmp_path) == [[48, 49]]
    later = Poisoned(model_dir=str(tmp_path), progress="none")  # nor does this one need it
    assert later.restore() == 60


class _Epochs(tapekit.Callback):
    def __init__(self):
        self.ended = []

    def on_epoch_end(self, step, epoch):
        self.ended.append((step, epoch))


@pytest.mark.parametrize("source", ["memory", "checkpoint"])
def test_by_epochs_a_replay_from_a_checkpoint_ends_each_epoch_once(tmp_path, source):
    # pass-local step 3 is bad: global 3, 13, 23; from ckpt-8, step 13's replay crosses
    # the end of epoch 1
    epochs = _Epochs()
    trainer = Poisoned(poison=(3,), steps_per_epoch=10, nan_policy="rollback",
                       rollback_from=source, model_dir=str(tmp_path), checkpoint_every_steps=8,
                       progress="none")
    trainer.fit(train_epochs=3, steps_per_loop=4, eval_every_epochs=1, callbacks=[epochs])
    assert epochs.ended == [(10, 1), (20, 2), (30, 3)]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [(row["split"], row["step"]) for row in rows]
    assert len(steps) == len(set(steps)) and ("eval", 10) in steps
    assert _skipped(tmp_path) == [[3, 3], [13, 13], [23, 23]]
    rerun = Poisoned(poison=(3,), steps_per_epoch=10, skip_steps="3,13,23", progress="none")
    rerun.fit(train_epochs=3, steps_per_loop=4)
    assert _same_weights(trainer, rerun)


def test_the_evaluation_due_in_skipped_steps_is_made(tmp_path):
    trainer = Poisoned(skip_steps="29-31", model_dir=str(tmp_path), progress="none")
    trainer.fit(train_steps=31, steps_per_loop=10, eval_every_steps=10)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if row["split"] == "eval"] == [10, 20, 31]
