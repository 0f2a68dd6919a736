"""What the outer loop drives: the narrow interface between `Controller` and the engine.

The controller (`tapekit.run.controller`) decides how long to train, when to evaluate and what
happens between loops; it needs only what `Runner` lists. `tapekit.run.engine.Engine` is the
real one (TensorFlow, strategies, compiled loops); tests drive the controller with a fake
one in plain Python. Nothing here imports TensorFlow.
"""

from typing import Dict, NamedTuple, Optional, Protocol, Sequence, Tuple


class LoopResult(NamedTuple):
    """What one compiled loop reports (eager values)."""

    metrics: Dict[str, float]  # mean over the loop's examples (and replicas); keras.metrics' results
    steps_run: int  # < steps asked for when the input ran out
    nonfinite_steps: int  # steps where some metric was NaN or infinite (counted with
    # skip_step; with stop, 1 for a loop that had any)
    first_nonfinite_offset: Optional[int]  # 0-based step within the loop (skip_step), or None
    first_nonfinite_metric: Optional[str]
    epoch_ended: bool = False  # training by epochs: this loop finished a pass over the data


class RunStatus:
    """How the last (or current) `fit` ended: set by the controller, read by the trainer.

    `stop_training` may be set by a callback to stop after the loop in progress.
    """

    def __init__(self):
        self.stop_training = False
        self.preempted = False  # stopped on SIGTERM (a checkpoint was saved)
        self.interrupted = False  # stopped on a first Ctrl-C (a checkpoint was saved)
        self.stopped_by_time = False  # stopped when max_time was used up (a checkpoint was saved)


class Runner(Protocol):
    """The engine as the controller sees it. Every call is eager, made on every worker."""

    status: RunStatus

    @property
    def current_step(self) -> int:
        """The global step (training steps applied so far)."""

    @property
    def examples_per_step(self) -> int:
        """The global batch size."""

    @property
    def latest_checkpoint(self) -> Optional[str]:
        """The newest checkpoint saved by this run's model_dir, or None."""

    @property
    def epochs_done(self) -> int:
        """Training by epochs: the passes over the data finished so far (checkpointed)."""

    def run_train_loop(self, num_steps: int) -> LoopResult:
        """Runs one compiled loop of up to `num_steps` training steps on the prepared input
        (training by epochs: never past the end of the epoch in progress)."""

    def evaluate(self, steps: Optional[int]) -> Dict[str, float]:
        """Runs the evaluation (None: the data to its end) and returns its metrics."""

    def stopped_by(self, error: BaseException, step: int) -> Exception:
        """The error to stop with after `error` was raised between loops at `step` (after
        saving that loop's checkpoint, unless a write failed: `tapekit.faults.between_loops`)."""

    def request_stop(self, requested: bool = True) -> None:
        """Ends the running loop at its next step (called from a signal watcher thread)."""

    def any_worker(self, flag: bool) -> bool:
        """True if `flag` is True on any worker (a collective vote when multi-worker)."""

    def device_memory(self) -> Dict[str, int]:
        """`memory/<device>/current_bytes` and `peak_bytes` for each device that reports
        them (`tapekit.run.accounting.device_memory`: GPUs; none on CPU)."""

    def record_stop(self, entry: Dict[str, object]) -> None:
        """Appends `entry` (why and where training stopped: `max_time`) to run.json's
        `stopped` (the chief; nothing without a model_dir)."""

    # What fault policies (`tapekit.faults.rollback`) ask, between loops.

    def skip_steps(self, steps: int, read: bool = True) -> int:
        """Counts `steps` steps as done without training on them, reading and dropping their
        batches unless `read` is False (by epochs: never past the pass's end); returns how
        many there were (fewer when the data ends)."""

    def reposition_input(self, step: int) -> None:
        """Puts the training input at global step `step` (after the state went back)."""

    def keep_good_state(self, step: int) -> None:
        """Before a loop: keeps the state to go back to (nan_policy=rollback)."""

    def restore_good_state(self) -> Tuple[int, str]:
        """Puts the good state back; returns its global step and where it came from."""

    def record_skipped(self, ranges: Sequence[Tuple[int, int]]) -> bool:
        """Records the step ranges skipped in run.json; False when there is no model_dir."""
