"""The file helpers for model_dir paths: local paths that other people's symlinks cannot
redirect, and paths with a scheme (gs://, s3://, ram://) through TensorFlow's `tf.io.gfile`.

Every file tapekit reads or writes under a model_dir goes through here (TensorFlow writes
checkpoints and summaries itself, through the same file systems).

A local path keeps its protections. A shared `model_dir` may hold entries somebody else
made, and tapekit never writes through a symbolic link: the files it opens itself are
opened with `O_NOFOLLOW` (a link in their place is refused, not followed), and before a run
starts, the entries it writes into (checkpoints/, summaries/, samples/, best/, the metrics
and record files) are checked not to be links that lead out of the model_dir
(`check_links`). Files are created with mode 0o666 less the user's umask, as `open` creates
them; a file rewritten whole is written beside it and renamed into place (`os.replace`).

A path with a scheme goes through `tf.io.gfile` (TensorFlow is imported only then, so
`tapekit.callbacks` imports without it). Object stores have no links, no append and no
atomic rename: `replace` is a copy and a delete there (an object is only ever seen whole,
but a job killed between the two leaves the `.tmp` beside it), and `append_line` reads the
file and writes it again whole through `write_text_atomically`, so every appended line
that returned is in the file, and a reader never sees a line cut in half.
"""

import os
import shutil
from typing import List, Optional

from tapekit.errors import TapekitError

# What tapekit writes at the top of a model_dir (TensorFlow writes inside the directories).
ENTRIES = ("checkpoints", "summaries", "samples", "best", "profile", "metrics.jsonl",
           "metrics.jsonl.tmp", "metrics.csv", "metrics.csv.tmp", "eval_metrics.jsonl", "run.json",
           "run.json.tmp", "flags.txt", "flags.txt.tmp")


def is_remote(path) -> bool:
    """Whether `path` has a scheme (gs://, s3://, ram://, ...): TensorFlow's file systems."""
    return "://" in str(path)


def _gfile():
    import tensorflow as tf
    return tf


def check_scheme(path: str) -> None:
    """Raises, in one line, if TensorFlow has no file system for `path`'s scheme (foo://)."""
    if not is_remote(path):
        return
    tf = _gfile()
    try:
        tf.io.gfile.exists(path)
    except tf.errors.UnimplementedError:
        scheme = str(path).split("://", 1)[0]
        raise TapekitError(
            f"model_dir {path}: TensorFlow has no file system for '{scheme}://'; install its "
            "plugin (e.g. tensorflow-io for s3://) or use a local path.") from None


def check_links(model_dir: str) -> None:
    """Raises if one of tapekit's entries in `model_dir` is a symbolic link that leads out
    of it (tapekit would write where the link points). Object stores have no links."""
    if is_remote(model_dir):
        return
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
    """`open(path, "w"/"a")` that refuses to follow a symbolic link at `path`. Local only."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC) | os.O_NOFOLLOW
    try:
        descriptor = os.open(path, flags, 0o666)
    except OSError:
        if os.path.islink(path):
            raise TapekitError(f"{path} is a symbolic link; tapekit never writes through one. "
                               "Remove it.") from None
        raise
    return os.fdopen(descriptor, ("a" if append else "w") + ("b" if binary else ""))


def exists(path: str) -> bool:
    if is_remote(path):
        return _gfile().io.gfile.exists(path)
    return os.path.exists(path)


def makedirs(path: str) -> None:
    """Creates directory `path` and its parents (nothing if it exists)."""
    if is_remote(path):
        _gfile().io.gfile.makedirs(path)
    else:
        os.makedirs(path, exist_ok=True)


def read_text(path: str) -> Optional[str]:
    """The text of file `path`, or None when there is none."""
    if not is_remote(path):
        if not os.path.exists(path):
            return None
        with open(path) as stream:
            return stream.read()
    tf = _gfile()
    try:  # read, not exists() first: an object store has no directories to tell apart
        with tf.io.gfile.GFile(path, "r") as stream:
            return stream.read()
    except tf.errors.NotFoundError:
        return None


def write_bytes(path: str, data: bytes) -> None:
    """Writes `data` to file `path` (a local one without following a link there)."""
    if is_remote(path):
        if str(path).startswith("ram://"):  # its files are appended to, where others truncate
            remove_tree(path)
        with _gfile().io.gfile.GFile(path, "wb") as stream:
            stream.write(data)
        return
    with open_for_writing(path, binary=True) as stream:
        stream.write(data)


def write_text(path: str, text: str) -> None:
    """Writes `text` to file `path` (a local one without following a link there)."""
    write_bytes(path, text.encode("utf-8"))


def replace(source: str, target: str) -> None:
    """Renames file or directory `source` to `target`, replacing a file there (a local
    directory `target` must be absent or empty). Local: `os.replace`, atomic. With a scheme:
    each file copied and deleted (object stores rename nothing in one step)."""
    if not is_remote(source):
        os.replace(source, target)
        return
    gfile = _gfile().io.gfile
    if not gfile.isdir(source):
        gfile.rename(source, target, overwrite=True)
        return
    for name in _files_under(source):
        gfile.makedirs(os.path.dirname(os.path.join(target, name)))
        gfile.rename(os.path.join(source, name), os.path.join(target, name), overwrite=True)
    remove_tree(source)


def write_text_atomically(path: str, text: str) -> None:
    """Writes `text` to `path.tmp` and renames it to `path`: a reader sees the old file or the
    new one, never half of one (with a scheme: see `replace`)."""
    write_text(path + ".tmp", text)
    replace(path + ".tmp", path)


def append_line(path: str, line: str) -> None:
    """Appends `line` and a newline to file `path`, creating it. Local: `O_APPEND`, no
    link followed. With a scheme (object stores cannot append): the file is read and written
    again whole, atomically, so it holds every line appended before, or the new one too."""
    if not is_remote(path):
        with open_for_writing(path, append=True) as stream:
            stream.write(line + "\n")
        return
    old = read_text(path) or ""
    if old and not old.endswith("\n"):
        old += "\n"
    write_text_atomically(path, old + line + "\n")


def remove_tree(path: str) -> None:
    """Deletes directory (or file) `path` and all it holds; nothing if there is none."""
    if not is_remote(path):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.remove(path)
        return
    tf = _gfile()
    try:
        if tf.io.gfile.isdir(path):
            tf.io.gfile.rmtree(path)
        else:
            tf.io.gfile.remove(path)
    except tf.errors.NotFoundError:
        pass


def _files_under(directory: str) -> List[str]:
    """Every file below `directory` (with a scheme), as paths relative to it."""
    gfile = _gfile().io.gfile
    result = []
    for name in gfile.listdir(directory):
        name = name.rstrip("/")  # GCS lists a directory as "name/"
        path = os.path.join(directory, name)
        if gfile.isdir(path):
            result += [os.path.join(name, inner) for inner in _files_under(path)]
        elif gfile.exists(path):  # ram:// lists a sibling's suffix ("saved_model.old" in saved_model)
            result.append(name)
    return result
