"""Cell labels of an image larger than memory, found chunk by chunk, equal to the whole image's.

`instances.cell_instances(probability, threshold, "components", min_size)` on the whole
image, in two passes over the chunks of `chunk_grid`, holding one chunk at a time:

1. `find_cells`: each chunk's 4-connected components of the mask (fragments of cells),
   measured (area, bounding box, exact integer sums of rows, columns and probabilities),
   and the pairs of fragments that face each other across a chunk border. A union-find
   over those pairs joins the fragments into cells; cells under `min_size` pixels are
   dropped (specks lying whole in their chunk at once), and the rest are numbered 1..N in
   raster order of their first pixels, as on the whole image.
2. `write_labels`: each chunk's components again, from the written mask (the same ones),
   relabelled as their cells.

`write_measurements` writes the cells' NAME_instances.csv as the predict stage writes a
single image's. Memory depends on the chunk side and the number of cells, never on the
image's size.
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import cv2
import numpy as np
import zarr

from pipeline.files import io
from pipeline.inference import outputs
from pipeline.inference.chunk_grid import Chunk
from pipeline.inference.labelling import instances


@dataclasses.dataclass
class _Fragments:
    """The kept 4-connected components of every chunk (fragments of cells), numbered chunk after chunk."""

    offsets: list[int]  # per chunk, the number of its first fragment
    first: np.ndarray  # raster index (row * width + col) of each fragment's first pixel
    area: np.ndarray
    top: np.ndarray  # bounding box, last row and column included
    left: np.ndarray
    bottom: np.ndarray
    right: np.ndarray
    row_sum: np.ndarray  # sums of the pixels' rows and columns (exact integers) and probabilities
    col_sum: np.ndarray
    probability_sum: np.ndarray
    touching: np.ndarray  # [E, 2] fragments of one cell: 4-neighbours across a chunk border


@dataclasses.dataclass
class Cells:
    """The cells kept, numbered 1..N: the label of every fragment (0: dropped) and each cell's measurements."""

    offsets: list[int]  # per chunk, the number of its first fragment
    lookup: np.ndarray
    area: np.ndarray
    row_sum: np.ndarray
    col_sum: np.ndarray
    top: np.ndarray
    left: np.ndarray
    bottom: np.ndarray
    right: np.ndarray
    probability_sum: np.ndarray


def find_cells(probability: zarr.Array, grid: list[Chunk], threshold: float, min_size: int) -> Cells:
    """The cells of `probability` (2-D, read chunk by chunk over `grid`) as
    `instances.cell_instances(probability, threshold, "components", min_size)` finds them
    on the whole image, measured; the first pass (`write_labels` is the second)."""
    return _cells(_fragments(probability, grid, threshold, min_size), min_size)


def _fragments(probability: zarr.Array, grid: list[Chunk], threshold: float, min_size: int) -> _Fragments:
    """Every chunk's components, measured, and which of them touch across chunk borders.

    Holds one chunk, the fragments' measurements and the border lines of one row of
    chunks (the bottom rows of the chunks above): memory of a chunk, the perimeters and
    the cells. Specks under `min_size` that lie whole in their chunk are dropped at once.
    """
    height, width = probability.shape
    parts: list[dict[str, np.ndarray]] = []
    touching: list[np.ndarray] = []
    offsets: list[int] = []
    above: dict[int, np.ndarray] = {}  # chunk column -> fragments along the bottom row of the chunk above
    right_edge = np.empty(0, np.int64)  # fragments along the right column of the chunk to the left
    total = 0
    for chunk in grid:
        block = probability[chunk.box]
        count, local, stats, centroids = _components(instances.cell_mask(block, threshold))
        kept = _kept(chunk, stats, min_size, height, width)
        numbers = _fragment_numbers(kept, total)
        if chunk.col > 0:
            touching.append(_touching(right_edge, numbers[local[:, 0]]))
        if chunk.row > 0:
            touching.append(_touching(above[chunk.col], numbers[local[0]]))
        above[chunk.col], right_edge = numbers[local[-1]], numbers[local[:, -1]]
        measured = _measured(chunk, local, count, stats, centroids, block, width)
        parts.append({key: values[kept] for key, values in measured.items()})
        offsets.append(total)
        total += np.count_nonzero(kept)
    joined = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    pairs = np.concatenate(touching) if touching else np.empty((0, 2), np.int64)
    return _Fragments(offsets=offsets, touching=pairs, **joined)


def _components(cells: np.ndarray) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """The 4-connected components of a boolean chunk: (count with the background, labels, stats, centroids)."""
    return cv2.connectedComponentsWithStats(cells.astype(np.uint8), connectivity=4, ltype=cv2.CV_32S)


def _kept(chunk: Chunk, stats: np.ndarray, min_size: int, height: int, width: int) -> np.ndarray:
    """Which components 1..count-1 of a chunk are fragments to keep: those of `min_size` pixels or
    more, and those on a border shared with another chunk, where they may continue."""
    top, left = stats[1:, cv2.CC_STAT_TOP], stats[1:, cv2.CC_STAT_LEFT]
    bottom, right = top + stats[1:, cv2.CC_STAT_HEIGHT], left + stats[1:, cv2.CC_STAT_WIDTH]
    shared = (((top == 0) & (chunk.row > 0)) | ((left == 0) & (chunk.col > 0))
              | ((bottom == chunk.height) & (chunk.row + chunk.height < height))
              | ((right == chunk.width) & (chunk.col + chunk.width < width)))
    return shared | (stats[1:, cv2.CC_STAT_AREA] >= min_size)


def _fragment_numbers(kept: np.ndarray, first: int) -> np.ndarray:
    """The fragment number of each component 0..count-1 of a chunk (the kept ones from `first` on), else -1."""
    numbers = np.full(len(kept) + 1, -1, np.int64)
    numbers[1:][kept] = first + np.arange(np.count_nonzero(kept))
    return numbers


def _touching(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """[E, 2] distinct pairs of fragments facing each other along two border lines (-1: no cell)."""
    both = (before >= 0) & (after >= 0)
    return np.unique(np.stack([before[both], after[both]], axis=1), axis=0)


def _measured(chunk: Chunk, local: np.ndarray, count: int, stats: np.ndarray, centroids: np.ndarray,
              block: np.ndarray, width: int) -> dict[str, np.ndarray]:
    """The measurements of one chunk's components 1..count-1, in image coordinates."""
    area = stats[1:, cv2.CC_STAT_AREA].astype(np.int64)
    top = stats[1:, cv2.CC_STAT_TOP].astype(np.int64) + chunk.row
    left = stats[1:, cv2.CC_STAT_LEFT].astype(np.int64) + chunk.col
    first = _first_pixels(local, count)
    return {
        "first": (chunk.row + first // chunk.width) * width + chunk.col + first % chunk.width,
        "area": area, "top": top, "left": left,
        "bottom": top + stats[1:, cv2.CC_STAT_HEIGHT] - 1, "right": left + stats[1:, cv2.CC_STAT_WIDTH] - 1,
        # OpenCV's centroids are exact integer sums over the area in double precision: rounded
        # back to those sums, chunks add up without rounding, as instances.measure's sums are exact.
        "row_sum": np.rint(centroids[1:, 1] * area).astype(np.int64) + chunk.row * area,
        "col_sum": np.rint(centroids[1:, 0] * area).astype(np.int64) + chunk.col * area,
        "probability_sum": np.bincount(local.ravel(), block.ravel(), count)[1:],
    }


def _first_pixels(local: np.ndarray, count: int) -> np.ndarray:
    """Position in the flattened chunk of the first pixel of each component 1..count-1."""
    flat = local.ravel()
    # OpenCV numbers components in raster order of their first pixels, so each first pixel
    # raises the running maximum of the labels; checked, with a sort if it ever does not.
    first = np.flatnonzero(np.diff(np.maximum.accumulate(flat), prepend=0) > 0)
    if len(first) == count - 1:
        return first
    labels, positions = np.unique(flat, return_index=True)
    return positions[labels > 0]


def _cells(fragments: _Fragments, min_size: int) -> Cells:
    """Joins touching fragments into cells, drops those under `min_size` pixels, numbers the rest
    1..N in raster order of their first pixels, and sums their measurements."""
    count = len(fragments.area)
    roots = _roots(count, fragments.touching)
    area = np.bincount(roots, fragments.area, count).astype(np.int64)  # float64 sums of integers: exact
    first = _reduced(np.minimum, roots, fragments.first, count)
    kept = np.flatnonzero((roots == np.arange(count)) & (area >= min_size))
    kept = kept[np.argsort(first[kept], kind="stable")]
    number = np.zeros(count, np.int64)
    number[kept] = np.arange(1, len(kept) + 1)
    return Cells(
        offsets=fragments.offsets, lookup=number[roots], area=area[kept],
        # Sums of integers below 2**53 in float64 are exact.
        row_sum=np.bincount(roots, fragments.row_sum, count)[kept].astype(np.int64),
        col_sum=np.bincount(roots, fragments.col_sum, count)[kept].astype(np.int64),
        top=_reduced(np.minimum, roots, fragments.top, count)[kept],
        left=_reduced(np.minimum, roots, fragments.left, count)[kept],
        bottom=_reduced(np.maximum, roots, fragments.bottom, count)[kept],
        right=_reduced(np.maximum, roots, fragments.right, count)[kept],
        probability_sum=np.bincount(roots, fragments.probability_sum, count)[kept])


def _reduced(ufunc: np.ufunc, roots: np.ndarray, values: np.ndarray, count: int) -> np.ndarray:
    """`ufunc` (np.minimum or np.maximum) of `values` over the fragments of each root."""
    result = values.copy()  # each root is its own fragment, so it starts from its own value
    ufunc.at(result, roots, values)
    return result


def _roots(count: int, pairs: np.ndarray) -> np.ndarray:
    """The root (smallest member) of every fragment's cell: union-find over the touching pairs.

    Vectorised as in `graph.connected_components`: each round hooks the larger root of
    every pair under the smaller one and compresses every path by pointer jumping, until
    no pair joins two trees. Parents only ever decrease, so no cycle can form.
    """
    parent = np.arange(count)
    while True:
        ends = parent[pairs[:, 0]], parent[pairs[:, 1]]
        if np.array_equal(*ends):
            return parent
        np.minimum.at(parent, np.maximum(*ends), np.minimum(*ends))
        while not np.array_equal(parent[parent], parent):
            parent = parent[parent]


def write_labels(mask: zarr.Array, labels: zarr.Array, grid: list[Chunk], cells: Cells, min_size: int) -> None:
    """The second pass: each chunk's components again (the same, from the mask of the probability
    that `cells` was found in), relabelled as the cells, into `labels` (of the label image's type)."""
    height, width = mask.shape
    lookup = cells.lookup.astype(labels.dtype)
    ends = [*cells.offsets[1:], len(lookup)]
    for chunk, offset, end in zip(grid, cells.offsets, ends):
        _, local, stats, _ = _components(mask[chunk.box] > 0)
        kept = _kept(chunk, stats, min_size, height, width)
        if np.count_nonzero(kept) != end - offset:  # the first pass saw another mask: a bug, not the user's
            raise RuntimeError(f"{chunk}: {np.count_nonzero(kept)} fragments, {end - offset} in the first pass")
        numbers = _fragment_numbers(kept, offset)
        table = np.zeros(len(numbers), lookup.dtype)  # background and dropped specks: 0
        table[numbers >= 0] = lookup[numbers[numbers >= 0]]
        labels[chunk.box] = table[local]


def write_measurements(path: Path, cells: Cells, size: io.Calibration | None = None) -> None:
    """Each cell's `outputs.measurement_columns` (physical ones with a pixel `size`, from
    `outputs.physical_size`) as CSV, formatted as the predict stage formats a single image's."""
    columns = (cells.area, cells.row_sum / cells.area, cells.col_sum / cells.area, cells.top, cells.left,
               cells.bottom, cells.right, cells.probability_sum / cells.area)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(outputs.measurement_columns(size))
        writer.writerows(outputs.measurement_row(label, *cell, size=size)
                         for label, cell in enumerate(zip(*columns), start=1))
