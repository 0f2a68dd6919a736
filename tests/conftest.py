"""Test set-up: two logical CPU devices, so MirroredStrategy runs 2 replicas on this machine."""

import gc
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

from tapekit.run import distribute  # noqa: E402

# Before any TensorFlow op runs in this process.
distribute.split_cpu(2)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# What can differ between the TensorFlow/Keras pairs tapekit supports, marked version_sensitive
# (setup.cfg): `make test-oldest` runs only these on the oldest pair; `make test` runs
# everything on the newest. A test elsewhere is marked one by one.
VERSION_SENSITIVE = {
    "test_compat.py": "private TensorFlow/Keras names, each checked on named versions",
    "test_optimizer_table.py": "every Keras optimizer and clipping option, by hand and resumed",
    "test_updates.py": "gradient summing and clipping inside Keras optimizers",
    "test_gradient_norms.py": "norms of what Keras optimizers are given and clip, in the graph",
    "test_ema.py": "the optimizer's EMA of the weights",
    "test_checkpointing.py": "tf.train.Checkpoint of Keras variables",
    "test_state.py": "what a checkpoint holds (Keras variables, optimizer slots, iterators)",
    "test_saved_checkpoint.py": "a checkpoint written by earlier code restores bit for bit",
    "test_resume.py": "bitwise resume after SIGKILL, on 1 and 2 replicas",
    "test_conformance.py": "Keras layer families: learn, replicas agree, resume bitwise",
    "test_async_checkpoint.py": "TensorFlow's async checkpoint copying Keras variables",
    "test_randomness.py": "Keras seed generators and op determinism",
    "test_precision.py": "Keras mixed precision and loss scaling",
    "test_xla.py": "jit_compile and Keras's StatelessScope",
    "test_build.py": "AutoGraph and the captured tensors of a build trace",
    "test_summaries.py": "summary metadata written through TensorFlow internals",
    "test_step_summaries.py": "tf.summary state in tf.function and MirroredStrategy's threads",
    "test_export.py": "SavedModel export of Keras models",
    "test_missing_checkpoints.py": "which checkpoints TensorFlow finds and reads whole",
    "test_object_store.py": "tf.io.gfile's ram:// file system under checkpoints and records",
}


def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.name in VERSION_SENSITIVE:
            item.add_marker(pytest.mark.version_sensitive)


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
