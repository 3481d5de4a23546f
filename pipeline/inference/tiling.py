"""Overlap-tile prediction with mirror extrapolation (Ronneberger et al. 2015, fig. 2).

Valid convolutions make every output pixel depend on `context(depth)` input pixels on
each side, so an image of any size is mirror-padded by that context, cut into tiles,
and the tiles' outputs are stitched. Tile offsets are multiples of 2^(depth-1), so every
tile's max-pooling grid coincides with that of the whole padded image: the stitched
result equals one pass of the network over the padded image, with the memory of one
batch of tiles.

Only TensorFlow ops run at prediction time (no numpy, no Python loop over tiles), so the
function traces into a `tf.function` / SavedModel signature with dynamic height and width.

Since every usable tile gives that same result, the tile side is free: each image gets the
side up to `predict.tile_size` whose tiles cost the network the fewest input pixels
(`fitted_tile`), chosen in graph ops from the image's dynamic size.

The tile loop itself, `predict_padded`, runs over any region of the padded image whose
origin is a multiple of the step: the whole padded image here, one chunk of an image
larger than memory in `large_image`, which reads the same padded pixels (`padding` says
how far the whole image is padded) and so gets the same output. Chunks keep the tile
`predict.tile_size`, to whose steps `chunk_grid` aligns them: they are large, where a
fitted tile would gain little.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import tensorflow as tf

from pipeline.errors import PipelineError
from pipeline.mirror import mirror_pad
from pipeline.sizes import alignment, context, output_size, prediction_tile_problem, valid_input_sizes

# A network's forward pass for inference: [N, T, T, C] float32 tiles -> [N, t, t, K] float32.
Network = Callable[[tf.Tensor], tf.Tensor]
# (tile side, output side, margin, step) of the tiles of one pass: Python ints for a fixed
# tile, scalar int32 tensors for one chosen per image (`fitted_tile`).
Geometry = tuple[int | tf.Tensor, int | tf.Tensor, int | tf.Tensor, int | tf.Tensor]


def tile_geometry(tile_size: int, depth: int, padding: str = "valid") -> tuple[int, int, int]:
    """(output side, margin, step between tiles) for a tile side; raises if unusable."""
    problem = prediction_tile_problem(tile_size, depth, padding)
    if problem:
        raise PipelineError(f"tile size {tile_size}: {problem}")
    out, align = output_size(tile_size, depth, padding), alignment(depth)
    return out, context(depth, padding), out // align * align


def usable_tile_sides(largest: int, depth: int, padding: str = "valid") -> list[int]:
    """Every tile side overlap-tile prediction can use up to `largest`, the largest first.

    Raises as `tile_geometry` does if `largest` itself is unusable, so that a wrong
    `predict.tile_size` is refused, not silently replaced by a smaller side.
    """
    tile_geometry(largest, depth, padding)
    return [side for side in reversed(valid_input_sizes(depth, 1, largest, padding))
            if not prediction_tile_problem(side, depth, padding)]


def fitted_tile(height: int | tf.Tensor, width: int | tf.Tensor, largest: int, depth: int,
                padding: str = "valid") -> Geometry:
    """The tiles for an image of `height` x `width`: of the usable sides up to `largest`, the one
    whose tiles give the network the fewest input pixels, as (tile, out, margin, step) tensors.

    Why choose per image: tiles cover the image in whole steps, so one fixed side can cost
    far more than the image. The `cpu` preset's 508 px tiles step 416 px, so a 512 px
    image takes four of them, 1.03 Mpx of network input for 0.26 Mpx of image, where four
    348 px tiles (256 px steps) take 0.48 Mpx. Every usable side gives the same output
    (one pass of the network over the mirror-padded image), so the side only changes the
    work, which the convolutions make proportional to the input pixels: tiles down x
    tiles across x side² (measured: 2.6x faster at 512 px, BENCHMARKS.md). `largest`
    (`predict.tile_size`) bounds the memory of a batch of tiles, so no side above it is
    taken. Of equal costs the larger side wins: fewer network calls. In TensorFlow ops on
    a height and width that may be dynamic, so that a traced graph (the SavedModel's
    signatures) chooses per image; the sides and their geometry are a static table from
    `tile_geometry`, their one owner.
    """
    sides = usable_tile_sides(largest, depth, padding)
    table = tf.constant([(side, *tile_geometry(side, depth, padding)) for side in sides], tf.int32)
    steps = tf.cast(table[:, 3], tf.int64)
    tiles = (tf.cast(height, tf.int64) + steps - 1) // steps * ((tf.cast(width, tf.int64) + steps - 1) // steps)
    cost = tiles * tf.cast(table[:, 0], tf.int64) ** 2
    # tf.argmin leaves the index among equal minima unspecified: the rank (largest side
    # first) breaks ties, added below the cost's unit.
    chosen = table[tf.argmin(cost * len(sides) + tf.range(len(sides), dtype=tf.int64))]
    return chosen[0], chosen[1], chosen[2], chosen[3]


def overlap_tile_predict(
    model: keras.Model,
    image: tf.Tensor,
    depth: int,
    tile_size: int,
    tiles_per_batch: int = 4,
    test_time_augmentation: bool = False,
    padding: str = "valid",
    network: Network | None = None,
    fitted: bool = True,
) -> tf.Tensor:
    """Runs `model` over an image of any size by overlapping, aligned tiles.

    Args:
        model: a U-Net of `depth` levels accepting [N, T, T, C] for any valid T.
        image: [H, W, C] float32, already normalised; H and W may be dynamic.
        depth: the network's number of resolution levels.
        tile_size: the largest tile side, which bounds memory; valid for `depth` and usable
            by `tile_geometry`. The tiles used are the cheapest usable side up to it for
            this image (`fitted_tile`).
        tiles_per_batch: tiles run through the network at once (at least 1); bounds the memory.
        test_time_augmentation: average the outputs for the 8 rotations and flips of the
            image (the paper averaged rotated versions for ISBI 2012); 8 times the work.
        padding: the network's convolutions; "same" nets get no context, so their
            tiles abut and the result is not exact at tile borders.
        network: what computes `model`'s output for a batch of tiles, if not the Keras
            model itself: another engine running the same network, on the same tiles
            (bench/bench_onnx.py measures ONNX Runtime so).
        fitted: False tiles every image with `tile_size` itself, the same output with more
            work on most sizes (the benchmarks' "before", and the tests' reference).

    Returns:
        [H, W, K] network output (class probabilities), exactly the input's size.
    """
    fixed = (tile_size, *tile_geometry(tile_size, depth, padding))  # refuses an unusable tile_size
    image = tf.convert_to_tensor(image, tf.float32)
    run = network or keras_network(model)
    classes = model.output_shape[-1]

    def stitched(view: tf.Tensor) -> tf.Tensor:
        # Each view chooses its own tiles, from its own height and width.
        shape = tf.shape(view)
        geometry = fitted_tile(shape[0], shape[1], tile_size, depth, padding) if fitted else fixed
        return _stitched_tiles(run, classes, view, geometry, tiles_per_batch)

    if not test_time_augmentation:
        return stitched(image)
    outputs = []
    for quarter_turns in range(4):
        for flip in (False, True):
            view = tf.image.rot90(image, quarter_turns)
            view = tf.reverse(view, [1]) if flip else view
            output = stitched(view)
            output = tf.reverse(output, [1]) if flip else output
            outputs.append(tf.image.rot90(output, (4 - quarter_turns) % 4))
    return tf.add_n(outputs) / len(outputs)


def padding(size: int | tf.Tensor, out: int | tf.Tensor, margin: int | tf.Tensor,
            step: int | tf.Tensor) -> tuple[int | tf.Tensor, int | tf.Tensor]:
    """(before, after): how far overlap-tile prediction mirror-pads an axis of `size` pixels.

    `margin` before; after, the margin and whatever completes the last tile's window, so
    that the padded side is tile_size + (tiles - 1) * step, itself a valid input size.
    Each argument may be a Python int or a scalar int32 tensor.
    """
    tiles = (size + step - 1) // step
    return margin, margin + tiles * step - size + out - step


def _stitched_tiles(
    network: Network, classes: int, image: tf.Tensor, geometry: Geometry, tiles_per_batch: int
) -> tf.Tensor:
    """The overlap-tile pass proper, for one orientation of the image and its tiles' `geometry`."""
    tile_size, out, margin, step = geometry
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    padded = mirror_pad(image, *padding(height, out, margin, step), *padding(width, out, margin, step))
    mosaic = predict_padded(network, padded, tile_size, step, tiles_per_batch)
    # The reshapes lose the static class count, which serving signatures should advertise.
    return tf.ensure_shape(mosaic[:height, :width], [None, None, classes])


def keras_network(model: keras.Model) -> Network:
    """The Keras model as a `Network`: its inference call on a batch of tiles."""
    return lambda tiles: model(tiles, training=False)


def predict_padded(network: Network, padded: tf.Tensor, tile_size: int | tf.Tensor, step: int | tf.Tensor,
                   tiles_per_batch: int) -> tf.Tensor:
    """The tile loop: the network's output for a mirror-padded region, [rows * step, cols * step, K].

    `padded` is [tile_size + (rows - 1) * step, tile_size + (cols - 1) * step, C] of
    normalised input; tiles are cut at every multiple of `step` and each keeps the
    [:step, :step] corner of its output, so the result for a region whose origin is a
    multiple of `step` in the whole padded image equals that part of the whole image's.
    `tile_size` and `step` are Python ints (static tile shapes) or scalar int32 tensors
    (a tile chosen per image).
    """
    side = _static(tile_size)  # a tile chosen per image has its side known only when it runs
    rows = (tf.shape(padded)[0] - tile_size) // step + 1
    cols = (tf.shape(padded)[1] - tile_size) // step + 1
    count = rows * cols

    def cut(origin: tf.Tensor) -> tf.Tensor:
        return tf.slice(padded, [origin[0], origin[1], 0], [tile_size, tile_size, -1])

    def predict_batch(first: tf.Tensor, outputs: tf.TensorArray):
        ids = tf.range(first, tf.minimum(first + tiles_per_batch, count))
        origins = tf.stack([ids // cols * step, ids % cols * step], axis=1)
        # Slicing tile by tile keeps the inputs to one batch too, however wide the image. The
        # tiles' rank and channels stated: without them, the network in this loop ran 8%
        # slower on the same tiles (cpu preset, 2048 px).
        tiles = tf.map_fn(cut, origins, fn_output_signature=tf.TensorSpec([side, side, padded.shape[-1]], tf.float32))
        probabilities = network(tiles)[:, :step, :step, :]
        return first + tiles_per_batch, outputs.scatter(ids, tf.cast(probabilities, tf.float32))

    outputs = tf.TensorArray(tf.float32, size=count, element_shape=[_static(step), _static(step), None])
    # One batch at a time: parallel iterations would hold several batches' activations.
    _, outputs = tf.while_loop(
        lambda first, _: first < count, predict_batch, [0, outputs], parallel_iterations=1
    )
    # Kept blocks form a regular grid: [rows, cols, step, step, K] -> [rows*step, cols*step, K].
    grid = tf.reshape(outputs.stack(), [rows, cols, step, step, -1])
    return tf.reshape(tf.transpose(grid, [0, 2, 1, 3, 4]), [rows * step, cols * step, -1])


def _static(size: int | tf.Tensor) -> int | None:
    """A side as a static shape entry: the int itself, None for a tensor."""
    return size if isinstance(size, int) else None
