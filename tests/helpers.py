"""Small shared pieces for the tests."""

import contextlib
import json
import os
import subprocess
import sys
import time

TAPEKIT_TRAIN = [sys.executable, "-m", "tapekit.trainers"]
TAPEKIT_EXPORT = [sys.executable, "-c", "from tapekit.trainers.main import export; export()"]
TESTS = os.path.dirname(os.path.abspath(__file__))


def run_cli(args, env, cwd=None, timeout=300, command=TAPEKIT_TRAIN):
    """Runs `command ARGS` (tapekit-train by default) and returns the CompletedProcess (text)."""
    return subprocess.run(list(command) + list(args), env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def start_cli(args, env, cwd, stderr=subprocess.PIPE):
    """Starts tapekit-train ARGS in the background (text pipes)."""
    return subprocess.Popen(TAPEKIT_TRAIN + list(args), cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=stderr, text=True)


def wait_for(path, process, timeout=120, containing=None):
    """Waits until `path` exists (and holds `containing`) while `process` runs."""
    deadline = time.monotonic() + timeout
    while not (os.path.exists(path) and (containing is None or containing in open(path).read())):
        assert process.poll() is None, f"the process ended ({process.returncode})"
        assert time.monotonic() < deadline, f"{path} never appeared (holding {containing!r})"
        time.sleep(0.02)


def wait_for_pause(pause_file, process, timeout=120):
    """Waits until a `resumable` trainer run with --pause_file=PAUSE_FILE has paused (at the
    end of the loop that reached --pause_at_step, its checkpoint saved); returns that step."""
    wait_for(pause_file, process, timeout)
    return int(open(pause_file).read())


def let_go(pause_file):
    """Lets a trainer paused by `wait_for_pause` go on."""
    open(f"{pause_file}.go", "w").close()


def reported_weights(stdout):
    """The WEIGHTS line a `resumable` trainer prints at the end: {"step", "weights"}."""
    line = next(l for l in stdout.splitlines() if l.startswith("WEIGHTS "))
    return json.loads(line[len("WEIGHTS "):])


@contextlib.contextmanager
def paused_cli(args, env, cwd, pause_file, step):
    """Starts a `resumable` tapekit-train ARGS with --pause_at_step=STEP and yields the process
    once it has paused there (its loop's checkpoint saved); kills it on the way out."""
    process = start_cli(list(args) + [f"--pause_at_step={step}", f"--pause_file={pause_file}"],
                        env, cwd)
    try:
        assert wait_for_pause(pause_file, process) == step
        yield process
    finally:
        process.kill()
        process.wait()


def user_trainer_module(name, train_step, arrays="np.ones([16, 2], np.float32)",
                        learning_rate=0.1):
    """The source of a module holding `class NAME(tapekit.Trainer)`: a Dense(1) under SGD on
    in-memory `arrays` (x, and its first column as y) with `train_step`'s body (indented
    8 spaces), for tests that run a user's trainer from the command line."""
    return f'''
import os
import numpy as np
import tensorflow as tf
import keras
import tapekit


class {name}(tapekit.Trainer):
    def build(self):
        self.model = keras.layers.Dense(1)
        self.optimizer = keras.optimizers.SGD({learning_rate})

    def train_arrays(self):
        x = {arrays}
        return x, x[:, :1]

    def train_step(self, batch):
{train_step}'''
