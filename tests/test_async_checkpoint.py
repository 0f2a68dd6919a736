"""--async_checkpoint: checkpoints written in the background, whole and on time."""

import os
import signal

import numpy as np
import tensorflow as tf

from tapekit.checkpoint import checkpointing, damaged

from helpers import TESTS, let_go, paused_cli
from resumable import Poisoned

STEPS = dict(steps_per_loop=10)


def _values(path):
    return {name: tf.train.load_variable(path, name) for name, _ in tf.train.list_variables(path)
            if not name.startswith(("save_counter", "_CHECKPOINTABLE", checkpointing.ITERATOR_KEY))}


def test_async_checkpoints_hold_what_sync_ones_do_and_resume_bitwise(tmp_path):
    Poisoned(model_dir=str(tmp_path / "sync"), checkpoint_every_steps=10, progress="none").fit(
        train_steps=30, **STEPS)
    trainer = Poisoned(model_dir=str(tmp_path / "async"), checkpoint_every_steps=10,
                       async_checkpoint=True, progress="none")
    trainer.fit(train_steps=30, **STEPS)
    # fit returned: the last save is on disk and listed
    latest = tf.train.latest_checkpoint(str(tmp_path / "async" / "checkpoints"))
    assert latest.endswith("ckpt-30") and damaged.unreadable(latest) is None
    for step in (20, 30):
        sync = _values(str(tmp_path / "sync" / "checkpoints" / f"ckpt-{step}"))
        written = _values(str(tmp_path / "async" / "checkpoints" / f"ckpt-{step}"))
        assert sync.keys() == written.keys()
        for name in sync:
            np.testing.assert_array_equal(sync[name], written[name], err_msg=name)

    resumed = Poisoned(model_dir=str(tmp_path / "async"), async_checkpoint=True, progress="none",
                       restore_from=str(tmp_path / "async" / "checkpoints" / "ckpt-20"))
    resumed.fit(train_steps=50, **STEPS)
    whole = Poisoned(progress="none")
    whole.fit(train_steps=50, **STEPS)
    for a, b in zip(whole.model.weights, resumed.model.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_a_save_in_flight_at_sigterm_completes_before_the_process_exits(tmp_path, cli_env):
    common = ["--trainer=resumable:Big", "--megabytes=400", "--train_steps=20",
              "--steps_per_loop=5", "--checkpoint_every_steps=10", "--async_checkpoint",
              "--progress=log"]
    model_dir, pause = tmp_path / "run", str(tmp_path / "paused")
    # paused right after step 10's save began (tapekit's callbacks run before the pause):
    # 400 MB take longer to write than the test takes to send SIGTERM
    with paused_cli(common + [f"--model_dir={model_dir}"], cli_env, TESTS, pause, 10) as process:
        in_flight = tf.train.latest_checkpoint(str(model_dir / "checkpoints")) is None
        process.send_signal(signal.SIGTERM)
        let_go(pause)
        _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    assert in_flight, "the save was not in flight any more when SIGTERM came"
    assert f"preempted at step 10, checkpoint {model_dir}/checkpoints/ckpt-10 saved" in stderr
    listed = tf.train.get_checkpoint_state(str(model_dir / "checkpoints")).all_model_checkpoint_paths
    assert [os.path.basename(p) for p in listed] == ["ckpt-10"]
    for path in listed:  # whole: every tensor reads back (resuming bitwise: the test above)
        assert damaged.unreadable(path) is None, path
