"""`tapekit.options`: one table behind the constructor, the command line and its checks."""

import inspect
import sys

import pytest
from absl import flags

import tapekit
from tapekit import options as options_lib
from tapekit.errors import TapekitError


def test_every_option_is_a_flag_with_the_same_default_choices_and_bounds():
    values = flags.FlagValues()
    options_lib.define_flags(values)
    for option in options_lib.TRAINER_OPTIONS + options_lib.FIT_OPTIONS:
        flag = values[option.name]
        default = option.default
        if option.kind == "list" and isinstance(default, str):  # absl splits it
            default = default.split(",")
        assert flag.default == default, option.name
        assert flag.help.endswith(option.help)
        if option.kind == "enum":
            assert flag.parser.enum_values == list(option.choices)
        if option.minimum is not None:
            assert flag.parser.lower_bound == option.minimum
    values(["prog", "--nan_policy=skip_step", "--profile_steps=3,5", "--learning_rate=0.5"])
    assert values.nan_policy == "skip_step" and values.profile_steps == ["3", "5"]
    assert values.loggers == ["tensorboard", "jsonl"]
    assert options_lib.resolve({}).loggers == ("tensorboard", "jsonl")
    with pytest.raises(flags.IllegalFlagValueError):
        values(["prog", "--progress=loud"])


def test_the_trainer_signature_is_the_option_table():
    parameters = inspect.signature(tapekit.Trainer).parameters
    assert list(parameters) == list(options_lib.names(options_lib.TRAINER_OPTIONS))
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters.values())
    assert parameters["checkpoint_every_secs"].default == 600.0


@pytest.mark.parametrize("arguments, message", [
    ({"global_batch_size": 0}, "global_batch_size must be a positive integer, got 0."),
    ({"global_batch_size": 12.5}, "global_batch_size must be an integer, got 12.5."),
    ({"learning_rate": 0.0}, "learning_rate must be positive, got 0.0."),
    ({"learning_rate": "fast"}, "learning_rate must be a number, got 'fast'."),
    ({"max_retraces": -1}, "max_retraces must be at least 0, got -1."),
    ({"checkpoint_every_secs": -5.0}, "checkpoint_every_secs must be at least 0, got -5.0."),
    ({"nan_policy": "ignore"}, "nan_policy must be one of stop, skip_step, rollback, got 'ignore'."),
    ({"precision": "fp8"}, "precision must be one of float32, mixed_float16, mixed_bfloat16"),
    ({"profile_steps": (5, 3), "model_dir": "/x"}, "profile_steps must be START,END with 1 <= START"),
    ({"profile_steps": ("a", "b"), "model_dir": "/x"}, "profile_steps must be START,END"),
    ({"profile_steps": (1, 3)}, "profile_steps needs a model_dir"),
])
def test_each_bad_value_is_one_error_naming_the_option(arguments, message):
    with pytest.raises(TapekitError, match="^" + message.replace(".", r"\.").replace("(", r"\(")
                       .replace(")", r"\)")):
        options_lib.resolve(arguments)


def test_resolve_normalizes_and_refuses_unknown_names():
    resolved = options_lib.resolve({"profile_steps": ["2", "4"], "model_dir": "/x",
                                    "checkpoint_every_secs": 0})
    assert resolved.profile_steps == (2, 4) and resolved.checkpoint_every_secs is None
    assert resolved.seed == 0 and resolved.progress == "auto"  # defaults
    with pytest.raises(TypeError, match="unexpected keyword argument.*learning_rte"):
        options_lib.resolve({"learning_rte": 0.1})


def test_numpy_numbers_are_accepted():
    np = pytest.importorskip("numpy")
    resolved = options_lib.resolve({"global_batch_size": np.int64(64),
                                    "learning_rate": np.float32(0.5)})
    assert resolved.global_batch_size == 64


def test_fit_arguments_use_the_same_checks():
    options_lib.check("steps_per_loop", 1)
    with pytest.raises(TapekitError, match="^eval_steps must be a positive integer, got 0"):
        options_lib.check("eval_steps", 0)


@pytest.mark.parametrize("text, seconds", [
    ("3h50m", 13800.0), ("90m", 5400.0), ("45s", 45.0), ("1.5h", 5400.0), ("1d2h", 93600.0),
    ("02:30:00", 9000.0), ("3600", 3600.0), (12, 12.0), (None, None)])
def test_max_time_reads_durations(text, seconds):
    assert options_lib.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["abc", "0", "-3m", "3x", "h"])
def test_a_bad_max_time_says_what_is_accepted(text):
    with pytest.raises(TapekitError, match="max_time must be"):
        options_lib.parse_duration(text)


def test_loggers_are_known_names_and_files_need_a_model_dir(monkeypatch):
    assert options_lib.resolve({"model_dir": "/tmp/x", "loggers": "tensorboard, CSV,csv"}).loggers \
        == ("tensorboard", "csv")
    assert options_lib.resolve({"loggers": ""}).loggers == ()
    with pytest.raises(TapekitError, match="unknown logger 'wandb'"):
        options_lib.resolve({"loggers": "wandb"})
    with pytest.raises(TapekitError, match="loggers=mlflow needs a model_dir"):
        options_lib.resolve({"loggers": ["mlflow"]})
    # MLflow missing: said on every worker while the options are resolved, before anything is made.
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed: find_spec says None
    with pytest.raises(TapekitError, match=r"^loggers=mlflow needs MLflow, which is not installed: "
                                           r"pip install 'tapekit\[mlflow\]'$"):
        options_lib.resolve({"model_dir": "/tmp/x", "loggers": "jsonl,mlflow"})
    assert options_lib.resolve({"model_dir": "/tmp/x", "loggers": "jsonl"}).loggers == ("jsonl",)
