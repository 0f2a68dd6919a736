"""Concrete tapekit trainers and their entrypoint (installed as `tapekit.trainers`)."""

__all__ = ["GANTrainer", "RegressionTrainer"]


def __getattr__(name):
    # Imported on first use, so that `python -m tapekit.trainers` decides how loud TensorFlow
    # is before importing it (`tapekit.trainers.main`).
    if name == "GANTrainer":
        from tapekit.trainers.gan import GANTrainer
        return GANTrainer
    if name == "RegressionTrainer":
        from tapekit.trainers.regression import RegressionTrainer
        return RegressionTrainer
    raise AttributeError(f"module 'tapekit.trainers' has no attribute {name!r}")
