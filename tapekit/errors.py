"""The one exception type tapekit raises for mistakes a user can fix, and errors for people:
one line that names the user's own line of code (never a tapekit frame) and what to do.

Imports no TensorFlow (the command line and the controller use it without).
"""

import errno
import functools
import os
import re
import threading
import traceback
from typing import Optional, Tuple

# Exit codes of the command line (docs/checkpoints-and-faults.md, "Exit codes"): 0 done or
# preempted (requeue resumes), 1 a crash (a Python traceback), 2 a TapekitError,
# 74 a write failed (EX_IOERR: a full disk, a lost permission), 130 Ctrl-C.
EXIT_ERROR = 2
EXIT_WRITE_FAILED = 74


class TapekitError(Exception):
    """A user-facing error: one line saying what was wrong and what to do.

    The command line prints only this line (no traceback) and exits non-zero.
    """

    exit_code = EXIT_ERROR


class WriteFailed(TapekitError):
    """A write into the model_dir (or an export) failed: the job stops, nothing saved is
    touched, and the same command resumes once the cause is fixed."""

    exit_code = EXIT_WRITE_FAILED


_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO,
                 errno.ESTALE, errno.ENOTCONN}
_WRITE_MESSAGES = re.compile(r"No space left on device|Disk quota exceeded|Read-only file system|"
                             r"Permission denied|Input/output error|Stale file handle|"
                             r"Transport endpoint is not connected")


def pass_through(error: BaseException, stopped: TapekitError) -> BaseException:
    """Lets `error` (not tapekit's: the user's exception, e.g. a sweep's `TrialPruned`)
    reach the caller as the same object, carrying tapekit's one line about what was done
    (`stopped`): as a note in its traceback and for the command line (`stop_of`)."""
    error.tapekit_error = stopped
    if hasattr(error, "add_note"):  # Python 3.11+
        error.add_note(f"tapekit: {stopped}")
    return error


# Where the exceptions of bugs come from; any other exception class is the user's own.
_LIBRARIES = ("builtins", "tensorflow", "keras", "tf_keras", "numpy", "absl", "google",
              "tapekit")


def own_exception(error: BaseException) -> Optional[BaseException]:
    """The exception the user raised, when its class is their own (or a third party's,
    such as a sweep's `TrialPruned`) rather than Python's, TensorFlow's, Keras's or
    tapekit's; else None. AutoGraph re-raises a copy with the trace prepended, whose
    context is the original: that original is returned, the object the user raised."""
    if type(error).__module__.split(".")[0] in _LIBRARIES:
        return None
    original = error
    while type(original.__context__) is type(error):
        original = original.__context__
    return original


def stop_of(error: BaseException) -> Optional[TapekitError]:
    """The one-line TapekitError behind `error`: itself, or the one it carries
    (`pass_through`); None for an error tapekit did not handle."""
    if isinstance(error, TapekitError):
        return error
    stopped = getattr(error, "tapekit_error", None)
    return stopped if isinstance(stopped, TapekitError) else None


def write_failure(error: BaseException, model_dir: Optional[str] = None) -> Optional[str]:
    """'No space left on device: /path' when `error` is a failed write into `model_dir` (an
    OSError of that kind, or TensorFlow's report of one, about a path under it), else None:
    a file that cannot be read elsewhere (a dataset, a hook's own file) is not one. A file
    missing under `model_dir` counts too (its file system went away)."""
    if not model_dir:
        return None
    root = os.path.realpath(model_dir)

    def inside(path) -> bool:
        try:
            return os.path.commonpath([root, os.path.realpath(str(path))]) == root
        except ValueError:
            return False

    if isinstance(error, OSError):
        if error.filename is None or not inside(error.filename):
            return None
        if error.errno in _WRITE_ERRNOS or isinstance(error, FileNotFoundError):
            return f"{error.strerror or type(error).__name__}: {error.filename}"
        return None
    text = str(error)
    found = _WRITE_MESSAGES.search(text)
    paths = [path for path in re.findall(r"(/[^\s:;'\"]+)", text) if inside(path)]
    if found is None or not paths:
        return None
    return f"{found.group(0)}: {paths[0]}"


def user_message(error: BaseException) -> str:
    """The one-line message of `error`, without what AutoGraph adds when it re-raises.

    An error raised while a `tf.function` is traced comes back with "in user code:" and
    a stack prepended; its last line is the original `TapekitError: message`.
    """
    text = str(error).strip()
    last = text.splitlines()[-1].strip() if text else ""
    prefix = "TapekitError: "
    return last[len(prefix):] if last.startswith(prefix) else last


def summarize(error: BaseException) -> str:
    """The most informative single line of an exception from TensorFlow or Keras.

    Keras wraps layer errors as "Exception encountered when calling X.call()." followed by
    the real message (in ANSI bold) and the arguments; this returns the real message.
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    # AutoGraph puts "in user code:" and the user's frames before the original message.
    original = list(re.finditer(r"^\s*(?:[\w.]+(?:Error|Exception)): ", text, re.M))
    if "in user code:" in text and original:
        text = text[original[-1].end():]
    # Keras' symbolic build of a Sequential wraps a layer's error after "Error encountered:".
    text = text.split("Error encountered:", 1)[-1]
    lines = [line.strip() for line in text.splitlines()]
    useful = [line for line in lines if line and not line.startswith(
        ("Exception encountered when calling", "Arguments received by", "•"))]
    return useful[0] if useful else type(error).__name__


def describe_spec(spec) -> str:
    """'(float32[100, 5], float32[100, 1])' for a structure of TensorSpecs."""
    import tensorflow as tf
    def one(s):
        shape = getattr(s, "shape", None)
        dtype = getattr(getattr(s, "dtype", None), "name", "?")
        return f"{dtype}{list(shape) if shape is not None and shape.rank is not None else '[?]'}"
    parts = [one(s) for s in tf.nest.flatten(spec)]
    return parts[0] if len(parts) == 1 else "(" + ", ".join(parts) + ")"


# ------------------------------------------------------------------ the user's code

_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)[^\n]*\n\s*(.*)')
# A layer refusing its input, or an op refusing the dtype it was fed: the data's fault.
_DATA_ERRORS = re.compile(
    r"is incompatible with the layer|expected axis .* of input shape|expected shape=|"
    r"found shape=|DataType \w+ not in list of allowed values|Cannot convert .* to EagerTensor"
    r"|could not convert string|expected [\w ]*dtype|incompatible with the expected dtype")


@functools.lru_cache(maxsize=1)
def _framework_dirs() -> Tuple[str, ...]:
    """TensorFlow, Keras, absl, the standard library, and tapekit's whole package (every
    subpackage, judged from its root: this file's folder) and its models."""
    import absl
    import keras
    import tensorflow as tf

    from tapekit import models
    dirs = [os.path.dirname(module.__file__) for module in (tf, keras, absl, threading, models)]
    dirs.append(os.path.dirname(os.path.abspath(__file__)))  # tapekit/, with its subpackages
    return tuple(os.path.realpath(d) + os.sep for d in dirs)


def user_frame(error: BaseException) -> Optional[str]:
    """'path/to/file.py:42 (`code`)' for the innermost line of user code behind `error`:
    from AutoGraph's "in user code" trace (listed outermost first) when there is one, else
    from the traceback."""
    traced = [(m.group(1), int(m.group(2)), m.group(4).strip()) for m in _FRAME.finditer(str(error))]
    raised = [(f.filename, f.lineno, (f.line or "").strip())
              for f in traceback.extract_tb(error.__traceback__)]
    for frames in (traced, raised):
        mine = [frame for frame in frames if is_user_code(frame[0])]
        if mine:
            path, line, code = mine[-1]
            relative = os.path.relpath(path)
            shown = path if relative.startswith("..") else relative
            return f"{shown}:{line}" + (f" (`{code}`)" if code else "")
    return None


def calling_user_frame() -> Optional[str]:
    """'path/to/file.py:42 (`code`)' for the innermost line of user code calling tapekit now
    (None inside AutoGraph's generated code, whose lines are not the user's)."""
    frames = [frame for frame in traceback.extract_stack() if is_user_code(frame.filename)]
    if not frames:
        return None
    frame = frames[-1]
    relative = os.path.relpath(frame.filename)
    shown = frame.filename if relative.startswith("..") else relative
    return f"{shown}:{frame.lineno}" + (f" (`{frame.line.strip()}`)" if frame.line else "")


def is_user_code(path: str) -> bool:
    return not (path.startswith("<") or os.path.basename(path).startswith("__autograph_generated")
                or os.path.realpath(path).startswith(_framework_dirs()))


def blames_data(error: BaseException) -> bool:
    """Whether the original message (not Keras' echo of the arguments) is an input error."""
    return bool(_DATA_ERRORS.search(summarize(error)))


_EAGER_ONLY = re.compile(r"object has no attribute 'numpy'|as a Python `bool` is not allowed|"
                         r"iterating over `tf.Tensor` is not allowed|"
                         r"Cannot convert a symbolic tf.Tensor|__array__\(\) on a symbolic")


def needs_eager(error: BaseException) -> bool:
    """Whether `error` is the classic compiled-mode mistake: a tensor's value (`.numpy()`,
    NumPy on a tensor) or a Python `if`/`for` on one, in code AutoGraph does not convert."""
    return bool(_EAGER_ONLY.search(str(error)))
