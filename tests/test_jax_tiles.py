"""The numpy input pipeline of Keras' JAX and PyTorch backends (pipeline.training.numpy_tiles)
against the TensorFlow one: given the same draws, the same tiles.

The warp is held to the compiled kernel and the graph op with the same displacement field;
the field, the rotation, the flips and turns, the gray-value curve, the normalisation and
the validation tiles to their TensorFlow owners."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from pipeline.config.resolve import preset
from pipeline.config.schema import AugmentConfig
from pipeline.mirror import mirror_positions, mirror_positions_array
from pipeline.normalization import normalize, normalize_array
from pipeline.training import augmentation, custom_op, input_pipeline
from pipeline.training import elastic_warp as ew
from pipeline.training import numpy_tiles as nt

IMPLEMENTATIONS = ["graph", pytest.param("kernel", marks=pytest.mark.skipif(
    custom_op.load() is None, reason="the compiled warp kernel could not be built here"))]


def _wild_field(height: int, width: int, seed: int = 0) -> np.ndarray:
    """The paper's elastic field plus a rotation plus pixel noise: positions far past the
    borders (mirrored), fractions everywhere."""
    rng = np.random.default_rng(seed)
    nodes = rng.normal(0, 10, (2, 3, 3))
    field = nt.displacement_field((height, width), nodes) + nt.rotation_field((height, width), 0.7)
    return (field + rng.normal(0, 3, field.shape)).astype(np.float32)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "nearest"])
def test_the_numpy_warp_equals_tensorflows_with_the_same_field(interpolation, implementation):
    rng = np.random.default_rng(1)
    image = rng.normal(size=(45, 52, 2)).astype(np.float32)
    labels = rng.integers(0, 5, (45, 52, 1)).astype(np.int32)
    field = _wild_field(45, 52)
    expected = ew.warp(image, field, interpolation, implementation).numpy()
    np.testing.assert_allclose(nt.warp(image, field, interpolation), expected, atol=2e-5)
    # Integer images (labels) keep their dtype; nearest copies values exactly.
    expected_labels = ew.warp(labels, field, interpolation, implementation).numpy()
    warped_labels = nt.warp(labels, field, interpolation)
    assert warped_labels.dtype == np.int32
    if interpolation == "nearest":
        np.testing.assert_array_equal(warped_labels, expected_labels)
    else:  # rounding of a float that lies within 2e-5 of .5 may go either way
        assert np.mean(warped_labels != expected_labels) < 1e-3


def test_the_field_interpolates_tensorflows_own_draws_exactly_as_it_does():
    seed, shape = tf.constant([4, 2]), (61, 70)
    # displacement_field's own draw of the nodes, repeated here, through the numpy interpolation:
    nodes = tf.random.stateless_normal([2, 3, 3], seed, stddev=10.0, alg="philox").numpy()
    np.testing.assert_allclose(nt.displacement_field(shape, nodes), ew.displacement_field(shape, seed, 3, 10.0),
                               atol=1e-4)
    np.testing.assert_allclose(nt.grid_weights(70, 5), ew._grid_weights(tf.constant(70), 5), atol=1e-6)
    np.testing.assert_allclose(nt.rotation_field(shape, 2.1), ew.rotation_field(shape, 2.1), atol=1e-4)


def test_mirrored_positions_and_the_gray_value_curve_are_tensorflows():
    positions = np.linspace(-300, 300, 2001, dtype=np.float32)
    np.testing.assert_array_equal(mirror_positions_array(positions, 77), mirror_positions(positions, 77))
    tile = np.linspace(-40, 40, 801, dtype=np.float32)
    np.testing.assert_allclose(nt.gamma_curve(tile, 1.2), augmentation._gamma(tile, 1.2), rtol=1e-5, atol=1e-5)


def test_flips_and_turns_are_tensorflows():
    tile = np.arange(5 * 6 * 2, dtype=np.float32).reshape(5, 6, 2)
    label, weight = tile[..., 0].astype(np.int32), tile[..., 1]
    for turns in range(4):
        got = nt.flip_and_rotate90(tile, label, weight, True, turns, AugmentConfig())
        expected = tf.image.rot90(tf.reverse(tile, [1]), turns).numpy()
        np.testing.assert_array_equal(got[0], expected)
        np.testing.assert_array_equal(got[1], expected[..., 0])
        np.testing.assert_array_equal(got[2], expected[..., 1])


def test_normalisation_and_validation_tiles_are_tensorflows():
    rng = np.random.default_rng(2)
    images = np.concatenate([rng.integers(0, 60_000, (2, 200, 210, 1)), np.full((1, 200, 210, 1), 7)]).astype(np.uint16)
    np.testing.assert_allclose(normalize_array(images), normalize(images).numpy(), atol=1e-6)
    assert not normalize_array(images[2:]).any()  # a constant image: zeros
    labels, weights = rng.integers(0, 2, images.shape[:3]), rng.random(images.shape[:3]).astype(np.float32)
    train = preset("smoke").train
    for got, expected in zip(nt.validation_tiles(images, labels, weights, 3, train),
                             input_pipeline.validation_tiles(images, labels, weights, 3, train)):
        np.testing.assert_allclose(got, expected, atol=1e-6)


def _source(augment: AugmentConfig | None = None) -> nt.TileSource:
    rng = np.random.default_rng(3)
    images = rng.integers(0, 255, (3, 120, 130, 1)).astype(np.uint8)
    instances = rng.integers(0, 4, (3, 120, 130))
    weights = rng.random((3, 120, 130)).astype(np.float32) + 1
    config = preset("smoke")
    return nt.TileSource(images, instances > 0, weights, config.model.depth, config.train,
                         augment or AugmentConfig(), config.model.padding)


def test_tiles_are_a_function_of_seed_and_index_with_the_paper_augmentation():
    source = _source()
    tiles, labels, weights = source.batch(5)
    assert tiles.shape == (4, 92, 92, 1) and labels.shape == weights.shape == (4, 52, 52)
    assert tiles.dtype == weights.dtype == np.float32 and labels.dtype == np.int32
    assert set(np.unique(labels)) <= {0, 1} and weights.min() >= 1 - 1e-5  # nearest labels, interpolated weights
    for got, again in zip(source.batch(5), _source().batch(5)):
        np.testing.assert_array_equal(got, again)
    assert not np.array_equal(source.batch(6)[0], tiles)


def test_without_augmentation_a_tile_is_the_normalised_image_cut_at_its_position():
    source = _source(AugmentConfig(flip=False, rotate90=False, rotate=False, elastic=False, brightness=0.0,
                                   contrast=0.0, gamma=0.0))
    tile, label, weight = source.example(0)
    draws = np.random.default_rng([source.seed, 0]).random(3)
    n, y, x = int(draws[0] * 3), int(draws[1] * (120 - 52 + 1)), int(draws[2] * (130 - 52 + 1))
    np.testing.assert_array_equal(tile, source.images[n, y : y + 92, x : x + 92])
    np.testing.assert_array_equal(label, source.labels[n, y + 20 : y + 72, x + 20 : x + 72])


def test_worker_processes_give_the_stream_of_this_process_from_any_batch_on():
    source = _source()
    stream = nt.batches(source, first_batch=7, workers=1)
    try:
        for number in (7, 8, 9):
            for got, expected in zip(next(stream), source.batch(number)):
                np.testing.assert_array_equal(got, expected)
    finally:
        stream.close()


def test_the_elastic_field_has_the_configured_spread():
    config = dataclasses.replace(AugmentConfig(), rotate=False, elastic_sigma=10.0)
    rng = np.random.default_rng(0)
    corners = np.array([nt.geometric_field((40, 40), rng, config)[0, 0] for _ in range(400)])
    # The corner pixels move by exactly the corner node's vector: N(0, 10^2) per component.
    assert abs(corners.std() - 10) < 1.0 and abs(corners.mean()) < 1.0
