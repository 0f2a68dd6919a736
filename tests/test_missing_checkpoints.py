"""Checkpoint files that go missing (issue 29): the checkpoints on disk decide where a run
resumes, not only the `checkpoint` state file, and a run never silently starts from step 0
over checkpoints it could not read."""

import glob
import json
import os

import numpy as np
import pytest

from tapekit.errors import TapekitError

from test_faults import _train

STATE = """model_checkpoint_path: "{latest}"
{listed}"""


def _state(model_dir, latest, listed):
    text = STATE.format(latest=latest, listed="".join(
        f'all_model_checkpoint_paths: "{name}"\n' for name in listed))
    (model_dir / "checkpoints" / "checkpoint").write_text(text)


def _snapshot(model_dir):
    return {path: os.path.getsize(path) for path in glob.glob(str(model_dir / "**"), recursive=True)
            if os.path.isfile(path)}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("whole"), 40)


@pytest.mark.parametrize("listed", [["ckpt-10", "ckpt-20", "ckpt-99"], ["ckpt-99"]],
                         ids=["lists-the-whole-one", "lost-it"])
def test_a_state_file_naming_missing_files_falls_back_to_the_newest_whole_one(
        tmp_path, uninterrupted, listed, caplog):
    _train(tmp_path, 20)  # ckpt-10 and ckpt-20 on disk
    _state(tmp_path, "ckpt-99", listed)  # a cleanup job deleted ckpt-99 after the file was written
    rows_before = (tmp_path / "metrics.jsonl").read_text()
    resumed = _train(tmp_path, 40)
    assert resumed.history[0]["step"] == 30  # from ckpt-20, not from 0
    for a, b in zip(uninterrupted.model.weights, resumed.model.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert (tmp_path / "metrics.jsonl").read_text().startswith(rows_before)  # rows kept
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["resumes"][-1]["fell_back"]["resumed_from"].endswith("ckpt-20")
    assert record["resumes"][-1]["fell_back"]["damaged"][0].endswith("ckpt-99")
    (line,) = [r.getMessage() for r in caplog.records if "ckpt-99 is damaged" in r.getMessage()]
    assert "NotFoundError" in line and "resuming from" in line and line.endswith("ckpt-20")


def test_a_lone_checkpoint_missing_its_data_is_refused_in_one_line_touching_nothing(tmp_path):
    _train(tmp_path, 10)
    (data,) = glob.glob(str(tmp_path / "checkpoints" / "ckpt-10.data-*"))
    os.remove(data)  # the index is there, the data file is gone
    before = _snapshot(tmp_path)
    with pytest.raises(TapekitError) as error:
        _train(tmp_path, 40)
    message = str(error.value)
    assert "\n" not in message and "has checkpoints but none is whole" in message
    assert "ckpt-10 cannot be read (NotFoundError" in message
    assert "Nothing was restored, moved or written" in message
    assert _snapshot(tmp_path) == before  # run.json, metrics.jsonl, the index: as they were


def test_missing_data_is_damage_like_a_torn_file_with_an_older_whole_one(tmp_path, uninterrupted):
    _train(tmp_path, 30)
    for data in glob.glob(str(tmp_path / "checkpoints" / "ckpt-30.data-*")):
        os.remove(data)
    resumed = _train(tmp_path, 40)
    assert resumed.history[0]["step"] == 30  # from ckpt-20: loop 21-30 trained again
    for a, b in zip(uninterrupted.model.weights, resumed.model.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    (aside,) = glob.glob(str(tmp_path / "checkpoints" / "set_aside-*"))
    assert os.path.exists(os.path.join(aside, "ckpt-30.index"))  # moved aside, not deleted
