"""Checkpoints of a trainer's whole state with `tf.train.CheckpointManager`, checked on restore.

Every worker calls `save` (under MultiWorkerMirroredStrategy saving may run collective
ops); only the chief writes into `MODEL_DIR/checkpoints`, the others into a temporary
directory of their own that is deleted right after (TensorFlow's convention). With
`async_save` (`--async_checkpoint`) a save returns once the state is copied to host memory
and is written in the background; `CheckpointManager` lists it, and deletes the oldest,
only once it is written whole (its write callback), and `wait` joins it.

Restores never half-succeed: the checkpoint's variables are compared with the trainer's
(names and shapes) first, every mismatch is listed in one error, and
`assert_existing_objects_matched` confirms the restore. Nothing on disk is changed by a
failed restore.
"""

import os
import shutil
import tempfile
from typing import Dict, List, Optional

import tensorflow as tf
from absl import logging

from tapekit import compat
from tapekit.checkpoint import files
from tapekit.checkpoint import state as state_lib
from tapekit.checkpoint.state import ITERATOR_KEY
from tapekit.errors import TapekitError, summarize

EPOCH_KEYS = (state_lib.EPOCHS_DONE_KEY + "/", state_lib.EPOCH_START_STEP_KEY + "/")
# spike_threshold's loss window (tapekit.faults): a run may start or stop judging
# spikes on resume; a checkpoint without it starts an empty window.
OPTIONAL_KEYS = (state_lib.LOSS_WINDOW_VALUES_KEY + "/", state_lib.LOSS_WINDOW_COUNT_KEY + "/")
_IGNORED_KEYS = ("_CHECKPOINTABLE_OBJECT_GRAPH", "save_counter/")
_VALUE = "/.ATTRIBUTES/VARIABLE_VALUE"  # what follows a variable's key in a checkpoint


def prepare_model_dir(model_dir: str) -> str:
    """Creates `model_dir` if needed and checks that files can be written there. A path with
    a scheme (gs://, ram://) is kept as it is, and refused if TensorFlow has no file system
    for it."""
    if files.is_remote(model_dir):
        return _prepare_remote_model_dir(model_dir)
    model_dir = os.path.abspath(os.path.expanduser(model_dir))
    try:
        os.makedirs(model_dir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=model_dir, prefix=".tapekit-write-test-"):
            pass
    except FileExistsError:
        raise TapekitError(
            f"model_dir {model_dir!r} is a file, not a directory; choose another --model_dir.") from None
    except OSError as error:
        raise TapekitError(
            f"cannot write to model_dir {model_dir!r} ({error.strerror or error}); choose a "
            "writable --model_dir.") from None
    files.check_links(model_dir)
    return model_dir


def _prepare_remote_model_dir(model_dir: str) -> str:
    model_dir = model_dir.rstrip("/")
    test = os.path.join(model_dir, f".tapekit-write-test-{os.getpid()}")
    try:
        files.check_scheme(model_dir)
        files.makedirs(model_dir)
        files.write_bytes(test, b"")
        files.remove_tree(test)
    except tf.errors.OpError as error:
        raise TapekitError(
            f"cannot write to model_dir {model_dir!r} ({type(error).__name__}: {summarize(error)}); "
            "check its credentials and permissions, or choose another --model_dir.") from None
    return model_dir


def check_restorable(path: str) -> None:
    """Raises if `path` (a checkpoint prefix such as .../ckpt-100) has no index file."""
    if not tf.io.gfile.exists(path + ".index"):
        found = listed(os.path.dirname(path) or ".")
        hint = f"; checkpoints there: {', '.join(_names(found))}" if found else ""
        raise TapekitError(
            f"--restore_from={path!r} is not a checkpoint (no {os.path.basename(path)}.index)"
            f"{hint}. Give the prefix, e.g. MODEL_DIR/checkpoints/ckpt-1000.")


def latest(directory: Optional[str]) -> Optional[str]:
    """The newest checkpoint `directory` lists (its `checkpoint` file, as
    `tf.train.CheckpointManager` writes it), or None: no directory, or nothing listed."""
    return tf.train.latest_checkpoint(directory) if directory else None


def listed(directory: Optional[str]) -> List[str]:
    """Every checkpoint `directory` lists, oldest first ([]: none)."""
    state = tf.train.get_checkpoint_state(directory) if directory else None
    return [p if os.path.isabs(p) or files.is_remote(p) else os.path.join(directory, p)
            for p in (state.all_model_checkpoint_paths if state else [])]


def candidates(directory: Optional[str]) -> List[str]:
    """Every checkpoint a run in `directory` might resume from, oldest first: those its
    `checkpoint` file lists (whose files may be gone) and every `ckpt-N` whose index file is
    on disk (which the file may have lost). The checkpoints on disk decide, not only the file."""
    if not directory:
        return []
    found = {os.path.normpath(p): p for p in listed(directory)}
    for index in tf.io.gfile.glob(os.path.join(directory, "ckpt-*.index")):
        path = index[:-len(".index")]
        if step_of(path) >= 0:
            found.setdefault(os.path.normpath(path), path)
    return sorted(found.values(), key=step_of)


def step_of(path: str) -> int:
    """The step in checkpoint `path`'s name (.../ckpt-100: 100), -1 when the name does not
    end in one. A name only: `saved_step` reads the step the checkpoint holds."""
    tail = str(path).rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def saved_step(path: str) -> int:
    """The global step stored in checkpoint `path`, read without restoring anything."""
    try:
        return int(reader(path).get_tensor(state_lib.GLOBAL_STEP_KEY + _VALUE))
    except Exception as error:  # the reader raises OpError, IndexError, … on damaged files
        raise _corrupt(path, error) from None


def reader(path: str):
    """TensorFlow's reader of checkpoint `path` (a prefix such as .../ckpt-100)
    (`tapekit.compat.checkpoint_reader`)."""
    return compat.checkpoint_reader(path)


def has_iterator(path: str) -> bool:
    try:
        return any(name.startswith(ITERATOR_KEY + "/") for name in reader(path).get_variable_to_shape_map())
    except Exception as error:  # damaged files: see saved_step
        raise _corrupt(path, error) from None


def iterator_can_be_saved(iterator) -> bool:
    """Whether TensorFlow can checkpoint this `tf.data` iterator (not when its pipeline runs
    Python code: from_generator, py_function, numpy_function). Tried once, by writing it to
    a scratch directory."""
    scratch = tempfile.mkdtemp(prefix="tapekit-iterator-")
    try:
        tf.train.Checkpoint(iterator=iterator).write(os.path.join(scratch, "iterator"))
        return True
    except (tf.errors.OpError, ValueError, TypeError):
        return False
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


class Checkpointer:
    """Saves and restores `objects` (name → trackable) for one trainer. Eager, outer loop only.

    `model_dir=None` makes a restore-only checkpointer.
    """

    def __init__(self, objects: Dict[str, object], model_dir: Optional[str], is_chief: bool,
                 max_to_keep: int = 3, task_id: int = 0, subdirectory: str = "checkpoints",
                 async_save: bool = False):
        self.checkpoint = tf.train.Checkpoint(**objects)
        self._options = tf.train.CheckpointOptions(enable_async=True) if async_save else None
        self._in_flight = None  # the path of the checkpoint written in the background
        self._objects = dict(objects)  # what `checkpoint` tracks, by name
        self.directory = os.path.join(model_dir, subdirectory) if model_dir else None
        self.is_chief = is_chief
        self.max_to_keep = max_to_keep
        self._temporary = None
        self._fallback = None  # see fall_back_to
        self.manager = None
        if model_dir:
            if not is_chief:
                self._temporary = tempfile.mkdtemp(prefix=f"tapekit-worker{task_id}-")
            self._make_manager()

    def _make_manager(self) -> None:
        write_dir = self.directory if self.is_chief else self._temporary
        self.manager = tf.train.CheckpointManager(self.checkpoint, write_dir,
                                                  max_to_keep=self.max_to_keep)

    @property
    def latest(self) -> Optional[str]:
        """The newest usable checkpoint in MODEL_DIR/checkpoints (the chief's), or None: the
        one `fall_back_to` named until the next save, else the newest listed."""
        if self._fallback is not None:
            return self._fallback
        return latest(self.directory)

    def fall_back_to(self, path: str) -> None:
        """Makes `path` the latest (every worker: the chief may still be moving the damaged
        ones aside while another reads the listing)."""
        self._fallback = path

    def track(self, objects: Dict[str, object]) -> None:
        """Adds `objects` (name → trackable) to what is saved and restored from now on."""
        for name, value in objects.items():
            setattr(self.checkpoint, name, value)
            self._objects[name] = value

    def track_iterator(self, iterator) -> None:
        """Saves and restores the position of a (non-distributed) `tf.data` iterator."""
        setattr(self.checkpoint, ITERATOR_KEY, iterator)
        self._objects[ITERATOR_KEY] = iterator

    def restore(self, path: str, checked: bool = True) -> None:
        """Restores every object from `path`; raises one TapekitError if anything does not
        match. Not `checked`: without first comparing `path`'s names and shapes with what
        this checkpointer would write (a checkpoint this run just wrote: a rollback)."""
        self.wait()
        mismatches = self._mismatches(path) if checked else []
        if mismatches:
            shown = "; ".join(mismatches[:12]) + (f"; … {len(mismatches) - 12} more"
                                                 if len(mismatches) > 12 else "")
            raise TapekitError(
                f"checkpoint {path!r} does not fit this trainer ({len(mismatches)} mismatches: "
                f"{shown}). It was written by a different model or configuration; use a new "
                "--model_dir or --restore_from a checkpoint of this trainer. Nothing was changed.")
        try:
            status = self._reading(path).restore(path)
            status.assert_existing_objects_matched()
            # The listing above found nothing unexpected; what this trainer does not track
            # (a saved input position when only restoring) is left unread without warnings.
            status.expect_partial()
        except AssertionError as error:
            raise TapekitError(f"checkpoint {path!r} restored only partly: {summarize(error)}; "
                               "use a checkpoint of this trainer.") from None
        except Exception as error:  # damaged data the listing did not touch
            raise _corrupt(path, error) from None

    def _reading(self, path: str) -> tf.train.Checkpoint:
        """What restores `path`: the checkpoint, or, when `path` lacks optional state
        (OPTIONAL_KEYS), one without it (that state keeps its values)."""
        saved_roots = {name.split("/")[0] for name in reader(path).get_variable_to_shape_map()}
        absent = [name for name in self._objects
                  if (name + "/").startswith(OPTIONAL_KEYS) and name not in saved_roots]
        if not absent:
            return self.checkpoint
        return tf.train.Checkpoint(**{name: value for name, value in self._objects.items()
                                      if name not in absent})

    def _mismatches(self, path: str) -> List[str]:
        try:
            saved = _variable_shapes(path)
        except Exception as error:  # damaged files: see saved_step
            raise _corrupt(path, error) from None
        scratch = tempfile.mkdtemp(prefix="tapekit-expected-")
        try:
            # What this trainer would write, to compare names and shapes before restoring.
            expected = _variable_shapes(self.checkpoint.write(os.path.join(scratch, "expected")))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        shapes = [f"{_short(name)} has shape {saved[name]} in the checkpoint, {shape} here"
                  for name, shape in expected.items() if name in saved and saved[name] != shape]
        # Training by epochs adds its position (tapekit.input.epochs); a trainer restoring without
        # training by epochs leaves it unread.
        extra = [f"{_short(name)} in the checkpoint is not in this trainer"
                 for name in saved if name not in expected
                 and not name.startswith(EPOCH_KEYS + OPTIONAL_KEYS)]
        missing = [f"{_short(name)} missing from the checkpoint"
                   for name in expected if name not in saved and not name.startswith(OPTIONAL_KEYS)]
        return shapes + extra + missing

    def save(self, step: int) -> None:
        """Saves a checkpoint at `step`. With `async_save`, returns once the state is copied
        to host memory (TensorFlow's async checkpoint) and writes it in the background; the
        one still in flight is waited for first, so one is written at a time."""
        self.wait()
        if self._options is None:
            path = self.manager.save(checkpoint_number=step)
        else:
            with compat.keras_variables_copied_in_place():
                path = self.manager.save(checkpoint_number=step, options=self._options)
        self._fallback = None
        if self._options is not None:
            self._in_flight = path
            return
        self._saved(path)

    def wait(self) -> None:
        """Waits until the checkpoint written in the background (if any) is on disk and
        listed; raises its write's error (a full disk). Called before a restore, at the end
        of training and before the process exits."""
        path, self._in_flight = self._in_flight, None
        if path is None:
            return
        self.checkpoint.sync()
        error = compat.async_checkpoint_error(self.checkpoint)
        if error is not None:
            raise error
        self._saved(path)

    def _saved(self, path: str) -> None:
        if self.is_chief:
            logging.info("saved checkpoint %s", path)
        else:
            shutil.rmtree(self._temporary, ignore_errors=True)

    def relist(self, kept: List[str], delete=()) -> None:
        """Deletes the checkpoints `delete` (prefixes) and makes this directory, and the
        manager, list `kept` only, the last as the latest (`tapekit.checkpoint.best`,
        `tapekit.checkpoint.damaged`). The chief only; a no-op elsewhere."""
        if not (self.is_chief and self.directory):
            return
        for old in delete:
            for name in tf.io.gfile.glob(old + ".*"):
                tf.io.gfile.remove(name)
        compat.write_checkpoint_state(self.directory, kept[-1] if kept else "", kept)
        self._make_manager()


def _variable_shapes(path: str) -> Dict[str, List[int]]:
    return {name: shape for name, shape in reader(path).get_variable_to_shape_map().items()
            if not name.startswith(_IGNORED_KEYS) and not name.startswith(ITERATOR_KEY + "/")}


def _corrupt(path: str, error: BaseException) -> TapekitError:
    older = [p for p in listed(os.path.dirname(path))
             if p != path and step_of(p) < step_of(path)]
    hint = (f"--restore_from={older[-1]} (an older checkpoint)" if older
            else "--restore_from an older checkpoint, or a new --model_dir")
    data_files = tf.io.gfile.glob(path + ".data-*") or [path + ".data-*"]
    return TapekitError(
        f"checkpoint {path!r} is damaged or unreadable ({', '.join(data_files)}: "
        f"{type(error).__name__}: {summarize(error)}); it was left as it is. Use {hint}.")


def _short(key: str) -> str:
    return key.replace(_VALUE, "")


def _names(paths) -> List[str]:
    return [os.path.basename(p) for p in paths]

