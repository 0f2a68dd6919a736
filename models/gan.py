"""The seed article's toy GAN, fixed: networks are Keras Models that own their variables.

The seed's generator and discriminator were plain functions creating new variables on
every call (so nothing could be trained). Here each network creates its layers once;
`GAN` holds both so `gan.generator.trainable_variables` and
`gan.discriminator.trainable_variables` are complete and disjoint.
"""

import keras


class Generator(keras.Model):
    """noise [batch, noise_dim] → Dense(hidden_units, relu) → Dense(output_dim) samples."""

    def __init__(self, hidden_units: int = 10, output_dim: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.hidden_units = hidden_units
        self.output_dim = output_dim
        self.hidden = keras.layers.Dense(hidden_units, activation="relu", name="hidden")
        self.out = keras.layers.Dense(output_dim, name="samples")

    def build(self, input_shape):
        self.hidden.build(input_shape)
        self.out.build(self.hidden.compute_output_shape(input_shape))

    def call(self, noise):
        return self.out(self.hidden(noise))

    def get_config(self):
        return {**super().get_config(), "hidden_units": self.hidden_units,
                "output_dim": self.output_dim}


class Discriminator(keras.Model):
    """samples [batch, dim] → Dense(hidden_units, relu) → Dense(1) logit (real vs generated)."""

    def __init__(self, hidden_units: int = 10, **kwargs):
        super().__init__(**kwargs)
        self.hidden_units = hidden_units
        self.hidden = keras.layers.Dense(hidden_units, activation="relu", name="hidden")
        self.out = keras.layers.Dense(1, name="logit")

    def build(self, input_shape):
        self.hidden.build(input_shape)
        self.out.build(self.hidden.compute_output_shape(input_shape))

    def call(self, samples):
        return self.out(self.hidden(samples))

    def get_config(self):
        return {**super().get_config(), "hidden_units": self.hidden_units}


class GAN(keras.Model):
    """Holds a generator and a discriminator; calling it generates samples from noise.

    Args:
      generator, discriminator: Keras models; default to the seed's dense networks.
      noise_dim: size of the generator's noise input (the seed uses 10).
    """

    def __init__(self, generator: keras.Model = None, discriminator: keras.Model = None,
                 noise_dim: int = 10, **kwargs):
        super().__init__(**kwargs)
        self.noise_dim = noise_dim
        self.generator = generator if generator is not None else Generator(name="generator")
        self.discriminator = (discriminator if discriminator is not None
                              else Discriminator(name="discriminator"))

    def build(self, input_shape=None):
        self.generator.build((None, self.noise_dim))
        samples = self.generator.compute_output_spec(keras.KerasTensor((None, self.noise_dim)))
        self.discriminator.build(samples.shape)

    def call(self, noise):
        return self.generator(noise)
