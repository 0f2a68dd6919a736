"""The attributes of a `Trainer` that are tapekit's, which a subclass must not redefine."""

from tapekit import options as options_lib
from tapekit.errors import TapekitError

# What each holds. A subclass assigning one would silently change the run, so it is an error
# (instances: `Trainer.__setattr__`; classes: `check_namespace`). stop_training is writable.
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
    "stopped_by_time": "whether the last fit stopped when max_time was used up",
    "loss_scales": "the dynamic loss scales under mixed_float16",
    "train_loop_trace_count": "how often the training loop was traced",
    "options": "the run's validated options",
}
TAPEKIT_ATTRIBUTES.update({option.name: f"the run's {option.name} option"
                           for option in options_lib.TRAINER_OPTIONS
                           if option.name not in TAPEKIT_ATTRIBUTES})


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
