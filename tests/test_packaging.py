"""Installed, the repository's models/ and trainers/ live under tapekit., never at the top level."""

import importlib.util
import os
import shutil
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
    # Built from a copy, so that no build/ or *.egg-info is written into the repository and
    # no stale build/lib from an earlier build lands in the wheel.
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", "runs", "demo_runs"))
    for needed in ("setuptools", "wheel"):  # the build backend, used from this environment
        assert importlib.util.find_spec(needed), f"{needed} is missing: pip install -e '.[test]'"
    # Without build isolation and without an index: works offline.
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-build-isolation", "--no-deps",
         "--no-index", "-w", str(tmp_path / "dist"), str(source)],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = [name for name in os.listdir(tmp_path / "dist") if name.endswith(".whl")]
    names = zipfile.ZipFile(tmp_path / "dist" / wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"tapekit"}
    assert "tapekit/models/mlp.py" in names and "tapekit/trainers/main.py" in names
    sources = {os.path.relpath(os.path.join(folder, name), REPO)
               for folder, _, found in os.walk(os.path.join(REPO, "tapekit"))
               for name in found if name.endswith(".py")}
    assert len(sources) > 30 and sources <= set(names), sorted(sources - set(names))  # every subpackage
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "tapekit-train = tapekit.trainers.main:run" in zipfile.ZipFile(
        tmp_path / "dist" / wheel).read(entry_points).decode()
