"""The one exception type tapekit raises for mistakes a user can fix, and message helpers."""

import errno
import os
import re
from typing import Optional

# Exit codes of the command line (BUILD.md, "Faults and what tapekit does"): 0 done or
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
