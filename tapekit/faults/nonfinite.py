"""`nan_policy`'s check of a finished loop, before anything records or saves it.

The compiled loop counts the steps where a metric was NaN or infinite (`LoopResult`);
`nan_policy=skip_step` skipped those steps' updates in the graph, so a loop that had some
is kept with a warning; `nan_policy=stop` stops the run with one line that names the
steps and the last good checkpoint, which stays the latest. (`nan_policy=rollback` undoes
the loop first: `tapekit.faults.rollback`.)
"""

from typing import Callable, Optional

from absl import logging

from tapekit.errors import TapekitError
from tapekit.run.hooks import LoopHook
from tapekit.run.runner import LoopResult


class NonFiniteCheck(LoopHook):
    """A hook of the outer loop; `latest_checkpoint()` names the last good checkpoint."""

    def __init__(self, nan_policy: str, latest_checkpoint: Callable[[], Optional[str]]):
        self.nan_policy = nan_policy
        self.latest_checkpoint = latest_checkpoint

    def after_loop(self, step: int, result: LoopResult, full: bool) -> None:
        if not result.nonfinite_steps:
            return None
        first_step = step - result.steps_run + 1
        if result.first_nonfinite_offset is None:  # nan_policy=stop checks the loop's sums
            where = (f"at step {step}" if result.steps_run == 1 else
                     f"in steps {first_step}-{step} (one loop; --steps_per_loop=1 from the last "
                     "checkpoint finds the step)")
        else:
            where = f"at step {first_step + result.first_nonfinite_offset}"
        if self.nan_policy == "skip_step":  # checks every step: the first bad one is known
            logging.warning("%d step(s) with non-finite values were skipped (first: %s %s)",
                            result.nonfinite_steps, result.first_nonfinite_metric, where)
            return None
        latest = self.latest_checkpoint()
        kept = f"the last good checkpoint {latest} is kept" if latest else "nothing was saved"
        raise TapekitError(
            f"non-finite {result.first_nonfinite_metric} {where}; training stopped "
            f"and this state was not checkpointed ({kept}). Check the data, lower the learning "
            "rate, or use --nan_policy=rollback (go back, skip the bad batches) or skip_step.")
