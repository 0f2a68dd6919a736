"""SavedModel export (tapekit.checkpoint.export): round trips, refusing to overwrite, tapekit-export."""


import numpy as np
import pytest
import tensorflow as tf

import tapekit
from tapekit.checkpoint.export import export_saved_model
from tapekit.trainers import GANTrainer, RegressionTrainer

from conftest import REPO
from helpers import TAPEKIT_EXPORT, run_cli


def _serve(export_dir, name, inputs):
    signature = tf.saved_model.load(str(export_dir)).signatures["serving_default"]
    (spec_name,) = signature.structured_input_signature[1]
    assert spec_name == name
    outputs = signature(**{name: tf.constant(inputs)})
    assert list(outputs) == ["output_0"]
    return outputs["output_0"].numpy()


def test_regression_model_round_trip(tmp_path):
    trainer = RegressionTrainer(model="mlp")
    trainer.fit(train_steps=20, steps_per_loop=10)
    model, signature = trainer.export_model()
    assert signature[0].shape.as_list() == [None, 5]
    export_saved_model(model, signature, str(tmp_path / "mlp"))
    x = np.random.default_rng(0).random((7, 5), dtype=np.float32)
    np.testing.assert_allclose(_serve(tmp_path / "mlp", "x", x), model(x).numpy(), atol=1e-5)
    loaded = tf.saved_model.load(str(tmp_path / "mlp"))
    np.testing.assert_allclose(loaded.serve(x).numpy(), model(x).numpy(), atol=1e-5)


@pytest.mark.parametrize("model_name", ["dense", "dcgan"])
def test_gan_generator_round_trip(model_name, tmp_path):
    trainer = GANTrainer(model=model_name, num_examples=256)
    trainer.fit(train_steps=3, steps_per_loop=3)
    generator, signature = trainer.export_model()
    export_saved_model(generator, signature, str(tmp_path / "generator"))
    noise = np.random.default_rng(1).standard_normal((6, trainer.noise_dim)).astype(np.float32)
    served = _serve(tmp_path / "generator", "noise", noise)
    # Inference mode: BatchNorm of the dcgan generator uses its moving averages.
    expected = generator(noise, training=False).numpy()
    assert served.shape == expected.shape
    np.testing.assert_allclose(served, expected, atol=1e-5)


def test_refuses_a_non_empty_export_dir_and_accepts_an_empty_one(tmp_path):
    trainer = RegressionTrainer(model="linear")
    trainer.fit(train_steps=1, steps_per_loop=1)
    model, signature = trainer.export_model()
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("keep me")
    with pytest.raises(tapekit.TapekitError,
                       match="exists and is not empty; choose a new --export_dir"):
        export_saved_model(model, signature, str(taken))
    assert [p.name for p in taken.iterdir()] == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    export_saved_model(model, signature, str(empty))
    assert (empty / "saved_model.pb").exists()


def test_a_signature_that_does_not_fit_leaves_nothing_behind(tmp_path):
    trainer = RegressionTrainer(model="mlp")
    trainer.fit(train_steps=1, steps_per_loop=1)
    model, _ = trainer.export_model()
    with pytest.raises(tapekit.TapekitError, match="cannot export"):
        export_saved_model(model, [tf.TensorSpec([None, 3], tf.float32)], str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def test_restore_gets_the_checkpointed_weights_without_training(tmp_path):
    trained = GANTrainer(model="dcgan", num_examples=128, model_dir=str(tmp_path / "run"))
    trained.fit(train_steps=3, steps_per_loop=3)  # saves checkpoints/ckpt-3 at the end
    fresh = GANTrainer(model="dcgan", num_examples=128, seed=5)
    assert fresh.restore(str(tmp_path / "run" / "checkpoints" / "ckpt-3")) == 3
    model, signature = fresh.export_model()
    assert fresh.current_step == 3 and signature[0].name == "noise"
    assert len(model.variables) == len(trained.gan.generator.variables) == 12
    for restored, original in zip(model.variables, trained.gan.generator.variables):
        np.testing.assert_array_equal(restored.numpy(), original.numpy())  # moving stats too
    wrong = GANTrainer(model="dcgan", num_examples=128, noise_dim=32)
    with pytest.raises(tapekit.TapekitError, match="does not fit this trainer"):
        wrong.restore(str(tmp_path / "run" / "checkpoints" / "ckpt-3"))


def test_tapekit_export_command_restores_the_latest_checkpoint(tmp_path, cli_env):
    model_dir, export_dir = tmp_path / "run", tmp_path / "export"
    trained = run_cli(["--trainer=regression", "--model=linear", "--train_steps=300",
                       f"--model_dir={model_dir}"], cli_env, cwd=REPO)
    assert trained.returncode == 0, trained.stderr[-2000:]

    def export(*flags):
        return run_cli(flags, cli_env, cwd=REPO, command=TAPEKIT_EXPORT)

    result = export("--trainer=regression", "--model=linear", f"--model_dir={model_dir}",
                    f"--export_dir={export_dir}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "step 300" in result.stdout
    y = _serve(export_dir, "x", np.array([[0.0], [1.0]], np.float32))
    np.testing.assert_allclose(y[:, 0], [2.0, 5.0], atol=0.1)  # y = 3x + 2, learned
    again = export("--trainer=regression", "--model=linear", f"--model_dir={model_dir}",
                   f"--export_dir={export_dir}")
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert again.stderr.strip().splitlines()[-1] == (
        f"tapekit-export: error: export_dir '{export_dir}' exists and is not empty; choose a "
        "new --export_dir.")
    mismatched = export("--trainer=regression", "--model=mlp", f"--model_dir={model_dir}",
                        f"--export_dir={tmp_path / 'other'}")
    assert mismatched.returncode == 2 and "Traceback" not in mismatched.stderr
    assert "does not fit this trainer" in mismatched.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "other").exists()
