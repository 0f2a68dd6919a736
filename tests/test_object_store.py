"""A model_dir with a scheme (gs://, s3://, ram://): every file through `tf.io.gfile`.

Whole runs on TensorFlow's in-memory file system (ram://) stand in for an object store:
train, stop and resume bit for bit, fall back from a torn checkpoint, and every file a run
writes (run.json, metrics.jsonl, samples, best/, an export) lands there, none locally.
"""

import json
import os
import uuid

import numpy as np
import pytest
import tensorflow as tf

from tapekit.checkpoint import files
from tapekit.errors import TapekitError
from trainers.regression import RegressionTrainer

from test_faults import Noisy

gfile = tf.io.gfile


@pytest.fixture
def ram(tmp_path, monkeypatch):
    """A fresh ram:// folder; the test runs in an empty local folder that must stay empty."""
    monkeypatch.chdir(tmp_path)
    yield f"ram://tapekit-{uuid.uuid4().hex}"
    assert os.listdir(tmp_path) == []  # nothing written locally (./ram:/... included)


def _train(model_dir, steps, **options):
    trainer = Noisy(model_dir=model_dir, progress="none", deterministic=True,
                    checkpoint_every_steps=10, **options)
    trainer.fit(train_steps=steps, steps_per_loop=10)
    return trainer


def _read(path):
    with gfile.GFile(path) as stream:
        return stream.read()


def _rows(path):
    """A metrics file's train and eval rows (not the loops' stats)."""
    rows = [json.loads(line) for line in _read(path).splitlines()]
    return [row for row in rows if row.get("split") != "stats"]


def _tear(path):
    """Truncates checkpoint `path`'s data file to half, as a write cut short would."""
    (data,) = gfile.glob(path + ".data-*")
    content = _read_bytes(data)
    gfile.remove(data)  # ram:// appends to a file opened for writing
    with gfile.GFile(data, "wb") as stream:
        stream.write(content[:len(content) // 2])


def _read_bytes(path):
    with gfile.GFile(path, "rb") as stream:
        return stream.read()


def _assert_same_weights(a, b):
    for x, y in zip(a.model.weights, b.model.weights):
        np.testing.assert_array_equal(x.numpy(), y.numpy())


def test_a_run_on_ram_stops_resumes_bit_for_bit_and_falls_back_from_a_torn_checkpoint(ram):
    whole = _train(f"{ram}/whole", 40)
    assert whole.model_dir == f"{ram}/whole"  # kept as given: no abspath, no ./ram:/

    _train(f"{ram}/stopped", 20)
    resumed = _train(f"{ram}/stopped", 40)
    _assert_same_weights(whole, resumed)
    assert [row["step"] for row in _rows(f"{ram}/stopped/metrics.jsonl")] == [10, 20, 30, 40]
    record = json.loads(_read(f"{ram}/stopped/run.json"))
    assert [entry["step"] for entry in record["resumes"]] == [20]

    _train(f"{ram}/torn", 30)
    _tear(f"{ram}/torn/checkpoints/ckpt-30")
    fell_back = _train(f"{ram}/torn", 40)  # no flag changed: it falls back by itself
    _assert_same_weights(whole, fell_back)
    aside = gfile.glob(f"{ram}/torn/checkpoints/set_aside-*/ckpt-30.*")
    assert len(aside) == 2  # moved, data and index, never deleted
    entry = json.loads(_read(f"{ram}/torn/run.json"))["resumes"][-1]
    assert entry["step"] == 20 and entry["fell_back"]["damaged"][0].endswith("ckpt-30")
    assert entry["fell_back"]["resumed_from"] == f"{ram}/torn/checkpoints/ckpt-20"
    # the loop after ckpt-20 is trained again, its row written once
    assert [row["step"] for row in _rows(f"{ram}/torn/metrics.jsonl")] == [10, 20, 30, 40]


class Sampled(RegressionTrainer):
    def sample_images(self, num_images):
        return np.full([num_images, 4, 4, 1], 0.5, np.float32)


def test_every_file_of_a_run_lands_on_ram(ram):
    model_dir = f"{ram}/run"
    trainer = Sampled(model="mlp", model_dir=model_dir, best_metric="loss", progress="none",
                      sample_every_steps=10)
    trainer.fit(train_steps=20, steps_per_loop=10, eval_every_steps=10)
    trainer.export(f"{ram}/export")

    names = set(gfile.listdir(model_dir))
    assert {"checkpoints", "summaries", "samples", "best", "metrics.jsonl", "run.json"} <= names
    assert not [name for name in names if name.endswith(".tmp")]
    assert json.loads(_read(f"{model_dir}/run.json"))["settings"]["model_dir"] == model_dir
    rows = _rows(f"{model_dir}/metrics.jsonl")
    assert [(row["split"], row["step"]) for row in rows] == [
        ("train", 10), ("eval", 10), ("train", 20), ("eval", 20)]
    assert sorted(gfile.listdir(f"{model_dir}/samples")) == ["step_000010.png", "step_000020.png"]
    assert _read_bytes(f"{model_dir}/samples/step_000020.png").startswith(b"\x89PNG")
    assert gfile.glob(f"{model_dir}/summaries/train/events.out.tfevents.*")

    best = json.loads(_read(f"{model_dir}/best/best.json"))
    assert best["step"] == 20  # kept twice: the second replaced the first saved_model
    assert best["checkpoint"] == f"{model_dir}/best/ckpt-{best['step']}"
    assert gfile.exists(best["checkpoint"] + ".index")
    assert gfile.exists(f"{model_dir}/best/saved_model/saved_model.pb")
    assert not gfile.glob(f"{model_dir}/best/saved_model.*")  # no .partial, no .old left
    x = tf.zeros([2, 5])
    for served in (f"{model_dir}/best/saved_model", f"{ram}/export"):
        assert tf.saved_model.load(served).serve(x).shape == (2, 1)

    # the evaluator beside it reads the checkpoints there and writes eval_metrics.jsonl there
    evaluator = RegressionTrainer(model="mlp", model_dir=model_dir, progress="none")
    assert evaluator.evaluate_checkpoints(latest_only=True) == 1
    assert [row["step"] for row in _rows(f"{model_dir}/eval_metrics.jsonl")] == [20]


def test_a_scheme_tensorflow_has_no_file_system_for_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TapekitError) as raised:
        Noisy(model_dir="foo://bucket/run", progress="none").fit(train_steps=10, steps_per_loop=10)
    message = str(raised.value)
    assert message == ("model_dir foo://bucket/run: TensorFlow has no file system for 'foo://'; "
                       "install its plugin (e.g. tensorflow-io for s3://) or use a local path.")
    assert os.listdir(tmp_path) == []


def test_appended_lines_on_ram_are_each_kept_whole(ram):
    path = f"{ram}/metrics.jsonl"
    for step in (10, 20, 30):
        files.append_line(path, json.dumps({"step": step}))
        assert [row["step"] for row in _rows(path)] == list(range(10, step + 1, 10))
    assert not gfile.exists(path + ".tmp")  # written beside it, then renamed into place
    files.write_text(path, '{"step": 10}\n{"st')  # a torn last line (a local file killed mid-write)
    files.append_line(path, json.dumps({"step": 20}))
    assert _read(path) == '{"step": 10}\n{"st\n{"step": 20}\n'


def test_the_helpers_on_ram_and_locally(ram, tmp_path):
    for root in (ram, str(tmp_path / "local")):
        files.makedirs(f"{root}/d/e")
        assert files.read_text(f"{root}/d/missing") is None
        files.write_text_atomically(f"{root}/d/a.json", "1")
        files.write_text_atomically(f"{root}/d/a.json", "2")
        assert files.read_text(f"{root}/d/a.json") == "2" and not files.exists(f"{root}/d/a.json.tmp")
        files.write_bytes(f"{root}/d/e/x", b"x")
        files.replace(f"{root}/d", f"{root}/moved")  # a directory
        assert files.read_text(f"{root}/moved/e/x") == "x" and not files.exists(f"{root}/d/e/x")
        files.remove_tree(f"{root}/moved")
        files.remove_tree(f"{root}/moved")  # nothing there: nothing done
        assert not files.exists(f"{root}/moved/a.json")
    files.remove_tree(str(tmp_path / "local"))
    assert files.is_remote("gs://b/run") and files.is_remote(ram) and not files.is_remote("/tmp/x")


def test_a_local_file_still_refuses_a_symbolic_link(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("theirs\n")
    os.symlink(target, tmp_path / "metrics.jsonl")
    with pytest.raises(TapekitError, match="is a symbolic link"):
        files.append_line(str(tmp_path / "metrics.jsonl"), "{}")
    os.symlink(target, tmp_path / "run.json.tmp")
    with pytest.raises(TapekitError, match="is a symbolic link"):
        files.write_text_atomically(str(tmp_path / "run.json"), "{}")
    assert target.read_text() == "theirs\n"


def test_the_command_line_on_ram_resumes_from_its_flags_txt_and_refuses_an_unknown_scheme(
        ram, tmp_path, cli_env):
    from helpers import run_cli
    first = run_cli(["--trainer=regression", "--model=mlp", f"--model_dir={ram}/run",
                     "--train_steps=10", "--steps_per_loop=10", "--progress=none"], cli_env)
    assert first.returncode == 0, first.stderr
    assert "--model=mlp" in _read(f"{ram}/run/flags.txt")
    # only --model_dir and a longer run: the rest (--model=mlp) is taken from flags.txt there
    second = run_cli([f"--model_dir={ram}/run", "--train_steps=20", "--steps_per_loop=10",
                      "--progress=none", f"--export_dir={ram}/export"], cli_env)
    assert second.returncode == 0, second.stderr
    assert "--model=mlp" in second.stderr  # "resuming the run in ... with the flags ..."
    assert json.loads(_read(f"{ram}/run/run.json"))["resumes"][0]["step"] == 10
    assert gfile.exists(f"{ram}/export/saved_model.pb")

    for trainer in (["--trainer=regression"], []):  # without --trainer, flags.txt is read first
        refused = run_cli(trainer + ["--model_dir=foo://bucket/run"], cli_env)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr
        assert refused.stderr.strip().splitlines()[-1] == (
            "tapekit-train: error: model_dir foo://bucket/run: TensorFlow has no file system for "
            "'foo://'; install its plugin (e.g. tensorflow-io for s3://) or use a local path.")
