"""What a trainer's checkpoint holds: every variable of everything the trainer owns.

A trainer owns what its public attributes hold — Keras models and layers, optimizers,
`keras.metrics`, Keras `SeedGenerator`s, `tf.Variable`s, `tf.Module`s, `tf.random.Generator`s,
or lists, tuples and dicts of these — plus tapekit's own state (the global step, `rng`, the
update state of `tapekit.compiled.updates`).

`tf.train.Checkpoint` follows TensorFlow's object graph, which misses some Keras 3 state:
a `SeedGenerator`'s state variable (Dropout, `keras.random`, augmentation layers;
keras-team/keras#19796) and the variables of `keras.metrics` are not TensorFlow
trackables. `checkpoint_objects` adds every such variable under `keras_state/ATTRIBUTE/`,
keyed by its position in the owner's `.variables` and its name (never by Keras' global
auto-numbered paths, which differ between two trainers in one process). `check_coverage`
then proves, before the first step, that every owned variable is saved.
"""

from typing import Any, Dict, List, Optional

import keras
import numpy as np
import tensorflow as tf

from tapekit import compat
from tapekit.errors import TapekitError

# What a public attribute may hold for the trainer to own it.
STATE_TYPES = (keras.Layer, keras.optimizers.Optimizer, keras.metrics.Metric,
               keras.random.SeedGenerator, tf.Variable, tf.Module, tf.random.Generator)

# tapekit's own entries of a checkpoint (root names), beside the trainer's attributes.
KERAS_STATE = "keras_state"  # what TensorFlow's object graph misses (docstring)
GLOBAL_STEP_KEY = "global_step"
RNG_KEY = "rng"
ITERATOR_KEY = "train_iterator"  # the input's position (`Checkpointer.track_iterator`)
EPOCHS_DONE_KEY = "tapekit_epochs_done"  # training by epochs (`tapekit.input.epochs`)
EPOCH_START_STEP_KEY = "tapekit_epoch_start_step"
LOSS_WINDOW_VALUES_KEY = "tapekit_loss_window_values"  # spike_threshold's (`tapekit.faults`)
LOSS_WINDOW_COUNT_KEY = "tapekit_loss_window_count"


def owned_state(attributes: Dict[str, Any]) -> Dict[str, Any]:
    """The public attributes (name → value) that hold state: a STATE_TYPES value, or a
    list/tuple/dict with one inside."""
    return {name: value for name, value in attributes.items()
            if not name.startswith("_") and _holds_state(value)}


def run_state(global_step, rng, attributes: Dict[str, Any],
              updaters: Dict[str, Any]) -> Dict[str, Any]:
    """Everything a run's checkpoint holds: the global step, the random generator, every
    model, optimizer, metric, variable and module the trainer holds in a public attribute
    (`attributes`; see `owned_state`), and tapekit's per-optimizer update state (loss
    scales, gradient accumulators: `updaters`, by name)."""
    owned: Dict[str, Any] = {GLOBAL_STEP_KEY: global_step, RNG_KEY: rng}
    for name, value in owned_state(attributes).items():
        owned.setdefault(name, value)
    owned.update(updaters)
    return owned


def owned_leaves(attributes: Dict[str, Any]) -> List[Any]:
    """The objects inside the owned public attributes (containers flattened)."""
    return [leaf for value in owned_state(attributes).values() for leaf in _leaves(value)]


def optimizers(attributes: Dict[str, Any]) -> Dict[str, keras.optimizers.Optimizer]:
    """The optimizers the trainer holds, by attribute name ("name/key" inside a container),
    without duplicates."""
    found, seen = {}, set()
    for name, value in owned_state(attributes).items():
        items = (value.items() if isinstance(value, dict) else enumerate(value)
                 if isinstance(value, (list, tuple)) else [(None, value)])
        for key, item in items:
            if isinstance(item, keras.optimizers.Optimizer) and id(item) not in seen:
                seen.add(id(item))
                found[name if key is None else f"{name}/{key}"] = item
    return found


def attribute_name(attributes: Dict[str, Any], value) -> Optional[str]:
    """The name of the attribute ("name/key" inside a container) that holds `value`, or None."""
    for name, held in attributes.items():
        if held is value:
            return name
        items = (held.items() if isinstance(held, dict) else enumerate(held)
                 if isinstance(held, (list, tuple)) else ())
        for key, item in items:
            if item is value:
                return f"{name}/{key}"
    return None


def parameter_counts(attributes: Dict[str, Any]) -> Dict[str, Dict[str, Dict[str, int]]]:
    """What the trainer's models and optimizers hold, by attribute name ("name/key" inside a
    container): each model's (layer's) trainable and non-trainable parameters, and each
    built optimizer's slot variables (its variables but the iteration count and learning
    rate: moments, EMA copies, ...) and the parameters they hold. Eager."""
    def size(variables) -> int:
        return int(sum(np.prod(v.shape) for v in variables))

    models, found_optimizers = {}, {}
    for name, value in owned_state(attributes).items():
        items = (value.items() if isinstance(value, dict) else enumerate(value)
                 if isinstance(value, (list, tuple)) else [(None, value)])
        for key, item in items:
            label = name if key is None else f"{name}/{key}"
            if isinstance(item, keras.layers.Layer) and not isinstance(item, keras.metrics.Metric):
                models[label] = {"trainable": size(item.trainable_weights),
                                 "non_trainable": size(item.non_trainable_weights)}
    for label, optimizer in optimizers(attributes).items():
        if not optimizer.built:
            continue
        excluded = {id(optimizer.iterations)}
        rate = getattr(optimizer, "learning_rate", None)
        if isinstance(rate, (tf.Variable, keras.Variable)):
            excluded.add(id(rate))
        slots = [v for v in optimizer.variables if id(v) not in excluded
                 and not v.path.endswith("learning_rate")]
        found_optimizers[label] = {"slot_variables": len(slots), "slot_parameters": size(slots)}
    return {"models": models, "optimizers": found_optimizers}


def describe_parameters(counts: Dict[str, Dict[str, Dict[str, int]]], attributes) -> str:
    """The log block of `parameter_counts`: one line per model and optimizer."""
    lines = ["models and optimizers:"]
    for label, count in counts["models"].items():
        lines.append(f"  {label} ({_type_name(attributes, label)}): {count['trainable']:,} "
                     f"trainable + {count['non_trainable']:,} non-trainable parameters")
    for label, count in counts["optimizers"].items():
        lines.append(f"  {label} ({_type_name(attributes, label)}): {count['slot_variables']} "
                     f"slot variables, {count['slot_parameters']:,} parameters")
    total = sum(c["trainable"] + c["non_trainable"] for c in counts["models"].values())
    lines.append(f"  total model parameters: {total:,}")
    return "\n".join(lines)


def _type_name(attributes, label: str) -> str:
    name, _, key = label.partition("/")
    value = attributes.get(name)
    if key and isinstance(value, dict):
        value = value.get(key)
    elif key and isinstance(value, (list, tuple)):
        value = value[int(key)]
    return type(value).__name__


def _holds_state(value) -> bool:
    return any(isinstance(leaf, STATE_TYPES) for leaf in _leaves(value))


def _leaves(value) -> List[Any]:
    if isinstance(value, dict):
        return [leaf for item in value.values() for leaf in _leaves(item)]
    if isinstance(value, (list, tuple)):
        return [leaf for item in value for leaf in _leaves(item)]
    return [value]


def variables_of(state: Dict[str, Any]) -> List[Any]:
    """Every variable of `state` (`owned_state`/`run_state`), without duplicates."""
    found = {}
    for value in state.values():
        for variable in _variables_of(value):
            found.setdefault(id(variable), variable)
    return list(found.values())


def _variables_of(value) -> List[Any]:
    """Every variable `value` owns, Keras-untracked ones included, in a stable order."""
    result = []
    for leaf in _leaves(value):
        if isinstance(leaf, keras.random.SeedGenerator):
            result.append(leaf.state)
        elif isinstance(leaf, tf.random.Generator):
            result.append(leaf.state)
        elif isinstance(leaf, tf.Variable) or isinstance(leaf, keras.Variable):
            result.append(leaf)
        elif hasattr(leaf, "variables"):
            result.extend(leaf.variables)
    return result


def keras_metrics(attributes: Dict[str, Any]) -> List[keras.metrics.Metric]:
    """The `keras.metrics.Metric`s the trainer holds, directly or in its models, without
    duplicates."""
    found, seen = [], set()
    for leaf in owned_leaves(attributes):
        candidates = [leaf] if isinstance(leaf, keras.metrics.Metric) else (
            list(getattr(leaf, "metrics", None) or []) if isinstance(leaf, keras.Layer) else [])
        for metric in candidates:
            if isinstance(metric, keras.metrics.Metric) and id(metric) not in seen:
                seen.add(id(metric))
                found.append(metric)
    return found


def _trackable_container(value):
    """`value` with dict keys as strings (TensorFlow saves only string keys) and tuples as lists."""
    if isinstance(value, dict):
        return {str(key): _trackable_container(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_trackable_container(item) for item in value]
    return value


def _key(variable) -> int:
    """Identity of a variable's storage: a Keras variable wraps a tf.Variable."""
    if isinstance(variable, keras.Variable):
        return id(variable.value)
    return id(variable)


def _saved_keys(objects: Dict[str, Any]) -> set:
    """The variables TensorFlow's object graph reaches from `objects` (what it would save)."""
    root = tf.train.Checkpoint(**objects)  # the view holds it weakly
    return {_key(node) for node in tf.train.TrackableView(root).descendants()
            if isinstance(node, (tf.Variable, keras.Variable))}


def checkpoint_objects(state: Dict[str, Any]) -> Dict[str, Any]:
    """`tf.train.Checkpoint` keyword arguments that save everything in `state` (name →
    owned value, tapekit's own state included): trackables as they are, containers wrapped,
    and Keras variables TensorFlow would miss under `keras_state/NAME/`."""
    objects: Dict[str, Any] = {}
    for name, value in state.items():
        if compat.is_trackable(value):
            objects[name] = value
        elif isinstance(value, (list, tuple, dict)):
            holder = tf.Module(name=name)
            holder.value = _trackable_container(value)  # TensorFlow wraps it (ListWrapper, …)
            objects[name] = holder
    saved = _saved_keys(objects)
    missed = tf.Module(name=KERAS_STATE)
    for name, value in state.items():
        untracked = {f"{index}_{_short_name(variable)}": variable
                     for index, variable in enumerate(_variables_of(value))
                     if isinstance(variable, keras.Variable) and _key(variable) not in saved}
        if untracked:
            setattr(missed, name, untracked)
            objects[KERAS_STATE] = missed
    return objects


def check_coverage(state: Dict[str, Any], objects: Dict[str, Any]) -> None:
    """Raises a TapekitError naming every variable of `state` a checkpoint of `objects`
    would not hold. Eager, once, before the first step."""
    saved = _saved_keys(objects)
    missing = [f"{name}: {_path(variable)}" for name, value in state.items()
               for variable in _variables_of(value) if _key(variable) not in saved]
    if missing:
        raise TapekitError(
            f"{len(missing)} variable(s) would not be saved in checkpoints: "
            f"{', '.join(missing[:10])}{' …' if len(missing) > 10 else ''}. Keep state in Keras "
            "layers/models, optimizers, keras.metrics, tf.Module or tf.Variable attributes of "
            "the trainer (created in build()), not inside other objects.")


def _short_name(variable) -> str:
    name = getattr(variable, "name", "") or "variable"
    return name.split("/")[-1].split(":")[0]


def _path(variable) -> str:
    return getattr(variable, "path", None) or getattr(variable, "name", repr(variable))
