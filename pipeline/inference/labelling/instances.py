"""Cell instances of a prediction: which cell each pixel belongs to, and each cell's measurements.

Conventions, shared by the predict stage's `NAME_labels.tif` and the CTC SEG it is scored by:

- A pixel is cell when its probability of cell exceeds the threshold, strictly, compared
  in double precision (`pipeline.metrics.common`'s convention).
- Instances are 4-connected, as everywhere in the project: in EM the membrane between two
  cells can be a single diagonal step, which 8-connectivity would bridge.
- Label images: 0 = background, 1..N = the cells, numbered in raster order of their first
  pixel; a stack is labelled slice by slice, each slice from 1.
- `INSTANCE_METHODS` (`pipeline.config.schema`): "components" takes every 4-connected
  component of the cells as one cell; "watershed" first cuts cells joined by a thin neck
  (see `_split_lines`).
"""

from __future__ import annotations

import cv2
import numpy as np

from pipeline.config.schema import INSTANCE_METHODS

# The columns of `measure`: bounding boxes include their last row and column.
COLUMNS = ("label", "area", "centroid_y", "centroid_x", "min_row", "min_col", "max_row", "max_col",
           "mean_probability")

# A neck splits two cells when it is narrower than this fraction of the smaller cell's
# widest point (distance-transform maxima whose ratio to the saddle between them is
# below 1 / _NECK_RATIO are one cell): a gap left by a missed membrane is a few pixels
# wide, a cell's waist is rarely under half its width.
_NECK_RATIO = 0.5
_DYNAMIC = float(np.log(1 / _NECK_RATIO))  # the same ratio as a height difference of log distances

_CROSS = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))  # the 4-neighbourhood


def cell_mask(probability: np.ndarray, threshold: float) -> np.ndarray:
    """Boolean mask of the pixels whose probability of cell exceeds `threshold` (in double precision)."""
    return np.asarray(probability, np.float64) > threshold


def cell_instances(probability: np.ndarray, threshold: float = 0.5, method: str = "components",
                   min_size: int = 1) -> np.ndarray:
    """int32 instance labels of a probability of cell [H, W] or [D, H, W], slice by slice.

    The cells at `threshold`, split by `method` (one of `INSTANCE_METHODS`); objects of fewer than
    `min_size` pixels are dropped and the others numbered 1..N.
    """
    _check_method(method)
    probability = np.asarray(probability)
    stack = probability[None] if probability.ndim == 2 else probability
    labels = [_label_slice(p, threshold, method, min_size) for p in stack]
    return np.stack(labels).reshape(probability.shape)


def cell_segments(probability: np.ndarray, threshold: float, method: str = "components") -> np.ndarray:
    """Boolean mask of one [H, W] slice's cells as `method` separates them: the pixels above
    `threshold`, less the 1 px lines by which "watershed" cuts thin necks, so that each
    4-connected component is one cell. What the predict stage labels, and what evaluation's
    segmentation metrics score."""
    _check_method(method)
    cells = cell_mask(probability, threshold)
    if method == "watershed" and cells.any():
        cells &= ~_split_lines(cells, probability, threshold)
    return cells


def _check_method(method: str) -> None:
    if method not in INSTANCE_METHODS:
        raise ValueError(f"method must be one of {INSTANCE_METHODS}, got {method!r}")


def _label_slice(probability: np.ndarray, threshold: float, method: str, min_size: int) -> np.ndarray:
    """`cell_instances` of one [H, W] slice."""
    cells = cell_segments(probability, threshold, method)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(cells.astype(np.uint8), connectivity=4,
                                                                ltype=cv2.CV_32S)
    kept = stats[:, cv2.CC_STAT_AREA] >= min_size
    kept[0] = False  # the background
    renumbered = np.zeros(count, np.int32)
    renumbered[kept] = np.arange(1, np.count_nonzero(kept) + 1)
    return renumbered[labels]


def _split_lines(cells: np.ndarray, probability: np.ndarray, threshold: float) -> np.ndarray:
    """Boolean mask of the 1 px lines that a seeded watershed draws between touching cells.

    Seeds: the significant maxima of the distance to the background (`_seeds`), one per
    cell that the mask's shape shows, however the cells touch. Flooding: `cv2.watershed`,
    which grows the seeds in order of the difference between neighbouring pixels of its
    image, so it needs an image with edges where cells meet: the probability, whose dips
    are membranes the network saw but not above the threshold (the distance transform
    has no such edges). The lines fall where the floods of two seeds meet; where the
    probability is flat, half-way between them.
    """
    # Cells span 0..127 (1 - p, rescaled) and background is 255: any step from a cell into
    # the background costs more than any step inside cells, so every cell pixel is flooded
    # from the seeds of its own component before a flood can cross the background.
    relief = np.full(cells.shape, 255, np.uint8)
    scaled = (1 - np.asarray(probability, np.float64)) / max(1 - threshold, 1e-12) * 127
    relief[cells] = np.clip(np.round(scaled[cells]), 0, 127)
    # cv2.watershed marks the image's outermost pixels as lines: pad them away.
    markers = np.pad(_seeds(cells), 1)
    flooded = cv2.watershed(cv2.cvtColor(np.pad(relief, 1, constant_values=255), cv2.COLOR_GRAY2BGR), markers)
    return (flooded[1:-1, 1:-1] == -1) & cells


def _seeds(cells: np.ndarray) -> np.ndarray:
    """int32 markers 1..S: the h-maxima of the log distance to the background, with h = `_DYNAMIC`.

    A maximum is kept when the log distance falls by at least h on every path to a higher
    maximum (that is, the neck is below `_NECK_RATIO` of its own width); each kept one is
    marked by its dome, the pixels above that fall, so that flooding starts from cores of
    a size that follows the cell's. Every 4-connected component keeps its highest maximum.
    """
    distance = cv2.distanceTransform(cells.astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    # Cell pixels are at least 1 px from the background, so their log distance is >= 0;
    # the background sits below every cell's floor, so no reconstruction crosses it.
    height = np.where(cells, np.log(np.maximum(distance, 1)), -2 * _DYNAMIC).astype(np.float32)
    floor = np.where(cells, height - _DYNAMIC, height).astype(np.float32)
    while True:  # grey reconstruction by dilation of height - h under height, 4-connected
        grown = np.minimum(cv2.dilate(floor, _CROSS), height)
        if np.array_equal(grown, floor):
            break
        floor = grown
    dome = height - floor
    _, domes = cv2.connectedComponents((dome > 0).astype(np.uint8), connectivity=4, ltype=cv2.CV_32S)
    significant = np.unique(domes[dome >= _DYNAMIC - 1e-4])  # domes that rise the full h: their tops
    numbers = np.zeros(domes.max() + 1, np.int32)
    numbers[significant[significant > 0]] = np.arange(1, np.count_nonzero(significant) + 1)
    return numbers[domes]


def label_image(labels: np.ndarray) -> np.ndarray:
    """`labels` as the image file stores them: uint16, or uint32 beyond 65,535 cells in a slice."""
    return labels.astype(np.uint16 if labels.max(initial=0) <= np.iinfo(np.uint16).max else np.uint32)


def measure(labels: np.ndarray, probability: np.ndarray) -> np.ndarray:
    """float64 [N, len(COLUMNS)]: each cell's row of `COLUMNS`, for labels [H, W] numbered 1..N.

    Area in pixels, centroid (y, x) the mean pixel position, the bounding box's first and
    last row and column, and the mean probability of cell over the cell's pixels.
    """
    count = int(labels.max(initial=0))
    rows, cols = np.nonzero(labels)
    which = labels[rows, cols].astype(np.intp) - 1
    area = np.bincount(which, minlength=count)
    if not area.all():  # a missing number would make its row a division by zero
        raise ValueError(f"labels must be numbered 1..N without gaps; {np.flatnonzero(area == 0)[0] + 1} is missing")
    first_row, first_col = np.full(count, labels.shape[0]), np.full(count, labels.shape[1])
    last_row, last_col = np.full(count, -1), np.full(count, -1)
    np.minimum.at(first_row, which, rows)
    np.minimum.at(first_col, which, cols)
    np.maximum.at(last_row, which, rows)
    np.maximum.at(last_col, which, cols)
    probability_sum = np.bincount(which, np.asarray(probability, np.float64)[rows, cols], count)
    return np.column_stack([np.arange(1, count + 1), area, np.bincount(which, rows, count) / area,
                            np.bincount(which, cols, count) / area, first_row, first_col, last_row, last_col,
                            probability_sum / area])


def outlines(labels: np.ndarray) -> np.ndarray:
    """Boolean mask of each cell's own edge: its pixels with a 4-neighbour of another label or background."""
    padded = np.pad(labels, 1, mode="edge")  # the image's border is no edge
    inner = padded[1:-1, 1:-1]
    edge = ((padded[:-2, 1:-1] != inner) | (padded[2:, 1:-1] != inner)
            | (padded[1:-1, :-2] != inner) | (padded[1:-1, 2:] != inner))
    return edge & (labels > 0)
