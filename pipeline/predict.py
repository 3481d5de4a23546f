"""Stage `predict`: segment TIFF/PNG images or stacks with overlap-tile prediction."""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import keras
import numpy as np
import tensorflow as tf

from pipeline import io, rundir
from pipeline.config import Config
from pipeline.input_pipeline import normalize
from pipeline.rundir import RunDir
from pipeline.tiling import overlap_tile_predict


def _as_batch(image: tf.Tensor, channels: int) -> tuple[tf.Tensor, tf.Tensor]:
    """[H, W], [H, W, C], [B, H, W] (C = 1) or [B, H, W, C] -> ([B, H, W, C], leading dims).

    For a 1-channel model, [H, W, 3|4] and [B, H, W, 3|4] are colour images, read as grey
    (their first channel) by `io.COLOUR_AS_GREY`, else refused; so a [B, H, W] batch of
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
    layouts = (f"[H, W], [B, H, W], [H, W, 1] or [B, H, W, 1] (or a grey image stored as colour: [H, W, 3|4] "
               f"or [B, H, W, 3|4])" if channels == 1 else f"[H, W, {channels}] or [B, H, W, {channels}]")
    check = tf.debugging.Assert(valid, [f"image must be {layouts}, with no empty dimension; got shape", shape])
    with tf.control_dependencies([check]):
        leading = tf.cast(batch_axis, tf.int32)
        depth = tf.where(channel_axis, last, 1) if channels == 1 else channels
        height, width = shape[leading], shape[leading + 1]
        batch = tf.reshape(image, tf.stack([tf.reduce_prod(shape[:leading]), height, width, depth]))
    if channels > 1:
        return batch, shape[:leading]
    # The same test as io.as_model_channels: true for [B, H, W, 1], whose slices are empty.
    grey = tf.reduce_all(tf.equal(batch[..., 1:3], batch[..., :1])) & tf.reduce_all(
        tf.equal(batch[..., 3:], batch[:, :1, :1, 3:]))
    colour_check = tf.debugging.Assert(grey, [f"{io.COLOUR_AS_GREY}; got shape", shape])
    with tf.control_dependencies([colour_check]):
        return batch[..., 0, tf.newaxis], shape[:leading]


def segmentation_function(model: keras.Model, config: Config):
    """Whole images -> {"mask", "probabilities"}: what `predict`, `evaluate` and the export run.

    Takes [H, W], [H, W, C], [B, H, W] (1-channel models) or [B, H, W, C] of any numeric
    dtype, and for a 1-channel model a grey image stored as colour ([H, W, 3|4] or
    [B, H, W, 3|4], by `io.COLOUR_AS_GREY`); normalises each image, predicts it tile by
    tile (with test-time augmentation if configured) and returns the mask (uint8, 255 =
    cell) and class probabilities in the input's layout. Written with TensorFlow ops
    only, so it traces into a SavedModel.
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
                config.model.padding,
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


class Segmenter:
    """Probability of cell for whole images of any size, with a trained model."""

    def __init__(self, model: keras.Model, config: Config):
        self._segment = tf.function(
            segmentation_function(model, config), input_signature=[tf.TensorSpec(None, tf.float32)]
        )

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """[H, W, C] image of any dtype -> [H, W] float32 probability of cell."""
        return self._segment(tf.cast(image, tf.float32))["probabilities"][..., 1].numpy()


def load_model(run: RunDir) -> keras.Model:
    """The best model of a run for inference, or an error saying to train first.

    Without its training configuration (loss, metrics, optimizer): inference needs none
    of it, and a plain `keras.saving.load_model(path, compile=False)` reads the same file
    without this project.
    """
    return keras.saving.load_model(rundir.require(run.best_model, "train"), compile=False)


def overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """BGR picture of the image with predicted membranes (mask == 0) tinted red."""
    grey = image[..., 0].astype(np.float64)
    low, high = np.percentile(grey, (0.5, 99.5))
    grey = np.clip((grey - low) / max(high - low, 1e-12) * 255, 0, 255).astype(np.uint8)
    picture = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
    tint = picture.copy()
    tint[mask == 0] = (0, 0, 255)
    return cv2.addWeighted(picture, 0.6, tint, 0.4, 0)


def run(
    config: Config,
    run: RunDir,
    input_path: Path | None = None,
    output_dir: Path | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Writes NAME_prob.tif, NAME_mask.tif and NAME_overlay*.png per input image or stack.

    Without an input, predicts the prepared test split of the run. The output folder,
    every input, existing outputs (refused unless `overwrite`) and the free space are
    checked before anything is written; an input's files appear together or not at all.
    """
    output_dir = Path(output_dir or run.predictions)
    io.check_output_folder(output_dir)
    stacks = _inputs(config, run, input_path)
    outputs = {name: _outputs(output_dir, name, len(stack)) for name, stack in stacks.items()}
    io.refuse_existing([path for paths in outputs.values() for path in paths], overwrite)
    # float32 probabilities, uint8 mask, at most 3 bytes per pixel of overlay PNG.
    io.check_free_space(output_dir, sum(8 * stack[..., 0].size for stack in stacks.values()))
    segment = Segmenter(load_model(run), config)
    run.save_config(config)
    progress = keras.utils.Progbar(sum(len(stack) for stack in stacks.values()), unit_name="image")
    for name, stack in stacks.items():
        probability = np.stack([_progress(segment(image), progress) for image in stack])
        mask = ((probability > config.predict.threshold) * 255).astype(np.uint8)
        with io.atomic_paths(outputs[name], overwrite) as (prob_path, mask_path, *overlay_paths):
            # A single image keeps its 2-D shape; a stack stays a stack.
            io.encode_tiff(prob_path, probability if len(stack) > 1 else probability[0])
            io.encode_tiff(mask_path, mask if len(stack) > 1 else mask[0])
            for image, image_mask, path in zip(stack, mask, overlay_paths):
                io.encode_png(path, overlay(image, image_mask))
        _remove_stale_overlays(output_dir, name, outputs[name])
    written = [path for paths in outputs.values() for path in paths]
    print(f"predicted {len(stacks)} input(s) -> {output_dir} ({len(written)} files)")
    return written


def _remove_stale_overlays(output_dir: Path, name: str, current: list[Path]) -> None:
    """Removes the overlays of an earlier input of this name (a longer stack, or a single
    image where there is now a stack) that `--overwrite` replaced."""
    pattern = re.compile(re.escape(name) + r"_overlay(_\d{3})?\.png")
    for path in output_dir.iterdir():
        if pattern.fullmatch(path.name) and path not in current:
            path.unlink()


def _progress(result: np.ndarray, progress: keras.utils.Progbar) -> np.ndarray:
    progress.add(1)
    return result


def _inputs(config: Config, run: RunDir, input_path: Path | None) -> dict[str, np.ndarray]:
    """Named [N, H, W, C] stacks: the given file or folder, else the run's test split."""
    if input_path is None:
        test = rundir.load_split(run, "test", config)
        # Prepared images of different sizes are padded to the largest: crop them back.
        return {f"test_{i:03d}": image[None, :height, :width]
                for i, (image, (height, width)) in enumerate(zip(test["images"], test["sizes"]))}
    channels = config.model.input_channels
    return {path.stem: io.read_stack(path, channels) for path in io.image_files(input_path)}


def _outputs(output_dir: Path, name: str, count: int) -> list[Path]:
    """[probability TIFF, mask TIFF, one overlay PNG per slice]."""
    overlays = [f"{name}_overlay.png"] if count == 1 else [f"{name}_overlay_{i:03d}.png" for i in range(count)]
    return [output_dir / f"{name}_prob.tif", output_dir / f"{name}_mask.tif"] + [output_dir / o for o in overlays]
