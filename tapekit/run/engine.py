"""The machinery behind a `Trainer`: strategy, build, compiled loops, input, checkpoints.

A `Trainer` (the user's contract) holds one `Engine` and nothing else of tapekit's. The
engine owns the run's state (the strategy, the global step, the random generator, the
optimizers' updaters, the compiled loops, the input and the checkpointer) and offers the
outer loop (`tapekit.run.controller.Controller`) the `tapekit.run.runner.Runner` protocol.
Building is `tapekit.run.building`; resuming, `tapekit.checkpoint.resume`. Eager, on every
worker.

Process-wide settings (BUILD.md, "Architecture"): the constructor calls
`keras.utils.set_random_seed(seed)`, so that `build()` and the trainer's own set-up draw the
same numbers on every run of the seed (TensorFlow cannot restore an earlier global seed);
`deterministic=True` turns op determinism on only while `fit`, `evaluate` or `restore` runs.
"""

import contextlib
from typing import Any, Dict, List, Optional, Sequence, Tuple

import keras
import tensorflow as tf

from tapekit import compat
from tapekit import options as options_lib
from tapekit.checkpoint import best, checkpointing, resume
from tapekit.checkpoint import record as record_lib
from tapekit.checkpoint import state as state_lib
from tapekit.checkpoint.checkpointing import Checkpointer
from tapekit.compiled import build as build_lib
from tapekit.compiled import precision as precision_lib
from tapekit.compiled import updates
from tapekit.compiled.loop import CompiledLoop, LoopPlan, call_loop
from tapekit.compiled.step_summaries import RunSummaries
from tapekit.faults import between_loops, lock
from tapekit.faults import good_state as good_state_lib
from tapekit.faults.stop import StopFlag
from tapekit.input import epochs as epochs_lib
from tapekit.input import run_input
from tapekit.run import accounting, building, distribute, time_budget
from tapekit.run import controller as controller_lib
from tapekit.run.ema import EmaWeights
from tapekit.run.runner import LoopResult, RunStatus


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
            options_lib.check_global_batch_size(options.global_batch_size, self.strategy)
        if options.restore_from is not None:
            checkpointing.check_restorable(options.restore_from)
        # Last of the checks, and the first thing written.
        self.model_dir = (checkpointing.prepare_model_dir(options.model_dir)
                          if options.model_dir else None)
        keras.utils.set_random_seed(options.seed)  # process-wide: see the module docstring
        with self.strategy.scope():
            self.global_step = tf.Variable(
                0, dtype=tf.int64, trainable=False, name="global_step",
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
            # For randomness inside train_step that must resume exactly (checkpointed).
            self.rng = tf.random.Generator.from_seed(options.seed)
        self.epochs = epochs_lib.EpochPasses(self.strategy)  # training by train_epochs
        self.stop = StopFlag(self.strategy)  # a signal's, read by the loop each step
        self.summaries = RunSummaries.of(self)  # tf.summary in steps; writers TensorBoard shares
        self._by_epochs = False
        self.status = RunStatus()
        self.history: List[Dict[str, float]] = []
        self.updaters = updates.Updaters(
            options, lambda value: state_lib.attribute_name(vars(trainer), value))
        self.checkpointer: Optional[Checkpointer] = None
        self.built = False
        self.built_learning_rates: List[tuple] = []  # (optimizer, its rate after build())
        self.parameters: Dict[str, Any] = {}  # state.parameter_counts, once built
        self.loss_window: Optional[good_state_lib.LossWindow] = None  # with spike_threshold
        self.train_loop: Optional[CompiledLoop] = None
        self.train_report: Optional[build_lib.BuildReport] = None
        self._eval_loop: Optional[CompiledLoop] = None
        self._eval_data = None  # during fit: the evaluation's input, made once per fit
        self._restored = False
        self._train_iterator = None
        self._dataset = None  # what prepare_training trains on (None: the trainer's input)
        self.rollbacks = good_state_lib.RunRollbacks()  # skipped steps, nan_policy=rollback
        self.ema = EmaWeights()  # the optimizers' averages (use_ema), once built
        self.input = run_input.RunInput(self.strategy, trainer, lambda: self.global_batch_size,
                                     options.seed)

    def _running(self):
        return compat.op_determinism(self.options.deterministic)

    @property
    def global_batch_size(self) -> int:
        return options_lib.global_batch_size(self.options, self.trainer, self.strategy)

    @property
    def learning_rate(self) -> float:
        return options_lib.learning_rate(self.options, self.trainer)

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

    @property
    def epochs_done(self) -> int:
        return self.epochs.epochs_done

    def run_train_loop(self, num_steps: int) -> LoopResult:
        """Runs one compiled loop of up to `num_steps` steps on the input `prepare_training` set."""
        if self._by_epochs:
            return self.epochs.run_loop(call_loop, self.train_loop, self.input, num_steps,
                                        self.current_step, self.stop.requested)
        iterator = None if self.train_loop.in_memory is not None else self._train_iterator
        return call_loop(self.train_loop, iterator, num_steps)

    def reposition_input(self, step: int) -> None:
        if self._by_epochs:
            self.epochs.begin(self.input, self._dataset, self.train_loop.in_memory, step)
        elif self.train_loop.in_memory is None:
            self._train_iterator = self.input.train_iterator(self._dataset, step)

    def skip_steps(self, steps: int, read: bool = True) -> int:
        if read:  # by epochs: never past the pass's end; in memory, batches follow the step
            if self._by_epochs:
                steps = self.epochs.read(self.input, self.train_loop.in_memory, steps,
                                         self.current_step)
            elif self.train_loop.in_memory is None:
                steps = run_input.read_and_drop(self._train_iterator, steps)
        self.global_step.assign_add(steps)
        return steps

    def keep_good_state(self, step: int) -> None:
        self.rollbacks.good_state.keep(step)

    def restore_good_state(self) -> Tuple[int, str]:
        return self.rollbacks.good_state.restore()

    def record_skipped(self, ranges: Sequence[Tuple[int, int]]) -> bool:
        if self.model_dir and distribute.is_chief(self.strategy):
            record_lib.record_skipped(self.model_dir, ranges)
        return bool(self.model_dir)

    def stopped_by(self, error: BaseException, step: int) -> Exception:
        return between_loops.stopped_by(self, error, step)

    def request_stop(self, requested: bool = True) -> None:
        self.stop.request(requested)

    def any_worker(self, flag: bool) -> bool:
        return distribute.any_worker(self.strategy, flag)

    def device_memory(self) -> Dict[str, int]:
        return accounting.device_memory()

    def record_stop(self, entry: Dict[str, Any]) -> None:
        time_budget.record_stop(self.model_dir if distribute.is_chief(self.strategy) else None, entry)

    def fit(self, train_steps: Optional[int], steps_per_loop: int, dataset, callbacks: Sequence,
            eval_every_steps: Optional[int], eval_steps: Optional[int],
            by_epochs: Optional[Dict[str, Optional[int]]] = None,
            max_time=None) -> List[Dict[str, float]]:
        """`Trainer.fit` (arguments validated there; `max_time`: its `TimeBudget`); `by_epochs`:
        its train_epochs, eval_every_epochs and checkpoint_every_epochs (`tapekit.input.epochs`)."""
        by_epochs = by_epochs or {}
        self._by_epochs = by_epochs.get("train_epochs") is not None
        if self._by_epochs and self.checkpointer is not None:  # built by restore/evaluate
            self.checkpointer.track(self.epochs.state())
        with lock.held_for_training(self), self._running(), self._evaluation_input(
                eval_every_steps or by_epochs.get("eval_every_epochs"), eval_steps):
            self.prepare_training(dataset, {
                "train_steps": train_steps, "steps_per_loop": steps_per_loop,
                "eval_every_steps": eval_every_steps, "eval_steps": eval_steps, **by_epochs})
            options = self.options
            rollback = self.rollbacks.for_fit(self, self._by_epochs)
            keep_best = best.keep_best_of(self, self._eval_data) if self._eval_data else None
            defaults = controller_lib.default_callbacks(
                self, options, train_steps, self.model_dir if distribute.is_chief(self.strategy)
                else None, self.checkpointer, keep_best, summary_writers=self.summaries.writers,
                checkpoint_every_epochs=by_epochs.get("checkpoint_every_epochs"))
            controller = controller_lib.Controller(
                self, defaults + list(callbacks),
                trainer=self.trainer, eval_every_steps=eval_every_steps, eval_steps=eval_steps,
                nan_policy=options.nan_policy, profile_steps=options.profile_steps, rollback=rollback,
                profile_dir=controller_lib.worker_profile_dir(self.model_dir, self.strategy))
            self.request_stop(False)
            with distribute.peers_stopping_explained(self):
                history = controller.train(train_steps, int(steps_per_loop),
                                           by_epochs.get("train_epochs"),
                                           by_epochs.get("eval_every_epochs"), max_time)
            self.ema.swap_in()  # as Keras fit ends: the models hold the averages
        self.history.extend(history)
        return history

    @contextlib.contextmanager
    def _evaluation_input(self, eval_every_steps, eval_steps):
        """The evaluation's input for one fit, made once (before training, so that an
        endless one is refused first) when the fit evaluates or keeps the best checkpoint."""
        keeps_best = bool(self.options.best_metric and self.model_dir)
        if eval_every_steps or keeps_best:
            self._eval_data = self.input.evaluation(
                must_end=bool(eval_every_steps) and eval_steps is None)
        try:
            yield
        finally:
            self._eval_data = None

    def prepare_training(self, dataset=None, fit_settings: Optional[Dict[str, Any]] = None) -> None:
        """Builds the trainer (once), compiles the loop for this kind of input, and on the
        first call starts where the run left off (`tapekit.checkpoint.resume.start`)."""
        in_memory = self.input.in_memory_examples(dataset)
        self.ensure_built(dataset, in_memory)
        self.ema.swap_out()  # training goes on from the raw weights
        self._dataset = dataset
        if not self._restored:
            self._restored = True
            self._train_iterator = resume.start(self, dataset, in_memory, fit_settings or {},
                                                positioned=not self._by_epochs)
        elif in_memory is None and not self._by_epochs and (
                dataset is not None or self._train_iterator is None):
            self._train_iterator = self.input.train_iterator(dataset, 0)
        if self._by_epochs:
            self.epochs.begin(self.input, dataset, in_memory, self.current_step)
        endless = in_memory is None and self.input.train_endless
        loop = self.train_loop
        if loop is None or loop.in_memory is not in_memory or loop.endless != endless:
            plan = LoopPlan.for_training(self.train_report, self.options, self.summaries, self.updaters)
            self.train_loop = CompiledLoop(self.strategy, self.trainer.train_step, plan,
                                           self.global_step, in_memory, endless, self.stop.variable)

    def evaluate(self, steps: Optional[int] = None, dataset=None) -> Dict[str, float]:
        """`Trainer.evaluate` (arguments validated there); inside `fit`, on its input."""
        with self._running():
            # A whole pass reuses the fit's input; a part of one (`steps`) reads a new one, so
            # that every evaluation sees the same batches (a pipeline may reshuffle per pass).
            reuse = dataset is None and self._eval_data is not None and steps is None
            distributed = (self._eval_data if reuse
                           else self.input.evaluation(dataset, must_end=steps is None))
            loop = self.eval_loop(distributed.element_spec, distributed)
            return self.ema.evaluated(lambda: call_loop(
                loop, None if loop.in_memory is not None else iter(distributed), steps).metrics)

    def eval_loop(self, element_spec, data) -> CompiledLoop:
        """The compiled evaluation loop, planned from a build trace of `eval_step` (once)."""
        self.ensure_built()
        if self._eval_loop is None:
            report = build_lib.trace_for(self, self.trainer.eval_step, element_spec, None,
                                         lambda: next(iter(data)))
            plan = LoopPlan.for_evaluation(report, self.options, self.summaries)
            self._eval_loop = CompiledLoop(self.strategy, self.trainer.eval_step, plan,
                                           in_memory=data if data is run_input.NO_DATA else None)
        return self._eval_loop

    def restore(self, checkpoint: Optional[str] = None) -> int:
        """`Trainer.restore`: builds, restores, returns the step; trains and writes nothing."""
        with self._running():
            return resume.restore(self, checkpoint)

    def ensure_built(self, dataset=None, in_memory=None) -> None:
        """Creates every variable and optimizer slot before the first step (once:
        `tapekit.run.building`)."""
        if not self.built:
            building.build(self, dataset, in_memory)
            self.built = True

    def apply_gradients(self, tape, loss, models_or_variables, optimizer,
                        allow_none_gradients: bool) -> None:
        """`Trainer.apply_gradients` (traced, per replica)."""
        self.updaters.apply(tape, loss, models_or_variables, optimizer, allow_none_gradients)

    @property
    def loss_scales(self) -> List[precision_lib.DynamicLossScale]:
        return self.updaters.loss_scales

    def owned_state(self) -> Dict[str, Any]:
        """Everything a checkpoint holds (`tapekit.checkpoint.state.run_state`)."""
        return state_lib.run_state(self.global_step, self.rng, vars(self.trainer),
                                   {**self.updaters.checkpointed(),
                                    **(self.epochs.state() if self._by_epochs else {}),
                                    **(self.loss_window.state() if self.loss_window else {})})

    def checkpoint_objects(self) -> Dict[str, Any]:
        return state_lib.checkpoint_objects(self.owned_state())
