"""Image grids and PNG files (tapekit.images)."""

import numpy as np
import pytest
import tensorflow as tf

import tapekit
from tapekit.images import SEPARATOR_VALUE, image_grid, write_png


def _tiles(count, height=28, width=28, channels=1):
    # Tile k is uniformly k / count: every tile is recognisable in the grid.
    values = np.arange(count, dtype=np.float32) / count
    return np.ones((count, height, width, channels), np.float32) * values[:, None, None, None]


def test_ten_images_make_a_three_by_four_grid_with_two_pixel_separators():
    images = _tiles(10)
    grid = image_grid(images)
    # 3 rows × 4 columns of 28 px, separated by 2 px, no outer border
    assert grid.shape == (3 * 28 + 2 * 2, 4 * 28 + 3 * 2, 1) == (88, 118, 1)
    assert grid.dtype == np.uint8
    for index in range(10):
        top, left = (index // 4) * 30, (index % 4) * 30
        tile = grid[top:top + 28, left:left + 28]
        np.testing.assert_array_equal(tile, np.round(images[index] * 255).astype(np.uint8))
    assert np.all(grid[28:30] == SEPARATOR_VALUE) and np.all(grid[:, 28:30] == SEPARATOR_VALUE)
    assert np.all(grid[60:, 60:] == SEPARATOR_VALUE)  # the two unused cells of the last row


def test_grid_columns_single_image_rgb_and_clipping():
    assert image_grid(_tiles(10), columns=5).shape == (58, 148, 1)
    assert image_grid(_tiles(3), columns=10).shape == (28, 28 * 3 + 2 * 2, 1)
    single = image_grid(np.full((1, 5, 7, 3), 0.5, np.float32))
    assert single.shape == (5, 7, 3) and np.all(single == 128)
    clipped = image_grid(np.array([[[[-2.0]], [[3.0]], [[np.nan]]]], np.float32))
    assert clipped[:, 0, 0].tolist() == [0, 255, 0]
    assert image_grid(tf.zeros([4, 8, 8, 4])).shape == (18, 18, 4)  # tensors work too


@pytest.mark.parametrize("images, columns", [
    (np.zeros((28, 28, 1)), None),  # one image without the batch axis
    (np.zeros((2, 28, 28)), None),  # no channel axis
    (np.zeros((2, 28, 28, 2)), None),  # two channels
    (np.zeros((0, 28, 28, 1)), None),  # nothing to tile
    (np.zeros((2, 28, 28, 1)), 0),
])
def test_bad_images_raise_one_clear_error(images, columns):
    with pytest.raises(tapekit.TapekitError) as raised:
        image_grid(images, columns)
    assert "\n" not in str(raised.value)


def test_png_is_written_with_its_directory_and_decodes_to_the_grid(tmp_path):
    grid = image_grid(_tiles(10))
    path = tmp_path / "samples" / "step_100.png"
    write_png(str(path), grid)
    decoded = tf.io.decode_png(tf.io.read_file(str(path))).numpy()
    assert decoded.shape == (88, 118, 1)
    np.testing.assert_array_equal(decoded, grid)
    rgb = image_grid(np.random.default_rng(0).random((5, 6, 6, 3)))
    write_png(str(tmp_path / "rgb.png"), rgb)
    np.testing.assert_array_equal(tf.io.decode_png(tf.io.read_file(str(tmp_path / "rgb.png"))), rgb)


def test_write_png_wants_a_uint8_grid(tmp_path):
    with pytest.raises(tapekit.TapekitError, match="pass image_grid"):
        write_png(str(tmp_path / "x.png"), _tiles(2))
    with pytest.raises(tapekit.TapekitError, match="uint8"):
        write_png(str(tmp_path / "x.png"), np.zeros((4, 4, 1), np.float32))
    assert not (tmp_path / "x.png").exists()
