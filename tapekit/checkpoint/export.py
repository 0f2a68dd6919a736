"""Export a trained model as a SavedModel for serving, and the `tapekit-export` command.

`export_saved_model` writes through Keras 3's own `keras.export.ExportArchive`, not
`tf.saved_model.save`: on a Keras 3 model the latter writes signatures with wrong names
and dtypes (keras-team/keras#19458). The endpoint "serve" calls the model with
`training=False`; being the archive's first endpoint it is also `serving_default`.

The `tapekit-export` command (`tapekit.cli.export_main`) builds a trainer from the same
flags as `tapekit-train`, restores its latest checkpoint with `Trainer.restore` and calls
`Trainer.export`, which comes here.
"""

from typing import Sequence

import keras
import tensorflow as tf

from tapekit.errors import TapekitError, describe_spec, summarize

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
