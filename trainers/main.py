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


_EARLY_INFO = re.compile(r"^(I\d{4} |WARNING: All log messages before absl::InitializeLog)")


def _import_tensorflow_quietly() -> None:
    """Imports TensorFlow with its C++ INFO lines (oneDNN, CUDA stubs, CPU features, ...)
    left out of stderr. Some are printed while it loads, before TF_CPP_MIN_LOG_LEVEL is
    read, so stderr is caught during the import and every other line passed on."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    import tempfile
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as caught:
        os.dup2(caught.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            for line in caught.read().decode(errors="replace").splitlines(keepends=True):
                if not _EARLY_INFO.match(line):
                    sys.stderr.write(line)


# TensorFlow's own INFO lines bury tapekit's: hidden unless asked for (decided before
# TensorFlow is imported).
if not _shows_tensorflow_logs(sys.argv):
    _import_tensorflow_quietly()

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
