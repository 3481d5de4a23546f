"""The paper's augmentation: switches, label exactness, mirrored rotation, gray values, seeds, colour."""

import numpy as np
import pytest
import tensorflow as tf

from pipeline.config.schema import AugmentConfig
from pipeline.training import augmentation, custom_op
from pipeline.training.augmentation import augment
from pipeline.training.elastic_warp import displacement_field, warp_example

SEED = tf.constant([5, 9], tf.int64)
OFF = dict(flip=False, rotate90=False, rotate=False, elastic=False, brightness=0.0, contrast=0.0, gamma=0.0)


def _example(size=60):
    rng = np.random.default_rng(0)
    label = np.kron(rng.integers(0, 2, (size // 6, size // 6)), np.ones((6, 6), int)).astype(np.int32)
    tile = (label[..., None] * 2.0 - 1.0 + 0.1 * rng.standard_normal((size, size, 1))).astype(np.float32)
    return tile, label, 1 + label.astype(np.float32)


def test_everything_off_is_the_identity():
    tile, label, weight = _example()
    for result, original in zip(augment(tile, label, weight, SEED, AugmentConfig(**OFF)), (tile, label, weight)):
        np.testing.assert_array_equal(result, original)


@pytest.mark.parametrize("switch", ["flip", "rotate90", "rotate", "elastic", "brightness", "contrast", "gamma"])
def test_each_switch_changes_the_tile_and_keeps_the_format(switch):
    tile, label, weight = _example()
    value = True if isinstance(OFF[switch], bool) else 0.3
    seeds = [tf.constant([s, 1], tf.int64) for s in range(4)]  # a flip or turn may draw "no change"
    results = [augment(tile, label, weight, s, AugmentConfig(**dict(OFF, **{switch: value}))) for s in seeds]
    assert any(not np.array_equal(result[0], tile) for result in results)
    for new_tile, new_label, new_weight in results:
        assert new_tile.shape == tile.shape and new_tile.dtype == tf.float32
        assert new_label.dtype == tf.int32 and set(np.unique(new_label)) <= {0, 1}
        assert new_weight.shape == weight.shape


def test_geometry_moves_tile_label_and_weights_together():
    tile, label, weight = _example()
    config = AugmentConfig(**dict(OFF, flip=True, rotate90=True, rotate=True, elastic=True))
    new_tile, new_label, new_weight = (part.numpy() for part in augment(tile, label, weight, SEED, config))
    assert ((new_tile[..., 0] > 0) == (new_label == 1)).mean() > 0.95
    assert (np.abs(new_weight - (1 + new_label)) < 0.5).mean() > 0.95


def test_rotation_by_any_angle_mirrors_instead_of_black_corners():
    tile, label, weight = _example()
    positive = np.abs(tile) + 1
    config = AugmentConfig(**dict(OFF, rotate=True))
    for seed in range(3):
        rotated = augment(positive, label, weight, tf.constant([seed, 0], tf.int64), config)[0].numpy()
        assert rotated.min() > 0.5  # a constant (zero) border would show in the corners


def test_gray_values_are_a_monotone_curve_of_the_tile():
    tile, label, weight = _example()
    config = AugmentConfig(**dict(OFF, brightness=0.2, contrast=0.2, gamma=0.3))
    changed = augment(tile, label, weight, SEED, config)[0].numpy().ravel()
    order = np.argsort(tile.ravel())
    assert np.all(np.diff(changed[order]) >= -1e-5)  # the same ordering of gray values
    assert not np.allclose(changed, tile.ravel(), atol=1e-3)


def test_same_seed_same_result_other_seed_other_result():
    tile, label, weight = _example()
    first = augment(tile, label, weight, SEED, AugmentConfig())
    again = augment(tile, label, weight, SEED, AugmentConfig())
    other = augment(tile, label, weight, tf.constant([5, 10], tf.int64), AugmentConfig())
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], other[0])


def test_bilinear_image_interpolation_is_configurable():
    tile, label, weight = _example()
    cubic = augment(tile, label, weight, SEED, AugmentConfig(**dict(OFF, elastic=True)))
    linear = augment(tile, label, weight, SEED, AugmentConfig(**dict(OFF, elastic=True, interpolation="bilinear")))
    np.testing.assert_array_equal(cubic[1], linear[1])
    assert not np.array_equal(cubic[0], linear[0])


def _colour_example(size=60):
    """`_example` with two more channels of their own: an inverted and a noise channel."""
    tile, label, weight = _example(size)
    noise = np.random.default_rng(1).standard_normal(tile.shape).astype(np.float32)
    return np.concatenate([tile, -tile, noise], axis=-1), label, weight


def test_a_colour_tile_is_augmented_as_each_of_its_channels_alone():
    colour, label, weight = _colour_example()
    config = AugmentConfig(brightness=0.2, contrast=0.2, gamma=0.3)  # and every geometric switch on
    tile, new_label, new_weight = augment(colour, label, weight, SEED, config)
    for channel in range(3):
        alone = augment(colour[..., channel : channel + 1], label, weight, SEED, config)
        np.testing.assert_allclose(tile[..., channel], alone[0][..., 0], atol=1e-5)
        np.testing.assert_array_equal(new_label, alone[1])
        np.testing.assert_array_equal(new_weight, alone[2])


@pytest.mark.parametrize("implementation", ["kernel", "xla"])
def test_both_warps_of_augmentation_resample_every_channel_alike(implementation):
    # augment takes the compiled kernel where it is built, else the XLA-compiled graph.
    if implementation == "kernel" and custom_op.load() is None:
        pytest.skip("the compiled warp kernel cannot be built here")
    colour, label, weight = _colour_example()
    field = displacement_field(label.shape, SEED, 3, 10.0)

    def warped(tile):
        if implementation == "kernel":
            return warp_example(tile, label, weight, field, "bicubic", implementation="kernel")[0]
        return augmentation._compiled_warp_example(tile, label, weight, field, "bicubic")[0]

    together = warped(colour).numpy()
    for channel in range(3):
        np.testing.assert_allclose(together[..., channel], warped(colour[..., channel : channel + 1])[..., 0],
                                   atol=1e-5)
