"""`tapekit.run.runner`: the narrow interface between the controller and the engine."""

import inspect

import numpy as np
import pytest

from tapekit.run import runner
from tapekit.run.engine import Engine
from tapekit.trainers import RegressionTrainer

from fake_runner import FakeRunner


@pytest.mark.parametrize("implementation", [Engine, FakeRunner], ids=["Engine", "FakeRunner"])
def test_the_engine_and_the_fake_implement_the_whole_runner_protocol(implementation):
    members = {name: member for name, member in vars(runner.Runner).items()
               if not name.startswith("_")}
    assert sorted(members) == [
        "any_worker", "current_step", "device_memory", "epochs_done", "evaluate",
        "examples_per_step", "keep_good_state", "latest_checkpoint", "record_skipped",
        "record_stop", "reposition_input", "request_stop", "restore_good_state",
        "run_train_loop", "skip_steps", "stopped_by"]
    for name, member in members.items():
        real = getattr(implementation, name)
        assert isinstance(real, property) == isinstance(member, property), name
        if not isinstance(member, property):
            declared = list(inspect.signature(member).parameters)
            assert list(inspect.signature(real).parameters)[:len(declared)] == declared, name
    assert runner.Runner.__annotations__ == {"status": runner.RunStatus}


def test_a_run_status_starts_cleared_and_a_loop_reports_what_it_ran():
    status = runner.RunStatus()
    assert (status.stop_training, status.preempted, status.interrupted,
            status.stopped_by_time) == (False, False, False, False)
    trainer = RegressionTrainer(progress="none")
    trainer.fit(train_steps=10, steps_per_loop=5)
    result = trainer._engine.run_train_loop(3)  # what the controller calls, once per loop
    assert isinstance(result, runner.LoopResult)
    assert result.steps_run == 3 and trainer.current_step == 13
    assert sorted(result.metrics) == ["loss"] and np.isfinite(result.metrics["loss"])
    assert (result.nonfinite_steps, result.first_nonfinite_offset) == (0, None)
