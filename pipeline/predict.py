"""Stage `predict`: segment TIFF/PNG images or stacks with `inference`, write masks and overlays."""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import keras
import numpy as np

from pipeline import io, rundir
from pipeline.config import Config
from pipeline.display import grey8
from pipeline.inference import Segmenter, load_model
from pipeline.rundir import RunDir


def overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """BGR picture of the image with predicted membranes (mask == 0) tinted red."""
    picture = cv2.cvtColor(grey8(image[..., 0]), cv2.COLOR_GRAY2BGR)
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
