"""Small shared pieces for the tests."""

import contextlib
import json
import os
import subprocess
import sys
import time

TAPEKIT_TRAIN = [sys.executable, "-m", "tapekit.trainers"]
TAPEKIT_EXPORT = [sys.executable, "-c", "from tapekit.trainers.main import export; export()"]
TESTS = os.path.dirname(os.path.realpath(__file__))
REPO = os.path.dirname(TESTS)


def run_cli_process(args, env, cwd=None, timeout=300, command=TAPEKIT_TRAIN):
    """Runs `command ARGS` (tapekit-train by default) in a process of its own and returns the
    CompletedProcess (text). For what only a process shows: TensorFlow's import-time logs, a
    debugger on stdin (in-process, pytest takes pdb over); everything else runs in-process
    (`run_cli`)."""
    return subprocess.run(list(command) + list(args), env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def run_cli(args, env=None, cwd=None, command=TAPEKIT_TRAIN):
    """Runs tapekit-train ARGS (or tapekit-export, `command=TAPEKIT_EXPORT`) in this process, as
    `run_cli_process` would in its own, and returns a CompletedProcess: the exit code, stdout
    (prints) and stderr (absl's log lines, the one-line errors, a traceback if one escaped).

    Everything the command line sets for a process is put back afterwards: flag values (and the
    trainer's own flags, so the next run declares them again), the environment (`env`), the
    working directory (`cwd`), sys.path, modules imported from `cwd`, logging handlers and
    levels, and SIGINT/SIGTERM handlers. TensorFlow is imported once for all runs, which is
    what makes this several seconds faster than a process."""
    import io
    import logging
    import signal
    import traceback

    import tensorflow as tf
    from absl import app, flags
    from absl import logging as absl_logging

    from tapekit import cli
    from tapekit.trainers.main import BUILTIN_TRAINERS

    cli.define_common_flags()
    flag_names = set(flags.FLAGS)
    saved_environ, saved_cwd = dict(os.environ), os.getcwd()
    saved_path, saved_modules = list(sys.path), set(sys.modules)
    root = logging.getLogger()
    saved_handlers, saved_root_level = list(root.handlers), root.level
    saved_tf_level = tf.get_logger().level
    saved_signals = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    absl_handler = absl_logging.get_absl_handler().python_handler
    saved_stream, saved_exit = absl_handler.stream, os._exit
    stdout, stderr = io.StringIO(), io.StringIO()

    def exit_now(code):  # a failed write leaves by os._exit: end the run, not pytest
        raise SystemExit(code)

    program = "tapekit-export" if command == TAPEKIT_EXPORT else "tapekit-train"
    main = cli.export_main if command == TAPEKIT_EXPORT else cli.main
    returncode = 0
    try:
        if env is not None:
            os.environ.clear()
            os.environ.update(env)
        if cwd is not None:
            os.chdir(cwd)
        # Each run is app.run's first in its process (it adds absl's log handler, declares
        # --help* and raises --verbosity to INFO), as it is for tapekit-train.
        app._run_init.done = app._register_and_parse_flags_with_usage.done = False
        absl_handler.stream = stderr
        os._exit = exit_now
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                main(BUILTIN_TRAINERS, argv=[program] + list(args), program=program)
            except SystemExit as leaving:
                code = leaving.code
                if isinstance(code, str):  # as Python prints sys.exit("message")
                    print(code, file=sys.stderr)
                returncode = 1 if isinstance(code, str) else (code or 0)
            except Exception:  # noqa: BLE001 - as Python leaves on an uncaught exception
                traceback.print_exc()
                returncode = 1
    finally:
        os._exit = saved_exit
        absl_handler.stream = saved_stream
        # The trainer's own flags and app.run's --help* go: the next run declares them again
        # (the --help* only after it has read --trainer, as in a process).
        for name in set(flags.FLAGS) - flag_names:
            delattr(flags.FLAGS, name)
        app._define_help_flags_called = False
        flags.FLAGS.unparse_flags()
        root.handlers[:] = saved_handlers
        root.setLevel(saved_root_level)
        tf.get_logger().setLevel(saved_tf_level)
        for signum, handler in saved_signals.items():
            signal.signal(signum, handler)
        os.chdir(saved_cwd)
        if env is not None:
            os.environ.clear()
            os.environ.update(saved_environ)
        sys.path[:] = saved_path
        if cwd is not None and os.path.realpath(cwd) not in (TESTS, REPO):
            # a user's module of a temporary directory: the next test's may have its name
            here = os.path.realpath(cwd) + os.sep
            for name in set(sys.modules) - saved_modules:
                if os.path.realpath(getattr(sys.modules[name], "__file__", None) or "/"
                                    ).startswith(here):
                    del sys.modules[name]
    return subprocess.CompletedProcess([program] + list(args), returncode, stdout.getvalue(),
                                       stderr.getvalue())


def start_cli(args, env, cwd, stderr=subprocess.PIPE):
    """Starts tapekit-train ARGS in the background (text pipes)."""
    return subprocess.Popen(TAPEKIT_TRAIN + list(args), cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=stderr, text=True)


def wait_for(path, process, timeout=120, containing=None):
    """Waits until `path` exists (and holds `containing`) while `process` runs."""
    deadline = time.monotonic() + timeout
    while not (os.path.exists(path) and (containing is None or containing in open(path).read())):
        if process.poll() is not None:
            _, stderr = process.communicate()
            raise AssertionError(f"the process ended ({process.returncode}): "
                                 f"{(stderr or '')[-3000:]}")
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
    line = next(line for line in stdout.splitlines() if line.startswith("WEIGHTS "))
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
