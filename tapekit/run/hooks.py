"""`LoopHook`: a policy the outer loop calls around each compiled loop.

Fault policies (`tapekit.faults.rollback`, `tapekit.faults.nonfinite`) and the profiler
(`tapekit.run.profiler`) are hooks, so that `Controller.train` reads as the outer loop
only. Unlike a `Callback` (after a loop is recorded), a hook acts before a loop (its length,
steps to skip) and on a loop before anything records or saves it (undo it, refuse it).
Every method runs eagerly, on every worker, and defaults to doing nothing.
"""

from typing import Optional

from tapekit.run.runner import LoopResult


class LoopHook:
    """Override what the policy needs; the controller calls the hooks in order."""

    def steps_to_skip(self, step: int, train_steps: Optional[int]) -> int:
        """Steps to skip before the next loop, whose first step would be `step + 1`."""
        return 0

    def skip(self, steps: int) -> int:
        """Skips `steps` steps (their batches are read, not trained on); returns how many
        there were (fewer when the data ends)."""
        return 0

    def loop_length(self, step: int, num_steps: int) -> int:
        """The next loop's length, at most `num_steps` (at least 1)."""
        return num_steps

    def before_loop(self, step: int) -> None:
        """Just before the loop that starts after global step `step` runs."""

    def after_loop(self, step: int, result: LoopResult, full: bool) -> Optional[int]:
        """After a loop that reached `step`, before anything records or saves it (`full`:
        it ran the steps asked for, or ended an epoch). Returns the global step the run went
        back to when the hook undid the loop, else None; may raise to stop the run."""
        return None

    def replayed(self, step: int) -> bool:
        """Whether the loop that reached `step` replays loops already recorded."""
        return False

    def end(self) -> None:
        """After the last loop of `fit`, however it ended."""
