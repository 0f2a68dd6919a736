"""Installed, the repository's models/ and trainers/ live under tapekit., never at the top level."""

import os
import subprocess
import sys
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_installed_names_are_under_tapekit(tmp_path):
    code = ("import importlib.util as u, tapekit.models, tapekit.trainers;"
            "print(u.find_spec('models'), u.find_spec('trainers'));"
            "print(tapekit.models.MLP.__module__, tapekit.trainers.RegressionTrainer.__module__)")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.split("\n")
    assert lines[0] == "None None"  # no top-level `models` / `trainers` package is installed
    assert lines[1] == "tapekit.models.mlp tapekit.trainers.regression"


def test_wheel_maps_models_and_trainers_under_tapekit(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(tmp_path), REPO],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = [name for name in os.listdir(tmp_path) if name.endswith(".whl")]
    names = zipfile.ZipFile(tmp_path / wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"tapekit"}
    assert "tapekit/models/mlp.py" in names and "tapekit/trainers/main.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "tapekit-train = tapekit.trainers.main:run" in zipfile.ZipFile(
        tmp_path / wheel).read(entry_points).decode()
