"""`tapekit.checkpoint.checkpointing`: checked restores, writable model dirs, nothing saved is lost."""

import os

import pytest
import tensorflow as tf

import tapekit
from tapekit.checkpoint import checkpointing
from tapekit.checkpoint.checkpointing import Checkpointer
from tapekit.trainers import RegressionTrainer


def _snapshot(directory):
    return {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))
            if (directory / name).is_file()}


def test_a_checkpoint_of_another_model_is_refused_with_the_mismatches(tmp_path):
    RegressionTrainer(model="linear", model_dir=str(tmp_path)).fit(train_steps=20, steps_per_loop=10)
    before = _snapshot(tmp_path / "checkpoints")
    # Allowed past the run record's check, the checkpoint's own check refuses it.
    other = RegressionTrainer(model="mlp", model_dir=str(tmp_path), allow_changes="model")
    with pytest.raises(tapekit.TapekitError) as raised:
        other.fit(train_steps=40)
    message = str(raised.value)
    assert "does not fit this trainer" in message and "mismatches" in message
    assert "model/w in the checkpoint is not in this trainer" in message
    assert "missing from the checkpoint" in message
    assert _snapshot(tmp_path / "checkpoints") == before


def test_a_checkpoint_with_other_shapes_is_refused(tmp_path):
    RegressionTrainer(model="mlp", hidden_units=10, model_dir=str(tmp_path)).fit(
        train_steps=10, steps_per_loop=10)
    with pytest.raises(tapekit.TapekitError, match=r"has shape \[5, 10\] in the checkpoint, \[5, 7\] here"):
        RegressionTrainer(model="mlp", hidden_units=7, model_dir=str(tmp_path),
                          allow_changes="hidden_units").fit(train_steps=20)


def test_a_truncated_newest_checkpoint_is_set_aside_and_an_older_one_restores(tmp_path):
    RegressionTrainer(model_dir=str(tmp_path), checkpoint_every_steps=10).fit(
        train_steps=20, steps_per_loop=10)
    checkpoints = tmp_path / "checkpoints"
    damaged = checkpoints / "ckpt-20.data-00000-of-00001"
    damaged.write_bytes(damaged.read_bytes()[:7])
    # The same command again: it falls back on ckpt-10 by itself (tests/test_faults.py has
    # the bitwise check, the run record and --restore_from, which never falls back).
    restarted = RegressionTrainer(model_dir=str(tmp_path))
    restarted.fit(train_steps=30, steps_per_loop=10)
    assert restarted.current_step == 30
    (aside,) = [d for d in os.listdir(checkpoints) if d.startswith("set_aside-")]
    assert len((checkpoints / aside / damaged.name).read_bytes()) == 7  # kept, not overwritten
    assert tf.train.latest_checkpoint(checkpoints).endswith("ckpt-30")


def test_restore_from_a_path_that_is_not_a_checkpoint(tmp_path):
    with pytest.raises(tapekit.TapekitError, match="is not a checkpoint"):
        RegressionTrainer(restore_from=str(tmp_path / "nothing-here"))


def test_model_dir_that_is_a_file_or_unwritable_fails_before_training(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    with pytest.raises(tapekit.TapekitError, match="is a file, not a directory"):
        RegressionTrainer(model_dir=str(afile))
    with pytest.raises(tapekit.TapekitError, match="cannot write to model_dir"):
        RegressionTrainer(model_dir=str(afile / "below"))
    with pytest.raises(tapekit.TapekitError, match="cannot write to model_dir"):
        RegressionTrainer(model_dir="/proc/tapekit-cannot-write-here")
    assert afile.read_text() == "keep me"


def test_latest_and_step_of_read_a_real_checkpoint_directory(tmp_path):
    step = tf.Variable(0, dtype=tf.int64)
    checkpointer = Checkpointer({"global_step": step}, str(tmp_path), True, max_to_keep=2)
    directory = str(tmp_path / "checkpoints")
    assert checkpointing.latest(directory) is None and checkpointing.latest(None) is None
    for value in (5, 10, 100):
        step.assign(value)
        checkpointer.save(value)
    latest = checkpointing.latest(directory)
    assert latest == os.path.join(directory, "ckpt-100") == checkpointer.latest
    assert checkpointing.step_of(latest) == checkpointing.saved_step(latest) == 100
    listed = tf.train.get_checkpoint_state(directory).all_model_checkpoint_paths
    assert [checkpointing.step_of(path) for path in listed] == [10, 100]
    assert checkpointing.step_of(str(tmp_path / "my-model")) == -1  # a name without a step
