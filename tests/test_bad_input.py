"""Bad input gets one clear error before work is lost, and nothing saved is changed."""


import keras
import numpy as np
import pytest
import tensorflow as tf

import tapekit
from tapekit.models import MLP

from small_trainers import LinearSGD, Unshuffled, rows


class FixedInput(Unshuffled):
    """An MLP built for 5 features, fed whatever `arrays` holds (Unshuffled's input and step)."""

    def __init__(self, arrays, **kwargs):
        super().__init__(global_batch_size=32, **kwargs)
        self.arrays = arrays

    def build(self):
        self.model = MLP(hidden_units=4, output_units=1)
        self.model.build((None, 5))
        self.optimizer = keras.optimizers.SGD(0.1)


def test_data_of_the_wrong_shape_fails_before_the_first_step():
    trainer = FixedInput((np.zeros((64, 3), np.float32), np.zeros((64, 1), np.float32)))
    with pytest.raises(tapekit.TapekitError) as raised:
        trainer.fit(train_steps=5)
    message = str(raised.value)
    assert "cannot run on this data: batches are (float32[32, 3], float32[32, 1])" in message
    assert "expected axis -1 of input shape to have value 5" in message  # what the model expects
    assert "\n" not in message
    assert trainer.current_step == 0


def test_data_of_the_wrong_dtype_fails_before_the_first_step():
    trainer = FixedInput((np.array([["a"] * 5] * 64), np.zeros((64, 1), np.float32)))
    with pytest.raises(tapekit.TapekitError, match=r"batches are \(string\[32, 5\], float32\[32, 1\]\)"):
        trainer.fit(train_steps=5)
    assert trainer.current_step == 0


def test_data_that_runs_out_stops_cleanly_at_the_last_step_and_checkpoints_it(tmp_path, caplog):
    x, y = rows(23 * 8)
    trainer = LinearSGD(global_batch_size=8, model_dir=str(tmp_path))
    history = trainer.fit(train_steps=100, steps_per_loop=10,
                          dataset=tf.data.Dataset.from_tensor_slices((x, y)).batch(8))
    assert trainer.current_step == 23
    assert [h["step"] for h in history] == [10, 20, 23]
    assert "the training data ran out: 3 of this loop's 10 steps ran" in caplog.text
    assert tf.train.latest_checkpoint(tmp_path / "checkpoints").endswith("ckpt-23")
