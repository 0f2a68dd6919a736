"""`tapekit.checkpoint.best`: best.json, the kept checkpoint and export, resumed from best.json.

On a real `Checkpointer` of one variable (no trainer): what best/ holds after each offer.
"""

import glob
import os

import pytest
import tensorflow as tf

from tapekit.checkpoint import best as best_lib
from tapekit.checkpoint import checkpointing
from tapekit.checkpoint.checkpointing import Checkpointer


def _best(model_dir, variable, mode="min", export=None, metric="loss"):
    checkpointer = Checkpointer({"global_step": variable}, str(model_dir), True, max_to_keep=2,
                                subdirectory=best_lib.DIRECTORY)
    return best_lib.Best(str(model_dir / best_lib.DIRECTORY), metric, mode, checkpointer, export)


def _kept(model_dir):
    return sorted(os.path.basename(p) for p in glob.glob(str(model_dir / "best" / "ckpt-*.index")))


def test_best_keeps_one_checkpoint_of_the_best_value_and_resumes_from_best_json(tmp_path):
    variable = tf.Variable(0, dtype=tf.int64)
    exports = []
    best = _best(tmp_path, variable, export=lambda path: (os.makedirs(path), exports.append(path)))
    offers = [(10, 2.0), (20, 3.0), (30, 1.0), (40, float("nan"))]
    kept = []
    for step, value in offers:
        variable.assign(step)
        kept.append(best.consider(step, value))
    assert kept == [True, False, True, False]
    assert (best.value, best.step) == (1.0, 30)
    record = best_lib.read(str(tmp_path / "best"))
    assert record == {"metric": "loss", "value": 1.0, "step": 30,
                      "checkpoint": str(tmp_path / "best" / "ckpt-30")}
    assert _kept(tmp_path) == ["ckpt-30.index"]
    assert checkpointing.latest(str(tmp_path / "best")) == record["checkpoint"]
    assert checkpointing.saved_step(record["checkpoint"]) == 30
    assert len(exports) == 2 and sorted(os.listdir(tmp_path / "best")) == [
        "best.json", "checkpoint", "ckpt-30.data-00000-of-00001", "ckpt-30.index", "saved_model"]

    resumed = _best(tmp_path, variable)  # a resumed run, or an evaluator process
    assert (resumed.value, resumed.step) == (1.0, 30)
    assert not resumed.consider(50, 1.5)
    assert _best(tmp_path, variable, metric="accuracy", mode="max").value is None


def test_a_failed_export_leaves_best_at_the_previous_best(tmp_path):
    variable = tf.Variable(0, dtype=tf.int64)

    def export(path):
        if variable.numpy() == 20:
            raise OSError(28, "No space left on device", path)
        os.makedirs(path)

    best = _best(tmp_path, variable, mode="max", export=export)
    best.consider(10, 0.5)
    variable.assign(20)
    with pytest.raises(OSError, match="No space left"):
        best.consider(20, 0.9)
    assert best_lib.read(str(tmp_path / "best"))["step"] == 10
    assert _kept(tmp_path) == ["ckpt-10.index"]
    assert checkpointing.latest(str(tmp_path / "best")).endswith("ckpt-10")
    assert not os.path.exists(tmp_path / "best" / "saved_model.partial")
    assert (best.value, best.step) == (0.5, 10)
