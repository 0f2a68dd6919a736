"""Models own their variables: created once in build, complete, never re-created by call."""

import numpy as np
import tensorflow as tf

from tapekit.models import GAN, MLP, LinearRegression


def test_linear_regression_variables():
    model = LinearRegression()
    y = model(tf.ones([4, 1]))
    assert y.shape == (4, 1)
    assert [v.shape for v in model.trainable_variables] == [(1, 1), (1,)]
    np.testing.assert_allclose(y.numpy(), np.full((4, 1), model.w.numpy().item()))


def test_mlp_is_the_seed_network_and_call_creates_no_variables():
    model = MLP(hidden_units=10, output_units=1, activation="sigmoid")
    model(tf.ones([3, 5]))
    shapes = [tuple(v.shape) for v in model.trainable_variables]
    assert shapes == [(5, 10), (10,), (10, 1), (1,)]
    before = [id(v) for v in model.variables]
    model(tf.zeros([7, 5]))
    assert [id(v) for v in model.variables] == before


def test_deeper_mlp_shapes():
    model = MLP(hidden_units=[8, 4], output_units=2, activation="relu")
    assert model(tf.ones([2, 3])).shape == (2, 2)
    assert len(model.trainable_variables) == 6


def test_gan_holds_two_disjoint_complete_networks():
    gan = GAN(noise_dim=10)
    gan.build()
    generator, discriminator = gan.generator, gan.discriminator
    assert len(generator.trainable_variables) == 4 and len(discriminator.trainable_variables) == 4
    assert not {id(v) for v in generator.trainable_variables} & {
        id(v) for v in discriminator.trainable_variables}
    assert len(gan.trainable_variables) == 8
    samples = gan(tf.ones([5, 10]))
    assert samples.shape == (5, 1)
    assert discriminator(samples).shape == (5, 1)
    assert len(gan.trainable_variables) == 8
