"""Concrete tapekit trainers and their entrypoint (installed as `tapekit.trainers`)."""

from tapekit.trainers.gan import GANTrainer
from tapekit.trainers.regression import RegressionTrainer

__all__ = ["GANTrainer", "RegressionTrainer"]
