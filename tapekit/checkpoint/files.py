"""Writing files into a model_dir that other people's symlinks cannot redirect.

A shared `model_dir` may hold entries somebody else made. tapekit never writes through a
symbolic link: the files it opens itself are opened with `O_NOFOLLOW` (a link in their
place is refused, not followed), and before a run starts, the entries it writes into
(checkpoints/, summaries/, samples/, best/, the metrics and record files) are checked not
to be links that lead out of the model_dir. Files are created with mode 0o666 less the
user's umask, as `open` creates them.
"""

import os

from tapekit.errors import TapekitError

# What tapekit writes at the top of a model_dir (TensorFlow writes inside the directories).
ENTRIES = ("checkpoints", "summaries", "samples", "best", "profile", "metrics.jsonl",
           "metrics.jsonl.tmp", "eval_metrics.jsonl", "run.json", "run.json.tmp", "flags.txt",
           "flags.txt.tmp")


def check_links(model_dir: str) -> None:
    """Raises if one of tapekit's entries in `model_dir` is a symbolic link that leads out
    of it (tapekit would write where the link points)."""
    root = os.path.realpath(model_dir)
    for name in ENTRIES:
        path = os.path.join(model_dir, name)
        if not os.path.islink(path):
            continue
        target = os.path.realpath(path)
        if os.path.commonpath([root, target]) != root:
            raise TapekitError(
                f"{path} is a symbolic link to {target}, outside the model_dir; tapekit never "
                "writes through one. Remove the link (or use another --model_dir).")


def open_for_writing(path: str, append: bool = False, binary: bool = False):
    """`open(path, "w"/"a")` that refuses to follow a symbolic link at `path`."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC) | os.O_NOFOLLOW
    try:
        descriptor = os.open(path, flags, 0o666)
    except OSError:
        if os.path.islink(path):
            raise TapekitError(f"{path} is a symbolic link; tapekit never writes through one. "
                               "Remove it.") from None
        raise
    return os.fdopen(descriptor, ("a" if append else "w") + ("b" if binary else ""))


def write_bytes(path: str, data: bytes) -> None:
    """Writes `data` to a local `path` without following a link there; other file systems
    (gs://, ...) through TensorFlow."""
    if "://" in path:
        import tensorflow as tf
        tf.io.write_file(path, data)
        return
    with open_for_writing(path, binary=True) as stream:
        stream.write(data)
