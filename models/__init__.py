"""Keras Model subclasses for tapekit (installed as `tapekit.models`).

Each creates its layers in `__init__` and its variables in `build`, never in `call`, so
`trainable_variables` is complete once the model is built and stays the same afterwards.
"""

from tapekit.models.dcgan import DCGANDiscriminator, DCGANGenerator
from tapekit.models.gan import GAN, Discriminator, Generator
from tapekit.models.linear import LinearRegression
from tapekit.models.mlp import MLP

__all__ = ["DCGANDiscriminator", "DCGANGenerator", "GAN", "Discriminator", "Generator",
           "LinearRegression", "MLP"]
