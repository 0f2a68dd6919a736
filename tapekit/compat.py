"""Where tapekit reaches into private TensorFlow/Keras code: each reach is one named function
here, with the versions it was checked on, so that a Keras upgrade breaks in one place.

A patch is a context manager that undoes itself on exit.
"""

import contextlib

from tapekit.errors import TapekitError


@contextlib.contextmanager
def gradients_already_summed(optimizer):
    """While open, `optimizer.apply_gradients` in a replica context does not sum the
    gradients over replicas: tapekit hands it gradients already summed (the global-batch
    gradient, the same on every replica), so the optimizer's clipping sees what one device
    would see and sparse rows are not gathered again from every replica.

    Keras's TensorFlow optimizer sums in `TFOptimizer._all_reduce_sum_gradients`, called
    by `_backend_update_step` after clipping (checked on Keras 3.3 to 3.15; Keras 3.0-3.2
    never summed, so each replica applied its own gradient). The patch is an attribute of
    this one optimizer instance, undone on exit; the object behaves as before afterwards.
    Open it outside the replica threads (in cross-replica context): every replica sees it.
    """
    if not callable(getattr(type(optimizer), "_all_reduce_sum_gradients", None)):
        raise TapekitError(
            f"{type(optimizer).__name__} has no _all_reduce_sum_gradients: this Keras version "
            "sums gradients over replicas differently from the ones tapekit supports "
            "(Keras 3.3 and later); upgrade Keras.")
    missing = object()
    previous = vars(optimizer).get("_all_reduce_sum_gradients", missing)
    optimizer._all_reduce_sum_gradients = list  # (gradient, variable) pairs, as they are
    try:
        yield
    finally:
        if previous is missing:
            del optimizer._all_reduce_sum_gradients
        else:
            optimizer._all_reduce_sum_gradients = previous
