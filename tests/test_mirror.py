"""Mirror padding: numpy's 'reflect' for any pad size, image or batch, static or dynamic pads."""

import numpy as np
import pytest
import tensorflow as tf

from pipeline.mirror import mirror_pad, mirror_pad_array, mirror_positions


@pytest.mark.parametrize(
    "shape, pads",
    [
        ((6, 7, 1), (2, 3, 1, 4)),
        ((6, 7, 2), (5, 5, 6, 6)),  # pad = size - 1, the most tf.pad REFLECT allows
        ((3, 5, 1), (11, 11, 11, 11)),  # pads larger than the image: repeated reflection
        ((4, 4, 3), (0, 9, 13, 0)),
        ((1, 6, 1), (4, 2, 3, 8)),  # a one-row strip
        ((5, 1, 1), (2, 3, 7, 1)),
        ((1, 1, 2), (3, 2, 4, 5)),  # a single pixel
        ((4, 5, 1), (0, 0, 0, 0)),
    ],
)
def test_mirror_pad_matches_numpy_reflect(shape, pads):
    x = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    top, bottom, left, right = pads
    expected = np.pad(x, ((top, bottom), (left, right), (0, 0)), mode="reflect")
    np.testing.assert_array_equal(mirror_pad(x, *pads).numpy(), expected)
    as_tensors = [tf.constant(p, tf.int32) for p in pads]
    np.testing.assert_array_equal(mirror_pad(tf.constant(x), *as_tensors).numpy(), expected)


@pytest.mark.parametrize("pad", [2, 5])  # within the 3 x 4 images (tf.pad's REFLECT), and beyond them
def test_a_batch_is_padded_image_by_image(pad):
    images = np.arange(2 * 3 * 4 * 2, dtype=np.float32).reshape(2, 3, 4, 2)
    expected = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
    np.testing.assert_array_equal(mirror_pad(images, pad, pad, pad, pad).numpy(), expected)


@pytest.mark.parametrize("shape, pads", [((6, 7, 2), [(2, 3), (1, 4)]), ((3, 5, 1), [(11, 0), (0, 11)]),
                                         ((1, 6, 3), [(4, 2), (3, 8)])])
def test_numpy_arrays_are_padded_as_tensors_are(shape, pads):
    x = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    (top, bottom), (left, right) = pads
    np.testing.assert_array_equal(mirror_pad_array(x, pads), mirror_pad(x, top, bottom, left, right).numpy())
    # Leading axes named with (0, 0) stay, as a batch does in mirror_pad; channels are never padded.
    batch = np.stack([x, -x])
    np.testing.assert_array_equal(mirror_pad_array(batch, [(0, 0), *pads]),
                                  mirror_pad(batch, top, bottom, left, right).numpy())


@pytest.mark.parametrize("size", [1, 2, 5])
def test_whole_positions_mirror_to_the_pixels_padding_repeats_there(size):
    # Up to three image sizes beyond either edge, where the mirroring is exact.
    reach = 3 * max(size - 1, 1)
    positions = np.arange(-reach, size + reach)
    expected = np.pad(np.arange(size), reach, mode="reflect")
    mirrored = mirror_positions(tf.constant(positions, tf.float32), size).numpy()
    np.testing.assert_array_equal(mirrored, expected)


def test_fractional_positions_keep_their_fraction_and_no_position_leaves_the_image():
    mirrored = mirror_positions(tf.constant([-0.25, 4.5, 9.75, 1e6, -1e6, np.nan], tf.float32), 5).numpy()
    np.testing.assert_array_equal(mirrored, [0.25, 3.5, 1.75, 0, 0, 4])
