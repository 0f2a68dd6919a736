"""Building a run before its first step: everything the engine holds that needs the models."""

import keras
import tensorflow as tf
from absl import logging

from tapekit.checkpoint import resume
from tapekit.checkpoint import state as state_lib
from tapekit.checkpoint.checkpointing import Checkpointer
from tapekit.compiled import build as build_lib
from tapekit.compiled import precision as precision_lib
from tapekit.faults import good_state as good_state_lib
from tapekit.namespace import check_namespace
from tapekit.run import distribute
from tapekit.run.ema import EmaWeights


def build(engine, dataset=None, in_memory=None) -> None:
    """Creates every model variable and optimizer slot of `engine`'s trainer before the first
    step: `build()` in the strategy scope under the precision policy, one real trace of
    `train_step` (`tapekit.compiled.build`), the optimizers built on what the step updates
    (`tapekit.compiled.updates.Updaters`), the checkpoint checked to cover every variable,
    and the checkpointer. Eager, once per engine."""
    check_namespace(engine.trainer)
    if in_memory is None and dataset is None:
        in_memory = engine.input.in_memory_examples(None)
    element_spec = engine.input.train_spec(dataset, in_memory)
    # Again (the constructor did it once): initial weights depend on the seed alone, not on
    # what other trainers drew from Keras's global generator since this one was made.
    keras.utils.set_random_seed(engine.options.seed)
    with engine.strategy.scope(), precision_lib.dtype_policy(engine.options.precision), \
            tf.variable_creator_scope(build_lib.same_on_every_replica):
        engine.trainer.build()
    engine.train_report = build_lib.trace_for(
        engine, engine.trainer.train_step, element_spec, engine.global_step,
        lambda: engine.input.first_train_batch(dataset, in_memory))
    with engine.strategy.scope():
        for optimizer, variables in engine.train_report.updates:
            engine.updaters.add(optimizer, variables)
    engine.ema = EmaWeights(engine.updaters.built)
    engine.loss_window = good_state_lib.loss_window(engine.strategy, engine.options,
                                                engine.train_report.metric_names)
    engine.built_learning_rates = resume.built_learning_rates(engine.trainer)
    engine.parameters = state_lib.parameter_counts(vars(engine.trainer))  # also in run.json
    logging.info("%s", state_lib.describe_parameters(engine.parameters, vars(engine.trainer)))
    objects = engine.checkpoint_objects()
    state_lib.check_coverage(engine.owned_state(), objects)
    if engine.model_dir:
        engine.checkpointer = Checkpointer(
            objects, engine.model_dir, distribute.is_chief(engine.strategy),
            max_to_keep=engine.options.max_checkpoints_to_keep,
            async_save=engine.options.async_checkpoint,
            task_id=distribute.task_id(engine.strategy))

