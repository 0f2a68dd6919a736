"""XLA on several replicas: each replica's forward and backward pass compiled, its updates after.

A Keras optimizer sums gradients over replicas with a `merge_call`, which TensorFlow cannot
put inside an XLA function unless every replica is a GPU (and Keras 3 turns XLA off under
any tf.distribute strategy, keras-team/keras#18716). So with `jit_compile` on more than one
replica, tapekit compiles with XLA what is each replica's own — the step up to its
gradients: the forward pass, the losses, `tape.gradient` — and runs what crosses replicas
after it, outside XLA, in the same replica function: the Keras variables the step writes
(BatchNormalization's moving statistics, `keras.metrics`, `SeedGenerator`s: collected in
Keras's `StatelessScope`, so reads later in the step see the new values) are assigned,
then each `Trainer.apply_gradients` of the step runs, in call order (`tapekit.compiled.updates`: the
sum over replicas, clipping, accumulation, the optimizer). On one replica the whole step is
compiled, as before.

The numbers are those of the run without XLA up to float rounding (XLA fuses and reorders
float operations). What a step cannot do here, it is told before step 1 in one line:

* read, after an `apply_gradients`, weights that call updates (a sequential GAN update:
  the discriminator's step, then the generator's forward pass through the new
  discriminator). Run without XLA, it would read the new values; here they are applied
  after the compiled part, so it would read the old ones;
* call `optimizer.apply_gradients` itself, or assign a `tf.Variable` (not a Keras one): the
  `merge_call` either makes cannot be compiled.
"""

import dataclasses
from typing import Any, Callable, List, Optional, Tuple

import keras
import tensorflow as tf

from tapekit import compat
from tapekit.errors import TapekitError, user_frame

# Ops that read a variable's shape, not its value: they do not see an update.
_NOT_READS = ("VariableShape",)


@dataclasses.dataclass
class DeferredUpdates:
    """The `apply_gradients` calls of one replica's compiled step, recorded in call order:
    (updater, variables, gradients) each; and, for each, where in the graph it was called
    and the handles of the variables it updates (what a later read would use)."""

    updates: List[Tuple[Any, List, List]] = dataclasses.field(default_factory=list)
    marks: List[Tuple[int, dict]] = dataclasses.field(default_factory=list)

    def add(self, updater, variables, gradients) -> None:
        handles = {}
        for variable in variables:
            resource = variable.value if isinstance(variable, keras.Variable) else variable
            handles[resource.handle.ref()] = getattr(variable, "path", None) or resource.name
        self.marks.append((len(compat.traced_operations()), handles))
        self.updates.append((updater, list(variables), list(gradients)))

    def check_no_read_after_update(self) -> None:
        """Raises the one error for a step that reads updated weights after their update."""
        operations = compat.traced_operations()
        inside = compat.captured_as()  # the graph reads a variable through its handle's
        read = set()
        for first_op, handles in self.marks:
            placeholders = {inside[ref]: path for ref, path in handles.items() if ref in inside}
            placeholders.update(handles)  # a handle made inside the graph is used as it is
            read |= {placeholders[tensor.ref()] for op in operations[first_op:]
                     if op.type not in _NOT_READS for tensor in op.inputs
                     if tensor.ref() in placeholders}
        if read:
            read = sorted(read)
            raise TapekitError(
                f"with jit_compile on several replicas tapekit compiles each replica's forward "
                f"and backward pass with XLA and applies the step's updates after it, but this "
                f"step reads {', '.join(read[:4])}{' …' if len(read) > 4 else ''} after an "
                "apply_gradients that updates it (a sequential update), which would then see "
                "the old value. Compute every loss before the first apply_gradients, or train "
                "without --jit_compile (or on one replica).")


class _WritesCollected(keras.StatelessScope):
    """Keras's stateless scope: a Keras variable written inside it (BatchNormalization's
    moving statistics, a `keras.metrics` update, a `SeedGenerator`) keeps its new value in
    the scope, which later reads inside it see, instead of assigning it (a `merge_call`
    on a mirrored variable); `written` keeps each such variable, to be assigned after."""

    def __init__(self):
        super().__init__(initialize_variables=False)
        self.written = {}

    def add_update(self, update):
        super().add_update(update)
        self.written[id(update[0])] = update[0]


class SplitStep:
    """`measure(batch, deferred)` (`CompiledLoop._measure`) with XLA up to the gradients
    and the deferred updates applied after it (see the module docstring). Runs per replica."""

    def __init__(self, measure: Callable, updates_measured: Optional[Callable] = None):
        self._measure = measure
        # (apply_updates, measured) -> measured: runs the updates and adds what it measures of
        # them (`CompiledLoop._updates_measured`, log_gradient_norms); None: just runs them.
        self._updates_measured = updates_measured
        self._compiled = tf.function(self._forward_and_backward, jit_compile=True,
                                     autograph=False)
        self._applies: List[Tuple[Any, List]] = []  # (updater, variables): the last trace's
        self._written: List[Any] = []  # the Keras variables it writes, in order

    def __call__(self, batch):
        values, totals, weights, gradients, written = self._compiled(batch)
        for variable, value in zip(self._written, written):
            variable.assign(value)

        def apply_updates():
            start = 0
            for updater, variables in self._applies:
                updater.apply(list(gradients[start:start + len(variables)]), variables)
                start += len(variables)

        if self._updates_measured is not None:
            return self._updates_measured(apply_updates, (values, totals, weights))
        apply_updates()
        return values, totals, weights

    def _forward_and_backward(self, batch):
        deferred = DeferredUpdates()
        try:
            with _WritesCollected() as writes:
                values, totals, weights = self._measure(batch, deferred)
        except RuntimeError as error:
            if "merge_call" not in str(error):
                raise
            where = user_frame(error)
            raise TapekitError(
                f"with jit_compile on several replicas the step's forward and backward pass "
                f"are compiled with XLA, and something in it needs all replicas at once (a "
                f"merge_call{f', at {where}' if where else ''}): optimizer.apply_gradients "
                "called directly (use self.apply_gradients(tape, loss, model, optimizer)), or "
                "an assignment to a tf.Variable (not a Keras variable) in the step; or train "
                "without --jit_compile.") from None
        deferred.check_no_read_after_update()
        self._applies = [(updater, variables) for updater, variables, _ in deferred.updates]
        gradients = [g for _, _, grads in deferred.updates for g in grads]
        self._written = list(writes.written.values())
        written = [writes.get_current_value(variable) for variable in self._written]
        return values, totals, weights, gradients, written
