"""Conformance suite: eight model families written as users write them, each checked alike.

The families and what each must reach live in `tests/families.py` (`FAMILIES`); this file
is the one harness that checks every family:

  (a) it learns: its held-out quality after a short training run;
  (b) 1 and 2 replicas (same global batch, same seed, randomness off) report the same
      per-loop metrics, to rel 1e-5;
  (c) stopped at step N and resumed by a new trainer equals an uninterrupted run to 2N, bit
      for bit, on every variable the trainer holds (randomness on, deterministic ops), on 1
      and on 2 replicas;
  (d) a checkpoint holds every variable: a fresh trainer with another seed restores all of
      them (models' trainable and non-trainable variables, seed generator states, BatchNorm
      statistics, keras.metrics, optimizer slots, tapekit's step and generator);
  (e) `Trainer.export` writes a SavedModel whose serving signature gives outputs of the
      served shape (families with a natural served model);

and keras.metrics held as trainer attributes are reported, per loop and per evaluation.

One training run per family (trained on first use) is shared by (a), (e) and the
keras.metrics check; (b), (c) and (d) train short runs of their own.
"""

import dataclasses
from typing import Dict, List, Tuple

import keras
import numpy as np
import pytest
import tensorflow as tf

from families import FAMILIES, Family

NAMES = list(FAMILIES)
REPLICAS = {1: {"strategy": "default"}, 2: {"strategy": "mirrored", "cpu_replicas": 2}}
OTHER_SEED = 1  # trainers are otherwise built with the default seed, 0
NOT_METRICS = ("step", "steps_per_sec", "examples_per_sec")
# (b): four loops of five steps.
COMPARE_STEPS, COMPARE_STEPS_PER_LOOP = 20, 5
# (c): stop at N = 15, mid-epoch (25 steps per epoch in memory) and between the two micro-steps
# of an accumulated update; the resumed run crosses the epoch boundary.
RESUME_STEP, RESUME_STEPS_PER_LOOP = 15, 5
SERVED_BATCH = 3

# ------------------------------------------------------------------ helpers


def make(family: Family, **overrides):
    """A new trainer of `family`: its registry options, then the test's own."""
    return family.trainer(**{"progress": "none", **family.trainer_kwargs, **overrides})


def _variables_of(value) -> list:
    if isinstance(value, (keras.Layer, keras.metrics.Metric, keras.optimizers.Optimizer)):
        return list(value.variables)  # layers: trainable, non-trainable, seed generator states
    if isinstance(value, (keras.random.SeedGenerator, tf.random.Generator)):
        return [value.state]
    if isinstance(value, (tf.Variable, keras.Variable)):
        return [value]
    return []


def trainer_state(trainer) -> Dict[str, Tuple[str, np.ndarray]]:
    """Every variable the trainer holds, read eagerly: "attribute[i]" -> (path, value).

    Models and layers (all their variables), keras.metrics, optimizers, seed generators and
    variables held as public attributes, and tapekit's global step and generator (read
    through the trainer's properties: tapekit keeps them in its engine, not in `vars`). The
    keys do not depend on Keras' layer name numbering, so two trainers compare by key.
    """
    state = {"tapekit global_step": ("global_step", np.array(trainer.global_step.numpy())),
             "tapekit rng": ("rng", np.array(trainer.rng.state.numpy()))}
    seen = {id(trainer.global_step), id(trainer.rng.state)}
    for name, value in vars(trainer).items():
        if name.startswith("_"):
            continue
        for index, variable in enumerate(_variables_of(value)):
            if id(variable) in seen:
                continue
            seen.add(id(variable))
            path = getattr(variable, "path", None) or variable.name
            state[f"{name}[{index}]"] = (path, np.array(variable.numpy()))
    return state


def assert_same_state(actual, expected, what: str) -> None:
    """Bitwise equality of two `trainer_state`s; one failure listing every difference."""
    assert sorted(actual) == sorted(expected), f"{what}: the trainers hold different variables"
    problems = []
    for key, (path, want) in expected.items():
        got = actual[key][1]
        try:
            np.testing.assert_array_equal(got, want)
        except AssertionError:
            difference = (np.max(np.abs(got.astype(np.float64) - want.astype(np.float64)))
                          if got.shape == want.shape else "shape")
            problems.append(f"{key} {path} (max abs difference {difference})")
    assert not problems, (f"{what}: {len(problems)} of {len(expected)} variables differ: "
                          + "; ".join(problems))


def metrics_of(loop: Dict[str, float]) -> Dict[str, float]:
    return {name: value for name, value in loop.items() if name not in NOT_METRICS}


def example_input(spec: tf.TensorSpec, rng: np.random.Generator) -> tf.Tensor:
    """SERVED_BATCH examples for a serving signature's input (other unknown sizes: 5)."""
    shape = [SERVED_BATCH] + [5 if size is None else size for size in spec.shape[1:]]
    if spec.dtype.is_integer:  # ids 1 and 2 exist in every family's vocabulary
        return tf.constant(rng.integers(1, 3, shape), spec.dtype)
    return tf.constant(rng.standard_normal(shape), spec.dtype)


@dataclasses.dataclass
class TrainedRun:
    trainer: object
    history: List[Dict[str, float]]
    eval_results: Dict[str, float]


@pytest.fixture(scope="session")
def trained_run():
    """`trained_run(name)`: the family trained once (randomness on, default seed, 1 replica,
    no model_dir: nothing but training can fail), then evaluated on its held-out data.
    A failure is kept and raised again for each test that uses the run."""
    runs = {}

    def get(name: str) -> TrainedRun:
        if name not in runs:
            family = FAMILIES[name]
            try:
                trainer = make(family)
                history = trainer.fit(family.train_steps, family.steps_per_loop)
                runs[name] = TrainedRun(trainer, history, trainer.evaluate())
            except Exception as error:  # noqa: BLE001 - every test of this family reports it
                runs[name] = error
        if isinstance(runs[name], Exception):
            raise runs[name]
        return runs[name]

    return get


# ------------------------------------------------------------------ (a) it learns


@pytest.mark.parametrize("name", NAMES)
def test_learns(name, trained_run):
    quality = FAMILIES[name].quality
    run = trained_run(name)
    for loop in run.history:
        assert all(np.isfinite(value) for value in metrics_of(loop).values()), loop
    value = run.eval_results[quality.metric]
    if quality.at_least is not None:
        assert value >= quality.at_least, f"{name}: {quality} not reached: {value:.4f}"
    if quality.at_most is not None:
        assert value <= quality.at_most, f"{name}: {quality} not reached: {value:.4f}"


# ------------------------------------------------------------------ (b) 1 and 2 replicas


@pytest.mark.parametrize("name", NAMES)
def test_one_and_two_replicas_report_the_same_losses(name):
    family = FAMILIES[name]
    histories = {}
    for replicas, strategy in REPLICAS.items():
        trainer = make(family, **family.randomness_off, **strategy)
        assert trainer.num_replicas == replicas
        histories[replicas] = trainer.fit(COMPARE_STEPS, COMPARE_STEPS_PER_LOOP)
    one, two = histories[1], histories[2]
    assert [loop["step"] for loop in two] == [loop["step"] for loop in one]
    differences = []
    for loop_one, loop_two in zip(one, two):
        metrics_one, metrics_two = metrics_of(loop_one), metrics_of(loop_two)
        assert sorted(metrics_two) == sorted(metrics_one)
        differences += [
            f"step {loop_one['step']} {metric}: {metrics_one[metric]!r} on 1 replica, "
            f"{metrics_two[metric]!r} on 2"
            for metric in metrics_one
            if metrics_two[metric] != pytest.approx(metrics_one[metric], rel=1e-5, abs=1e-6)]
    assert not differences, f"{name}: " + "; ".join(differences)


# ------------------------------------------------------------------ (c) exact resume


@pytest.mark.parametrize("replicas", [1, 2], ids=["1_replica", "2_replicas"])
@pytest.mark.parametrize("name", NAMES)
def test_stopped_and_resumed_equals_uninterrupted_bitwise(name, replicas, tmp_path):
    family = FAMILIES[name]
    options = dict(REPLICAS[replicas], deterministic=True)
    model_dir = str(tmp_path / "run")
    make(family, model_dir=model_dir, **options).fit(RESUME_STEP, RESUME_STEPS_PER_LOOP)
    resumed = make(family, model_dir=model_dir, **options)
    resumed.fit(2 * RESUME_STEP, RESUME_STEPS_PER_LOOP)
    # It resumed at N (its first loop ends one loop after N), it did not start over.
    assert resumed.history[0]["step"] == RESUME_STEP + RESUME_STEPS_PER_LOOP
    uninterrupted = make(family, **options)
    uninterrupted.fit(2 * RESUME_STEP, RESUME_STEPS_PER_LOOP)
    assert_same_state(trainer_state(resumed), trainer_state(uninterrupted),
                      f"{name} on {replicas} replica(s), resumed at step {RESUME_STEP}")


# ------------------------------------------------------------------ (d) complete checkpoints


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_restores_every_variable(name, tmp_path):
    family = FAMILIES[name]
    model_dir = tmp_path / "run"
    saved = make(family, model_dir=str(model_dir))
    saved.fit(RESUME_STEP, RESUME_STEPS_PER_LOOP)  # saves at its end
    checkpoint = tf.train.latest_checkpoint(str(model_dir / "checkpoints"))
    assert checkpoint, f"{name}: fit wrote no checkpoint"
    restored = make(family, seed=OTHER_SEED)
    assert restored.restore(checkpoint) == RESUME_STEP
    assert_same_state(trainer_state(restored), trainer_state(saved),
                      f"{name}: restored into a trainer with another seed")


# ------------------------------------------------------------------ (e) export


@pytest.mark.parametrize("name", [name for name in NAMES if FAMILIES[name].serves])
def test_export_serves_outputs_of_the_served_shape(name, trained_run, tmp_path):
    family = FAMILIES[name]
    trainer = trained_run(name).trainer
    model, signature = trainer.export_model()
    export_dir = trainer.export(str(tmp_path / "export"))
    serving = tf.saved_model.load(export_dir).signatures["serving_default"]
    rng = np.random.default_rng(0)
    inputs = [example_input(spec, rng) for spec in signature]
    outputs = serving(**{spec.name: value for spec, value in zip(signature, inputs)})
    assert len(outputs) == 1, f"{name}: serving outputs {sorted(outputs)}"
    (served,) = outputs.values()
    assert tuple(served.shape) == (SERVED_BATCH,) + family.serves
    expected = model(inputs[0] if len(inputs) == 1 else inputs, training=False)
    np.testing.assert_allclose(served.numpy(), keras.ops.convert_to_numpy(expected), atol=1e-5)


def test_families_without_export_say_why():
    for name, family in FAMILIES.items():
        assert family.serves or family.no_export, f"{name}: give serves=... or no_export=reason"


# ------------------------------------------------------------------ keras.metrics


@pytest.mark.parametrize("name", [name for name in NAMES if FAMILIES[name].keras_metrics])
def test_keras_metrics_are_reported_per_loop_and_per_evaluation(name, trained_run):
    """A keras.metrics object held by the trainer appears under its name in the fit history
    (reset every loop: it equals the loop's own mean of the same quantity) and in evaluate's
    results (reset every evaluation)."""
    run = trained_run(name)
    for metric_name, (split, step_output) in FAMILIES[name].keras_metrics.items():
        results = run.history[-1] if split == "train" else run.eval_results
        where = "the last loop of fit" if split == "train" else "evaluate's results"
        assert metric_name in results, (f"{name}: keras metric {metric_name!r} is not in "
                                        f"{where}: {sorted(results)}")
        assert results[metric_name] == pytest.approx(results[step_output], abs=1e-6), (
            f"{name}: {metric_name} {results[metric_name]} != {step_output} "
            f"{results[step_output]} in {where}")
