"""`python -m tapekit.trainers`: the same entrypoint as the `tapekit-train` script."""

from tapekit.trainers.main import run

if __name__ == "__main__":
    run()
