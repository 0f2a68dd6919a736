"""Export a trained model as a SavedModel for serving, and the `tapekit-export` command.

`export_saved_model` writes through Keras 3's own `keras.export.ExportArchive`, not
`tf.saved_model.save`: on a Keras 3 model the latter writes signatures with wrong names
and dtypes (keras-team/keras#19458). The endpoint "serve" calls the model with
`training=False`; being the archive's first endpoint it is also `serving_default`.

`tapekit-export --trainer=… --model_dir=… --export_dir=… [trainer flags]` builds the
trainer from the same flags as `tapekit-train`, restores its latest checkpoint (or
`--restore_from`) without training and exports `Trainer.export_model()`.
"""

import os
import re
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type

import keras
import tensorflow as tf
from absl import app, flags, logging

from tapekit import checkpointing
from tapekit import cli
from tapekit import precision as precision_lib
from tapekit.errors import TapekitError, summarize, user_message
from tapekit.trainer import Trainer, describe_spec

FLAGS = flags.FLAGS
PROGRAM = "tapekit-export"
ENDPOINT = "serve"


def check_export_dir(export_dir: str) -> None:
    """Raises a TapekitError unless `export_dir` is new or an empty directory. Eager."""
    if not tf.io.gfile.exists(export_dir):
        return
    if not tf.io.gfile.isdir(export_dir):
        raise TapekitError(f"export_dir {export_dir!r} is a file; choose a new --export_dir.")
    if tf.io.gfile.listdir(export_dir):
        raise TapekitError(
            f"export_dir {export_dir!r} exists and is not empty; choose a new --export_dir.")


def export_saved_model(model: keras.Model, input_signature: Sequence[tf.TensorSpec],
                       export_dir: str) -> str:
    """Writes `model` as a SavedModel whose `serving_default` signature runs it for inference.

    Eager. The model must be built (its variables exist). The endpoint takes one tensor
    per spec of `input_signature` (named by the specs' names; one spec: the model's input,
    several: passed as a list), calls `model(..., training=False)` and returns
    `{"output_0": ...}`. Load it with `tf.saved_model.load(export_dir)` and call
    `.signatures["serving_default"](name=tensor)` or `.serve(tensor)`.

    Raises a TapekitError if `export_dir` exists and is not empty (nothing is overwritten),
    or if the model cannot be traced on the signature (then nothing is left behind).
    Returns `export_dir`.
    """
    check_export_dir(export_dir)
    signature = list(input_signature)
    if not signature or not all(isinstance(spec, tf.TensorSpec) for spec in signature):
        raise TapekitError(
            f"input_signature must be a non-empty list of tf.TensorSpec, got {input_signature!r}; "
            "e.g. [tf.TensorSpec([None, 5], tf.float32, name='x')].")

    def serve(*inputs):
        return model(inputs[0] if len(inputs) == 1 else list(inputs), training=False)

    created = not tf.io.gfile.exists(export_dir)
    try:
        archive = keras.export.ExportArchive()
        archive.track(model)
        archive.add_endpoint(ENDPOINT, serve, input_signature=signature)
        archive.write_out(export_dir, verbose=False)
    except Exception as error:  # shapes that do not fit the model, an unwritable path, …
        if created and tf.io.gfile.exists(export_dir):  # leave no half-written SavedModel
            tf.io.gfile.rmtree(export_dir)
        raise TapekitError(
            f"cannot export {model.name} with input signature {describe_spec(signature)} to "
            f"{export_dir!r}: {type(error).__name__}: {summarize(error)}") from None
    return export_dir


def restore_for_export(trainer: Trainer, checkpoint_path: str) -> Tuple[keras.Model,
                                                                          List[tf.TensorSpec]]:
    """Builds `trainer`'s models and restores the exported one from a checkpoint. Eager.

    Uses only the trainer's public contract: `build()` (in the strategy scope, under the
    precision policy, as training does), `export_model()`, then one call of the model on
    zeros of its signature to create its variables, and a restore of every public Keras
    layer attribute of the trainer (the names tapekit checkpoints them under). Optimizer
    state is not needed and not restored. Returns `export_model()`'s (model, signature).
    """
    with trainer.strategy.scope(), precision_lib.dtype_policy(trainer.precision):
        trainer.build()
    exported = trainer.export_model()
    if exported is None:
        raise TapekitError(
            f"{type(trainer).__name__} has nothing to export: its export_model() returns None; "
            "override it to return (model, [tf.TensorSpec(...)]).")
    model, signature = exported
    zeros = [tf.zeros([1 if size is None else size for size in spec.shape], spec.dtype)
             for spec in signature]
    with trainer.strategy.scope():
        model(zeros[0] if len(zeros) == 1 else zeros, training=False)
    layers = {name: value for name, value in vars(trainer).items()
              if not name.startswith("_") and isinstance(value, keras.Layer)}
    failure = _restore({"global_step": trainer.global_step, **layers}, checkpoint_path)
    if failure:
        raise TapekitError(
            f"checkpoint {checkpoint_path!r} does not fit {type(trainer).__name__} ({failure}); "
            "export with the same trainer flags the run was trained with.")
    return model, list(signature)


def _restore(objects: Dict[str, Any], path: str) -> Optional[str]:
    """Restores `objects` (name → trackable, named as in the trainer's checkpoints) from
    `path`; returns None, or what did not fit."""
    try:
        status = tf.train.Checkpoint(**objects).restore(path)
        status.expect_partial()  # optimizer slots and other unbuilt state stay behind
        status.assert_existing_objects_matched()
    except AssertionError as error:  # variables the checkpoint has no value for
        # It lists them as <Variable path=..., shape=..., value=[...]>; keep the paths.
        paths = re.findall(r"path=([^,>]+)", str(error))
        return (f"no values for {', '.join(paths[:6])}{', …' if len(paths) > 6 else ''}"
                if paths else summarize(error))
    except Exception as error:  # shapes that differ, damaged files
        return f"{type(error).__name__}: {summarize(error)}"
    return None


# ------------------------------------------------------------------ the command line


def main(argv: Optional[Sequence[str]] = None) -> None:
    """`tapekit-export`: parses the trainer's flags, restores its checkpoint and exports."""
    argv = list(sys.argv if argv is None else argv)
    cli.define_common_flags()
    if "export_dir" not in FLAGS:
        flags.DEFINE_string("export_dir", None,
                            "New (or empty) directory to write the SavedModel to.")
    trainer_class, own_flags = _trainer_class_and_flags(argv)
    app.run(lambda args: _export(trainer_class, own_flags, args), argv=argv)


def _trainer_class_and_flags(argv: List[str]) -> Tuple[Type[Trainer], List[str]]:
    """Resolves --trainer before the full parse and declares its own flags (as tapekit-train)."""
    from tapekit.trainers.main import BUILTIN_TRAINERS  # the built-in names live there

    try:
        FLAGS(argv, known_only=True)  # only to learn --trainer; app.run parses for real
        trainer_spec = FLAGS.trainer
    except flags.Error:
        trainer_spec = FLAGS["trainer"].default
    FLAGS.unparse_flags()
    try:
        trainer_class = cli.load_trainer_class(trainer_spec, BUILTIN_TRAINERS)
    except TapekitError as error:
        _exit_with_error(error)
    before = set(FLAGS)
    trainer_class.define_flags()
    return trainer_class, sorted(set(FLAGS) - before)


def _export(trainer_class: Type[Trainer], own_flags: List[str], argv) -> None:
    try:
        if len(argv) > 1:
            raise TapekitError(f"unexpected arguments: {' '.join(argv[1:])}")
        export_dir = FLAGS.export_dir
        if not export_dir:
            raise TapekitError("--export_dir is required: a new directory for the SavedModel.")
        check_export_dir(export_dir)  # before any work
        checkpoint_path = _checkpoint_to_export(FLAGS.model_dir, FLAGS.restore_from)
        kwargs = {name: FLAGS[name].value for name in cli.TRAINER_FLAGS + tuple(own_flags)
                  if name in FLAGS}
        # One device: the weights do not depend on the strategy they were trained under.
        kwargs.update(strategy="default", device=None, cpu_replicas=1)
        trainer = trainer_class(**kwargs)
        model, signature = restore_for_export(trainer, checkpoint_path)
        export_saved_model(model, signature, export_dir)
    except TapekitError as error:
        _exit_with_error(error)
    logging.info("exported %s from %s", model.name, checkpoint_path)
    arguments = ", ".join(f"{spec.name}: {describe_spec(spec)}" for spec in signature)
    print(f"Exported {model.name} (step {trainer.current_step}, {checkpoint_path}) to "
          f"{export_dir}: signature serving_default({arguments})", flush=True)


def _checkpoint_to_export(model_dir: Optional[str], restore_from: Optional[str]) -> str:
    if restore_from:
        checkpointing.check_restorable(restore_from)
        return restore_from
    if not model_dir:
        raise TapekitError("give --model_dir (a run with checkpoints) or "
                           "--restore_from=CHECKPOINT to export from.")
    directory = os.path.join(model_dir, "checkpoints")
    latest = tf.train.latest_checkpoint(directory) if tf.io.gfile.isdir(directory) else None
    if latest is None:
        raise TapekitError(f"no checkpoint in {directory!r}; train first with tapekit-train "
                           f"--model_dir={model_dir}, or give --restore_from=CHECKPOINT.")
    return latest


def _exit_with_error(error: BaseException):
    # A restore that failed half-way logs each unused checkpoint value when it is collected
    # at exit: keep the error the last line.
    tf.get_logger().setLevel("ERROR")
    print(f"{PROGRAM}: error: {user_message(error)}", file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == "__main__":
    main()
