"""What users look at: TensorBoard event files, sample PNGs, progress output, the README trainer."""

import contextlib
import glob
import io
import os
import re

import numpy as np
import pytest
import tensorflow as tf

from tapekit.trainers import GANTrainer, RegressionTrainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _events(directory):
    """{tag: [(step, plugin_name, value)]} from every event file under `directory`."""
    tags = {}
    for path in glob.glob(os.path.join(directory, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                tensor = tf.make_ndarray(value.tensor)
                tags.setdefault(value.tag, []).append(
                    (event.step, value.metadata.plugin_data.plugin_name, tensor))
    return tags


def test_tensorboard_has_metrics_learning_rate_speed_and_eval(tmp_path):
    trainer = RegressionTrainer(model="mlp", model_dir=str(tmp_path), progress="none")
    trainer.fit(train_steps=40, steps_per_loop=20, eval_every_steps=40, eval_steps=2)
    train = _events(tmp_path / "summaries" / "train")
    assert {"loss", "steps_per_sec", "learning_rate"} <= set(train)
    assert [step for step, _, _ in train["loss"]] == [20, 40]
    assert all(plugin == "scalars" for _, plugin, _ in train["loss"])
    assert train["learning_rate"][0][2] == pytest.approx(0.01)
    evaluation = _events(tmp_path / "summaries" / "eval")
    assert [step for step, _, _ in evaluation["loss"]] == [40]


def test_one_dimensional_gan_writes_generated_and_real_histograms(tmp_path):
    trainer = GANTrainer(model_dir=str(tmp_path), sample_every_steps=10, progress="none")
    trainer.fit(train_steps=20, steps_per_loop=10)
    train = _events(tmp_path / "summaries" / "train")
    assert {"generated", "real", "generator_loss", "discriminator_loss",
            "learning_rate/generator_optimizer", "learning_rate/discriminator_optimizer"} <= set(train)
    step, plugin, buckets = train["generated"][-1]
    assert step == 20 and plugin == "histograms" and buckets.shape[1] == 3
    assert buckets[:, 2].sum() == pytest.approx(10000)  # GANTrainer.sample() draws 10 000
    assert not (tmp_path / "samples").exists()  # a 1-D GAN has no images


def test_image_gan_writes_png_grids_and_image_summaries(tmp_path):
    trainer = GANTrainer(model="dcgan", model_dir=str(tmp_path), sample_every_steps=4,
                         num_examples=256, progress="none")
    trainer.fit(train_steps=10, steps_per_loop=2)
    pngs = sorted(os.listdir(tmp_path / "samples"))
    assert pngs == ["step_000004.png", "step_000008.png", "step_000010.png"]
    grid = tf.io.decode_png(tf.io.read_file(str(tmp_path / "samples" / pngs[-1]))).numpy()
    assert grid.shape == (4 * 28 + 3 * 2, 4 * 28 + 3 * 2, 1)  # 16 samples, 4 × 4, 2 px gaps
    images = _events(tmp_path / "summaries" / "train")["samples"]
    assert [step for step, _, _ in images] == [4, 8, 10]
    width, height, png = images[-1][2]
    assert (int(width), int(height)) == (118, 118) and images[-1][1] == "images"
    np.testing.assert_array_equal(tf.io.decode_png(png).numpy(), grid)


def test_progress_bar_log_lines_or_nothing(caplog):
    caplog.set_level("INFO")
    caplog.set_level("INFO", logger="absl")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        RegressionTrainer(progress="bar").fit(train_steps=30, steps_per_loop=10)
    assert "30/30" in out.getvalue() and "loss" in out.getvalue()
    caplog.clear()
    RegressionTrainer(progress="log").fit(train_steps=20, steps_per_loop=10)
    assert re.search(r"step 20/20: loss=\S+, steps_per_sec=", caplog.text)
    caplog.clear()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        RegressionTrainer(progress="none").fit(train_steps=20, steps_per_loop=10)
    assert out.getvalue() == "" and "step 20/20" not in caplog.text


def test_the_readme_user_trainer_runs_as_written(tmp_path, monkeypatch):
    readme = open(os.path.join(REPO, "README.md")).read()
    code = re.search(r"## A trainer is the science only\n\n```python\n(.*?)```", readme, re.S).group(1)
    assert len([line for line in code.splitlines() if line.strip()]) <= 18  # short, as promised
    code = code.replace('"/tmp/run"', repr(str(tmp_path / "run")))
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    history = namespace["history"]
    assert history[-1]["step"] == 500 and history[-1]["loss"] < history[0]["loss"]
    assert (tmp_path / "run" / "metrics.jsonl").exists()
