"""Overlap-tile prediction: exactness against one whole-image pass, batching, tracing, tile checks, TTA,
the tile fitted to each image."""

from __future__ import annotations

import functools
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipeline.config.schema import ModelConfig
from pipeline.errors import PipelineError
from pipeline.inference.tiling import fitted_tile, overlap_tile_predict, tile_geometry
from pipeline.mirror import mirror_pad
from pipeline.sizes import alignment, context, is_valid_input_size, output_size
from pipeline.training.model import unet


@functools.cache
def tiny_unet(depth: int = 3, input_channels: int = 1, num_classes: int = 2) -> keras.Model:
    keras.utils.set_random_seed(0)
    config = ModelConfig(
        depth=depth,
        base_filters=4,
        num_classes=num_classes,
        input_channels=input_channels,
        dropout=0.0,
    )
    return unet(config)


def random_image(height: int, width: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(height, width, channels)).astype(np.float32)


def whole_image_reference(model: keras.Model, image: np.ndarray, depth: int, tile: int) -> np.ndarray:
    """The network run once on the padded image that the tiles are cut from, cropped."""
    out, margin = output_size(tile, depth), context(depth)
    step = out // alignment(depth) * alignment(depth)
    height, width = image.shape[:2]
    rows, cols = -(-height // step), -(-width // step)
    padded = mirror_pad(
        image,
        margin,
        margin + rows * step - height + out - step,
        margin,
        margin + cols * step - width + out - step,
    )
    assert padded.shape[0] == tile + (rows - 1) * step
    assert padded.shape[1] == tile + (cols - 1) * step
    return model(padded[None], training=False)[0, :height, :width].numpy()


@pytest.mark.parametrize(
    "depth, tile, size",
    [
        (3, 60, (40, 40)),  # a multiple of the step (20)
        (3, 60, (50, 50)),  # not a multiple
        (3, 92, (50, 50)),  # smaller than the tile's output
        (3, 92, (37, 103)),  # non-square, several tiles across only
        (3, 44, (23, 18)),  # tiny tiles (step 4): many of them
        (3, 60, (7, 9)),  # smaller than the context (20)
        (3, 60, (1, 40)),  # a one-row strip
        (3, 60, (1, 1)),
        (2, 20, (13, 11)),  # depth 2: alignment 2, step 4
        (2, 30, (29, 31)),
        # From depth 4 on, the output side is not a multiple of the alignment: tile 108
        # gives 20 pixels but steps by 16, so only these cases test the aligned step.
        (4, 108, (50, 70)),
        (4, 100, (9, 30)),
        (4, 124, (67, 5)),
    ],
)
def test_tiles_equal_one_pass_over_the_padded_image(depth, tile, size):
    model = tiny_unet(depth)
    image = random_image(*size)
    result = overlap_tile_predict(model, image, depth, tile, tiles_per_batch=4).numpy()
    assert result.shape == (*size, 2)
    np.testing.assert_allclose(result, whole_image_reference(model, image, depth, tile), atol=1e-5)
    np.testing.assert_allclose(result.sum(axis=-1), 1.0, atol=1e-5)


def test_multichannel_input_and_three_classes():
    model = tiny_unet(3, input_channels=2, num_classes=3)
    image = random_image(45, 70, channels=2, seed=1)
    result = overlap_tile_predict(model, image, 3, 60, tiles_per_batch=3).numpy()
    assert result.shape == (45, 70, 3)
    np.testing.assert_allclose(result, whole_image_reference(model, image, 3, 60), atol=1e-5)


def test_batch_size_does_not_change_the_result():
    model = tiny_unet(3)
    image = random_image(61, 47, seed=2)
    results = [overlap_tile_predict(model, image, 3, 60, tiles_per_batch=n).numpy() for n in (1, 3, 64)]
    for other in results[1:]:
        np.testing.assert_allclose(other, results[0], atol=1e-6)


def test_inside_tf_function_with_dynamic_size():
    model = tiny_unet(3, input_channels=2)

    @tf.function(input_signature=[tf.TensorSpec([None, None, 2], tf.float32)])
    def predict(image):
        return overlap_tile_predict(model, image, 3, 60, tiles_per_batch=3)

    for size in [(50, 33), (21, 64)]:
        image = random_image(*size, channels=2, seed=3)
        traced = predict(tf.constant(image)).numpy()
        assert traced.shape == (*size, 2)
        assert predict.get_concrete_function().output_shapes.as_list() == [None, None, 2]
        eager = overlap_tile_predict(model, image, 3, 60, tiles_per_batch=3).numpy()
        np.testing.assert_allclose(traced, eager, atol=1e-6)
    assert predict.experimental_get_tracing_count() == 1


def test_a_network_outside_tensorflow_runs_the_same_tiles():
    # As bench/bench_onnx.py runs ONNX Runtime: numpy batches through tf.numpy_function, in a
    # traced graph of any image size. Here the engine is the model itself, called from numpy.
    model = tiny_unet(3)
    batches = []

    def engine(tiles: np.ndarray) -> np.ndarray:
        batches.append(tiles.shape)
        return model(tiles, training=False).numpy()

    def network(tiles: tf.Tensor) -> tf.Tensor:
        return tf.numpy_function(engine, [tiles], tf.float32, stateful=False)

    @tf.function(input_signature=[tf.TensorSpec([None, None, 1], tf.float32)])
    def predict(image):
        return overlap_tile_predict(model, image, 3, 60, tiles_per_batch=3, network=network)

    image = random_image(50, 61, seed=4)  # 3 x 4 tiles of 60 px, stepping 20
    result = predict(tf.constant(image)).numpy()
    np.testing.assert_allclose(result, overlap_tile_predict(model, image, 3, 60, tiles_per_batch=3).numpy(), atol=1e-6)
    assert batches == [(3, 60, 60, 1)] * 4


@pytest.mark.parametrize("tile", [61, 62, 10])
def test_invalid_tile_size_raises(tile):
    with pytest.raises(PipelineError, match=f"tile size {tile}: not a valid tile size for a U-Net of depth 3"):
        overlap_tile_predict(tiny_unet(3), random_image(8, 8), 3, tile)


@pytest.mark.parametrize("depth, tile, smallest", [(4, 92, 100), (5, 188, 204)])
def test_tile_with_output_smaller_than_the_alignment_raises(depth, tile, smallest):
    # Valid for the network, but a 4-pixel output cannot advance by a multiple of 8 or 16.
    with pytest.raises(PipelineError, match=f"tile size {tile}: gives a 4-pixel output .* tile size is {smallest}"):
        overlap_tile_predict(tiny_unet(depth), random_image(8, 8), depth, tile)


def test_test_time_augmentation_is_equivariant_and_averages_the_eight_views():
    keras.utils.set_random_seed(5)
    model = unet(ModelConfig(depth=3, base_filters=4, dropout=0.0))
    image = tf.constant(np.random.default_rng(6).normal(size=(37, 53, 1)).astype(np.float32))
    averaged = overlap_tile_predict(model, image, 3, 60, test_time_augmentation=True)
    # The average over all rotations and flips commutes with rotating the input.
    rotated = overlap_tile_predict(model, tf.image.rot90(image), 3, 60, test_time_augmentation=True)
    np.testing.assert_allclose(rotated.numpy(), np.rot90(averaged.numpy()), atol=1e-5)
    views = [
        np.rot90(np.fliplr(overlap_tile_predict(model, tf.image.flip_left_right(tf.image.rot90(image, k)), 3, 60)),
                 -k) for k in range(4)
    ] + [np.rot90(overlap_tile_predict(model, tf.image.rot90(image, k), 3, 60), -k) for k in range(4)]
    np.testing.assert_allclose(averaged.numpy(), np.mean(views, axis=0), atol=1e-5)
    assert not np.allclose(averaged.numpy(), overlap_tile_predict(model, image, 3, 60).numpy(), atol=1e-3)


def cheapest_side_by_enumeration(height: int, width: int, largest: int, depth: int, padding: str) -> int:
    """Every side from 1 to `largest` tried: those the network takes and whose output covers a tile
    step, costed as tiles x side² network pixels; the fewest, then the largest side."""
    costs = {}
    for side in range(1, largest + 1):
        if not is_valid_input_size(side, depth, padding) or output_size(side, depth, padding) < alignment(depth):
            continue
        step = output_size(side, depth, padding) // alignment(depth) * alignment(depth)
        costs[side] = math.ceil(height / step) * math.ceil(width / step) * side * side
    return min(costs, key=lambda side: (costs[side], -side))


@pytest.mark.parametrize("depth, largest, padding, sizes", [
    (4, 508, "valid", [(384, 384), (512, 512), (1024, 1024), (2048, 2048), (37, 1000), (1, 1), (600, 90)]),
    (5, 572, "valid", [(512, 512), (100, 700), (3, 3)]),
    (3, 92, "valid", [(7, 9), (30, 45), (130, 61), (70, 101)]),
    (2, 8, "same", [(4, 4), (5, 9), (12, 3)]),  # 4 x 4: one tile of 4 ties four of 2, the larger wins
])
def test_the_fitted_tile_is_the_cheapest_side_up_to_the_largest(depth, largest, padding, sizes):
    chosen = []
    for height, width in sizes:
        tile, out, margin, step = (int(value) for value in fitted_tile(height, width, largest, depth, padding))
        assert tile == cheapest_side_by_enumeration(height, width, largest, depth, padding), (height, width)
        assert (out, margin, step) == tile_geometry(tile, depth, padding)
        chosen.append(tile)
    assert len(set(chosen)) > 1  # the sizes do choose different tiles


def test_the_fitted_tile_is_chosen_in_a_traced_graph_per_image():
    @tf.function(input_signature=[tf.TensorSpec([], tf.int32), tf.TensorSpec([], tf.int32)])
    def choose(height, width):
        return fitted_tile(height, width, 508, 4)[0]

    for size in (384, 512, 1024, 2048):
        assert int(choose(size, size)) == cheapest_side_by_enumeration(size, size, 508, 4, "valid")
    assert choose.experimental_get_tracing_count() == 1


@pytest.mark.parametrize("depth, largest, size, augment", [
    (3, 92, (7, 9), False),  # smaller than the context (20)
    (3, 92, (1, 1), False),
    (3, 92, (30, 45), False),  # non-square
    (3, 92, (130, 61), False),
    (3, 92, (130, 61), True),  # test-time augmentation turns it to 61 x 130
    (3, 92, (7, 30), True),
    (4, 204, (67, 5), False),
    (4, 204, (150, 90), True),
])
def test_fitted_tiles_give_the_fixed_tiles_output_and_the_whole_padded_image_pass(depth, largest, size, augment):
    model = tiny_unet(depth)
    image = random_image(*size, seed=7)
    assert int(fitted_tile(*size, largest, depth)[0]) < largest  # else both would cut the same tiles
    fitted = overlap_tile_predict(model, image, depth, largest, 3, test_time_augmentation=augment).numpy()
    fixed = overlap_tile_predict(model, image, depth, largest, 3, test_time_augmentation=augment, fitted=False)
    assert fitted.shape == (*size, 2)
    np.testing.assert_allclose(fitted, fixed.numpy(), atol=1e-5)
    if not augment:
        np.testing.assert_allclose(fitted, whole_image_reference(model, image, depth, largest), atol=1e-5)
