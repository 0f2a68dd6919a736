"""`FakeRunner`: the whole `tapekit.run.runner.Runner` protocol in plain Python, no TensorFlow.

Its "state" is the global step; its input is numbered batches (the batch of global step s
is batch s, read in order from `input_at`), so a test sees where a policy put the input.
Loops add steps and report loss = 1 / step, unless `script(loop_index, num_steps)` returns
a `LoopResult` (or does something, such as sending a signal, while "the loop runs").
`poisoned` batches make the loop that reads them non-finite, wherever the input is.
"""

from typing import Optional, Sequence, Tuple

from tapekit.errors import TapekitError
from tapekit.run.runner import LoopResult, RunStatus


class FakeRunner:
    def __init__(self, step=0, script=None, latest="ckpt-dir/ckpt-0", votes=None,
                 poisoned=(), data_size=None, epoch_steps=None):
        self.status = RunStatus()
        self.step = step
        self.script = script
        self.latest = latest
        self.votes = votes or (lambda flag, step: flag)
        self.poisoned = set(poisoned)  # batches (1-based, as global steps) that give NaN
        self.data_size = data_size  # batches in the data (None: endless)
        self.epoch_steps = epoch_steps  # by epochs: batches per pass
        self.input_at = step  # batches read so far (the next is input_at + 1)
        self.loops, self.evaluations, self.stop_requests, self.stopped = [], [], [], []
        self.stop_records = []
        self.kept: Optional[int] = None
        self.recorded: Sequence[Tuple[int, int]] = ()
        self.epochs = 0

    # ------------------------------------------------------------------ the loop's view

    @property
    def current_step(self):
        return self.step

    @property
    def examples_per_step(self):
        return 10

    @property
    def latest_checkpoint(self):
        return self.latest

    @property
    def epochs_done(self):
        return self.epochs

    def run_train_loop(self, num_steps):
        self.loops.append(num_steps)
        result = self.script(len(self.loops) - 1, num_steps) if self.script else None
        if result is None:
            runs = self._available(num_steps)
            batches = range(self.input_at + 1, self.input_at + runs + 1)
            bad = [batch for batch in batches if batch in self.poisoned]
            ended = self._ends_pass(runs)
            result = LoopResult(
                {"loss": float("nan") if bad else 1.0 / (self.step + max(runs, 1))}, runs,
                1 if bad else 0, None, "loss" if bad else None, epoch_ended=ended)
            if ended:
                self.epochs += 1
        self.step += result.steps_run
        self.input_at += result.steps_run
        return result

    def evaluate(self, steps):
        self.evaluations.append((self.step, steps))
        return {"loss": 0.5}

    def stopped_by(self, error, step):
        self.stopped.append((type(error).__name__, step))
        return TapekitError(f"{error} (raised between loops at step {step})")

    def request_stop(self, requested=True):
        self.stop_requests.append(requested)

    def any_worker(self, flag):
        return self.votes(flag, self.step)

    def device_memory(self):
        return {"memory/GPU_0/current_bytes": 1000 * self.step, "memory/GPU_0/peak_bytes": 5000}

    def record_stop(self, entry):
        self.stop_records.append(entry)

    # ------------------------------------------------------------------ fault policies' view

    def skip_steps(self, steps, read=True):
        if read:
            steps = self._available(steps)
            if self._ends_pass(steps):
                self.epochs += 1
            self.input_at += steps
        self.step += steps
        return steps

    def reposition_input(self, step):
        self.input_at = step

    def keep_good_state(self, step):
        self.kept = step

    def restore_good_state(self):
        self.step = self.kept
        return self.kept, "the copy kept in memory"

    def record_skipped(self, ranges):
        self.recorded = list(ranges)
        return True

    # ------------------------------------------------------------------ helpers

    def _available(self, steps):
        if self.epoch_steps:
            return min(steps, self.epoch_steps - self.input_at % self.epoch_steps)
        if self.data_size is not None:
            return max(0, min(steps, self.data_size - self.input_at))
        return steps

    def _ends_pass(self, runs):
        return bool(self.epoch_steps) and runs > 0 and (self.input_at + runs) % self.epoch_steps == 0
