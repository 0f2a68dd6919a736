"""Small shared pieces for the tests."""

import subprocess
import sys

TAPEKIT_TRAIN = [sys.executable, "-m", "tapekit.trainers"]


def run_cli(args, env, cwd=None, timeout=300):
    """Runs `python -m tapekit.trainers ARGS` and returns the CompletedProcess (text)."""
    return subprocess.run(TAPEKIT_TRAIN + list(args), env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)
