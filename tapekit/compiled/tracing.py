"""The one context a step runs in: what tapekit's functions called from the step read.

A user's step calls tapekit back — `Trainer.apply_gradients`, `compute_loss`,
`compute_mean` — and draws random numbers from Keras `SeedGenerator`s. What those do
depends on why the step is running, and that is held by one visible object, a `StepTrace`,
carried in a `contextvars.ContextVar` rather than in module globals:

- `purpose="build"` (`tapekit.compiled.build.trace_step`): the step is traced once before step 1.
  `apply_gradients` records which optimizer updates which variables instead of applying,
  and the `keras.metrics` the step updates are recorded.
- `purpose="loop"` (`tapekit.compiled.loop.CompiledLoop`): the step is traced into a compiled loop;
  `apply_gradients` updates.
- `purpose="eager"`: the step runs eagerly, op by op, for debugging; `apply_gradients`
  updates.

In every purpose `compute_loss`/`compute_mean` note the examples behind each value they
return (`means`), which the loop uses for exact means, and each seed a `SeedGenerator`
hands out is folded with the replica's id (`tapekit.compiled.randomness`).

A trace is opened per replica, inside the function the strategy runs: MirroredStrategy
runs each replica's function in a thread of its own, which starts with a fresh context.
So two trainers building in two threads never see each other's trace.
"""

import contextlib
import contextvars
import dataclasses
from typing import Any, Dict, Iterator, List, Optional, Tuple

from tapekit import compat
from tapekit.compiled import randomness

PURPOSES = ("build", "loop", "eager")

_CURRENT: contextvars.ContextVar = contextvars.ContextVar("tapekit_step_trace", default=None)


@dataclasses.dataclass
class StepTrace:
    """Why a step runs, and what tapekit records while it does (see the module docstring)."""

    purpose: str
    # purpose="build": (optimizer, variables) for each update the step asks for, in call
    # order, once per replica; and the keras.metrics it updates, by id.
    updates: List[Tuple[Any, List]] = dataclasses.field(default_factory=list)
    keras_metrics: Dict[int, Any] = dataclasses.field(default_factory=dict)
    # tensor.ref() -> (sum of per-example values or None, number of examples) for each value
    # compute_loss/compute_mean returned (`tapekit.compiled.means`).
    means: Dict[Any, Tuple] = dataclasses.field(default_factory=dict)
    # jit_compile on several replicas: `apply_gradients` records its gradients here
    # (`tapekit.compiled.xla.DeferredUpdates`) and the update runs after the compiled part.
    deferred: Any = None
    # log_gradient_norms, purpose="loop"/"eager": what each update of the step adds to the
    # loop's gradient metrics (`tapekit.compiled.gradient_norms.StepNorms`); None: off.
    gradient_norms: Any = None

    def __post_init__(self):
        if self.purpose not in PURPOSES:
            raise ValueError(f"purpose must be one of {PURPOSES}, got {self.purpose!r}")

    @property
    def building(self) -> bool:
        return self.purpose == "build"


def current() -> Optional[StepTrace]:
    """The trace of the step running in this context (this replica), else None."""
    return _CURRENT.get()


@contextlib.contextmanager
def step(trace: StepTrace) -> Iterator[StepTrace]:
    """Opens `trace` for one replica's step: `current()` returns it until the step ends.

    Call it inside the replica function (see the module docstring). While any trace is open,
    Keras's `SeedGenerator.next` is patched (`tapekit.compat.seeds_transformed`); the patch
    folds the replica's id into seeds drawn where a trace is current and leaves every other
    caller (Keras `fit` in another thread) as Keras has it.
    """
    token = _CURRENT.set(trace)
    try:
        with compat.seeds_transformed(_seed_of_this_replica):
            yield trace
    finally:
        _CURRENT.reset(token)


def _seed_of_this_replica(seed):
    return seed if _CURRENT.get() is None else randomness.fold_in_replica(seed)
