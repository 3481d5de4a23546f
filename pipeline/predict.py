"""Stage `predict`: segment TIFF/PNG images or stacks with `inference`, write masks, labels and overlays.

Per input NAME: the probability of cell, the mask at `predict.threshold`, the cell
instances (`pipeline.instances`, by `predict.instances` and `predict.min_size`) as a label
image and a CSV of their measurements, and overlays with each cell outlined in its colour.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import keras
import numpy as np

from pipeline import instances, io, rundir
from pipeline.config import Config
from pipeline.console import progress_bar
from pipeline.display import bgr8
from pipeline.inference import Segmenter, load_model
from pipeline.rundir import RunDir


# Outline colours (BGR), cell k in OUTLINE_COLOURS[(k - 1) % 9]: matplotlib's "tab10"
# without its grey, which would vanish in the grey picture. Cells are numbered in raster
# order, so neighbours along a row get different colours.
OUTLINE_COLOURS = np.array([(180, 119, 31), (14, 127, 255), (44, 160, 44), (40, 39, 214), (189, 103, 148),
                            (75, 86, 140), (194, 119, 227), (34, 189, 188), (207, 190, 23)], np.uint8)


def overlay(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """BGR picture of the image (in colour where it is RGB) with each cell of `labels` outlined in its colour.

    Only the outlines are drawn, so the membranes the segmentation is judged by stay visible.
    """
    picture = bgr8(image)
    edge = instances.outlines(labels)
    picture[edge] = OUTLINE_COLOURS[(labels[edge] - 1) % len(OUTLINE_COLOURS)]
    return picture


def run(
    config: Config,
    run: RunDir,
    input_path: Path | None = None,
    output_dir: Path | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Writes NAME_prob.tif, NAME_mask.tif, NAME_labels.tif, NAME_instances.csv and
    NAME_overlay*.png per input image or stack; the TIFFs keep the input's pixel size.

    Without an input, predicts the prepared test split of the run. The output folder,
    every input, existing outputs (refused unless `overwrite`) and the free space are
    checked before anything is written; an input's files appear together or not at all.
    """
    output_dir = Path(output_dir or run.predictions)
    io.check_output_folder(output_dir)
    stacks = _inputs(config, run, input_path)
    outputs = {name: _outputs(output_dir, name, len(stack)) for name, stack in stacks.items()}
    io.refuse_existing([path for paths in outputs.values() for path in paths], overwrite)
    # float32 probabilities, uint8 mask, uint16 (rarely uint32) labels, at most 3 bytes per
    # pixel of overlay PNG; the CSV, a line per cell, is small beside them.
    io.check_free_space(output_dir, sum(12 * stack[..., 0].size for stack in stacks.values()))
    segment = Segmenter(load_model(run), config)
    run.save_config(config)
    calibrations = _calibrations(input_path)
    progress = progress_bar(sum(len(stack) for stack in stacks.values()), "image")
    for name, stack in stacks.items():
        probability = np.stack([_progress(segment(image), progress) for image in stack])
        # Slice by slice: comparing in double precision makes a float64 copy of what it compares.
        mask = np.stack([instances.cell_mask(p, config.predict.threshold) for p in probability]).astype(np.uint8) * 255
        labels = instances.cell_instances(probability, config.predict.threshold, config.predict.instances,
                                          config.predict.min_size)
        with io.atomic_paths(outputs[name], overwrite) as (prob_path, mask_path, labels_path, csv_path,
                                                           *overlay_paths):
            # A single image keeps its 2-D shape; a stack stays a stack.
            single, calibration = len(stack) == 1, calibrations.get(name)
            io.encode_tiff(prob_path, probability[0] if single else probability, calibration)
            io.encode_tiff(mask_path, mask[0] if single else mask, calibration)
            io.encode_tiff(labels_path, instances.label_image(labels[0] if single else labels), calibration)
            _write_measurements(csv_path, labels, probability, single)
            for image, image_labels, path in zip(stack, labels, overlay_paths):
                io.encode_png(path, overlay(image, image_labels))
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


def _write_measurements(path: Path, labels: np.ndarray, probability: np.ndarray, single: bool) -> None:
    """Writes each cell's `instances.COLUMNS` as CSV into `path`, for a stack with its slice first."""
    rows = []
    for index, (slice_labels, slice_probability) in enumerate(zip(labels, probability)):
        for label, area, y, x, first_row, first_col, last_row, last_col, mean in instances.measure(
                slice_labels, slice_probability):
            row = [int(label), int(area), f"{y:.3f}", f"{x:.3f}", int(first_row), int(first_col), int(last_row),
                   int(last_col), f"{mean:.6f}"]
            rows.append(row if single else [index, *row])
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(instances.COLUMNS if single else ("slice", *instances.COLUMNS))
        writer.writerows(rows)


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


def _calibrations(input_path: Path | None) -> dict[str, io.Calibration | None]:
    """The pixel size each input file declares, which its TIFF outputs keep."""
    if input_path is None:  # the prepared test split keeps none
        return {}
    return {path.stem: io.read_calibration(path) for path in io.image_files(input_path)}


def _outputs(output_dir: Path, name: str, count: int) -> list[Path]:
    """[probability TIFF, mask TIFF, labels TIFF, measurements CSV, one overlay PNG per slice]."""
    overlays = [f"{name}_overlay.png"] if count == 1 else [f"{name}_overlay_{i:03d}.png" for i in range(count)]
    files = [f"{name}_prob.tif", f"{name}_mask.tif", f"{name}_labels.tif", f"{name}_instances.csv", *overlays]
    return [output_dir / file for file in files]
