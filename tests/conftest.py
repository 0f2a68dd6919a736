"""Test set-up: two logical CPU devices, so MirroredStrategy runs 2 replicas on this machine."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from tapekit import distribute  # noqa: E402

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
