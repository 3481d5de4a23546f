"""Stage `predict`: segment TIFF/PNG images or stacks with overlap-tile prediction."""

from __future__ import annotations

from pathlib import Path

import cv2
import keras
import numpy as np
import tensorflow as tf

from pipeline import io, rundir
from pipeline.config import Config
from pipeline.input_pipeline import normalize
from pipeline.tiling import overlap_tile_predict


class Segmenter:
    """Probability of cell for whole images of any size, with a trained model."""

    def __init__(self, model: keras.Model, config: Config):
        depth, tiles = config.model.depth, config.predict

        @tf.function(input_signature=[tf.TensorSpec([None, None, config.model.input_channels])])
        def probability(image: tf.Tensor) -> tf.Tensor:
            output = overlap_tile_predict(model, normalize(image), depth, tiles.tile_size, tiles.tiles_per_batch)
            return output[..., 1]

        self._probability = probability

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """[H, W, C] image of any dtype -> [H, W] float32 probability of cell."""
        return self._probability(tf.cast(image, tf.float32)).numpy()


def load_model(run_dir: Path) -> keras.Model:
    """The best model of a run, or an error saying to train first."""
    return keras.models.load_model(rundir.require(rundir.best_model(run_dir), "train"))


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
    run_dir: Path,
    input_path: Path | None = None,
    output_dir: Path | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Writes NAME_prob.tif, NAME_mask.tif and NAME_overlay*.png per input image or stack.

    Without an input, predicts the prepared test split of the run. All inputs are read
    and checked, and existing outputs refused (unless `overwrite`), before anything is
    written; each file appears only once it is complete.
    """
    output_dir = Path(output_dir or Path(run_dir) / "predictions")
    stacks = _inputs(config, run_dir, input_path)
    outputs = {name: _outputs(output_dir, name, len(stack)) for name, stack in stacks.items()}
    io.refuse_existing([path for paths in outputs.values() for path in paths], overwrite)
    segment = Segmenter(load_model(run_dir), config)
    progress = keras.utils.Progbar(sum(len(stack) for stack in stacks.values()), unit_name="image")
    for name, stack in stacks.items():
        probability = np.stack([_progress(segment(image), progress) for image in stack])
        mask = ((probability > config.predict.threshold) * 255).astype(np.uint8)
        prob_path, mask_path, *overlay_paths = outputs[name]
        # A single image keeps its 2-D shape; a stack stays a stack.
        io.write_tiff(prob_path, probability if len(stack) > 1 else probability[0], overwrite)
        io.write_tiff(mask_path, mask if len(stack) > 1 else mask[0], overwrite)
        for image, image_mask, path in zip(stack, mask, overlay_paths):
            io.write_png(path, overlay(image, image_mask), overwrite)
    written = [path for paths in outputs.values() for path in paths]
    print(f"predicted {len(stacks)} input(s) -> {output_dir} ({len(written)} files)")
    return written


def _progress(result: np.ndarray, progress: keras.utils.Progbar) -> np.ndarray:
    progress.add(1)
    return result


def _inputs(config: Config, run_dir: Path, input_path: Path | None) -> dict[str, np.ndarray]:
    """Named [N, H, W, C] stacks: the given file or folder, else the run's test split."""
    if input_path is None:
        test = rundir.load_split(run_dir, "test", config)["images"]
        return {f"test_{i:03d}": image[None] for i, image in enumerate(test)}
    channels = config.model.input_channels
    return {path.stem: io.read_stack(path, channels) for path in io.image_files(input_path)}


def _outputs(output_dir: Path, name: str, count: int) -> list[Path]:
    """[probability TIFF, mask TIFF, one overlay PNG per slice]."""
    overlays = [f"{name}_overlay.png"] if count == 1 else [f"{name}_overlay_{i:03d}.png" for i in range(count)]
    return [output_dir / f"{name}_prob.tif", output_dir / f"{name}_mask.tif"] + [output_dir / o for o in overlays]
