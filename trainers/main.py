"""The `tapekit-train` entrypoint: the built-in trainers plus any user subclass by path."""

import os
import re
import sys


def _shows_tensorflow_logs(argv) -> bool:
    """--tensorflow_logs, or absl's --verbosity/-v of 1 or more, among `argv`."""
    for arg in argv[1:]:
        if arg in ("--tensorflow_logs", "--tensorflow_logs=true", "--tensorflow_logs=True"):
            return True
        level = re.fullmatch(r"(?:--verbosity|-v)=(-?\d+)", arg)
        if level and int(level.group(1)) >= 1:
            return True
    return False


# TensorFlow's C++ INFO lines (oneDNN, CPU features, collectives, ...) bury tapekit's own;
# they are hidden unless asked for, which must be decided before TensorFlow is imported.
if not _shows_tensorflow_logs(sys.argv):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from tapekit import cli  # noqa: E402

BUILTIN_TRAINERS = {
    "regression": "tapekit.trainers.regression:RegressionTrainer",
    "gan": "tapekit.trainers.gan:GANTrainer",
}


def run() -> None:
    """`tapekit-train`."""
    cli.main(BUILTIN_TRAINERS)


def export() -> None:
    """`tapekit-export`: a SavedModel from a run's checkpoint (see `tapekit.cli.export_main`)."""
    cli.export_main(BUILTIN_TRAINERS)


if __name__ == "__main__":
    run()
