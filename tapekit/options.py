"""Every option of a run, declared once: the constructor, the command line and the run record.

`TRAINER_OPTIONS` are `Trainer(...)`'s keyword arguments and `FIT_OPTIONS` are `fit(...)`'s;
the command line declares one absl flag per option from the same table (`define_flags`),
with the same default, bounds, choices and help text. `resolve` validates a trainer's
arguments once, with one error per bad value, and returns them as an `Options` object.

Two defaults are the trainer class's own (`default_learning_rate`,
`default_global_batch_size`): None here, and resolved by the trainer when read, so a
subclass may set them anywhere in its `__init__`.
"""

import dataclasses
import functools
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

from tapekit.errors import TapekitError

STRATEGY_NAMES = ("default", "auto", "one_device", "mirrored", "multi_worker")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
NAN_POLICIES = ("stop", "skip_step", "rollback")
ROLLBACK_SOURCES = ("auto", "memory", "checkpoint")
PROGRESS_MODES = ("auto", "bar", "log", "none")
BEST_MODES = ("auto", "min", "max")
CLUSTER_RESOLVERS = ("tf_config", "slurm")
LOGGERS = ("tensorboard", "jsonl", "csv", "mlflow")


@dataclasses.dataclass(frozen=True)
class Option:
    """One option: its absl flag kind ("string", "integer", "float", "bool", "enum", "list"),
    default, help text and the checks its value must pass (None always passes)."""

    name: str
    kind: str
    default: Any
    help: str
    minimum: Optional[float] = None  # integers: at least this; floats: see `positive`
    positive: bool = False  # a float that must be > 0
    choices: Tuple[str, ...] = ()
    parse: Optional[Callable[[Any], Any]] = None  # reads a string kind's value, or raises

    def check(self, value) -> None:
        """Raises a TapekitError naming this option when `value` is not allowed."""
        if value is None:
            return
        if self.parse is not None:
            self.parse(value)
        if self.kind == "integer":
            if isinstance(value, bool) or not isinstance(value, int) and not _is_integer(value):
                raise TapekitError(f"{self.name} must be an integer, got {value!r}.")
            if self.minimum is not None and value < self.minimum:
                wanted = "a positive integer" if self.minimum == 1 else f"at least {self.minimum}"
                raise TapekitError(f"{self.name} must be {wanted}, got {value!r}.")
        elif self.kind == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)) and not _is_number(value):
                raise TapekitError(f"{self.name} must be a number, got {value!r}.")
            if self.positive and not value > 0:
                raise TapekitError(f"{self.name} must be positive, got {value}.")
            if self.minimum is not None and not value >= self.minimum:
                raise TapekitError(f"{self.name} must be at least {self.minimum:g}, got {value}.")
        elif self.kind == "enum" and isinstance(value, str) and value not in self.choices:
            raise TapekitError(
                f"{self.name} must be one of {', '.join(self.choices)}, got {value!r}.")


def _is_integer(value) -> bool:
    return hasattr(value, "__index__")  # NumPy integers


def _is_number(value) -> bool:
    return hasattr(value, "__float__") and not isinstance(value, str)


TRAINER_OPTIONS = (
    Option("model_dir", "string", None,
           "Directory for metrics.jsonl, checkpoints and summaries. Unset: write nothing."),
    Option("strategy", "enum", "default", "tf.distribute strategy (or, in Python, a "
           "tf.distribute.Strategy object).", choices=STRATEGY_NAMES),
    Option("global_batch_size", "integer", None,
           "Examples per step over all replicas. Unset: the trainer's default.", minimum=1),
    Option("learning_rate", "float", None, "Unset: the trainer's default.", positive=True),
    Option("seed", "integer", 0, "Seeds Python, NumPy and TensorFlow (and synthetic data)."),
    Option("jit_compile", "bool", False, "Compile the per-replica step with XLA."),
    Option("run_eagerly", "bool", False,
           "Run each step eagerly, as Python, op by op: print, .numpy() and breakpoint() work in "
           "train_step/eval_step (slow; for debugging). tf.config.run_functions_eagerly(True) "
           "does the same. XLA is off while it is on."),
    Option("device", "string", None, "Device for --strategy=one_device, e.g. /gpu:0."),
    Option("cluster_resolver", "enum", "tf_config",
           "Where --strategy=multi_worker learns the cluster: the TF_CONFIG environment "
           "variable, or the Slurm step it runs in (srun; TensorFlow's SlurmClusterResolver).",
           choices=CLUSTER_RESOLVERS),
    Option("slurm_port_base", "integer", 8888,
           "With --cluster_resolver=slurm: task k on a node listens on this port + k.",
           minimum=1),
    Option("cpu_replicas", "integer", 1,
           "Split the host CPU into this many logical devices (mirrored/auto on CPU).", minimum=1),
    Option("precision", "enum", "float32",
           "float32, mixed_float16 (dynamic loss scaling) or mixed_bfloat16: the Keras dtype "
           "policy while build() creates models.", choices=PRECISIONS),
    Option("checkpoint_every_steps", "integer", None,
           "Save a checkpoint every this many steps (at loop ends) and at the end; unset: only "
           "at the end. Needs a model_dir.", minimum=1),
    Option("checkpoint_every_secs", "float", 600.0,
           "Also save a checkpoint at the first loop end this many seconds after the last one "
           "(a killed run loses minutes, not the run); 0: not by time. Needs a model_dir.",
           minimum=0.0),
    Option("async_checkpoint", "bool", False,
           "Write checkpoints in the background (TensorFlow's async checkpoint): training "
           "waits only while the state is copied to host memory (which then holds a second "
           "copy). A save in flight is finished before the next save, a restore, the end of "
           "fit and the process's exit."),
    Option("max_checkpoints_to_keep", "integer", 3, "Checkpoints kept in MODEL_DIR/checkpoints.",
           minimum=1),
    Option("restore_from", "string", None,
           "Start from this checkpoint (a prefix like DIR/ckpt-1000) instead of the latest one "
           "in MODEL_DIR/checkpoints; newer checkpoints there are moved aside, not deleted."),
    Option("deterministic", "bool", False,
           "Turn on TensorFlow op determinism: with the seed, a killed and resumed run ends "
           "bitwise equal to an uninterrupted one."),
    Option("nan_policy", "enum", "stop",
           "On a NaN/inf loss or metric: stop with an error at the end of the loop (nothing bad "
           "is checkpointed), skip the update of that step, or roll back: go back to the "
           "state before the loop, replay it one step per loop, and skip the bad steps "
           "(recorded in run.json, skipped again on resume; docs/checkpoints-and-faults.md, "
           "\"Rolling back\").",
           choices=NAN_POLICIES),
    Option("max_rollbacks", "integer", 3,
           "With --nan_policy=rollback: stop after this many rollbacks in a row (no good "
           "full loop between them).", minimum=1),
    Option("spike_threshold", "float", None,
           "With --nan_policy=rollback: a loop whose mean loss (each metric named loss or "
           "*_loss) exceeds this many times the median of the last 20 good loops' is bad too "
           "(judged once 5 loops are known).", minimum=1.0),
    Option("rollback_from", "enum", "auto",
           "With --nan_policy=rollback, the good state to go back to: a copy of the state "
           "kept in memory at each loop's start (no replay; costs one copy per loop and the "
           "state's size in memory), or the last checkpoint (no cost until used; replays from "
           "it). auto: memory when the state is at most 1 GiB, else the checkpoint.",
           choices=ROLLBACK_SOURCES),
    Option("skip_steps", "list", None,
           "Global steps whose batches are read but not trained on: FIRST-LAST or STEP, "
           "comma-separated (what --nan_policy=rollback records in run.json 'skipped'; a "
           "rerun with the run's --flagfile skips them too)."),
    Option("clip_global_norm", "float", None,
           "Clip the global-batch gradient of each optimizer to this global norm.", positive=True),
    Option("gradient_accumulation_steps", "integer", 1,
           "Apply the mean gradient of this many steps (micro-batches) at once.", minimum=1),
    Option("max_retraces", "integer", None,
           "Fail once the compiled loop is traced more than this many extra times (each retrace "
           "logs which input's shape or dtype changed). Unset: only warn.", minimum=0),
    Option("profile_steps", "list", None,
           "START,END: write a TensorBoard profiler trace of these global steps, each step "
           "marked, to MODEL_DIR/profile, then log its analysis (step time, input wait, top "
           "ops; needs tapekit[profile])."),
    Option("log_gradient_norms", "bool", False,
           "Report, per loop and per optimizer, the global gradient norm before and after "
           "clipping, the update-to-weight ratio and the share of steps clipped (computed in "
           "the graph, exact on any number of replicas)."),
    Option("loggers", "list", "tensorboard,jsonl",
           "Where each loop's and evaluation's metrics go, comma-separated: tensorboard "
           "(MODEL_DIR/summaries), jsonl (MODEL_DIR/metrics.jsonl), csv (MODEL_DIR/metrics.csv), "
           "mlflow (MLflow's tracking URI, else a local store; needs tapekit[mlflow])."),
    Option("mlflow_experiment", "string", None,
           "With --loggers=...,mlflow: the MLflow experiment; unset: MLFLOW_EXPERIMENT_NAME, "
           "else the model_dir's parent folder's name."),
    Option("progress", "enum", "auto",
           "Progress bar (bar), one log line per loop (log), nothing (none); auto: a bar on a "
           "terminal or in a Jupyter notebook, log lines in a batch job.", choices=PROGRESS_MODES),
    Option("sample_every_steps", "integer", None,
           "With a model_dir: save sample image grids (MODEL_DIR/samples/step_N.png) and "
           "TensorBoard image/histogram summaries this often, and at the end.", minimum=1),
    Option("summary_every_steps", "integer", None,
           "With a model_dir: write the tf.summary calls of train_step (scalar, histogram, "
           "...) to MODEL_DIR/summaries/train at every step whose global step (counting it) "
           "is a multiple of this, at that step, from the chief's first replica; eval_step's "
           "of each evaluation's first step to summaries/eval. Unset: they write nothing, and "
           "the loop has no summary op. Not with jit_compile.", minimum=1),
    Option("allow_changes", "list", None,
           "Settings a resumed run may change on purpose (comma-separated), e.g. "
           "global_batch_size,seed; other changes that break exact resume are refused."),
    Option("best_metric", "string", None,
           "Keep MODEL_DIR/best/ (a checkpoint, and the exported model) at the best value of "
           "this evaluation metric, written as for --early_stopping_metric: eval_X for the "
           "evaluation's X (X alone is accepted too)."),
    Option("best_mode", "enum", "auto",
           "Whether a lower (min) or higher (max) best_metric is better; auto: max for names "
           "containing acc, auc, precision or recall, else min.", choices=BEST_MODES),
)

FIT_OPTIONS = (
    Option("train_steps", "integer", 1000, "Train until the global step reaches this.",
           minimum=1),
    Option("train_epochs", "integer", None,
           "Instead of --train_steps: train for this many passes over training data that ends "
           "(each pass re-iterates it, shuffled as its pipeline says).", minimum=1),
    Option("eval_every_epochs", "integer", None,
           "With --train_epochs: evaluate after every this many epochs, and at the end.",
           minimum=1),
    Option("checkpoint_every_epochs", "integer", None,
           "With --train_epochs: also save a checkpoint at the end of every this many epochs.",
           minimum=1),
    Option("max_time", "string", None,
           "A wall-time budget for this fit, e.g. 3h50m, 90m, 45s or seconds: stop at the next "
           "step once the budget, less the measured time of a checkpoint save, is used up, "
           "save, and exit 0 (the reason is in run.json). A resumed run gets a fresh budget.",
           parse=lambda value: parse_duration(value)),
    Option("steps_per_loop", "integer", 100,
           "Steps per compiled in-graph loop; metrics are logged once per loop.", minimum=1),
    Option("eval_every_steps", "integer", None,
           "Evaluate after each loop passing a multiple of this, and at the end.", minimum=1),
    Option("eval_steps", "integer", None,
           "Steps per evaluation; unset: the whole evaluation data set (one pass, which must "
           "end).", minimum=1),
)

_BY_NAME = {option.name: option for option in TRAINER_OPTIONS + FIT_OPTIONS}

Options = dataclasses.make_dataclass(
    "Options", [(option.name, Any, dataclasses.field(default=option.default))
                for option in TRAINER_OPTIONS], frozen=True)
Options.__doc__ = "A trainer's validated options (`tapekit.options.TRAINER_OPTIONS`)."
Options.__module__ = __name__


def check(name: str, value) -> None:
    """Validates one option (of the constructor or of `fit`) by name."""
    _BY_NAME[name].check(value)


def check_global_batch_size(value, strategy) -> None:
    """Validates a global batch size, which must split evenly over `strategy`'s replicas."""
    check("global_batch_size", value)
    replicas = strategy.num_replicas_in_sync
    if value % replicas:
        raise TapekitError(
            f"global_batch_size={value} is not divisible by the {replicas} replicas in "
            f"sync; use a multiple of {replicas}.")


def global_batch_size(options, trainer, strategy) -> int:
    """The option, else the trainer class's `default_global_batch_size` (read when used)."""
    value = options.global_batch_size
    if value is None:
        value = trainer.default_global_batch_size
        check_global_batch_size(value, strategy)
    return int(value)


def learning_rate(options, trainer) -> float:
    """The option, else the trainer class's `default_learning_rate` (read when used)."""
    value = options.learning_rate
    return float(value if value is not None else trainer.default_learning_rate)


def resolve(arguments: Dict[str, Any]) -> "Options":
    """Validates `Trainer(...)`'s keyword arguments and returns them as `Options`.

    Unknown names are a TypeError (as for any Python call). Normalizes `profile_steps` to a
    (START, END) tuple and `checkpoint_every_secs=0` to None.
    """
    unknown = sorted(set(arguments) - {option.name for option in TRAINER_OPTIONS})
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) for Trainer: {', '.join(unknown)} "
                        f"(the options are {', '.join(o.name for o in TRAINER_OPTIONS)}).")
    for name, value in arguments.items():
        check(name, value)
    values = dict(arguments)
    steps = values.get("profile_steps")
    if steps is not None:
        try:
            steps = tuple(int(step) for step in steps)
        except (TypeError, ValueError):
            steps = ()
        if len(steps) != 2 or not 1 <= steps[0] <= steps[1]:
            raise TapekitError(f"profile_steps must be START,END with 1 <= START <= END, got "
                               f"{values['profile_steps']}.")
        if not values.get("model_dir"):
            raise TapekitError("profile_steps needs a model_dir to write the trace to.")
        values["profile_steps"] = steps
    if values.get("best_metric") and not values.get("model_dir"):
        raise TapekitError("best_metric needs a model_dir to keep MODEL_DIR/best/ in.")
    if values.get("summary_every_steps") and not values.get("model_dir"):
        raise TapekitError("summary_every_steps needs a model_dir to write "
                           "MODEL_DIR/summaries to.")
    if values.get("summary_every_steps") and values.get("jit_compile"):
        raise TapekitError("summary_every_steps cannot be used with jit_compile: XLA cannot "
                           "compile tf.summary writes; turn one of them off.")
    allowed = values.get("allow_changes")
    if allowed is not None:
        allowed = allowed.split(",") if isinstance(allowed, str) else allowed
        values["allow_changes"] = tuple(name.strip() for name in allowed if name.strip())
    values["skip_steps"] = step_ranges(values.get("skip_steps"))
    values["loggers"] = logger_names(values.get("loggers", _BY_NAME["loggers"].default),
                                     values.get("model_dir"))
    rollback = values.get("nan_policy") == "rollback"
    for name, default in (("spike_threshold", None), ("rollback_from", "auto")):
        if values.get(name, default) != default and not rollback:
            raise TapekitError(f"{name} applies only with nan_policy=rollback (nan_policy is "
                               f"{values.get('nan_policy', 'stop')}).")
    if values.get("rollback_from") == "checkpoint" and not values.get("model_dir"):
        raise TapekitError("rollback_from=checkpoint needs a model_dir (its checkpoints are "
                           "what it goes back to); use rollback_from=memory without one.")
    if "checkpoint_every_secs" in values:
        values["checkpoint_every_secs"] = values["checkpoint_every_secs"] or None
    return Options(**values)


def step_ranges(value) -> Optional[Tuple[Tuple[int, int], ...]]:
    """`skip_steps` as sorted, merged (FIRST, LAST) ranges of global steps (inclusive), from
    "FIRST-LAST,STEP,..." (a string or a list of such items) or pairs; None: no steps."""
    if value is None or value == "" or value == ():
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    ranges = []
    for item in items:
        try:
            if isinstance(item, str):
                first, _, last = item.strip().partition("-")
                pair = (int(first), int(last or first))
            elif isinstance(item, (list, tuple)):
                pair = (int(item[0]), int(item[-1]))
            else:
                pair = (int(item), int(item))
        except (TypeError, ValueError, IndexError):
            pair = None
        if pair is None or not 1 <= pair[0] <= pair[1]:
            raise TapekitError(f"skip_steps must be FIRST-LAST or STEP items (global steps, 1 "
                               f"or more, FIRST <= LAST), comma-separated; got {item!r}.")
        ranges.append(pair)
    merged = []
    for first, last in sorted(ranges):
        if merged and first <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(last, merged[-1][1]))
        else:
            merged.append((first, last))
    return tuple(merged)


def logger_names(value, model_dir: Optional[str]) -> Tuple[str, ...]:
    """`loggers` ("tensorboard,jsonl" or a list of names) as a tuple of known names, in order,
    without repeats; "" or None: none. Checked on every worker before anything is written:
    csv and mlflow need a model_dir, mlflow needs MLflow installed."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    result: list = []
    for item in items:
        name = str(item).strip().lower()
        if not name or name in result:
            continue
        if name not in LOGGERS:
            raise TapekitError(f"loggers: unknown logger {item!r}; the loggers are "
                               f"{', '.join(LOGGERS)} (comma-separated).")
        result.append(name)
    needs_dir = [name for name in result if name in ("csv", "mlflow")]
    if needs_dir and not model_dir:
        raise TapekitError(f"loggers={','.join(needs_dir)} needs a model_dir (the CSV file, and "
                           "the MLflow run's id that a resumed run continues, are kept there).")
    if "mlflow" in result:
        import importlib.util
        if importlib.util.find_spec("mlflow") is None:
            raise TapekitError("loggers=mlflow needs MLflow, which is not installed: "
                               "pip install 'tapekit[mlflow]'")
    return tuple(result)


_DURATION_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}


def parse_duration(value) -> Optional[float]:
    """`max_time` in seconds: a number of seconds, or "3h50m", "90m", "1d2h", "45s", "1.5h"
    (units d, h, m, s; an optional "HH:MM:SS" too). None or "": None."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        import re
        text = str(value).strip().lower().replace(" ", "")
        seconds = None
        if re.fullmatch(r"\d+(\.\d+)?", text):
            seconds = float(text)
        elif re.fullmatch(r"\d+:\d{1,2}:\d{1,2}", text):
            hours, minutes, secs = (int(part) for part in text.split(":"))
            seconds = hours * 3600.0 + minutes * 60.0 + secs
        elif re.fullmatch(r"(\d+(\.\d+)?[dhms])+", text):
            seconds = sum(float(number) * _DURATION_UNITS[unit]
                          for number, _, unit in re.findall(r"(\d+(\.\d+)?)([dhms])", text))
        if seconds is None:
            raise TapekitError(f"max_time must be a duration such as 3h50m, 90m, 45s, 1.5h, "
                               f"02:30:00 or a number of seconds; got {value!r}.")
    if not seconds > 0:
        raise TapekitError(f"max_time must be positive, got {value!r}.")
    return seconds


def format_ranges(ranges) -> str:
    """(FIRST, LAST) ranges as `skip_steps` writes them: "FIRST-LAST,STEP"."""
    return ",".join(f"{first}-{last}" if last != first else str(first) for first, last in ranges)


def define_flags(flag_values, options: Sequence[Option] = TRAINER_OPTIONS + FIT_OPTIONS) -> None:
    """Declares one absl flag per option (same name, default, bounds, choices and help)."""
    from absl import flags  # only the command line needs absl.flags
    for option in options:
        kwargs: Dict[str, Any] = {"flag_values": flag_values}
        if option.kind == "enum":
            kwargs["enum_values"] = list(option.choices)
        if option.kind == "integer" and option.minimum is not None:
            kwargs["lower_bound"] = int(option.minimum)
        if option.kind == "float" and option.minimum is not None:
            kwargs["lower_bound"] = float(option.minimum)
        if option.kind == "float" and option.positive:
            kwargs["lower_bound"] = 1e-300  # absl has no exclusive bound
        define: Callable = getattr(flags, f"DEFINE_{option.kind}")
        define(name=option.name, default=option.default, help=option.help, **kwargs)
        if option.parse is not None:  # refused while the flags are parsed, in the same words
            flags.register_validator(option.name, functools.partial(_parses, option),
                                     flag_values=flag_values)


def _parses(option: Option, value) -> bool:
    from absl import flags
    try:
        option.check(value)
    except TapekitError as error:
        raise flags.ValidationError(str(error)) from None
    return True


def signature(first: str):
    """`first` (self or cls), then every trainer option as a keyword-only parameter."""
    import inspect
    return inspect.Signature(
        [inspect.Parameter(first, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        + [inspect.Parameter(option.name, inspect.Parameter.KEYWORD_ONLY, default=option.default)
           for option in TRAINER_OPTIONS])


def names(options: Sequence[Option]) -> Tuple[str, ...]:
    return tuple(option.name for option in options)
