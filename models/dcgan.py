"""A small DCGAN pair for 28×28 images: a transposed-convolution generator and a conv critic.

Both are Keras Models that create their layers in `__init__` and every variable in
`build`, so they fit `tapekit.models.GAN` (which builds the discriminator on the
generator's `compute_output_spec`) and `trainable_variables` never grows after that.
"""

import keras

IMAGE_SIZE = 28
_SEED_SIZE = IMAGE_SIZE // 4  # two stride-2 upsamplings: 7 → 14 → 28


class DCGANGenerator(keras.Model):
    """noise [batch, noise_dim] → images [batch, 28, 28, channels] in [-1, 1] (tanh).

    Dense → 7×7×(2·base_filters) → BatchNorm, LeakyReLU → Conv2DTranspose(base_filters,
    stride 2) to 14×14 → BatchNorm, LeakyReLU → Conv2DTranspose(channels, stride 2) to
    28×28 → tanh. BatchNorm uses batch statistics when called with `training=True` and
    its moving averages otherwise (sampling, export).

    Args:
      noise_dim: size of the noise vector (its last axis).
      channels: image channels (1 grey, 3 RGB).
      base_filters: width of the network; 32 keeps a training step on CPU in tens of ms.
    """

    def __init__(self, noise_dim: int = 64, channels: int = 1, base_filters: int = 32, **kwargs):
        super().__init__(**kwargs)
        self.noise_dim = noise_dim
        self.channels = channels
        self.base_filters = base_filters
        seed_filters = 2 * base_filters
        self.project = keras.layers.Dense(_SEED_SIZE * _SEED_SIZE * seed_filters, use_bias=False,
                                          name="project")
        self.reshape = keras.layers.Reshape((_SEED_SIZE, _SEED_SIZE, seed_filters), name="seed")
        # synchronized: batch statistics over the global batch, so N replicas train like one;
        # momentum 0.9: the moving averages used for sampling catch up within a short run.
        self.project_norm = keras.layers.BatchNormalization(momentum=0.9, synchronized=True,
                                                            name="project_norm")
        self.upsample = keras.layers.Conv2DTranspose(base_filters, 4, strides=2, padding="same",
                                                     use_bias=False, name="upsample_14")
        self.upsample_norm = keras.layers.BatchNormalization(momentum=0.9, synchronized=True,
                                                             name="upsample_norm")
        self.to_image = keras.layers.Conv2DTranspose(channels, 4, strides=2, padding="same",
                                                     activation="tanh", name="upsample_28")
        self.activation = keras.layers.LeakyReLU(negative_slope=0.2, name="leaky_relu")

    def build(self, input_shape):
        self.project.build(input_shape)
        shape = self.reshape.compute_output_shape(self.project.compute_output_shape(input_shape))
        self.project_norm.build(shape)
        self.upsample.build(shape)
        shape = self.upsample.compute_output_shape(shape)
        self.upsample_norm.build(shape)
        self.to_image.build(shape)

    def call(self, noise, training=False):
        hidden = self.reshape(self.project(noise))
        hidden = self.activation(self.project_norm(hidden, training=training))
        hidden = self.activation(self.upsample_norm(self.upsample(hidden), training=training))
        return self.to_image(hidden)

    def get_config(self):
        return {**super().get_config(), "noise_dim": self.noise_dim, "channels": self.channels,
                "base_filters": self.base_filters}


class DCGANDiscriminator(keras.Model):
    """images [batch, 28, 28, channels] → one logit per image [batch, 1] (real vs generated).

    Conv2D(base_filters, stride 2) → LeakyReLU → Conv2D(2·base_filters, stride 2) →
    LeakyReLU → flatten → Dense(1). No BatchNorm and no dropout: real and generated batches
    go through it separately, and it holds no state besides its weights.
    """

    def __init__(self, base_filters: int = 32, **kwargs):
        super().__init__(**kwargs)
        self.base_filters = base_filters
        self.downsample = keras.layers.Conv2D(base_filters, 4, strides=2, padding="same",
                                              name="downsample_14")
        self.downsample_more = keras.layers.Conv2D(2 * base_filters, 4, strides=2, padding="same",
                                                   name="downsample_7")
        self.activation = keras.layers.LeakyReLU(negative_slope=0.2, name="leaky_relu")
        self.flatten = keras.layers.Flatten(name="flatten")
        self.logit = keras.layers.Dense(1, name="logit")

    def build(self, input_shape):
        self.downsample.build(input_shape)
        shape = self.downsample.compute_output_shape(input_shape)
        self.downsample_more.build(shape)
        shape = self.flatten.compute_output_shape(self.downsample_more.compute_output_shape(shape))
        self.logit.build(shape)

    def call(self, images):
        hidden = self.activation(self.downsample(images))
        hidden = self.activation(self.downsample_more(hidden))
        return self.logit(self.flatten(hidden))

    def get_config(self):
        return {**super().get_config(), "base_filters": self.base_filters}
