"""Faults an unattended job meets, handled without a person: a torn checkpoint, a full disk,
a hook that raises."""

import glob
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import tapekit
from tapekit.errors import TapekitError
from tapekit.trainers import RegressionTrainer

from helpers import user_trainer_module


class Noisy(tapekit.Trainer):
    """Dropout, BatchNorm and a seeded, reshuffled tf.data pipeline: what a user writes."""

    default_global_batch_size = 16

    def build(self):
        self.model = keras.Sequential([keras.layers.Dense(8), keras.layers.BatchNormalization(),
                                       keras.layers.Dropout(0.2, seed=1), keras.layers.Dense(1)])
        self.optimizer = keras.optimizers.Adam(0.01)

    def train_dataset(self, input_context):
        rng = np.random.default_rng(0)
        x = rng.standard_normal((256, 4)).astype(np.float32)
        y = x @ np.array([[1.0], [-2.0], [0.5], [3.0]], np.float32)
        return tapekit.per_replica_batches(tf.data.Dataset.from_tensor_slices((x, y)),
                                           input_context, self.global_batch_size,
                                           shuffle_buffer_size=256, seed=self.seed)

    def train_step(self, batch):
        x, y = batch
        with tf.GradientTape() as tape:
            loss = self.compute_loss(tf.square(self.model(x, training=True) - y))
        self.apply_gradients(tape, loss, self.model, self.optimizer)
        return {"loss": loss}


def _train(model_dir, steps, **options):
    trainer = Noisy(model_dir=str(model_dir), progress="none", deterministic=True,
                    checkpoint_every_steps=10, **options)
    trainer.fit(train_steps=steps, steps_per_loop=10)
    return trainer


def _tear(path):
    """Truncates checkpoint `path`'s data file to half, as a write cut short would."""
    (data,) = glob.glob(path + ".data-*")
    size = os.path.getsize(data)
    with open(data, "r+b") as stream:
        stream.truncate(size // 2)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The 40 steps every interrupted Noisy run here must end bitwise equal to."""
    return _train(tmp_path_factory.mktemp("uninterrupted"), 40)


def test_a_torn_newest_checkpoint_is_set_aside_and_the_run_resumes_from_the_one_before(
        tmp_path, uninterrupted):
    whole = uninterrupted
    _train(tmp_path / "torn", 30)
    _tear(str(tmp_path / "torn" / "checkpoints" / "ckpt-30"))
    resumed = _train(tmp_path / "torn", 40)  # no flag changed: it falls back by itself
    for a, b in zip(whole.model.weights, resumed.model.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    aside = glob.glob(str(tmp_path / "torn" / "checkpoints" / "set_aside-*" / "ckpt-30.*"))
    assert len(aside) == 2  # moved, data and index, never deleted
    run = json.loads((tmp_path / "torn" / "run.json").read_text())
    fell_back = run["resumes"][-1]["fell_back"]
    assert fell_back["damaged"][0].endswith("ckpt-30") and fell_back["resumed_from"].endswith(
        "ckpt-20") and run["resumes"][-1]["step"] == 20


def test_an_explicit_restore_from_a_torn_checkpoint_never_falls_back(tmp_path):
    _train(tmp_path, 30)
    torn = str(tmp_path / "checkpoints" / "ckpt-30")
    _tear(torn)
    with pytest.raises(TapekitError, match="ckpt-30' is damaged or unreadable"):
        _train(tmp_path, 40, restore_from=torn)
    assert os.path.exists(torn + ".index")  # left where it was


def test_when_no_checkpoint_is_readable_the_error_names_the_newest(tmp_path):
    _train(tmp_path, 20)
    for path in ("ckpt-10", "ckpt-20"):
        _tear(str(tmp_path / "checkpoints" / path))
    with pytest.raises(TapekitError, match=r"has checkpoints but none is whole: .*ckpt-20 "
                                           r"\(and 1 older\) cannot be read"):
        _train(tmp_path, 30)


class BuggyHook(Noisy):
    fixed = False

    def sample_images(self, num_images):
        if self.current_step >= 20 and not self.fixed:
            raise ValueError("a bug in sample_images")
        return np.zeros([num_images, 4, 4, 1], np.float32)


def test_a_hook_that_raises_stops_the_run_after_saving_its_last_loop(tmp_path, uninterrupted):
    trainer = BuggyHook(model_dir=str(tmp_path), progress="none", sample_every_steps=10,
                        deterministic=True)
    with pytest.raises(ValueError, match="a bug in sample_images") as error:  # the user's own
        trainer.fit(train_steps=40, steps_per_loop=10)
    message = str(error.value.tapekit_error)  # tapekit's one line goes with it
    assert "ValueError at tests/test_faults.py:" in message and "a bug in sample_images" in message
    assert "raised between loops at step 20" in message and "ckpt-20 of that loop first" in message
    assert os.path.exists(tmp_path / "checkpoints" / "ckpt-20.index")
    # The 20 steps are not lost: the same run resumes there and ends where a clean run ends.
    resumed = BuggyHook(model_dir=str(tmp_path), progress="none", sample_every_steps=10,
                        deterministic=True)
    resumed.fixed = True  # the user fixed the hook
    resumed.fit(train_steps=40, steps_per_loop=10)
    for a, b in zip(uninterrupted.model.weights, resumed.model.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def _fill(directory):
    """Writes into `directory` until its file system has no byte left."""
    chunk = b"\0" * (1 << 16)
    with open(os.path.join(directory, "filler"), "wb", buffering=0) as stream:
        try:
            while True:
                stream.write(chunk)
        except OSError:
            pass
        try:
            while True:
                stream.write(b"\0")
        except OSError:
            pass


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs (as root); skipped where it cannot be mounted."""
    import subprocess
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {made.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


# Keeping 2: a save that failed at step 30 must not have deleted ckpt-10 to make room.
FULL_DISK_RUN = ["--trainer=resumable:Regression", "--deterministic", "--train_steps=60",
                 "--steps_per_loop=10", "--checkpoint_every_steps=10", "--progress=log",
                 "--max_checkpoints_to_keep=2"]


@pytest.fixture(scope="module")
def full_disk_reference(tmp_path_factory):
    """The WEIGHTS of FULL_DISK_RUN uninterrupted (async writes train the same numbers)."""
    from helpers import TESTS, reported_weights, run_cli
    whole = run_cli(FULL_DISK_RUN + [f"--model_dir={tmp_path_factory.mktemp('whole')}"],
                    cwd=TESTS)
    assert whole.returncode == 0, whole.stderr[-2000:]
    return reported_weights(whole.stdout)


@pytest.mark.parametrize("writes", ["sync", "async"])
def test_a_full_disk_stops_the_job_with_one_line_and_the_same_command_resumes(
        small_disk, tmp_path, cli_env, writes, full_disk_reference):
    from helpers import TESTS, let_go, paused_cli, reported_weights, run_cli, wait_for
    # With --async_checkpoint the write fails in the background; the next save (or the end)
    # waits for it and stops the job the same way.
    common = FULL_DISK_RUN + (["--async_checkpoint"] if writes == "async" else [])
    model_dir, pause = small_disk / "run", str(tmp_path / "paused")
    with paused_cli(common + [f"--model_dir={model_dir}"], cli_env, TESTS, pause, 20) as process:
        # async: ckpt-20 may still be writing at the pause; the disk fills after it is whole
        wait_for(model_dir / "checkpoints" / "checkpoint", process, containing='"ckpt-20"')
        wait_for(model_dir / "checkpoints" / "ckpt-20.index", process)
        _fill(small_disk)  # the disk fills under the running job
        let_go(pause)
        _, stderr = process.communicate(timeout=300)
    assert process.returncode == 74, stderr[-2000:]  # a failed write, not a crash (1)
    last = stderr.strip().splitlines()[-1]
    noticed = 30 if writes == "sync" else 40  # async: when the next save waits for it
    assert last.startswith(f"tapekit-train: error: a write failed at step {noticed} (No space "
                           "left on device") and f"{model_dir}/checkpoints/ckpt-20" in last, last
    assert "ckpt-30_temp" in last  # the checkpoint whose write failed
    saved = sorted(p.name for p in (model_dir / "checkpoints").glob("ckpt-*.index"))
    assert saved == ["ckpt-10.index", "ckpt-20.index"]  # nothing saved was lost
    os.remove(small_disk / "filler")  # space freed: the same command resumes
    resumed = run_cli(common + [f"--model_dir={model_dir}"], cli_env, cwd=TESTS)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from checkpoint {model_dir}/checkpoints/ckpt-20 at step 20" in resumed.stderr
    assert reported_weights(resumed.stdout) == full_disk_reference


# Marks (from inside the compiled loop) that step 50 has run.
LONG_LOOP_TRAINER = user_trainer_module("LongLoop", """\
        x, y = batch
        with tf.GradientTape() as tape:
            loss = self.compute_loss(tf.square(self.model(x) - y))
        self.apply_gradients(tape, loss, self.model, self.optimizer)
        tf.cond(tf.equal(self.global_step, 50),
                lambda: tf.py_function(lambda: open(os.environ["MARKER"], "w").close() or 0.0,
                                       [], tf.float32),
                lambda: tf.constant(0.0))
        return {"loss": loss}
""", arrays="np.linspace(-1, 1, 128, dtype=np.float32).reshape(64, 2)", learning_rate=0.01)


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_a_stop_request_ends_a_long_loop_at_the_next_step_and_saves(tmp_path, cli_env, signum):
    import signal
    import subprocess
    import time

    from helpers import TAPEKIT_TRAIN
    (tmp_path / "long_loop.py").write_text(LONG_LOOP_TRAINER)
    marker = tmp_path / "at_step_50"
    env = dict(cli_env, MARKER=str(marker))
    model_dir = tmp_path / "run"
    process = subprocess.Popen(
        TAPEKIT_TRAIN + ["--trainer=long_loop:LongLoop", "--global_batch_size=8",
                         "--train_steps=100000000", "--steps_per_loop=100000000",
                         "--progress=log", f"--model_dir={model_dir}"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300  # a guard against a hang, not a measurement
        while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), process.communicate(timeout=60)
        process.send_signal(getattr(signal, signum))  # inside the one long loop
        _, stderr = process.communicate(timeout=300)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == (0 if signum == "SIGTERM" else 130), stderr[-2000:]
    heard = "SIGTERM received: stopping at the next step" if signum == "SIGTERM" else (
        "Ctrl-C: stopping at the next step")
    assert heard in stderr
    saved = [int(p.name[5:-6]) for p in (model_dir / "checkpoints").glob("ckpt-*.index")]
    assert len(saved) == 1 and 50 < saved[0] < 100000000  # saved mid-loop, where it stopped
    assert "the training data ran out" not in stderr


def test_chaos_five_sigkills_at_random_moments_end_bitwise_where_a_clean_run_ends(
        tmp_path, cli_env):
    """The GAN (two models, two optimizers, noise drawn from the checkpointed generator, a
    shuffled input) is killed with SIGKILL at 5 seeded-random loop ends, each after some
    checkpoint, and restarted each time with the same command. (Dropout, BatchNorm and a
    reshuffled tf.data pipeline are killed and resumed in `test_conformance.py`.)"""
    import random
    import signal

    from helpers import TESTS, paused_cli, reported_weights, run_cli_process
    common = ["--trainer=resumable:GAN", "--deterministic", "--seed=3", "--train_steps=150",
              "--steps_per_loop=5", "--checkpoint_every_steps=20"]
    # Every run in a process of its own, as the killed ones are: in this process, after the
    # tests before it, the last bit of a float can differ from a fresh process's.
    whole = run_cli_process(common + [f"--model_dir={tmp_path / 'whole'}"], cli_env, cwd=TESTS)
    assert whole.returncode == 0, whole.stderr[-2000:]
    model_dir = tmp_path / "chaos"
    kills = sorted(random.Random(7).sample(range(25, 150, 5), 5))  # loop ends past ckpt-20
    for number, kill_at in enumerate(kills):
        pause = str(tmp_path / f"paused-{number}")
        with paused_cli(common + [f"--model_dir={model_dir}"], cli_env, TESTS, pause,
                        kill_at) as process:
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=60)
        assert process.returncode == -signal.SIGKILL
    finished = run_cli_process(common + [f"--model_dir={model_dir}"], cli_env, cwd=TESTS)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert len(json.loads((model_dir / "run.json").read_text())["resumes"]) == 5
    assert reported_weights(finished.stdout) == reported_weights(whole.stdout)  # bit for bit


def test_tapekit_never_writes_through_a_symlink_out_of_the_model_dir(tmp_path):
    outside = tmp_path / "not_yours.txt"
    outside.write_text("precious\n")
    model_dir = tmp_path / "shared"
    model_dir.mkdir()
    os.symlink(outside, model_dir / "metrics.jsonl")
    with pytest.raises(TapekitError, match=r"metrics.jsonl is a symbolic link to .*not_yours.txt, "
                                           "outside the model_dir; tapekit never writes through"):
        Noisy(model_dir=str(model_dir), progress="none")
    assert outside.read_text() == "precious\n"
    # A link inside the model_dir planted after the start is refused too, not followed.
    os.remove(model_dir / "metrics.jsonl")
    trainer = Noisy(model_dir=str(model_dir), progress="none", sample_every_steps=None)
    trainer.fit(train_steps=10, steps_per_loop=10)
    os.remove(model_dir / "metrics.jsonl")
    os.symlink(outside, model_dir / "metrics.jsonl")
    with pytest.raises(TapekitError, match="metrics.jsonl is a symbolic link"):
        trainer.fit(train_steps=20, steps_per_loop=10)
    assert outside.read_text() == "precious\n"
    assert oct(os.stat(model_dir / "run.json").st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_refused_resume_moves_no_damaged_checkpoint(tmp_path):
    _train(tmp_path, 30)
    torn = tmp_path / "checkpoints" / "ckpt-30"
    _tear(str(torn))
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    with pytest.raises(TapekitError, match="resuming would silently change it: seed"):
        _train(tmp_path, 40, seed=9)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before


class _ExportFailsAfter(RegressionTrainer):
    """Its export of best/ fails (a full disk) from the `fail_from`-th export on."""

    def __init__(self, fail_from, **kwargs):
        super().__init__(**kwargs)
        self.fail_from, self.exports = fail_from, 0

    def export(self, export_dir):
        self.exports += 1
        if self.exports >= self.fail_from:
            raise OSError(28, "No space left on device", export_dir)
        return super().export(export_dir)


def test_an_export_of_best_that_fails_leaves_best_at_the_previous_best(tmp_path):
    trainer = _ExportFailsAfter(fail_from=2, model="mlp", model_dir=str(tmp_path),
                                best_metric="loss", progress="none")
    with pytest.raises(tapekit.TapekitError, match="No space left on device") as raised:
        trainer.fit(train_steps=60, steps_per_loop=20, eval_every_steps=20)
    failed_at = int(str(raised.value).split("write failed at step ")[1].split()[0])
    assert failed_at in (40, 60)  # the second improvement's export (the first was at 20)
    best = json.loads((tmp_path / "best" / "best.json").read_text())
    assert best["step"] == 20 and best["checkpoint"].endswith("ckpt-20")
    # best.json names a checkpoint that is there, is the only one, and reads whole
    assert tf.train.latest_checkpoint(tmp_path / "best") == best["checkpoint"]
    assert sorted(glob.glob(str(tmp_path / "best" / "ckpt-*.index"))) == [best["checkpoint"] + ".index"]
    assert RegressionTrainer(model="mlp").restore(best["checkpoint"]) == 20
    assert os.path.exists(tmp_path / "best" / "saved_model" / "saved_model.pb")
    assert not os.path.exists(tmp_path / "best" / "saved_model.partial")


def test_rows_written_after_the_checkpoint_a_run_resumes_from_are_written_once(tmp_path):
    # as if killed after writing step 20's row but before saving ckpt-20: resumed at 10
    RegressionTrainer(model_dir=str(tmp_path), progress="none", checkpoint_every_steps=10).fit(
        train_steps=20, steps_per_loop=10)
    RegressionTrainer(model_dir=str(tmp_path), progress="none",
                      restore_from=str(tmp_path / "checkpoints" / "ckpt-10")).fit(
        train_steps=30, steps_per_loop=10)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if row["split"] == "train"] == [10, 20, 30]
