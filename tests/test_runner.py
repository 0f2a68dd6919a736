"""`tapekit.runner`: the narrow interface between the controller and the engine."""

import inspect

from tapekit import runner
from tapekit.engine import Engine


def test_the_engine_implements_the_runner_interface_as_declared():
    members = {name: member for name, member in vars(runner.Runner).items()
               if not name.startswith("_")}
    assert sorted(members) == ["any_worker", "current_step", "evaluate", "examples_per_step",
                               "latest_checkpoint", "run_train_loop"]
    for name, member in members.items():
        real = getattr(Engine, name)
        assert isinstance(real, property) == isinstance(member, property), name
        if not isinstance(member, property):
            declared = list(inspect.signature(member).parameters)
            assert list(inspect.signature(real).parameters)[:len(declared)] == declared, name
    assert runner.Runner.__annotations__ == {"status": runner.RunStatus}


def test_a_run_status_starts_cleared_and_a_loop_result_names_its_fields():
    status = runner.RunStatus()
    assert (status.stop_training, status.preempted, status.interrupted) == (False, False, False)
    result = runner.LoopResult({"loss": 0.5}, 10, 0, None, None)
    assert result._asdict() == {"metrics": {"loss": 0.5}, "steps_run": 10, "nonfinite_steps": 0,
                                "first_nonfinite_offset": None, "first_nonfinite_metric": None}
