"""A multi-layer perceptron; the seed article's 5 → 10 sigmoid → 1 network is one configuration."""

from typing import Sequence, Union

import keras


class MLP(keras.Model):
    """Dense hidden layers with one activation, then a linear output layer.

    Args:
      hidden_units: one int per hidden layer (an int means one hidden layer).
      output_units: size of the (linear) output.
      activation: any Keras activation name; the seed network uses "sigmoid".
    """

    def __init__(self, hidden_units: Union[int, Sequence[int]] = 10, output_units: int = 1,
                 activation: str = "sigmoid", **kwargs):
        super().__init__(**kwargs)
        self.hidden_units = [hidden_units] if isinstance(hidden_units, int) else list(hidden_units)
        self.output_units = output_units
        self.activation = activation
        self.hidden_layers = [keras.layers.Dense(units, activation=activation, name=f"hidden_{i}")
                              for i, units in enumerate(self.hidden_units)]
        self.output_layer = keras.layers.Dense(output_units, name="output")

    def build(self, input_shape):
        for layer in self.hidden_layers:
            layer.build(input_shape)
            input_shape = layer.compute_output_shape(input_shape)
        self.output_layer.build(input_shape)

    def call(self, inputs):
        hidden = inputs
        for layer in self.hidden_layers:
            hidden = layer(hidden)
        return self.output_layer(hidden)

    def get_config(self):
        return {**super().get_config(), "hidden_units": self.hidden_units,
                "output_units": self.output_units, "activation": self.activation}
