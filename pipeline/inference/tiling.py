"""Overlap-tile prediction with mirror extrapolation (Ronneberger et al. 2015, fig. 2).

Valid convolutions make every output pixel depend on `context(depth)` input pixels on
each side, so an image of any size is mirror-padded by that context, cut into tiles,
and the tiles' outputs are stitched. Tile offsets are multiples of 2^(depth-1), so every
tile's max-pooling grid coincides with that of the whole padded image: the stitched
result equals one pass of the network over the padded image, with the memory of one
batch of tiles.

Only TensorFlow ops run at prediction time (no numpy, no Python loop over tiles), so the
function traces into a `tf.function` / SavedModel signature with dynamic height and width.

The tile loop itself, `predict_padded`, runs over any region of the padded image whose
origin is a multiple of the step: the whole padded image here, one chunk of an image
larger than memory in `large_image`, which reads the same padded pixels (`padding` says
how far the whole image is padded) and so gets the same output.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import tensorflow as tf

from pipeline.errors import PipelineError
from pipeline.mirror import mirror_pad
from pipeline.sizes import alignment, context, output_size, prediction_tile_problem

# A network's forward pass for inference: [N, T, T, C] float32 tiles -> [N, t, t, K] float32.
Network = Callable[[tf.Tensor], tf.Tensor]


def tile_geometry(tile_size: int, depth: int, padding: str = "valid") -> tuple[int, int, int]:
    """(output side, margin, step between tiles) for a tile side; raises if unusable."""
    problem = prediction_tile_problem(tile_size, depth, padding)
    if problem:
        raise PipelineError(f"tile size {tile_size}: {problem}")
    out, align = output_size(tile_size, depth, padding), alignment(depth)
    return out, context(depth, padding), out // align * align


def overlap_tile_predict(
    model: keras.Model,
    image: tf.Tensor,
    depth: int,
    tile_size: int,
    tiles_per_batch: int = 4,
    test_time_augmentation: bool = False,
    padding: str = "valid",
    network: Network | None = None,
) -> tf.Tensor:
    """Runs `model` over an image of any size by overlapping, aligned tiles.

    Args:
        model: a U-Net of `depth` levels accepting [N, tile_size, tile_size, C].
        image: [H, W, C] float32, already normalised; H and W may be dynamic.
        depth: the network's number of resolution levels.
        tile_size: input tile side; valid for `depth` and usable by `tile_geometry`.
        tiles_per_batch: tiles run through the network at once (at least 1); bounds the memory.
        test_time_augmentation: average the outputs for the 8 rotations and flips of the
            image (the paper averaged rotated versions for ISBI 2012); 8 times the work.
        padding: the network's convolutions; "same" nets get no context, so their
            tiles abut and the result is not exact at tile borders.
        network: what computes `model`'s output for a batch of tiles, if not the Keras
            model itself: another engine running the same network, on the same tiles
            (bench/bench_onnx.py measures ONNX Runtime so).

    Returns:
        [H, W, K] network output (class probabilities), exactly the input's size.
    """
    out, margin, step = tile_geometry(tile_size, depth, padding)
    image = tf.convert_to_tensor(image, tf.float32)
    run = network or keras_network(model)
    classes = model.output_shape[-1]
    if not test_time_augmentation:
        return _stitched_tiles(run, classes, image, tile_size, out, margin, step, tiles_per_batch)
    outputs = []
    for quarter_turns in range(4):
        for flip in (False, True):
            view = tf.image.rot90(image, quarter_turns)
            view = tf.reverse(view, [1]) if flip else view
            output = _stitched_tiles(run, classes, view, tile_size, out, margin, step, tiles_per_batch)
            output = tf.reverse(output, [1]) if flip else output
            outputs.append(tf.image.rot90(output, (4 - quarter_turns) % 4))
    return tf.add_n(outputs) / len(outputs)


def padding(size: int | tf.Tensor, out: int, margin: int, step: int) -> tuple[int, int | tf.Tensor]:
    """(before, after): how far overlap-tile prediction mirror-pads an axis of `size` pixels.

    `margin` before; after, the margin and whatever completes the last tile's window, so
    that the padded side is tile_size + (tiles - 1) * step, itself a valid input size.
    `size` may be a Python int or a scalar int32 tensor.
    """
    tiles = (size + step - 1) // step
    return margin, margin + tiles * step - size + out - step


def _stitched_tiles(
    network: Network, classes: int, image: tf.Tensor, tile_size: int, out: int, margin: int, step: int,
    tiles_per_batch: int,
) -> tf.Tensor:
    """The overlap-tile pass proper, for one orientation of the image."""
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    padded = mirror_pad(image, *padding(height, out, margin, step), *padding(width, out, margin, step))
    mosaic = predict_padded(network, padded, tile_size, step, tiles_per_batch)
    # The reshapes lose the static class count, which serving signatures should advertise.
    return tf.ensure_shape(mosaic[:height, :width], [None, None, classes])


def keras_network(model: keras.Model) -> Network:
    """The Keras model as a `Network`: its inference call on a batch of tiles."""
    return lambda tiles: model(tiles, training=False)


def predict_padded(network: Network, padded: tf.Tensor, tile_size: int, step: int, tiles_per_batch: int) -> tf.Tensor:
    """The tile loop: the network's output for a mirror-padded region, [rows * step, cols * step, K].

    `padded` is [tile_size + (rows - 1) * step, tile_size + (cols - 1) * step, C] of
    normalised input; tiles are cut at every multiple of `step` and each keeps the
    [:step, :step] corner of its output, so the result for a region whose origin is a
    multiple of `step` in the whole padded image equals that part of the whole image's.
    """
    rows = (tf.shape(padded)[0] - tile_size) // step + 1
    cols = (tf.shape(padded)[1] - tile_size) // step + 1
    count = rows * cols

    def cut(origin: tf.Tensor) -> tf.Tensor:
        return tf.slice(padded, [origin[0], origin[1], 0], [tile_size, tile_size, -1])

    def predict_batch(first: tf.Tensor, outputs: tf.TensorArray):
        ids = tf.range(first, tf.minimum(first + tiles_per_batch, count))
        origins = tf.stack([ids // cols * step, ids % cols * step], axis=1)
        # Slicing tile by tile keeps the inputs to one batch too, however wide the image.
        tiles = tf.map_fn(cut, origins, fn_output_signature=tf.float32)
        probabilities = network(tiles)[:, :step, :step, :]
        return first + tiles_per_batch, outputs.scatter(ids, tf.cast(probabilities, tf.float32))

    outputs = tf.TensorArray(tf.float32, size=count, element_shape=[step, step, None])
    # One batch at a time: parallel iterations would hold several batches' activations.
    _, outputs = tf.while_loop(
        lambda first, _: first < count, predict_batch, [0, outputs], parallel_iterations=1
    )
    # Kept blocks form a regular grid: [rows, cols, step, step, K] -> [rows*step, cols*step, K].
    grid = tf.reshape(outputs.stack(), [rows, cols, step, step, -1])
    return tf.reshape(tf.transpose(grid, [0, 2, 1, 3, 4]), [rows * step, cols * step, -1])
