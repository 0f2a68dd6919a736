"""The tree shows the architecture, and keeps to the limits issue 27 set (no TensorFlow)."""

import ast
import glob
import os
import subprocess
import sys

from tapekit import errors

from conftest import REPO

TAPEKIT = os.path.join(REPO, "tapekit")
SUBPACKAGES = ("callbacks", "checkpoint", "compiled", "faults", "input", "run")


def modules():
    return sorted(glob.glob(os.path.join(TAPEKIT, "**", "*.py"), recursive=True))


def test_each_subpackage_states_its_one_idea_and_imports_nothing_heavy():
    found = sorted(os.path.basename(os.path.dirname(path))
                   for path in glob.glob(os.path.join(TAPEKIT, "*", "__init__.py")))
    assert found == sorted(SUBPACKAGES)
    for name in SUBPACKAGES:
        assert ast.get_docstring(ast.parse(open(os.path.join(TAPEKIT, name, "__init__.py")).read()))
    # Importing every subpackage (and the TensorFlow-free outer loop) with TensorFlow unimportable.
    code = ("import sys; sys.modules['tensorflow'] = None; sys.modules['keras'] = None\n"
            + "".join(f"import tapekit.{name}\n" for name in SUBPACKAGES)
            + "import tapekit.run.controller, tapekit.faults.rollback, tapekit.faults.stop\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_no_module_global_is_assigned_by_a_function():
    statements = [f"{os.path.relpath(path, REPO)}:{node.lineno}" for path in modules()
                  for node in ast.walk(ast.parse(open(path).read()))
                  if isinstance(node, ast.Global)]
    assert not statements


def test_the_engine_and_the_outer_loop_stay_readable():
    engine = os.path.join(TAPEKIT, "run", "engine.py")
    assert len(open(engine).read().splitlines()) <= 300
    controller = ast.parse(open(os.path.join(TAPEKIT, "run", "controller.py")).read())
    (train,) = [node for node in ast.walk(controller)
                if isinstance(node, ast.FunctionDef) and node.name == "train"]
    assert train.end_lineno - train.lineno + 1 <= 60


def test_no_tapekit_frame_in_any_subpackage_is_taken_for_the_users_code():
    assert len(modules()) > 30
    blamed = [path for path in modules() if errors.is_user_code(path)]
    assert not blamed
    assert errors.is_user_code(os.path.join(REPO, "examples", "wgan_gp.py"))  # theirs is
