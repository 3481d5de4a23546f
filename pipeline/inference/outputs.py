"""The files predict writes for one input, and the failures list of a batch.

Per input NAME, in the output folder: `NAME_prob.tif` (float32 probability of cell),
`NAME_mask.tif` (uint8, 255 = cell), `NAME_labels.tif` (the cell instances of
`pipeline.inference.labelling.instances`, with a LUT that Fiji shows them in),
`NAME_instances.csv` (their measurements, in pixels and, where the input declares its pixel
size in a length unit, in that unit too) and `NAME_overlay.png`
(each cell outlined in its colour), or `NAME_overlay_NNN.png` per slice of a stack. The
TIFFs keep the input's pixel size. An input larger than memory (`Source.large`), which
`inference.large_image` segments chunk by chunk, gets the same names without overlays, as
OME-Zarr images `NAME_prob.ome.zarr` ... for an OME-Zarr input (`large_paths`). This
module names every output of the predict stage. An input's files are written together or not at all
(`io.atomic_paths`), so a rerun, or a retried Beam bundle, replaces them with identical
bytes and never leaves part of a group.

Both runners of the predict stage, in this process and on Apache Beam, write through
`write`: their files are byte-identical. A Beam batch also writes `failures.csv`, a row
(file, reason) per input it could not segment.
"""

from __future__ import annotations

import colorsys
import csv
import dataclasses
import re
import sys
from pathlib import Path

import numpy as np

from pipeline.config.schema import Config
from pipeline.display import bgr8
from pipeline.files import io
from pipeline.inference.labelling import instances

FAILURES = "failures.csv"
FAILURE_COLUMNS = ("file", "reason")

# Outline colours (BGR), cell k in OUTLINE_COLOURS[(k - 1) % 9]: matplotlib's "tab10"
# without its grey, which would vanish in the grey picture. Cells are numbered in raster
# order, so neighbours along a row get different colours.
OUTLINE_COLOURS = np.array([(180, 119, 31), (14, 127, 255), (44, 160, 44), (40, 39, 214), (189, 103, 148),
                            (75, 86, 140), (194, 119, 227), (34, 189, 188), (207, 190, 23)], np.uint8)


# How NAME_labels.tif looks in Fiji: ImageJ shows a 16-bit image through a 256-entry LUT
# spread over its display range. Entry 0 (background) is black; entries 1..255 are bright
# colours whose hues step by the golden ratio of the circle, in three shades taken in turn,
# so that cells numbered one after another (neighbours along a row) differ.
def _label_lut() -> np.ndarray:
    """uint8 [3, 256]: the labels' LUT, rows red, green and blue."""
    colours = [(0.0, 0.0, 0.0)] + [colorsys.hsv_to_rgb(k * 0.618033988749895 % 1.0, (1.0, 0.6, 0.9)[k % 3],
                                                       (1.0, 1.0, 0.7)[k % 3]) for k in range(1, 256)]
    return np.round(np.array(colours).T * 255).astype(np.uint8)


LABEL_LUT = _label_lut()

# What ImageJ names an uncalibrated image's unit: no physical size, and nothing to notice.
_PIXEL_UNITS = ("pixel", "pixels", "px")

# The images every input gets, in the order `paths` and `large_paths` list them.
IMAGE_KINDS = ("prob", "mask", "labels")


@dataclasses.dataclass(frozen=True)
class Source:
    """An input file of the predict stage and whether it is segmented chunk by chunk, which
    `large_image.sources` decides once per input for every step that needs to know."""

    path: Path
    large: bool

    @property
    def name(self) -> str:
        """The NAME its outputs take (`io.image_name`)."""
        return io.image_name(self.path)


def paths(output_dir: Path, name: str, count: int) -> list[Path]:
    """[probability TIFF, mask TIFF, labels TIFF, measurements CSV, one overlay PNG per slice]
    of an input of `count` slices."""
    overlays = [f"{name}_overlay.png"] if count == 1 else [f"{name}_overlay_{i:03d}.png" for i in range(count)]
    files = [*(f"{name}_{kind}.tif" for kind in IMAGE_KINDS), f"{name}_instances.csv", *overlays]
    return [Path(output_dir) / file for file in files]


def large_paths(output_dir: Path, name: str, ome_zarr: bool) -> list[Path]:
    """[probability, mask, labels, measurements CSV] of an input segmented chunk by chunk:
    OME-Zarr images for an OME-Zarr input (`ome_zarr`), else TIFFs; no overlay."""
    suffix = ".ome.zarr" if ome_zarr else ".tif"
    return [Path(output_dir) / f"{name}_{kind}{suffix}" for kind in IMAGE_KINDS] + [
        Path(output_dir) / f"{name}_instances.csv"]


def existing(output_dir: Path, name: str) -> list[Path]:
    """The files of an input NAME read whole already in `output_dir`, whatever its earlier slice count.

    What a run must refuse to replace without `--overwrite`: known before the input is
    read, so a Beam batch can refuse them on the driver.
    """
    output_dir = Path(output_dir)
    fixed = [path for path in paths(output_dir, name, 1)[:4] if path.exists()]
    return fixed + _overlays(output_dir, name)


def existing_of(output_dir: Path, source: Source) -> list[Path]:
    """The files of an input file already in `output_dir`: a large input's (`large_paths`), else `existing`'s."""
    if source.large:
        return [path for path in large_paths(output_dir, source.name, io.is_ome_zarr(source.path)) if path.exists()]
    return existing(output_dir, source.name)


def _overlays(output_dir: Path, name: str) -> list[Path]:
    """The overlay PNGs of NAME in `output_dir`: NAME_overlay.png and NAME_overlay_NNN.png."""
    if not output_dir.is_dir():
        return []
    pattern = re.compile(re.escape(name) + r"_overlay(_\d{3})?\.png")
    return sorted(path for path in output_dir.iterdir() if pattern.fullmatch(path.name))


def overlay(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """BGR picture of the image (in colour where it is RGB) with each cell of `labels` outlined in its colour.

    Only the outlines are drawn, so the membranes the segmentation is judged by stay visible.
    """
    picture = bgr8(image)
    edge = instances.outlines(labels)
    picture[edge] = OUTLINE_COLOURS[(labels[edge] - 1) % len(OUTLINE_COLOURS)]
    return picture


def write(output_dir: Path, name: str, stack: np.ndarray, probability: np.ndarray, config: Config,
          calibration: io.Calibration | None, overwrite: bool) -> list[Path]:
    """Writes an input's files from its [N, H, W, C] stack and [N, H, W] probability of cell;
    returns their paths.

    The mask is the probability above `predict.threshold`; the cells are
    `instances.cell_instances` by `predict.instances` and `predict.min_size`. A single
    image keeps its 2-D shape in the TIFFs; a stack stays a stack. Overlays of an earlier
    input of this name that the new files do not replace (a longer stack) are removed.
    """
    predict = config.predict
    # Slice by slice: comparing in double precision makes a float64 copy of what it compares.
    mask = np.stack([instances.cell_mask(p, predict.threshold) for p in probability]).astype(np.uint8) * 255
    labels = instances.cell_instances(probability, predict.threshold, predict.instances, predict.min_size)
    targets = paths(output_dir, name, len(stack))
    single = len(stack) == 1
    with io.atomic_paths(targets, overwrite) as (prob_path, mask_path, labels_path, csv_path, *overlay_paths):
        io.encode_tiff(prob_path, probability[0] if single else probability, calibration)
        io.encode_tiff(mask_path, mask[0] if single else mask, calibration)
        stored = instances.label_image(labels[0] if single else labels)
        io.encode_tiff(labels_path, stored, calibration, label_display(stored))
        write_measurements(csv_path, labels, probability, single, physical_size(calibration, targets[3]))
        for image, image_labels, path in zip(stack, labels, overlay_paths):
            io.encode_png(path, overlay(image, image_labels))
    for stale in set(_overlays(Path(output_dir), name)) - set(targets):
        stale.unlink(missing_ok=True)  # missing: another attempt at this input removed it first
    return targets


def label_display(labels: np.ndarray) -> dict:
    """ImageJ metadata that shows a label image in `LABEL_LUT` in Fiji (`io.encode_tiff`'s `display`).

    The display range is 0..255 where the labels end there, so that cell k takes entry k;
    beyond, 0..the last label, over which ImageJ spreads the 256 entries (runs of
    consecutive cells share a colour). The pixels stay the labels.
    """
    return {"LUTs": [LABEL_LUT], "min": 0, "max": max(255, int(labels.max(initial=0)))}


def physical_size(calibration: io.Calibration | None, target: Path) -> io.Calibration | None:
    """The pixel size that the measurements `target` adds physical columns in: the input's, its
    unit as `io.length_unit` names it; None (pixels only) without one.

    A declared size whose unit is no length unit (none, "pixel", "inch", an unknown
    spelling) is never guessed: pixels only, with a one-line notice naming `target`
    (none for "pixel", which declares no physical size).
    """
    if calibration is None or calibration.unit in _PIXEL_UNITS:
        return None
    unit = io.length_unit(calibration.unit)
    if unit is None:
        declared = f"is in {calibration.unit!r}, not a length unit" if calibration.unit else "has no unit"
        print(f"notice: {target}: in pixels only: the input's pixel size {declared} "
              f"(physical columns take {', '.join(io.LENGTH_UNITS)})", file=sys.stderr)
        return None
    return io.Calibration(calibration.x, calibration.y, unit, calibration.z)


def measurement_columns(size: io.Calibration | None) -> tuple[str, ...]:
    """The header of NAME_instances.csv: `instances.COLUMNS`, then with a pixel `size` (from
    `physical_size`) area, centroid and box in its unit, which each column's name ends with."""
    if size is None:
        return instances.COLUMNS
    unit = size.unit
    return (*instances.COLUMNS, f"area_{unit}2", f"centroid_y_{unit}", f"centroid_x_{unit}", f"min_y_{unit}",
            f"min_x_{unit}", f"max_y_{unit}", f"max_x_{unit}")


def write_measurements(path: Path, labels: np.ndarray, probability: np.ndarray, single: bool,
                       size: io.Calibration | None = None) -> None:
    """Writes each cell's `measurement_columns` as CSV into `path`, for a stack with its slice first."""
    rows = []
    for index, (slice_labels, slice_probability) in enumerate(zip(labels, probability)):
        for cell in instances.measure(slice_labels, slice_probability):
            row = measurement_row(*cell, size=size)
            rows.append(row if single else [index, *row])
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        columns = measurement_columns(size)
        writer.writerow(columns if single else ("slice", *columns))
        writer.writerows(rows)


def measurement_row(label: float, area: float, y: float, x: float, first_row: float, first_col: float,
                    last_row: float, last_col: float, mean: float,
                    size: io.Calibration | None = None) -> list[int | str]:
    """One cell's `measurement_columns` as NAME_instances.csv holds them: whole numbers, the
    centroid to 3 decimals, the mean probability to 6, physical values to 9 significant
    digits; for images read whole and chunk by chunk alike.

    A physical position is the pixel position times the pixel size (y by its height, x by
    its width), so the centre of the top left pixel is at 0; the area is the pixel count
    times the pixel's area.
    """
    row = [int(label), int(area), f"{y:.3f}", f"{x:.3f}", int(first_row), int(first_col), int(last_row),
           int(last_col), f"{mean:.6f}"]
    if size is None:
        return row
    physical = (area * size.y * size.x, y * size.y, x * size.x, first_row * size.y, first_col * size.x,
                last_row * size.y, last_col * size.x)
    return row + [f"{value:.9g}" for value in physical]


def failures_path(output_dir: Path) -> Path:
    """`failures.csv` of a batch written into `output_dir`."""
    return Path(output_dir) / FAILURES


def write_failures(output_dir: Path, failures: list[tuple[str, str]]) -> Path:
    """Writes `failures.csv`, a row (file, reason) per failed input sorted by file (only the
    header when none failed); replaces an earlier one, which the caller has refused if it
    must not."""
    target = failures_path(output_dir)
    with io.atomic_path(target, overwrite=True) as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(FAILURE_COLUMNS)
        writer.writerows(sorted(failures))
    return target


def read_failures(output_dir: Path) -> list[tuple[str, str]]:
    """The rows of `failures.csv` in `output_dir`, without the header."""
    with open(failures_path(output_dir), newline="") as handle:
        return [(file, reason) for file, reason in list(csv.reader(handle))[1:]]
