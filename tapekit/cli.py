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

from tapekit import options as options_lib
from tapekit.callbacks import EarlyStopping
from tapekit.checkpoint import files, record
from tapekit.checkpoint.export import check_export_dir
from tapekit.errors import EXIT_ERROR, EXIT_WRITE_FAILED, TapekitError, is_user_code, stop_of, user_message
from tapekit.faults import stop
from tapekit.run import distribute
from tapekit.trainer import Trainer

FLAGS = flags.FLAGS
MODES = ("train", "evaluate", "train_and_evaluate", "continuous_evaluate")

def define_common_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """Declares the flags shared by all trainers (idempotent): one per option of
    `tapekit.options` (the constructor's and `fit`'s), plus the command line's own."""
    if "trainer" in flag_values:
        return
    def define(kind, name, default, help_text, **kwargs):
        getattr(flags, f"DEFINE_{kind}")(name, default, help_text, flag_values=flag_values, **kwargs)
    define("string", "trainer", "regression",
           "A built-in trainer name or 'package.module:ClassName' (a tapekit.Trainer subclass; "
           "the current directory is importable).")
    flags.DEFINE_enum("mode", "train", list(MODES),
                      "train (evaluating only with --eval_every_steps); train_and_evaluate "
                      "(evaluating every --eval_every_steps, by default at each checkpoint or "
                      "loop); evaluate (the latest checkpoint, or --restore_from, once); "
                      "continuous_evaluate (the evaluator beside a training job: each new "
                      "checkpoint once, until the one at --train_steps).",
                      flag_values=flag_values)
    define("bool", "tensorflow_logs", False,
           "Show TensorFlow's own INFO logs (device set-up, collectives, assets written), hidden "
           "by default so that tapekit's lines stand out; absl's --verbosity=1 shows them too.")
    define("float", "eval_timeout_secs", 3600.0,
           "continuous_evaluate: exit after this long without a new checkpoint.", lower_bound=0.0)
    options_lib.define_flags(flag_values)
    define("string", "export_dir", None,
           "After training, write the trained model (the generator for GANs) here as a "
           "SavedModel with a serving_default signature.")
    define("string", "early_stopping_metric", None,
           "Stop when this metric stops improving: a training metric ('loss') or an "
           "evaluation one ('eval_loss').")
    define("integer", "early_stopping_patience", 5,
           "Checks (loops, or evaluations) without improvement before stopping.", lower_bound=1)
    define("float", "early_stopping_min_delta", 0.0,
           "The least change that counts as an improvement.", lower_bound=0.0)


# Flags a resumed run never takes from its flags.txt: where it is, one-off permissions and
# restores, and outputs that must be new.
NOT_RESUMED = ("model_dir", "restore_from", "allow_changes", "export_dir", "pdb_post_mortem")


def recorded_flags(model_dir: Optional[str]) -> Dict[str, str]:
    """name -> value (as written) of each flag in MODEL_DIR/flags.txt of a recorded run
    (one with a run.json), else {}. Booleans are "true"/"false"."""
    if model_dir:
        files.check_scheme(model_dir)  # foo://: one line, before anything reads there
    if not model_dir or record.read(model_dir) is None:
        return {}
    text = files.read_text(os.path.join(model_dir, record.FLAGS_FILE))
    found = {}
    for line in (text or "").splitlines():
        if not line.startswith("--"):
            continue
        name, equals, value = line[2:].partition("=")
        if not equals:  # a boolean: --name or --noname
            name, value = ((name, "true") if name in FLAGS or not name.startswith("no")
                           else (name[2:], "false"))
        found[name] = value
    return found


def take_recorded_flags(trainer_class: Optional[type] = None) -> List[str]:
    """Gives every flag this command line leaves out its value from the run's flags.txt
    when --model_dir holds a recorded run, so that `--trainer=X --model_dir=DIR` (or just
    `--model_dir=DIR`) continues the same run; a flag given explicitly wins (and is checked
    by the safe-resume rules). The trainer's own `arguments_safe_to_change` (knobs that do
    not change what is trained) are not taken. Logs and returns the flags taken."""
    skipped = set(NOT_RESUMED) | set(getattr(trainer_class, "arguments_safe_to_change", ()))
    if FLAGS.mode in ("evaluate", "continuous_evaluate"):  # an evaluator runs where it is
        skipped |= {"mode", "strategy", "device", "cpu_replicas", "cluster_resolver",
                    "slurm_port_base", "profile_steps"}
    for either, other in (("train_steps", "train_epochs"), ("train_epochs", "train_steps")):
        if FLAGS[other].present:  # switching between steps and epochs: not both
            skipped.add(either)
    taken = []
    for name, value in recorded_flags(FLAGS.model_dir).items():
        if name in skipped or name not in FLAGS or FLAGS[name].present:
            continue
        if FLAGS[name].serialize() == (f"--{name}={value}" if FLAGS[name].flag_type() != "bool"
                                       else f"--{'' if value == 'true' else 'no'}{name}"):
            continue  # the default is what the run used
        FLAGS[name].parse(value)
        taken.append(f"--{name}={value}")
    if taken:
        logging.info("resuming the run in %s with the flags it was started with that this "
                     "command does not give: %s", FLAGS.model_dir, " ".join(taken))
    return taken


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
        if not FLAGS["trainer"].present:  # a resumed run's own, else the default
            trainer_spec = recorded_flags(FLAGS.model_dir).get("trainer", trainer_spec)
    except flags.Error:
        trainer_spec = FLAGS["trainer"].default
    except TapekitError as error:  # a model_dir whose scheme TensorFlow has no file system for
        exit_with_error(program, error)
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
    names = options_lib.names(options_lib.TRAINER_OPTIONS) + tuple(own_flags)
    kwargs = {name: FLAGS[name].value for name in names}
    kwargs.update(overrides)
    return kwargs


def main(builtins: Dict[str, str], argv: Optional[Sequence[str]] = None,
         program: str = "tapekit-train") -> None:
    """Parses flags, builds the chosen trainer, trains it and prints what it learned."""
    argv = list(sys.argv if argv is None else argv)
    trainer_class, own_flags = parse_trainer_class(argv, builtins, program)
    app.run(lambda args: _train(program, trainer_class, own_flags, args, argv), argv=argv)


def flags_text(own_flags: Sequence[str]) -> str:
    """Every flag this run set (or defaulted), one per line, in absl flagfile format."""
    names = (["trainer", "mode"] + list(options_lib.names(options_lib.TRAINER_OPTIONS))
             + list(options_lib.names(options_lib.FIT_OPTIONS))
             + ["export_dir", "eval_timeout_secs", "early_stopping_metric",
                "early_stopping_patience", "early_stopping_min_delta"] + list(own_flags))
    return "".join(FLAGS[name].serialize() + "\n" for name in names
                   if FLAGS[name].value is not None)


def quiet_tensorflow() -> None:
    """TensorFlow's Python INFO logs off unless --tensorflow_logs or --verbosity >= 1 (its C++
    ones are set before TensorFlow is imported: `tapekit.trainers.main`)."""
    shown = FLAGS.tensorflow_logs or FLAGS.verbosity >= 1
    tf.get_logger().setLevel("INFO" if shown else "WARNING")


def _train(program: str, trainer_class: Type[Trainer], own_flags: List[str], argv,
           command: Sequence[str] = ()) -> None:
    quiet_tensorflow()
    if len(argv) > 1:
        exit_with_error(program, TapekitError(f"unexpected arguments: {' '.join(argv[1:])}"))
    try:
        files.check_scheme(FLAGS.model_dir or "")
    except TapekitError as error:
        exit_with_error(program, error)
    try:
        take_recorded_flags(trainer_class)
    except (TapekitError, flags.Error) as error:
        exit_with_error(program, TapekitError(f"{FLAGS.model_dir}'s flags.txt: {error}"))
    if FLAGS.mode in ("evaluate", "continuous_evaluate"):
        return _evaluate(program, trainer_class, own_flags)
    callbacks = []
    if FLAGS.early_stopping_metric:
        callbacks.append(EarlyStopping(FLAGS.early_stopping_metric,
                                       patience=FLAGS.early_stopping_patience,
                                       min_delta=FLAGS.early_stopping_min_delta))
    try:
        if FLAGS.export_dir:  # refuse before training, not after
            check_export_dir(FLAGS.export_dir)
        # The debugger is most use where the step runs as Python, with values.
        eager = {"run_eagerly": True} if FLAGS.pdb_post_mortem else {}
        trainer = trainer_class(**trainer_kwargs(own_flags, **eager))
        fit_arguments = {name: FLAGS[name].value
                         for name in options_lib.names(options_lib.FIT_OPTIONS)}
        if fit_arguments["train_epochs"] and not FLAGS["train_steps"].present:
            fit_arguments["train_steps"] = None  # its default is not a choice made
        if (FLAGS.mode == "train_and_evaluate" and not fit_arguments["eval_every_steps"]
                and not fit_arguments["eval_every_epochs"]):
            fit_arguments["eval_every_steps"] = (FLAGS.checkpoint_every_steps
                                                 or FLAGS.steps_per_loop)
        try:
            with record.command_line(command, flags_text(own_flags), FLAGS.mode), \
                    stop.second_interrupt_kills():
                trainer.fit(callbacks=callbacks, **fit_arguments)
        except KeyboardInterrupt:  # Ctrl-C: the loop finished and was saved (and logged)
            sys.exit(130)
        if trainer.preempted or trainer.stopped_by_time:  # exit 0: a requeue resumes the run
            return
        if FLAGS.export_dir and distribute.is_chief(trainer.strategy):
            logging.info("exported the model to %s", trainer.export(FLAGS.export_dir))
        summary = trainer.results_summary()
    except Exception as error:  # tapekit's one line, or an exception that carries one
        if stop_of(error) is None:
            raise
        exit_with_error(program, error)
    logging.info("trained %s to step %d", trainer_class.__name__, trainer.current_step)
    if summary:
        print(summary, flush=True)


def _evaluate(program: str, trainer_class: Type[Trainer], own_flags: List[str]) -> None:
    """--mode=evaluate (once) or continuous_evaluate (the evaluator beside training)."""
    try:
        trainer = trainer_class(**trainer_kwargs(own_flags))
        if FLAGS.mode == "evaluate":
            count = trainer.evaluate_checkpoints(FLAGS.eval_steps, latest_only=True)
        else:
            count = trainer.evaluate_checkpoints(FLAGS.eval_steps, until_step=FLAGS.train_steps,
                                                 timeout_secs=FLAGS.eval_timeout_secs)
    except TapekitError as error:
        exit_with_error(program, error)
    logging.info("evaluated %d checkpoint(s) of %s", count, trainer.model_dir)


def export_main(builtins: Dict[str, str], argv: Optional[Sequence[str]] = None,
                program: str = "tapekit-export") -> None:
    """`tapekit-export`: builds the trainer from the same flags as training, restores its
    latest checkpoint (or --restore_from) without training, and writes --export_dir."""
    argv = list(sys.argv if argv is None else argv)
    trainer_class, own_flags = parse_trainer_class(argv, builtins, program)
    app.run(lambda args: _export(program, trainer_class, own_flags, args), argv=argv)


def _export(program: str, trainer_class: Type[Trainer], own_flags: List[str], argv) -> None:
    quiet_tensorflow()
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
    """Prints `program: error: <one line>` to stderr and exits with the error's exit code
    (2; 74 for a failed write, `tapekit.errors`); with absl's --pdb_post_mortem, first
    opens the debugger where the user's code raised."""
    # A restore that failed half-way logs every unused checkpoint value when it is garbage
    # collected at exit: keep the error the last line.
    tf.get_logger().setLevel("ERROR")
    stopped = stop_of(error) or error  # an exception passed through carries tapekit's line
    print(f"{program}: error: {user_message(stopped)}", file=sys.stderr, flush=True)
    if "pdb_post_mortem" in FLAGS and FLAGS.is_parsed() and FLAGS.pdb_post_mortem:
        post_mortem(error)
    code = getattr(stopped, "exit_code", EXIT_ERROR)
    if code == EXIT_WRITE_FAILED:  # a failing summary writer would speak after this line
        sys.stdout.flush()
        os._exit(code)
    sys.exit(code)


def post_mortem(error: BaseException) -> None:
    """The debugger on the exception behind tapekit's one-line `error` (its context), at
    the innermost frame of user code."""
    import pdb

    while isinstance(error, TapekitError) and error.__context__ is not None:
        error = error.__context__

    class AtUserFrame(pdb.Pdb):
        def setup(self, frame, traceback):
            result = super().setup(frame, traceback)
            for index in range(len(self.stack) - 1, -1, -1):
                if is_user_code(self.stack[index][0].f_code.co_filename):
                    self.curindex = index
                    self.curframe = self.stack[index][0]
                    self.curframe_locals = self.curframe.f_locals
                    break
            return result

    print(f"{type(error).__name__}: {error}".splitlines()[0], flush=True)
    debugger = AtUserFrame()
    debugger.reset()
    debugger.interaction(None, error.__traceback__)
