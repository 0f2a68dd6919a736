"""The `tapekit-train` entrypoint: the built-in trainers plus any user subclass by path."""

from tapekit import cli

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
