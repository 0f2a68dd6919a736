"""The `tapekit-train` entrypoint: the built-in trainers plus any user subclass by path."""

from tapekit import cli

BUILTIN_TRAINERS = {
    "regression": "tapekit.trainers.regression:RegressionTrainer",
    "gan": "tapekit.trainers.gan:GANTrainer",
}


def run() -> None:
    cli.main(BUILTIN_TRAINERS)


if __name__ == "__main__":
    run()
