"""tapekit.compat: the one place that touches private TensorFlow/Keras names or patches them."""

import glob
import os
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from tapekit import compat
from tapekit.compiled import tracing
from tapekit.run import distribute

from conftest import REPO

# What reaching into TensorFlow/Keras looks like in a line of source.
PRIVATE = {
    "a private Keras module": r"\bkeras\.src\b",
    "TensorFlow's __internal__": r"\b__internal__\b",
    "tf.compat.v1": r"\bcompat\.v1\b",
    "TensorFlow's own modules": r"\btensorflow\.(python|core)\b",
    "a FuncGraph's captures": r"\.captures\b",
    # (os._exit is the standard library's documented immediate exit, not a private name)
    "a private attribute of another object":
        r"(?<![\w.])(?!self\b|cls\b|os\._exit\b)[A-Za-z_]\w*\._[a-z]\w*",
    "a private attribute read by name": r"getattr\((?!self\b)[^,]+,\s*[\"']_[a-z]",
    "an instance attribute removed by name": r"\bvars\((?!self\b)[^)]*\)\.pop\(",
    "a method patched on an object":
        r"^\s*(?!self\b)[A-Za-z_]\w*(\.\w+)*\.(next|apply_gradients|update_state|_[a-z]\w*)\s*=[^=]",
}


def package_sources():
    """Every module of tapekit (its subpackages too), models/ and trainers/, but compat.py."""
    for folder in ("tapekit", "models", "trainers"):
        for path in sorted(glob.glob(os.path.join(REPO, folder, "**", "*.py"), recursive=True)):
            if os.path.relpath(path, REPO) != os.path.join("tapekit", "compat.py"):
                yield path


def test_the_scan_walks_every_subpackage():
    scanned = {os.path.relpath(os.path.dirname(path), REPO) for path in package_sources()}
    subpackages = {os.path.relpath(os.path.dirname(path), REPO)
                   for path in glob.glob(os.path.join(REPO, "tapekit", "*", "__init__.py"))}
    assert subpackages and subpackages <= scanned


def code_lines(path):
    """(number, line) of code: comments and docstrings are blanked out, and so is the text
    of other strings except one that names a private attribute (`getattr(x, "_name")`)."""
    text = open(path, encoding="utf-8").read()
    text = re.sub(r'("""|\'\'\')(.|\n)*?\1', lambda m: "\n" * m.group(0).count("\n"), text)
    for number, line in enumerate(text.splitlines(), 1):
        line = re.sub(r'"(?!_)[^"\n]*"|\'(?!_)[^\'\n]*\'', '""', line)
        yield number, re.sub(r"#.*", "", line)


def test_private_tensorflow_and_keras_access_lives_only_in_compat():
    found = []
    for path in package_sources():
        for number, line in code_lines(path):
            for what, pattern in PRIVATE.items():
                if re.search(pattern, line):
                    found.append(f"{os.path.relpath(path, REPO)}:{number}: {what}: {line.strip()}")
    assert not found, "move these into tapekit/compat.py:\n" + "\n".join(found)


def test_the_scan_finds_what_it_looks_for(tmp_path):
    """The patterns are not blind: each finds the kind of line it names."""
    samples = ["from keras.src.random import seed_generator", "tf.__internal__.autograph",
               "tf.compat.v1.train.update_checkpoint_state(d)",
               "from tensorflow.core.framework import summary_pb2", "for x in graph.captures:",
               "rate = optimizer._learning_rate", 'specs = getattr(spec, "_value_specs", None)',
               'vars(optimizer).pop("apply_gradients")', "optimizer.apply_gradients = record",
               "seed_generator.SeedGenerator.next = mine"]
    path = tmp_path / "sample.py"
    path.write_text("\n".join(samples) + "\n")
    lines = [line for _, line in code_lines(str(path))]
    missed = [line for line in lines if not any(re.search(p, line) for p in PRIVATE.values())]
    assert not missed
    clean = ["self._engine = engine", "self.optimizer.apply_gradients(zip(g, v))",
             "x = a._b  # comment only: a._b", 'name = "a._b"', "value == other.next",
             'getattr(self, "_cache", None)', "Trainer.__init__.__signature__ = signature"]
    path.write_text("\n".join(clean) + "\n")
    flagged = [line for _, line in code_lines(str(path))
               if any(re.search(p, line) for p in PRIVATE.values())]
    assert [line.strip() for line in flagged] == ["x = a._b"]


def test_instance_attributes_are_restored_or_removed_on_exit():
    optimizer = keras.optimizers.SGD()
    optimizer.own = "mine"
    with pytest.raises(RuntimeError):
        with compat.instance_attributes([(optimizer, {"apply_gradients": "patched",
                                                      "own": "patched"})]):
            assert optimizer.apply_gradients == "patched" and optimizer.own == "patched"
            raise RuntimeError("inside")
    assert "apply_gradients" not in vars(optimizer)  # the class's method again
    assert optimizer.own == "mine"


def test_the_seed_generator_patch_is_installed_only_while_a_step_is_traced():
    original = keras.random.SeedGenerator.next
    with tracing.step(tracing.StepTrace("loop")):
        with tracing.step(tracing.StepTrace("loop")):  # replicas enter one by one
            assert keras.random.SeedGenerator.next is not original
        assert keras.random.SeedGenerator.next is not original
    assert keras.random.SeedGenerator.next is original
    strategy = distribute.resolve_strategy("mirrored", cpu_replicas=2)  # one per process
    with strategy.scope():
        generator = keras.random.SeedGenerator(3)

    @tf.function
    def seeds(in_a_step):
        def replica():
            if not in_a_step:
                return generator.next()
            with tracing.step(tracing.StepTrace("loop")):
                return generator.next()
        return strategy.run(replica)

    first, second = strategy.experimental_local_results(seeds(True))
    assert not np.array_equal(first.numpy(), second.numpy())  # each replica its own seed
    assert keras.random.SeedGenerator.next is original
    # Outside a step's trace (Keras fit, say) the seeds are Keras's own: the same on both.
    first, second = strategy.experimental_local_results(seeds(False))
    assert np.array_equal(first.numpy(), second.numpy())


def test_op_determinism_is_on_inside_the_context_and_as_it_was_after():
    assert not compat.op_determinism_enabled()
    with compat.op_determinism(True):
        assert compat.op_determinism_enabled()
        with compat.op_determinism(False):  # not asked: left as it is
            assert compat.op_determinism_enabled()
    assert not compat.op_determinism_enabled()


def test_gradients_already_summed_leaves_the_optimizer_as_it_was():
    optimizer = keras.optimizers.Adam()
    with compat.gradients_already_summed(optimizer):
        assert optimizer._all_reduce_sum_gradients([(1, 2)]) == [(1, 2)]
    assert "_all_reduce_sum_gradients" not in vars(optimizer)
