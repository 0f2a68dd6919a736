"""Test set-up: two logical CPU devices, so MirroredStrategy runs 2 replicas on this machine."""

import gc
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

from tapekit.run import distribute  # noqa: E402

# Before any TensorFlow op runs in this process.
distribute.split_cpu(2)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def cli_env():
    """Environment for running tapekit-train in a subprocess (quiet TF logs)."""
    env = dict(os.environ)
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env.pop("TF_CONFIG", None)
    return env


@pytest.fixture(autouse=True)
def _freeze_what_earlier_tests_left():
    """Moves what each test leaves behind out of the garbage collector's sight.

    TensorFlow graphs and Keras models of earlier tests stay alive in reference cycles; with
    ~1.5 million such objects a full collection took over a minute inside a later test.
    """
    yield
    gc.freeze()
