"""Whole-image inference: a trained model on images of any size, layout and numeric dtype.

The library that the predict, evaluate and export stages share, so that no stage imports
another. `load_model` reads a trained model file without its training configuration;
`segmentation_function` is the TensorFlow-only path from an image to its mask and class
probabilities (layout check, `normalize`, overlap-tile prediction of `tiling`,
threshold); `Segmenter` runs it on numpy images and the export traces it into the
SavedModel's signatures, so local and served predictions are the same computation.
`tile_function` is the export's `tile` signature: the bare network on checked tiles.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from pipeline.config.schema import Config
from pipeline.files import io
from pipeline.inference.labelling.graph import connected_components, without_small
from pipeline.inference.tiling import Network, overlap_tile_predict
from pipeline.normalization import normalize


def _as_batch(image: tf.Tensor, channels: int) -> tuple[tf.Tensor, tf.Tensor]:
    """[H, W], [H, W, C], [B, H, W] (C = 1) or [B, H, W, C] -> ([B, H, W, C], leading dims).

    For a 1-channel model, [H, W, 3|4] and [B, H, W, 3|4] are colour images, read as grey
    (their first channel) by `io.COLOUR_AS_GREY`, else refused: `io.grey_pixels`'s test,
    in graph ops so that it runs inside the SavedModel; so a [B, H, W] batch of
    images 3 or 4 pixels wide must come as [B, H, W, 1]. Any other layout, and an empty
    dimension, fail with a message listing the layouts. The leading dims are [] or [B], so
    that outputs can take the input's layout again.
    """
    shape = tf.shape(image, out_type=tf.int32)
    rank = tf.size(shape)
    last = tf.concat([[0], shape], 0)[-1]  # 0 for a scalar, whose shape has no last entry
    colour = tf.constant(channels == 1) & ((last == 3) | (last == 4))
    channel_axis = (rank == 4) | ((rank == 3) & ((last == channels) | colour))
    batch_axis = (rank == 4) | ((rank == 3) & ~channel_axis)
    valid = tf.reduce_all([
        (rank >= 2) & (rank <= 4),
        ~channel_axis | (last == channels) | colour,
        channel_axis | (channels == 1),
        tf.reduce_all(shape > 0),
    ])
    layouts = ("[H, W], [B, H, W], [H, W, 1] or [B, H, W, 1] (or a grey image stored as colour: [H, W, 3|4] "
               "or [B, H, W, 3|4])" if channels == 1 else f"[H, W, {channels}] or [B, H, W, {channels}]")
    check = tf.debugging.Assert(valid, [f"image must be {layouts}, with no empty dimension; got shape", shape])
    with tf.control_dependencies([check]):
        leading = tf.cast(batch_axis, tf.int32)
        depth = tf.where(channel_axis, last, 1) if channels == 1 else channels
        height, width = shape[leading], shape[leading + 1]
        batch = tf.reshape(image, tf.stack([tf.reduce_prod(shape[:leading]), height, width, depth]))
    if channels > 1:
        return batch, shape[:leading]
    # io.grey_pixels(batch, batch[:, :1, :1]).all(): true for [B, H, W, 1], whose slices are empty.
    grey = tf.reduce_all(tf.equal(batch[..., 1:3], batch[..., :1])) & tf.reduce_all(
        tf.equal(batch[..., 3:], batch[:, :1, :1, 3:]))
    colour_check = tf.debugging.Assert(grey, [f"{io.COLOUR_AS_GREY}; got shape", shape])
    with tf.control_dependencies([colour_check]):
        return batch[..., 0, tf.newaxis], shape[:leading]


def segmentation_function(
    model: keras.Model, config: Config, network: Network | None = None
) -> Callable[[tf.Tensor], dict[str, tf.Tensor]]:
    """Whole images -> {"mask", "probabilities"}: what `predict`, `evaluate` and the export run.

    Takes [H, W], [H, W, C], [B, H, W] (1-channel models) or [B, H, W, C] of any numeric
    dtype, and for a 1-channel model a grey image stored as colour ([H, W, 3|4] or
    [B, H, W, 3|4], by `io.COLOUR_AS_GREY`); normalises each image, predicts it tile by
    tile (the side up to `predict.tile_size` that costs the network least for its size,
    `tiling.fitted_tile`; with test-time augmentation if configured) and returns the mask
    (uint8, 255 = cell) and class probabilities in the input's layout. Written with
    TensorFlow ops only, so it traces into a SavedModel. `network`, if given, runs the
    tiles instead of the Keras model (`tiling.overlap_tile_predict`); one that is not
    TensorFlow ops (a `tf.numpy_function`) keeps the function out of a SavedModel.
    """
    channels, depth, tiles = config.model.input_channels, config.model.depth, config.predict
    classes = config.model.num_classes

    def segment(image: tf.Tensor) -> dict[str, tf.Tensor]:
        image = tf.cast(image, tf.float32)
        image = tf.debugging.assert_all_finite(image, "image contains NaN or infinite values")
        batch, leading = _as_batch(image, channels)
        probabilities = tf.map_fn(
            lambda one: overlap_tile_predict(
                model, normalize(one), depth, tiles.tile_size, tiles.tiles_per_batch, tiles.test_time_augmentation,
                config.model.padding, network,
            ),
            batch,
            fn_output_signature=tf.TensorSpec([None, None, classes], tf.float32),
        )
        mask = tf.cast(probabilities[..., 1] > tiles.threshold, tf.uint8) * 255
        spatial = tf.shape(mask)[1:]
        return {
            "mask": tf.reshape(mask, tf.concat([leading, spatial], 0)),
            "probabilities": tf.reshape(probabilities, tf.concat([leading, spatial, [classes]], 0)),
        }

    return segment


def png_segmentation_function(model: keras.Model, config: Config) -> Callable[[tf.Tensor], dict[str, tf.Tensor]]:
    """PNG files -> {"mask_bytes": PNG, "labels_bytes": 16-bit PNG}: requests of a realistic size.

    Takes one PNG (a string scalar) or a batch of them ([B] strings): 8- or 16-bit, grey,
    grey with alpha or colour, read by the same rules as `segmentation_function` (a
    1-channel model takes a colour PNG only as grey stored as colour). Returns per image
    the mask (8-bit PNG, 255 = cell) and the cells' labels (16-bit PNG, 0 = background,
    1..N): the 4-connected components of the mask without those under `predict.min_size`
    pixels, as `predict` labels them with `predict.instances=components` (the seeded
    watershed has no graph implementation). The `_bytes` suffix makes TF Serving's REST
    API answer with base64 (`{"b64": ...}`) instead of raw bytes.
    """
    segment = segmentation_function(model, config)
    min_size = config.predict.min_size

    def one(png: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        image = tf.io.decode_png(png, channels=0, dtype=tf.uint16)  # 8-bit scaled by 257: normalised away
        # Grey with alpha is colour's rule for a grey image: [grey, grey, grey, alpha].
        image = tf.cond(tf.shape(image)[-1] == 2, lambda: tf.gather(image, [0, 0, 0, 1], axis=-1), lambda: image)
        mask = tf.ensure_shape(segment(image)["mask"], [None, None])  # one image in, one mask out
        labels = without_small(connected_components(mask > 0), min_size)
        check = tf.debugging.Assert(tf.reduce_max(labels) <= 65535, [
            "more than 65,535 cells do not fit a 16-bit PNG; use serving_default and label its mask"])
        with tf.control_dependencies([check]):
            return tf.io.encode_png(mask[..., None]), tf.io.encode_png(tf.cast(labels, tf.uint16)[..., None])

    def segment_png(pngs: tf.Tensor) -> dict[str, tf.Tensor]:
        # An empty batch is refused, as the whole-image signatures refuse one, not answered with nothing.
        check = tf.debugging.Assert(tf.size(pngs) > 0, ["image_bytes must hold at least one PNG; got shape",
                                                        tf.shape(pngs)])
        with tf.control_dependencies([check]):
            masks, labels = tf.map_fn(one, tf.reshape(pngs, [-1]), fn_output_signature=(tf.string, tf.string))
        shape = tf.shape(pngs)
        return {"mask_bytes": tf.reshape(masks, shape), "labels_bytes": tf.reshape(labels, shape)}

    return segment_png


def tile_function(model: keras.Model, config: Config) -> Callable[[tf.Tensor], dict[str, tf.Tensor]]:
    """Tiles [N, T, T, C] float32, already normalised -> {"probabilities": the network's output}.

    T is `predict.tile_size` and C the model's channels. Checked in the graph before the
    network runs, as `segmentation_function` checks images: any other rank, channel count
    or tile size, an empty batch and NaN or infinite values fail with an
    InvalidArgumentError naming the expected shape. Unchecked, the network's kernels fail
    obscurely (oneDNN's "could not create a primitive descriptor"), answer a wrong channel
    count, or abort the whole process, a model server included.
    """
    channels, tile = config.model.input_channels, config.predict.tile_size
    expected = [tile, tile, channels]

    def run_tiles(tiles: tf.Tensor) -> dict[str, tf.Tensor]:
        shape = tf.shape(tiles, out_type=tf.int32)
        padded = tf.concat([shape, [0, 0, 0, 0]], 0)[:4]  # compares entry by entry whatever the rank
        valid = (tf.size(shape) == 4) & (padded[0] > 0) & tf.reduce_all(tf.equal(padded[1:], expected))
        check = tf.debugging.Assert(valid, [
            f"tiles must be [N, {tile}, {tile}, {channels}] with N > 0 ({tile} = predict.tile_size of this "
            f"export, {channels} channel(s)); got shape", shape])
        with tf.control_dependencies([check]):
            tiles = tf.debugging.assert_all_finite(tiles, "tiles contain NaN or infinite values")
        return {"probabilities": model(tf.ensure_shape(tiles, [None, *expected]), training=False)}

    return run_tiles


class Segmenter:
    """Probability of cell for whole images of any size, with a trained model."""

    def __init__(self, model: keras.Model, config: Config):
        self._segment = tf.function(
            segmentation_function(model, config), input_signature=[tf.TensorSpec(None, tf.float32)]
        )

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """[H, W, C] image of any dtype -> [H, W] float32 probability of cell."""
        return self._segment(tf.cast(image, tf.float32))["probabilities"][..., 1].numpy()


class Ensemble:
    """The mean probability of cell of several models, each segmenting with its own settings.

    Each member tiles the image as its `Config` says (depth, tile sizes and test-time
    augmentation may differ); their probabilities are averaged in float64. An ensemble of
    one model gives that model's probabilities exactly. `seconds` holds each member's
    time spent segmenting so far (its first image includes tracing its graph), so that a
    caller can set the ensemble's cost beside one model's, measured in the same pass.
    """

    def __init__(self, members: Sequence[tuple[keras.Model, Config]]):
        if not members:
            raise ValueError("an ensemble needs at least one model")
        self._segmenters = [Segmenter(model, config) for model, config in members]
        self.seconds = [0.0] * len(members)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """[H, W, C] image of any dtype -> [H, W] float32 mean probability of cell."""
        probabilities = []
        for index, segment in enumerate(self._segmenters):
            start = time.perf_counter()
            probabilities.append(segment(image))
            self.seconds[index] += time.perf_counter() - start
        if len(probabilities) == 1:  # the run's own model, every default command: no copy
            return probabilities[0]
        return np.mean(probabilities, axis=0, dtype=np.float64).astype(np.float32)


def load_model(path: Path) -> keras.Model:
    """The model in the .keras file `path`, for inference.

    Without its training configuration (loss, metrics, optimizer): inference needs none
    of it, and a plain `keras.saving.load_model(path, compile=False)` reads the same file
    without this project. Which file, and the error when a run has none, are the stages'
    (`rundir.require(run.best_model, "train")`): inference knows no run directories.
    """
    return keras.saving.load_model(path, compile=False)
