"""A checkpoint written by an earlier tapekit (tests/data/saved_run, made before the modules
moved into subpackages) restores into today's code and resumes bit for bit."""

import os
import shutil

import numpy as np

import saved_run


def test_a_checkpoint_saved_before_the_move_resumes_bit_for_bit(tmp_path):
    model_dir = str(tmp_path / "run")
    shutil.copytree(saved_run.DATA, model_dir)
    run = saved_run.trainer(model_dir)
    history = run.fit(train_steps=saved_run.FINAL_STEP, steps_per_loop=3)
    assert [row["step"] for row in history] == [9, 12]  # resumed at step 6, not from 0
    expected = np.load(os.path.join(saved_run.DATA, f"step_{saved_run.FINAL_STEP}.npz"))
    resumed = list(saved_run.weights(run).values())  # in order: Keras numbers the names
    assert len(resumed) == len(expected.files) == 15  # 4 weights, a seed, Adam: 2 + 2 per weight
    for value, name in zip(resumed, expected.files):
        np.testing.assert_array_equal(value, expected[name], err_msg=name)
