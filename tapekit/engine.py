"""The machinery behind a `Trainer`: strategy, build, updaters, compiled loops, input, checkpoints.

A `Trainer` (the user's contract) holds one `Engine` and nothing else of tapekit's. The
engine owns the run's state — the strategy, the global step, the random generator, the
optimizers' update state (`tapekit.updates`), the compiled training and evaluation loops
(`tapekit.loop`), the input (`tapekit.inputs`) and the checkpointer — and offers the
outer loop (`tapekit.controller.Controller`) the narrow interface of `tapekit.runner.Runner`.
Everything here runs eagerly, on every worker.
"""

import os
from typing import Any, Dict, List, Optional, Sequence

import keras
import tensorflow as tf
from absl import logging

from tapekit import build as build_lib
from tapekit import callbacks as callbacks_lib
from tapekit import checkpointing
from tapekit import compat
from tapekit import controller as controller_lib
from tapekit import data as data_lib
from tapekit import distribute
from tapekit import inputs
from tapekit import options as options_lib
from tapekit import precision as precision_lib
from tapekit import record as record_lib
from tapekit import state as state_lib
from tapekit import updates
from tapekit.checkpointing import Checkpointer
from tapekit.errors import TapekitError, user_message
from tapekit.loop import CompiledLoop
from tapekit.runner import LoopResult, RunStatus

# A trainer's attributes that are tapekit's (read-only, except stop_training), and what
# they hold: a subclass assigning one would silently change the run, so it is an error.
TAPEKIT_ATTRIBUTES = {
    "strategy": "the run's tf.distribute strategy",
    "seed": "the run's seed, which input pipelines and synthetic data read",
    "global_batch_size": "the run's global batch size",
    "learning_rate": "the run's learning rate",
    "model_dir": "where the run writes",
    "global_step": "the checkpointed global step",
    "rng": "the checkpointed tf.random.Generator for randomness inside train_step",
    "current_step": "the global step as an int",
    "num_replicas": "the number of replicas in sync",
    "history": "the metrics of every loop run",
    "preempted": "whether the last fit stopped on SIGTERM",
    "interrupted": "whether the last fit stopped on Ctrl-C",
    "loss_scales": "the dynamic loss scales under mixed_float16",
    "train_loop_trace_count": "how often the training loop was traced",
    "options": "the run's validated options",
}
TAPEKIT_ATTRIBUTES.update({option.name: f"the run's {option.name} option"
                           for option in options_lib.TRAINER_OPTIONS
                           if option.name not in TAPEKIT_ATTRIBUTES})


class Engine:
    """Runs `trainer`'s steps under the strategy its `options` name. Created by `Trainer`."""

    def __init__(self, trainer, options, arguments=((), {})):
        self.trainer = trainer
        self.options = options
        self.arguments = record_lib.trainer_arguments(
            type(trainer), *arguments, options_lib.names(options_lib.TRAINER_OPTIONS))
        # The strategy first: splitting the CPU must happen before TensorFlow starts its devices.
        self.strategy = distribute.resolve_strategy(
            options.strategy, device=options.device, cpu_replicas=options.cpu_replicas,
            cluster_resolver=options.cluster_resolver, slurm_port_base=options.slurm_port_base)
        precision_lib.check_precision(options.precision, self.strategy)
        if options.global_batch_size is not None:
            self._check_global_batch_size(options.global_batch_size)
        if options.restore_from is not None:
            checkpointing.check_restorable(options.restore_from)
        # Last of the checks, and the first thing written.
        self.model_dir = (checkpointing.prepare_model_dir(options.model_dir)
                          if options.model_dir else None)
        if options.deterministic:
            tf.config.experimental.enable_op_determinism()
        keras.utils.set_random_seed(options.seed)
        with self.strategy.scope():
            self.global_step = tf.Variable(
                0, dtype=tf.int64, trainable=False, name="global_step",
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
            # For randomness inside train_step that must resume exactly (checkpointed).
            self.rng = tf.random.Generator.from_seed(options.seed)
        self.status = RunStatus()
        self.history: List[Dict[str, float]] = []
        self.checkpointer: Optional[Checkpointer] = None
        self.built = False
        self.train_loop: Optional[CompiledLoop] = None
        self._restored = False
        self._eval_loop: Optional[CompiledLoop] = None
        self._train_iterator = None
        self._train_endless = False  # see _make_train_iterator
        self._train_trace: Optional[build_lib.StepTrace] = None
        self._in_memory = inputs.InMemoryCache()
        self._updaters: Dict[tuple, updates.GradientUpdater] = {}
        self._built_learning_rates: List[tuple] = []  # (optimizer, its rate after build())

    # ------------------------------------------------------------------ resolved options

    @property
    def global_batch_size(self) -> int:
        """The option, else the trainer class's `default_global_batch_size` (read lazily)."""
        value = self.options.global_batch_size
        if value is None:
            value = self.trainer.default_global_batch_size
            self._check_global_batch_size(value)
        return int(value)

    @property
    def learning_rate(self) -> float:
        """The option, else the trainer class's `default_learning_rate` (read lazily)."""
        value = self.options.learning_rate
        return float(value if value is not None else self.trainer.default_learning_rate)

    def _check_global_batch_size(self, value) -> None:
        options_lib.check("global_batch_size", value)
        replicas = self.strategy.num_replicas_in_sync
        if value % replicas:
            raise TapekitError(
                f"global_batch_size={value} is not divisible by the {replicas} replicas in "
                f"sync; use a multiple of {replicas}.")

    # ------------------------------------------------------------------ what the controller uses

    @property
    def current_step(self) -> int:
        return int(self.global_step.numpy())

    @property
    def examples_per_step(self) -> int:
        return self.global_batch_size

    @property
    def latest_checkpoint(self) -> Optional[str]:
        return self.checkpointer.latest if self.checkpointer is not None else None

    def run_train_loop(self, num_steps: int) -> LoopResult:
        """Runs one compiled loop of up to `num_steps` steps on the input `prepare_training` set."""
        iterator = None if self.train_loop.in_memory is not None else self._train_iterator
        return _call_loop(self.train_loop, iterator, num_steps)

    def any_worker(self, flag: bool) -> bool:
        """True if `flag` is True on any worker (a collective only when multi-worker).

        Used at loop ends so that a SIGTERM sent to one worker stops all of them at the
        same step, where every worker then takes part in saving the checkpoint.
        """
        if not distribute.is_multi_worker(self.strategy):
            return bool(flag)
        votes = self.strategy.run(lambda: tf.constant(float(flag)))
        return float(self.strategy.reduce(tf.distribute.ReduceOp.SUM, votes, axis=None)) > 0

    # ------------------------------------------------------------------ fit, evaluate, restore

    def fit(self, train_steps: int, steps_per_loop: int, dataset, callbacks: Sequence,
            eval_every_steps: Optional[int], eval_steps: Optional[int]) -> List[Dict[str, float]]:
        """`Trainer.fit` (arguments validated there)."""
        if eval_every_steps and eval_steps is None:  # refuse endless evaluation before training
            self.distribute(None, self.trainer.eval_dataset, evaluation=True, must_end=True)
        self.prepare_training(dataset, {"train_steps": train_steps, "steps_per_loop": steps_per_loop,
                                        "eval_every_steps": eval_every_steps,
                                        "eval_steps": eval_steps})
        options = self.options
        write_dir = self.model_dir if distribute.is_chief(self.strategy) else None
        defaults = controller_lib.default_callbacks(self, options, train_steps, write_dir,
                                                    self.checkpointer, self.keep_best())
        controller = controller_lib.Controller(
            self, defaults + list(callbacks),
            trainer=self.trainer, eval_every_steps=eval_every_steps, eval_steps=eval_steps,
            nan_policy=options.nan_policy, profile_steps=options.profile_steps,
            profile_dir=os.path.join(self.model_dir, "profile") if self.model_dir else None)
        try:
            history = controller.train(int(train_steps), int(steps_per_loop))
        except (tf.errors.UnavailableError, tf.errors.AbortedError,
                tf.errors.CancelledError, tf.errors.InternalError) as error:
            stopped = distribute.stopped_workers(error, self.strategy)
            if stopped is None:
                raise
            latest = self.latest_checkpoint
            raise TapekitError(
                f"{stopped} stopped (no more heartbeats) while this worker was at step "
                f"{self.current_step}; the last checkpoint is {latest or 'none (none was saved)'}. "
                "Restart all workers to resume from it.") from None
        self.history.extend(history)
        return history

    def prepare_training(self, dataset=None, fit_settings: Optional[Dict[str, Any]] = None) -> None:
        """Builds the trainer (once), compiles the loop for this kind of input, and on the
        first call checks the run record (`tapekit.record`) and restores `restore_from` or
        the latest checkpoint, positioning the input."""
        in_memory = self.in_memory_examples(dataset)
        self.ensure_built(dataset, in_memory)
        if not self._restored:
            self._restored = True
            learning_rate_change = self._record_run(fit_settings or {})
            self._train_iterator = self._restore_and_position(dataset, in_memory)
            if learning_rate_change:
                self._override_learning_rates(*learning_rate_change)
        elif in_memory is None and (dataset is not None or self._train_iterator is None):
            self._train_iterator = self._make_train_iterator(dataset, 0)
        endless = in_memory is None and self._train_endless
        loop = self.train_loop
        if loop is None or loop.in_memory is not in_memory or loop.endless != endless:
            trace, options = self._train_trace, self.options
            self.train_loop = CompiledLoop(
                self.strategy, self.trainer.train_step, trace.metric_names,
                step_counter=self.global_step, jit_compile=options.jit_compile, name="train_loop",
                in_memory=in_memory, max_retraces=options.max_retraces,
                finite_means=options.nan_policy == "skip_step", keras_metrics=trace.keras_metrics,
                endless=endless, static_weights=trace.static_weights)

    def evaluate(self, steps: Optional[int] = None, dataset=None) -> Dict[str, float]:
        """`Trainer.evaluate` (arguments validated there)."""
        distributed = self.distribute(dataset, self.trainer.eval_dataset, evaluation=True,
                                      must_end=steps is None)
        loop = self._use_eval_loop(distributed.element_spec)
        return _call_loop(loop, iter(distributed), steps).metrics

    def _use_eval_loop(self, element_spec) -> CompiledLoop:
        self.ensure_built()
        if self._eval_loop is None:
            trace = self.trace(self.trainer.eval_step, element_spec)
            self._eval_loop = CompiledLoop(self.strategy, self.trainer.eval_step,
                                           trace.metric_names, jit_compile=self.options.jit_compile,
                                           name="eval_loop", keras_metrics=trace.keras_metrics,
                                           static_weights=trace.static_weights)
        return self._eval_loop

    def keep_best(self) -> Optional[callbacks_lib.KeepBest]:
        """The keeper of MODEL_DIR/best/ when `best_metric` is set; refuses, before any
        training, a metric the evaluation does not report."""
        options = self.options
        if not options.best_metric or self.model_dir is None:
            return None
        spec = self.distribute(None, self.trainer.eval_dataset, evaluation=True).element_spec
        names = self._use_eval_loop(spec).metric_names
        if options.best_metric not in names:
            raise TapekitError(
                f"best_metric={options.best_metric!r} is not a metric of the evaluation, which "
                f"reports: {', '.join(names) or 'nothing'}. Name one of those (eval_step's keys "
                "or keras.metrics names).")
        is_chief = distribute.is_chief(self.strategy)
        checkpointer = Checkpointer(self.checkpoint_objects(), self.model_dir, is_chief,
                                    max_to_keep=1, task_id=distribute.task_id(self.strategy),
                                    subdirectory="best")
        export = self.trainer.export if self.trainer.export_model() is not None else None
        return callbacks_lib.KeepBest(os.path.join(self.model_dir, "best"), options.best_metric,
                                      options.best_mode, checkpointer, export, is_chief)

    def restore(self, checkpoint: Optional[str] = None) -> int:
        """`Trainer.restore`: builds, restores, returns the step; trains and writes nothing."""
        path = checkpoint or self.options.restore_from or (
            tf.train.latest_checkpoint(os.path.join(self.model_dir, "checkpoints"))
            if self.model_dir else None)
        if path is None:
            raise TapekitError("nothing to restore: give a checkpoint, restore_from, or a model_dir "
                               "that has checkpoints (train first).")
        checkpointing.check_restorable(path)
        self.ensure_built()
        self._restore_read_only(path)
        return self.current_step

    def _restore_read_only(self, path: str) -> None:
        """Restores `path` with a checkpointer that can never write (checked, see Checkpointer)."""
        Checkpointer(self.checkpoint_objects(), None, True).restore(path)
        logging.info("restored checkpoint %s at step %d", path, self.current_step)

    # ------------------------------------------------------------------ input

    def distribute(self, dataset, dataset_fn, **kwargs):
        """A distributed dataset of `dataset`, or of `dataset_fn` (see `tapekit.inputs`)."""
        return inputs.distribute(self.strategy, dataset, dataset_fn, self.global_batch_size,
                                 self.options.seed, **kwargs)

    def in_memory_examples(self, dataset) -> Optional[data_lib.InMemoryExamples]:
        """The device-resident input for `dataset` arrays (or `train_arrays()`), else None."""
        arrays = dataset if data_lib.is_arrays(dataset) else (
            self.trainer.train_arrays() if dataset is None else None)
        return self._in_memory.get(self.strategy, arrays, self.global_batch_size, self.options.seed)

    def _make_train_iterator(self, dataset, skip_steps: int):
        """The training iterator; notes whether its data provably never ends (every input
        pipeline's dataset has infinite cardinality), which lets the loop skip the
        per-step end-of-data check."""
        pipelines = []
        iterator = iter(self.distribute(dataset, self.trainer.train_dataset,
                                        skip_steps=skip_steps, on_dataset=pipelines.append))
        self._train_endless = bool(pipelines) and all(
            d.cardinality() == tf.data.INFINITE_CARDINALITY for d in pipelines)
        return iterator

    def _restore_and_position(self, dataset, in_memory):
        """Restores `restore_from` or the latest checkpoint; returns the training iterator
        positioned where it left off (None for in-memory input: a function of the step)."""
        checkpointer = self.checkpointer
        path = self._restore_path()
        if checkpointer is None:
            if path:  # no model_dir: restore the state, nothing is saved later
                self._restore_read_only(path)
            return None if in_memory else self._make_train_iterator(dataset, self.current_step)
        iterator = None if in_memory is not None else inputs.positioned_iterator(
            lambda skip_steps: self._make_train_iterator(dataset, skip_steps), checkpointer, path)
        if path:
            checkpointer.restore(path)
            if self.options.restore_from:  # restarted from an older checkpoint: newer ones go aside
                checkpointer.set_aside_checkpoints_after(self.current_step)
            logging.info("resumed from checkpoint %s at step %d", path, self.current_step)
        return iterator

    def _restore_path(self) -> Optional[str]:
        checkpointer = self.checkpointer
        return self.options.restore_from or (checkpointer.latest if checkpointer else None)

    def _record_run(self, fit_settings: Dict[str, Any]):
        """Writes MODEL_DIR/run.json (the chief), or, when resuming a recorded run, first
        refuses settings that would silently change it. Returns (old, new) learning rates
        when one was given explicitly and differs from the record's, else None."""
        if self.model_dir is None:
            return None
        settings = {name: getattr(self.options, name)
                    for name in options_lib.names(options_lib.TRAINER_OPTIONS)}
        settings.update(global_batch_size=self.global_batch_size,
                        learning_rate=self.learning_rate, **fit_settings)
        new = record_lib.make_record(type(self.trainer), self.arguments, settings, self.strategy)
        old = record_lib.read(self.model_dir)
        path = self._restore_path()
        change = None
        if old is not None and path is not None:
            step = checkpointing.saved_step(path)
            changes = record_lib.check_resume(
                old, new, self.options.allow_changes or (), self.model_dir, step,
                safe=getattr(self.trainer, "arguments_safe_to_change", ()))
            change = record_lib.explicit_learning_rate_change(old, self.options.learning_rate)
            new = record_lib.resumed(old, new, step, changes)
        if distribute.is_chief(self.strategy):
            record_lib.write(self.model_dir, new)
        return change

    def _override_learning_rates(self, old, new) -> None:
        """A learning rate given explicitly on resume wins over the checkpoint's: each
        optimizer gets back the rate `build()` gave it."""
        for optimizer, rate in self._built_learning_rates:
            optimizer.learning_rate = rate
        logging.info("learning rate %s given for this resumed run replaces the checkpoint's %s",
                     new, old)

    # ------------------------------------------------------------------ building

    def ensure_built(self, dataset=None, in_memory=None) -> None:
        """Creates every model variable and optimizer slot before the first step.

        Runs eagerly, once. `build()` runs in the strategy scope under the precision policy;
        then `train_step` is traced once for real (`tapekit.build.trace_step`), which builds
        the models as a plain `tf.function` would. Every optimizer the step uses is then
        built on its variables in the strategy scope: building one inside a replica context
        fails under MirroredStrategy (keras-team/keras#19246), and unbuilt slots are skipped
        by restores (keras#19389). Last, the checkpoint's contents are checked to cover
        every variable the trainer owns.
        """
        if self.built:
            return
        check_namespace(self.trainer)
        if in_memory is None and dataset is None:
            in_memory = self.in_memory_examples(None)
        element_spec = (in_memory.element_spec if in_memory is not None
                        else self.distribute(dataset, self.trainer.train_dataset).element_spec)
        with self.strategy.scope(), precision_lib.dtype_policy(self.options.precision), \
                tf.variable_creator_scope(build_lib.same_on_every_replica):
            self.trainer.build()
        self._train_trace = self.trace(self.trainer.train_step, element_spec)
        with self.strategy.scope():
            for optimizer, variables in self._train_trace.updates:
                self._add_updater(optimizer, variables)
        self._built_learning_rates = [
            (optimizer, float(tf.convert_to_tensor(optimizer.learning_rate)))
            for optimizer in state_lib.optimizers(vars(self.trainer)).values()
            if compat.learning_rate_schedule(optimizer) is None]
        objects = self.checkpoint_objects()
        state_lib.check_coverage(self.owned_state(), objects)
        if self.model_dir:
            self.checkpointer = Checkpointer(
                objects, self.model_dir, distribute.is_chief(self.strategy),
                max_to_keep=self.options.max_checkpoints_to_keep,
                task_id=distribute.task_id(self.strategy))
        self.built = True

    def trace(self, step_fn, element_spec) -> build_lib.StepTrace:
        attributes = vars(self.trainer)
        return build_lib.trace_step(self.strategy, step_fn, element_spec,
                                    list(state_lib.optimizers(attributes).values()),
                                    state_lib.keras_metrics(attributes))

    def _add_updater(self, optimizer, variables) -> None:
        key = updates.updater_key(optimizer, variables)
        if key in self._updaters:
            return
        if not optimizer.built:
            optimizer.build(variables)
        options = self.options
        loss_scale = (precision_lib.DynamicLossScale() if options.precision == "mixed_float16"
                      else None)
        self._updaters[key] = updates.GradientUpdater(
            optimizer, variables, loss_scale=loss_scale, clip_global_norm=options.clip_global_norm,
            accumulation_steps=options.gradient_accumulation_steps,
            skip_nonfinite=options.nan_policy == "skip_step", name=f"updater_{len(self._updaters)}")

    def apply_gradients(self, tape, loss, models_or_variables, optimizer,
                        allow_none_gradients: bool) -> None:
        """`Trainer.apply_gradients` (traced, per replica)."""
        variables = updates.trainable_variables(models_or_variables)
        if not variables:
            raise TapekitError(
                f"apply_gradients got no trainable variables from {models_or_variables!r}; "
                "pass the model (or its variables) that the loss should update.")
        updates.check_optimizer(optimizer, self.options.clip_global_norm)
        if build_lib.record_update(optimizer, variables):  # building: remember what updates what
            return
        updater = self._updaters.get(updates.updater_key(optimizer, variables))
        if updater is None:
            raise TapekitError(
                "apply_gradients was called with an optimizer/variables pair that train_step did "
                "not use when tapekit built the trainer; call apply_gradients the same way every step.")
        updates.apply_from_tape(updater, tape, loss, variables, allow_none_gradients)

    @property
    def loss_scales(self) -> List[precision_lib.DynamicLossScale]:
        return [u.loss_scale for u in self._updaters.values() if u.loss_scale is not None]

    # ------------------------------------------------------------------ checkpointed state

    def owned_state(self) -> Dict[str, Any]:
        """Everything a checkpoint holds (`tapekit.state`): the global step, the random
        generator, every model, optimizer, metric, variable and module the trainer holds in
        a public attribute, and tapekit's per-optimizer update state (loss scales, gradient
        accumulators)."""
        owned: Dict[str, Any] = {"global_step": self.global_step, "rng": self.rng}
        for name, value in state_lib.owned_state(vars(self.trainer)).items():
            owned.setdefault(name, value)
        for index, updater in enumerate(self._updaters.values()):
            if not updater.is_plain:
                owned[f"updater_{index}"] = updater
        return owned

    def checkpoint_objects(self) -> Dict[str, Any]:
        return state_lib.checkpoint_objects(self.owned_state())


def check_namespace(trainer) -> None:
    """Raises if `trainer`'s class redefines one of tapekit's attributes (instances cannot:
    `Trainer.__setattr__` refuses them)."""
    for klass in type(trainer).__mro__:
        if klass.__module__ == "tapekit.trainer":  # Trainer itself defines them
            break
        clashes = sorted(set(vars(klass)) & set(TAPEKIT_ATTRIBUTES))
        if clashes:
            name = clashes[0]
            raise TapekitError(
                f"{klass.__name__} defines {name!r}, which is tapekit's "
                f"({TAPEKIT_ATTRIBUTES[name]}); rename yours (e.g. {name}_).")


def _call_loop(loop: CompiledLoop, iterator, num_steps) -> LoopResult:
    try:
        return loop(iterator, num_steps)
    except TapekitError as error:
        raise TapekitError(user_message(error)) from None
