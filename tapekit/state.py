"""What a trainer's checkpoint holds: every variable of everything the trainer owns.

A trainer owns what its public attributes hold — Keras models and layers, optimizers,
`keras.metrics`, Keras `SeedGenerator`s, `tf.Variable`s, `tf.Module`s, `tf.random.Generator`s,
or lists, tuples and dicts of these — plus tapekit's own state (the global step, `rng`, the
update state of `tapekit.updates`).

`tf.train.Checkpoint` follows TensorFlow's object graph, which misses some Keras 3 state:
a `SeedGenerator`'s state variable (Dropout, `keras.random`, augmentation layers;
keras-team/keras#19796) and the variables of `keras.metrics` are not TensorFlow
trackables. `checkpoint_objects` adds every such variable under `keras_state/ATTRIBUTE/`,
keyed by its position in the owner's `.variables` and its name (never by Keras' global
auto-numbered paths, which differ between two trainers in one process). `check_coverage`
then proves, before the first step, that every owned variable is saved.
"""

from typing import Any, Dict, List

import keras
import tensorflow as tf

from tapekit import compat
from tapekit.errors import TapekitError

# What a public attribute may hold for the trainer to own it.
STATE_TYPES = (keras.Layer, keras.optimizers.Optimizer, keras.metrics.Metric,
               keras.random.SeedGenerator, tf.Variable, tf.Module, tf.random.Generator)
KERAS_STATE = "keras_state"


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
    owned: Dict[str, Any] = {"global_step": global_step, "rng": rng}
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


def _holds_state(value) -> bool:
    return any(isinstance(leaf, STATE_TYPES) for leaf in _leaves(value))


def _leaves(value) -> List[Any]:
    if isinstance(value, dict):
        return [leaf for item in value.values() for leaf in _leaves(item)]
    if isinstance(value, (list, tuple)):
        return [leaf for item in value for leaf in _leaves(item)]
    return [value]


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
