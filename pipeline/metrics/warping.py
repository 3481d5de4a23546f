"""The warping error (Jain et al. 2010) as the ISBI 2012 challenge computes it.

The ground truth is warped toward the thresholded prediction by simple-point flips
(`warp_truth`), and the pixels where they still differ are classified
(`classify_mismatches`): only splits and mergers count. The thresholded prediction is
probability > t, or with `method="watershed"` the cells as the predict stage's labels
separate them (`cell_segments`). Conventions: `pipeline.metrics.common`; exact
definitions: `docs/metrics.md`.
"""

from __future__ import annotations

import cv2
import numpy as np

from pipeline.inference.labelling.instances import cell_segments
from pipeline.metrics.common import Sweep, check_pair, components, isbi_thresholds

WARPING_RADIUS = 20  # half-size of the window that decides a split, as in the ISBI script
SPLIT, MERGER = 1, 2  # kinds of counted warping-error pixels

# Offsets (dy, dx) of the 8-ring; bit k of a ring code is the pixel at _RING[k].
_RING = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def warping_thresholds() -> list[float]:
    """The warping error's grid: the first 10 values, 0.0 to 0.8999999999999999."""
    return isbi_thresholds(0.9)


def _is_simple(code: int) -> bool:
    """Simple point test of one 8-ring configuration (bit k = cell at `_RING[k]`).

    x is simple when exactly one 4-connected group of the ring's cells contains a
    4-neighbour of x, and the ring's membrane pixels form one 8-connected group. The
    centre's own value does not matter. (For the reference's 3-D Bertrand test on a
    single plane this gives the same 256 answers.)
    """
    patch = np.zeros((3, 3), np.uint8)
    for bit, (dy, dx) in enumerate(_RING):
        patch[1 + dy, 1 + dx] = (code >> bit) & 1
    cell_labels = components(patch, 4)[1]
    touching = {cell_labels[0, 1], cell_labels[1, 0], cell_labels[1, 2], cell_labels[2, 1]} - {0}
    membrane = 1 - patch
    membrane[1, 1] = 0
    return len(touching) == 1 and components(membrane, 8)[0] - 1 == 1


_SIMPLE = np.array([_is_simple(code) for code in range(256)])
_BITS = (1 << np.arange(8)).astype(np.int32)


def warp_truth(truth: np.ndarray, probability: np.ndarray, threshold: float,
               cells: np.ndarray | None = None) -> np.ndarray:
    """The ground truth relaxed toward the prediction's `cells` (by default `probability > threshold`)
    by simple-point flips.

    One 2-D slice: `truth` a cell mask, `probability` in double. Follows the reference:
    the image is padded with membrane; each pass visits the current mismatches
    column-major, stably sorted by |probability - threshold| (rounded to float32)
    descending, flipping each one that is a simple point of the labels at that moment;
    passes repeat until one flips nothing. Returns the warped cell mask.
    """
    labels = np.pad(truth, 1).astype(np.uint8)
    predicted = np.pad(probability > threshold if cells is None else cells, 1).astype(np.uint8)
    key = np.abs(np.pad(probability, 1) - threshold).astype(np.float32)
    # Mismatches only ever leave the set, and keys and scan positions are fixed, so
    # every later pass visits a subsequence of the first pass's order: no re-sorting.
    order = _visiting_order(labels != predicted, key)
    while order.size:
        flipped = _warp_pass(labels, order)
        if flipped.size == 0:
            break
        order = order[_clusters_near(labels != predicted, flipped).reshape(-1)[order]]
    return labels[1:-1, 1:-1].astype(bool)


def _visiting_order(visit: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Flat indices of the pixels to visit: column-major, then stably by key descending."""
    columns, rows = np.nonzero(visit.T)  # nonzero of the transpose scans x outer, y inner
    flat = rows * visit.shape[1] + columns
    return flat[np.argsort(-key.ravel()[flat], kind="stable")]


def _warp_pass(labels: np.ndarray, order: np.ndarray) -> np.ndarray:
    """One pass of simple-point flips over `order`; returns the flipped flat indices.

    Whether a pixel flips depends only on its 8 neighbours at its turn, and only
    visited pixels ever change. So instead of one pixel at a time, each step takes
    every pixel whose earlier-visited neighbours have all had their turn (a wavefront):
    no two of them are neighbours, and each sees exactly the labels it would see in
    the sequential order. The number of steps is the longest chain of neighbours
    visited one after the other, not the number of pixels.
    """
    flat = labels.reshape(-1)  # a view: flips land in `labels`
    offsets = np.array([dy * labels.shape[1] + dx for dy, dx in _RING])
    count = len(order)
    rank = np.full(flat.size, count, np.int32)
    rank[order] = np.arange(count, dtype=np.int32)
    neighbour_rank = rank[order[:, None] + offsets]
    own_rank = np.arange(count, dtype=np.int32)[:, None]
    waiting = np.count_nonzero(neighbour_rank < own_rank, axis=1)  # earlier neighbours still to go
    later = np.where((neighbour_rank > own_rank) & (neighbour_rank < count), neighbour_rank, -1)
    seen = np.full(count, -1, np.int32)
    flipped = []
    ready = np.flatnonzero(waiting == 0)
    while ready.size:
        pixels = order[ready]
        simple = pixels[_SIMPLE[flat[pixels[:, None] + offsets].astype(np.int32) @ _BITS]]
        flat[simple] ^= 1
        flipped.append(simple)
        released = later[ready].ravel()
        released = released[released >= 0]
        np.subtract.at(waiting, released, 1)
        ready = _unique(released[waiting[released] == 0], seen)
    return np.concatenate(flipped) if flipped else np.zeros(0, np.int64)


def _unique(values: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """The distinct values (in no particular order), using `scratch` instead of sorting."""
    scratch[values] = np.arange(len(values))
    return values[scratch[values] == np.arange(len(values))]


def _clusters_near(mismatch: np.ndarray, flipped: np.ndarray) -> np.ndarray:
    """The 8-connected groups of remaining mismatches next to a pixel flipped last pass.

    Only these can flip in the next pass: any other group was a whole group in the
    last pass, saw no change around it, and would replay that pass without a flip.
    """
    near = np.zeros(mismatch.size, np.uint8)
    near[flipped] = 1
    near = cv2.dilate(near.reshape(mismatch.shape), np.ones((3, 3), np.uint8)).astype(bool) & mismatch
    if not near.any():
        return near
    groups = components(mismatch, 8)[1]
    live = np.zeros(groups.max() + 1, bool)
    live[groups[near]] = True
    live[0] = False
    return live[groups]


def classify_mismatches(warped: np.ndarray, predicted: np.ndarray, radius: int = WARPING_RADIUS) -> np.ndarray:
    """Kind of each pixel where the warped truth differs from the prediction (one slice).

    Returns an int8 image: MERGER, SPLIT, or 0 (no mismatch, or a mismatch that only
    adds or removes an object or a hole, which the warping error does not count).
    U = distinct component labels (4-connected cells of `warped`, 0 = membrane) among
    x's 8 neighbours inside the image. |U| >= 3: merger if x is membrane in `warped`,
    split if cell. |U| = 2 and x cell: a split when setting x to membrane in the
    (2 * radius + 1)^2 window around x (outside = membrane) leaves more than 2
    distinct labels around x. A radius larger than the image stands for the whole
    image, which a window padded with membrane to at least its size gives as well.
    """
    labels = components(warped)[1]
    rows, columns = np.nonzero(warped != predicted)
    neighbours = _ring_values(np.pad(labels, 1, constant_values=-1), rows + 1, columns + 1)
    distinct = _distinct_count(neighbours)
    kinds = np.zeros(warped.shape, np.int8)
    many = distinct >= 3
    kinds[rows[many], columns[many]] = np.where(warped[rows[many], columns[many]], SPLIT, MERGER)
    doubtful = (distinct == 2) & warped[rows, columns]
    if radius > warped.shape[0] or radius > warped.shape[1]:
        radius = max(warped.shape)  # a window that holds the whole image
    padded = np.pad(warped, radius)
    for y, x in zip(rows[doubtful], columns[doubtful]):
        if _splits_locally(padded[y:y + 2 * radius + 1, x:x + 2 * radius + 1], radius):
            kinds[y, x] = SPLIT
    return kinds


def _ring_values(padded: np.ndarray, rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
    return np.stack([padded[rows + dy, columns + dx] for dy, dx in _RING], axis=1)


def _distinct_count(values: np.ndarray) -> np.ndarray:
    """Per row, the number of distinct values other than -1 (outside the image)."""
    ordered = np.sort(values, axis=1)
    starts = np.concatenate([ordered[:, :1] >= 0, (ordered[:, 1:] != ordered[:, :-1]) & (ordered[:, 1:] >= 0)], axis=1)
    return np.count_nonzero(starts, axis=1)


def _splits_locally(window: np.ndarray, radius: int) -> bool:
    """Whether removing the centre cell pixel of `window` cuts its cell there."""
    window = window.copy()
    window[radius, radius] = False
    labels = np.pad(components(window)[1], 1, constant_values=-1)
    ring = _ring_values(labels, np.array([radius + 1]), np.array([radius + 1]))
    return int(_distinct_count(ring)[0]) > 2


def warping_error_sweep(probability: np.ndarray, truth: np.ndarray, method: str = "components",
                        radius: int = WARPING_RADIUS) -> Sweep:
    """Warping error (splits + mergers, Jain et al. 2010) per threshold of the 10-value grid.

    Per slice the truth is warped toward the cells at t (`warp_truth`, `warping_mismatches`);
    the split and merger pixels (`classify_mismatches`) are added over the slices and
    divided by the number of pixels of the stack.
    """
    probability, truth = check_pair(probability, truth)
    thresholds = warping_thresholds()
    errors = [
        sum(np.count_nonzero(warping_mismatches(p, cells, t, method, radius)) for p, cells in zip(probability, truth))
        / probability.size
        for t in thresholds
    ]
    return Sweep(tuple(thresholds), tuple(errors))


def splits_and_mergers(probability: np.ndarray, truth: np.ndarray, threshold: float, method: str = "components",
                       radius: int = WARPING_RADIUS) -> dict[str, int]:
    """The warping error's pixels at one threshold, by kind: {"splits": n, "mergers": m}.

    Over an image or stack, as `check_pair` reads it. Splits are predicted membrane
    that cuts a true cell, mergers predicted cell that joins two: the two call for
    different remedies, and the error's sum hides which one dominates.
    """
    probability, truth = check_pair(probability, truth)
    kinds = [warping_mismatches(p, cells, threshold, method, radius) for p, cells in zip(probability, truth)]
    return {"splits": sum(int(np.count_nonzero(k == SPLIT)) for k in kinds),
            "mergers": sum(int(np.count_nonzero(k == MERGER)) for k in kinds)}


def warping_mismatches(probability: np.ndarray, truth: np.ndarray, threshold: float, method: str = "components",
                       radius: int = WARPING_RADIUS) -> np.ndarray:
    """The split and merger pixels of one slice at one threshold (see `classify_mismatches`), the
    prediction's cells separated by `method` (`cell_segments`)."""
    probability, truth = np.asarray(probability, np.float64), np.asarray(truth, bool)
    cells = cell_segments(probability, threshold, method)
    return classify_mismatches(warp_truth(truth, probability, threshold, cells), cells, radius)
