"""The absl command line shared by every trainer: common flags, loading a trainer class, running it.

`tapekit-train --trainer=NAME|package.module:ClassName [flags]`. The trainer class is
resolved from `--trainer` before the full parse, so that its own flags (declared in its
`define_flags` classmethod, named like its constructor's keyword arguments) are known and
listed by `--helpfull`.
"""

import importlib
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple, Type

import tensorflow as tf

from absl import app, flags, logging

from tapekit.callbacks import EarlyStopping
from tapekit import controller
from tapekit import distribute
from tapekit.distribute import STRATEGY_NAMES
from tapekit.errors import TapekitError, user_message
from tapekit.export import check_export_dir
from tapekit.precision import PRECISIONS
from tapekit.trainer import Trainer

FLAGS = flags.FLAGS

# The flags every trainer gets; the first group maps to Trainer(...), the second to fit(...).
TRAINER_FLAGS = ("model_dir", "strategy", "global_batch_size", "learning_rate", "seed",
                 "jit_compile", "device", "cpu_replicas", "precision", "checkpoint_every_steps",
                 "checkpoint_every_secs",
                 "max_checkpoints_to_keep", "restore_from", "deterministic", "nan_policy",
                 "clip_global_norm", "gradient_accumulation_steps", "max_retraces",
                 "profile_steps", "progress", "sample_every_steps")
FIT_FLAGS = ("train_steps", "steps_per_loop", "eval_every_steps", "eval_steps")


def define_common_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """Declares the flags shared by all trainers (idempotent)."""
    if "trainer" in flag_values:
        return
    def define(kind, name, default, help_text, **kwargs):
        getattr(flags, f"DEFINE_{kind}")(name, default, help_text, flag_values=flag_values, **kwargs)
    define("string", "trainer", "regression",
           "A built-in trainer name or 'package.module:ClassName' (a tapekit.Trainer subclass; "
           "the current directory is importable).")
    define("string", "model_dir", None,
           "Directory for metrics.jsonl (and checkpoints, summaries). Unset: write nothing.")
    define("integer", "train_steps", 1000, "Train until the global step reaches this.", lower_bound=1)
    define("integer", "steps_per_loop", 100,
           "Steps per compiled in-graph loop; metrics are logged once per loop.", lower_bound=1)
    define("integer", "global_batch_size", None,
           "Examples per step over all replicas. Unset: the trainer's default.", lower_bound=1)
    define("float", "learning_rate", None, "Unset: the trainer's default.", lower_bound=1e-300)
    define("integer", "seed", 0, "Seeds Python, NumPy and TensorFlow (and synthetic data).")
    flags.DEFINE_enum("strategy", "default", list(STRATEGY_NAMES), "tf.distribute strategy.",
                      flag_values=flag_values)
    define("string", "device", None, "Device for --strategy=one_device, e.g. /gpu:0.")
    define("integer", "cpu_replicas", 1,
           "Split the host CPU into this many logical devices (mirrored/auto on CPU).",
           lower_bound=1)
    define("bool", "jit_compile", False, "Compile the per-replica step with XLA.")
    flags.DEFINE_enum("precision", "float32", list(PRECISIONS),
                      "float32, mixed_float16 (dynamic loss scaling) or mixed_bfloat16.",
                      flag_values=flag_values)
    define("integer", "checkpoint_every_steps", None,
           "Save a checkpoint every this many steps (at loop ends) and at the end; unset: "
           "only at the end. Needs --model_dir.", lower_bound=1)
    define("float", "checkpoint_every_secs", 600.0,
           "Also save a checkpoint at the first loop end this many seconds after the last "
           "one (a killed run loses minutes, not the run); 0: not by time. Needs --model_dir.",
           lower_bound=0.0)
    define("integer", "max_checkpoints_to_keep", 3, "Checkpoints kept in MODEL_DIR/checkpoints.",
           lower_bound=1)
    define("string", "restore_from", None,
           "Start from this checkpoint (a prefix like DIR/ckpt-1000) instead of the latest one "
           "in MODEL_DIR/checkpoints; newer checkpoints there are moved aside, not deleted.")
    define("bool", "deterministic", False,
           "Turn on TensorFlow op determinism: with --seed, a killed and resumed run ends "
           "bitwise equal to an uninterrupted one.")
    flags.DEFINE_enum("nan_policy", "stop", ["stop", "skip_step"],
                      "On a NaN/inf loss or metric: stop with an error at the end of the loop "
                      "(nothing bad is checkpointed), or skip the update of that step.",
                      flag_values=flag_values)
    define("float", "clip_global_norm", None,
           "Clip the global-batch gradient of each optimizer to this global norm.",
           lower_bound=1e-300)
    define("integer", "gradient_accumulation_steps", 1,
           "Apply the mean gradient of this many steps (micro-batches) at once.", lower_bound=1)
    define("integer", "max_retraces", None,
           "Fail once the compiled loop is traced more than this many extra times (each "
           "retrace logs which input's shape or dtype changed). Unset: only warn.", lower_bound=0)
    flags.DEFINE_list("profile_steps", None,
                      "START,END: write a TensorBoard profiler trace of these global steps to "
                      "MODEL_DIR/profile.", flag_values=flag_values)
    flags.DEFINE_enum("progress", "auto", ["auto", "bar", "log", "none"],
                      "Progress bar (bar), one log line per loop (log), nothing (none); auto: a "
                      "bar on a terminal, log lines in a batch job.", flag_values=flag_values)
    define("integer", "sample_every_steps", None,
           "With --model_dir: save sample image grids (MODEL_DIR/samples/step_N.png) and "
           "TensorBoard image/histogram summaries this often, and at the end.", lower_bound=1)
    define("string", "export_dir", None,
           "After training, write the trained model (the generator for GANs) here as a "
           "SavedModel with a serving_default signature.")
    define("integer", "eval_every_steps", None,
           "Evaluate after each loop passing a multiple of this, and at the end.", lower_bound=1)
    define("integer", "eval_steps", None,
           "Steps per evaluation; unset: the whole evaluation data set (one pass, which must "
           "end).", lower_bound=1)
    define("string", "early_stopping_metric", None,
           "Stop when this metric stops improving: a training metric ('loss') or an "
           "evaluation one ('eval_loss').")
    define("integer", "early_stopping_patience", 5,
           "Checks (loops, or evaluations) without improvement before stopping.", lower_bound=1)
    define("float", "early_stopping_min_delta", 0.0,
           "The least change that counts as an improvement.", lower_bound=0.0)


def load_trainer_class(spec: str, builtins: Dict[str, str]) -> Type[Trainer]:
    """Resolves `--trainer`: a built-in name or 'package.module:ClassName'."""
    target = builtins.get(spec, spec)
    module_name, _, class_name = target.partition(":")
    if not module_name or not class_name:
        raise TapekitError(
            f"--trainer={spec!r} is neither a built-in trainer ({', '.join(sorted(builtins))}) "
            "nor of the form package.module:ClassName.")
    if os.getcwd() not in sys.path:  # like `python -m`: the user's own modules are importable
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # a missing module or a bug in it: one line either way
        raise TapekitError(
            f"--trainer={spec!r}: cannot import module {module_name!r} "
            f"({type(error).__name__}: {error}).") from None
    trainer_class = getattr(module, class_name, None)
    if trainer_class is None:
        raise TapekitError(f"--trainer={spec!r}: module {module_name!r} has no {class_name!r}.")
    if not (isinstance(trainer_class, type) and issubclass(trainer_class, Trainer)):
        raise TapekitError(
            f"--trainer={spec!r}: {class_name} is not a subclass of tapekit.Trainer.")
    return trainer_class


def parse_trainer_class(argv: Sequence[str], builtins: Dict[str, str],
                        program: str) -> Tuple[Type[Trainer], List[str]]:
    """Resolves `--trainer` before the full parse and declares the trainer's own flags.

    Returns the class and the names of the flags it declared (they map to its constructor).
    A bad `--trainer` exits with one line.
    """
    define_common_flags()
    try:
        FLAGS(list(argv), known_only=True)  # only to learn --trainer; app.run parses for real
        trainer_spec = FLAGS.trainer
    except flags.Error:
        trainer_spec = FLAGS["trainer"].default
    FLAGS.unparse_flags()
    try:
        trainer_class = load_trainer_class(trainer_spec, builtins)
    except TapekitError as error:
        exit_with_error(program, error)
    before = set(FLAGS)
    trainer_class.define_flags()
    return trainer_class, sorted(set(FLAGS) - before)


def trainer_kwargs(own_flags: Sequence[str], **overrides) -> Dict[str, object]:
    """The trainer's constructor arguments from the parsed flags."""
    kwargs = {name: FLAGS[name].value for name in TRAINER_FLAGS + tuple(own_flags)}
    kwargs.update(overrides)
    return kwargs


def main(builtins: Dict[str, str], argv: Optional[Sequence[str]] = None,
         program: str = "tapekit-train") -> None:
    """Parses flags, builds the chosen trainer, trains it and prints what it learned."""
    argv = list(sys.argv if argv is None else argv)
    trainer_class, own_flags = parse_trainer_class(argv, builtins, program)
    app.run(lambda args: _train(program, trainer_class, own_flags, args), argv=argv)


def _train(program: str, trainer_class: Type[Trainer], own_flags: List[str], argv) -> None:
    if len(argv) > 1:
        exit_with_error(program, TapekitError(f"unexpected arguments: {' '.join(argv[1:])}"))
    callbacks = []
    if FLAGS.early_stopping_metric:
        callbacks.append(EarlyStopping(FLAGS.early_stopping_metric,
                                       patience=FLAGS.early_stopping_patience,
                                       min_delta=FLAGS.early_stopping_min_delta))
    try:
        if FLAGS.export_dir:  # refuse before training, not after
            check_export_dir(FLAGS.export_dir)
        trainer = trainer_class(**trainer_kwargs(own_flags))
        controller.kill_on_second_interrupt()
        try:
            trainer.fit(callbacks=callbacks, **{name: FLAGS[name].value for name in FIT_FLAGS})
        except KeyboardInterrupt:  # Ctrl-C: the loop finished and was saved (and logged)
            sys.exit(130)
        if trainer.preempted:  # exit 0 so that the scheduler's requeue resumes the run
            return
        if FLAGS.export_dir and distribute.is_chief(trainer.strategy):
            logging.info("exported the model to %s", trainer.export(FLAGS.export_dir))
        summary = trainer.results_summary()
    except TapekitError as error:
        exit_with_error(program, error)
    logging.info("trained %s to step %d", trainer_class.__name__, trainer.current_step)
    if summary:
        print(summary, flush=True)


def export_main(builtins: Dict[str, str], argv: Optional[Sequence[str]] = None,
                program: str = "tapekit-export") -> None:
    """`tapekit-export`: builds the trainer from the same flags as training, restores its
    latest checkpoint (or --restore_from) without training, and writes --export_dir."""
    argv = list(sys.argv if argv is None else argv)
    trainer_class, own_flags = parse_trainer_class(argv, builtins, program)
    app.run(lambda args: _export(program, trainer_class, own_flags, args), argv=argv)


def _export(program: str, trainer_class: Type[Trainer], own_flags: List[str], argv) -> None:
    try:
        if len(argv) > 1:
            raise TapekitError(f"unexpected arguments: {' '.join(argv[1:])}")
        if not FLAGS.export_dir:
            raise TapekitError("--export_dir is required: a new directory for the SavedModel.")
        check_export_dir(FLAGS.export_dir)  # before any work
        # One device: the weights do not depend on the strategy they were trained under.
        trainer = trainer_class(**trainer_kwargs(own_flags, strategy="default", device=None,
                                                 cpu_replicas=1, progress="none"))
        step = trainer.restore()
        trainer.export(FLAGS.export_dir)
    except TapekitError as error:
        exit_with_error(program, error)
    model, signature = trainer.export_model()
    arguments = ", ".join(f"{spec.name}: {spec.dtype.name}{list(spec.shape)}" for spec in signature)
    print(f"Exported {model.name} (step {step}) to {FLAGS.export_dir}: "
          f"signature serving_default({arguments})", flush=True)


def exit_with_error(program: str, error: BaseException):
    """Prints `program: error: <one line>` to stderr and exits with status 2."""
    # A restore that failed half-way logs every unused checkpoint value when it is garbage
    # collected at exit: keep the error the last line.
    tf.get_logger().setLevel("ERROR")
    print(f"{program}: error: {user_message(error)}", file=sys.stderr, flush=True)
    sys.exit(2)
