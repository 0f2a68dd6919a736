"""Linear regression, y = x·w + b: the seed article's first workload as a Keras Model."""

import keras
import tensorflow as tf


class LinearRegression(keras.Model):
    """`y = x @ w + b` with `w` of shape [input_dim, output_units] and `b` of [output_units].

    `w` starts from N(0, 1) and `b` from zeros, as in the seed. Variables are created in
    `build` from the input's last dimension.
    """

    def __init__(self, output_units: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.output_units = output_units

    def build(self, input_shape):
        self.w = self.add_weight(
            name="w", shape=(input_shape[-1], self.output_units),
            initializer=keras.initializers.RandomNormal(stddev=1.0))
        self.b = self.add_weight(name="b", shape=(self.output_units,), initializer="zeros")

    def call(self, inputs):
        return tf.matmul(inputs, self.w) + self.b

    def get_config(self):
        return {**super().get_config(), "output_units": self.output_units}
