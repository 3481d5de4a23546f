"""Segmentation metrics, for training (Keras metrics) and evaluation (NumPy).

The evaluation metrics give the numbers of the challenges' own code (the ISBI 2012
Fiji scripts and the Cell Tracking Challenge's SEG); `shared/docs/METRICS.md` has the
exact definitions. Conventions (ISBI 2012), shared by every function here:

- `probability` is the probability of **cell**, a float in [0, 1]; `truth` is binary,
  cell = 1 (or 255 or True), membrane = 0. Both are one image [H, W] or a stack
  [D, H, W] of the same shape.
- A pixel is predicted cell at threshold t when probability > t, strictly, the value
  compared in double precision (a float32 0.4 is above the double 0.4).
- Stacks are scored slice by slice in 2-D, and the counts (pixels, Rand sums, warping
  error pixels) are added over the slices before the final ratio or F-score.
- Cells are 4-connected, membranes 8-connected.
"""

from __future__ import annotations

import dataclasses

import cv2
import keras
import numpy as np

from pipeline.errors import PipelineError

WARPING_RADIUS = 20  # half-size of the window that decides a split, as in the ISBI script
_DENSE_CONTINGENCY = 1 << 22  # largest label table counted densely (32 MiB of int64)

# Offsets (dy, dx) of the 8-ring; bit k of a ring code is the pixel at _RING[k].
_RING = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def isbi_thresholds(stop: float = 1.0, step: float = 0.1) -> list[float]:
    """The ISBI 2012 reference's threshold grid, built with its double accumulator.

    `for (t = 0; t <= 1; t += 0.1)` gives 11 values, among them 0.30000000000000004,
    and ends at 0.9999999999999999, so 1.0 itself is never used.
    """
    thresholds, t = [], 0.0
    while t <= stop:
        thresholds.append(t)
        t += step
    return thresholds


def warping_thresholds() -> list[float]:
    """The warping error's grid: the first 10 values, 0.0 to 0.8999999999999999."""
    return isbi_thresholds(0.9)


@dataclasses.dataclass(frozen=True)
class Sweep:
    """One error over a threshold grid: the value per threshold and the best one.

    The best is the lowest error; on a tie the first threshold wins, as in the
    reference, which only replaces its best on a strict improvement.
    """

    thresholds: tuple[float, ...]
    errors: tuple[float, ...]

    @property
    def best(self) -> int:
        return int(np.argmin(self.errors))

    @property
    def error(self) -> float:
        return self.errors[self.best]

    @property
    def threshold(self) -> float:
        return self.thresholds[self.best]


# --- input checks -------------------------------------------------------------------


def check_pair(probability: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Checks an ISBI-style pair; returns them as [D, H, W] float64 and bool stacks.

    Raises a one-line PipelineError naming the problem: different shapes, not an image
    or stack, a NaN, a probability outside [0, 1], or labels that are not binary.
    """
    probability, truth = np.asarray(probability), np.asarray(truth)
    if probability.shape != truth.shape:
        raise PipelineError(f"prediction shape {probability.shape} differs from ground truth shape {truth.shape}")
    if probability.ndim not in (2, 3) or probability.size == 0:
        raise PipelineError(f"expected an image [H, W] or a stack [D, H, W], got shape {probability.shape}")
    if probability.dtype.kind not in "biuf":
        raise PipelineError(f"prediction has non-numeric pixel type {probability.dtype}")
    probability = probability.astype(np.float64)  # exact for float32: the reference compares in double
    if np.isnan(probability).any():
        raise PipelineError(f"prediction contains {np.count_nonzero(np.isnan(probability))} NaN values")
    low, high = probability.min(), probability.max()
    if low < 0 or high > 1:
        raise PipelineError(f"prediction values span [{low:g}, {high:g}], outside [0, 1]; "
                            "expected the probability of cell")
    return _stack(probability), _stack(binary_truth(truth))


def binary_truth(truth: np.ndarray) -> np.ndarray:
    """Cell mask of binary labels (0 = membrane; 1, 255 or True = cell), else an error."""
    truth = np.asarray(truth)
    values = np.unique(truth)
    if not (set(values.tolist()) <= {0, 1} or set(values.tolist()) <= {0, 255}):
        shown = ", ".join(f"{v:g}" for v in values[:6]) + (", ..." if len(values) > 6 else "")
        raise PipelineError(f"ground truth is not binary (values {shown}); expected 0 = membrane, 1 or 255 = cell")
    return truth > 0


def truth_warning(truth: np.ndarray) -> str | None:
    """What a ground truth without membrane or without cell pixels makes meaningless, or None.

    `truth` is a cell mask, one image or a stack taken as a whole (a stack's counts are
    summed, so one degenerate slice leaves the stack's values meaningful). Why:
    - No membrane: threshold 0.0, the first of every sweep, calls each probability
      above 0 cell, which (without a probability of exactly 0) reproduces the truth,
      so the swept errors' lowest value is 0 whatever membranes are predicted.
    - No cell: the Rand sums and V_rand, V_info run over the truth's cell pixels (none),
      and warping can neither create a cell nor find two cells to split or merge, so
      these are 0 at every threshold; the cell F-score is 1 or 0, so the pixel error is
      0 unless a pixel is cell at the grid's top, 0.9999999999999999: only 1.0 is;
      IoU is 1 or 0; SEG has no reference object.
    Pixel accuracy (and, without membrane, IoU) still measure the prediction.
    """
    truth = np.asarray(truth, bool)
    if truth.all():
        return ("ground truth has no membrane pixels; warping, Rand and pixel errors, 1-Vrand and 1-Vinfo are 0 "
                "(at threshold 0.0) whatever membranes are predicted, unless a probability is exactly 0")
    if not truth.any():
        return ("ground truth has no cell pixels; Rand and warping errors, 1-Vrand and 1-Vinfo are 0 by definition, "
                "pixel error is 1 if a probability is exactly 1 and 0 otherwise, IoU is 0 if any pixel is "
                "predicted cell and 1 otherwise, and SEG (where scored) is 0")
    return None


def _stack(array: np.ndarray) -> np.ndarray:
    return array[None] if array.ndim == 2 else array


def _components(cells: np.ndarray, connectivity: int = 4) -> tuple[int, np.ndarray]:
    """(number of labels including 0, int32 labels): connected components of a mask."""
    return cv2.connectedComponents(cells.astype(np.uint8), connectivity=connectivity, ltype=cv2.CV_32S)


def _f_score(tp: float, fp: float, fn: float) -> float:
    precision = tp / (tp + fp) if fp else 1.0
    recall = tp / (tp + fn) if fn else 1.0
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


# --- pixel error ----------------------------------------------------------------------


def pixel_error_sweep(probability: np.ndarray, truth: np.ndarray) -> Sweep:
    """ISBI 2012 pixel error per threshold: 1 - F-score of the cell class.

    Positive = cell. precision = TP/(TP+FP), 1 when FP = 0; recall likewise with FN.
    """
    probability, truth = check_pair(probability, truth)
    errors = []
    for t in isbi_thresholds():
        predicted = probability > t
        tp = np.count_nonzero(predicted & truth)
        fp = np.count_nonzero(predicted & ~truth)
        fn = np.count_nonzero(~predicted & truth)
        errors.append(1.0 - _f_score(tp, fp, fn))
    return Sweep(tuple(isbi_thresholds()), tuple(errors))


def pixel_error(probability: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """ISBI 2012 pixel error: (1 - best cell F-score over the grid, threshold reaching it)."""
    sweep = pixel_error_sweep(probability, truth)
    return sweep.error, sweep.threshold


def foreground_iou(probability: np.ndarray, truth: np.ndarray, threshold: float = 0.5) -> float:
    """Intersection over union of the cell class at `threshold` (1 when both are empty)."""
    probability, truth = check_pair(probability, truth)
    predicted = probability > threshold
    union = np.count_nonzero(predicted | truth)
    return float(np.count_nonzero(predicted & truth) / union) if union else 1.0


def pixel_accuracy(probability: np.ndarray, truth: np.ndarray, threshold: float = 0.5) -> float:
    """Fraction of pixels whose class (cell or membrane) at `threshold` is right."""
    probability, truth = check_pair(probability, truth)
    return float(np.mean((probability > threshold) == truth))


# --- Rand error, V_rand and V_info ----------------------------------------------------


def _contingency(truth_labels: np.ndarray, proposal_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Counts n_ij over the ground truth's cell pixels: (i, j, n_ij) of every nonzero entry.

    i = ground-truth cell label (>= 1), j = proposal label (0 = proposal membrane).
    """
    inside = truth_labels > 0
    width = int(proposal_labels.max()) + 1
    pairs = truth_labels[inside].astype(np.int64) * width + proposal_labels[inside]
    if int(truth_labels.max() + 1) * width <= _DENSE_CONTINGENCY:
        counts = np.bincount(pairs, minlength=1)  # a dense table is faster than sorting
        pairs = np.flatnonzero(counts)
        counts = counts[pairs]
    else:
        pairs, counts = np.unique(pairs, return_counts=True)
    return pairs // width, pairs % width, counts


def _rand_counts(i: np.ndarray, j: np.ndarray, n: np.ndarray) -> tuple[int, int, int]:
    """(TP, TP + FP, TP + FN) of the foreground-restricted Rand index.

    Each proposal-membrane pixel (j = 0) is its own singleton segment, so it adds 1
    to TP and to TP + FP, and nothing else.
    """
    n0 = int(n[j == 0].sum())
    inner = j > 0
    tp = int((n[inner] ** 2).sum()) + n0
    b = np.bincount(j[inner], weights=n[inner]).astype(np.int64)
    a = np.bincount(i, weights=n).astype(np.int64)
    return tp, int((b ** 2).sum()) + n0, int((a ** 2).sum())


def rand_error_sweep(probability: np.ndarray, truth: np.ndarray) -> Sweep:
    """Foreground-restricted Rand error (1 - F-score of the Rand index) per threshold.

    Ground truth segments: 4-connected components of its cells; its membrane pixels
    are dropped. Proposal segments: 4-connected components of probability > t; its
    membrane pixels are singletons. Sums are added over slices.
    """
    return _segment_sweep(probability, truth, _cell_components, _rand_f_score)


def v_rand_sweep(probability: np.ndarray, truth: np.ndarray) -> Sweep:
    """1 - V_rand per threshold, after thinning the proposal's membranes (see `thin_membranes`)."""
    return _segment_sweep(probability, truth, thin_membranes, _rand_f_score)


def v_info_sweep(probability: np.ndarray, truth: np.ndarray) -> Sweep:
    """1 - V_info per threshold, after thinning the proposal's membranes.

    V_info = 2 I(A; B) / (H(A) + H(B)) over the ground truth's cell pixels, with the
    same segments as `v_rand_sweep` (proposal membrane pixels are singletons); 1 when
    both entropies are 0.
    """
    return _segment_sweep(probability, truth, thin_membranes, _info_f_score)


def _cell_components(cells: np.ndarray) -> np.ndarray:
    return _components(cells)[1]


def thin_membranes(cells: np.ndarray) -> np.ndarray:
    """Proposal segments with membranes thinned: 4-connected cells grown into membrane.

    A membrane pixel joins a cell when its labelled 4-neighbours all belong to that
    one cell; repeated until nothing changes. What is left as membrane (label 0) are
    the lines, at most a pixel or two wide, where different cells meet, and membrane
    touching no cell at all. (The 2015 ISBI leaderboard's V_rand/V_info thin the
    proposal; this is our reading of that step, not checked against Fiji's code.)
    """
    labels = _components(cells)[1]
    while True:
        padded = np.pad(labels, 1)
        neighbours = np.stack([padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]])
        highest = neighbours.max(axis=0)
        lowest = np.where(neighbours > 0, neighbours, np.iinfo(np.int32).max).min(axis=0)
        grow = (labels == 0) & (highest > 0) & (highest == lowest)
        if not grow.any():
            return labels
        labels = np.where(grow, highest, labels)


def _rand_f_score(i: np.ndarray, j: np.ndarray, n: np.ndarray) -> tuple[float, float, float]:
    tp, tp_fp, tp_fn = _rand_counts(i, j, n)
    return tp, tp_fp - tp, tp_fn - tp


def _info_f_score(i: np.ndarray, j: np.ndarray, n: np.ndarray) -> tuple[float, float, float]:
    """(I, H(B) - I, H(A) - I) in nats, so that `_f_score` gives 2I / (H(A) + H(B))."""
    total = n.sum()
    singletons = int(n[j == 0].sum())
    segment_sizes = np.bincount(j[j > 0], weights=n[j > 0])
    joint = np.concatenate([n[j > 0], np.ones(singletons)])
    proposal = np.concatenate([segment_sizes[segment_sizes > 0], np.ones(singletons)])
    truth = np.bincount(i, weights=n)
    h_truth, h_proposal, h_joint = (_entropy(sizes, total) for sizes in (truth, proposal, joint))
    information = h_truth + h_proposal - h_joint
    return information, h_proposal - information, h_truth - information


def _entropy(sizes: np.ndarray, total: float) -> float:
    p = sizes[sizes > 0] / total
    return float(-(p * np.log(p)).sum())


def _segment_sweep(probability, truth, segment, statistics) -> Sweep:
    """1 - F over the 11-value grid of a pair-counting statistic of the segmentations.

    `segment(cells) -> labels` makes the proposal's segments; `statistics(i, j, n)`
    returns (TP, FP, FN)-like sums, added over the slices before the F-score.
    """
    probability, truth = check_pair(probability, truth)
    truth_labels = [_cell_components(cells) for cells in truth]
    errors = []
    for t in isbi_thresholds():
        sums = np.zeros(3)
        for labels, slice_probability in zip(truth_labels, probability):
            sums += statistics(*_contingency(labels, segment(slice_probability > t)))
        errors.append(1.0 - _f_score(*sums))
    return Sweep(tuple(isbi_thresholds()), tuple(errors))


# --- warping error --------------------------------------------------------------------

SPLIT, MERGER = 1, 2  # kinds of counted warping-error pixels


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
    cell_labels = _components(patch, 4)[1]
    touching = {cell_labels[0, 1], cell_labels[1, 0], cell_labels[1, 2], cell_labels[2, 1]} - {0}
    membrane = 1 - patch
    membrane[1, 1] = 0
    return len(touching) == 1 and _components(membrane, 8)[0] - 1 == 1


_SIMPLE = np.array([_is_simple(code) for code in range(256)])
_BITS = (1 << np.arange(8)).astype(np.int32)


def warp_truth(truth: np.ndarray, probability: np.ndarray, threshold: float) -> np.ndarray:
    """The ground truth relaxed toward `probability > threshold` by simple-point flips.

    One 2-D slice: `truth` a cell mask, `probability` in double. Follows the reference:
    the image is padded with membrane; each pass visits the current mismatches
    column-major, stably sorted by |probability - threshold| (rounded to float32)
    descending, flipping each one that is a simple point of the labels at that moment;
    passes repeat until one flips nothing. Returns the warped cell mask.
    """
    labels = np.pad(truth, 1).astype(np.uint8)
    predicted = np.pad(probability > threshold, 1).astype(np.uint8)
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
    groups = _components(mismatch, 8)[1]
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
    labels = _components(warped)[1]
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
    labels = np.pad(_components(window)[1], 1, constant_values=-1)
    ring = _ring_values(labels, np.array([radius + 1]), np.array([radius + 1]))
    return int(_distinct_count(ring)[0]) > 2


def warping_error_sweep(probability: np.ndarray, truth: np.ndarray, radius: int = WARPING_RADIUS) -> Sweep:
    """Warping error (splits + mergers, Jain et al. 2010) per threshold of the 10-value grid.

    Per slice the truth is warped toward probability > t (`warp_truth`); the split
    and merger pixels (`classify_mismatches`) are added over the slices and divided by
    the number of pixels of the stack.
    """
    probability, truth = check_pair(probability, truth)
    thresholds = warping_thresholds()
    errors = [
        sum(np.count_nonzero(warping_mismatches(p, cells, t, radius)) for p, cells in zip(probability, truth))
        / probability.size
        for t in thresholds
    ]
    return Sweep(tuple(thresholds), tuple(errors))


def warping_mismatches(probability: np.ndarray, truth: np.ndarray, threshold: float,
                       radius: int = WARPING_RADIUS) -> np.ndarray:
    """The split and merger pixels of one slice at one threshold (see `classify_mismatches`)."""
    probability, truth = np.asarray(probability, np.float64), np.asarray(truth, bool)
    return classify_mismatches(warp_truth(truth, probability, threshold), probability > threshold, radius)


# --- Cell Tracking Challenge SEG ------------------------------------------------------


def seg_scores(predicted: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """CTC SEG's score of every reference object, frame after frame ([H, W] or [D, H, W]).

    Both are instance label images (0 = background). A reference object R is matched
    by the predicted object S with |R and S| > 0.5 |R| (at most one exists); its score
    is |R and S| / |R or S|, or 0 without a match. SEG is the mean of these scores.
    """
    predicted, reference = np.asarray(predicted), np.asarray(reference)
    if predicted.shape != reference.shape:
        raise PipelineError(f"prediction shape {predicted.shape} differs from ground truth shape {reference.shape}")
    if predicted.dtype.kind not in "biu" or reference.dtype.kind not in "biu":
        raise PipelineError("SEG needs integer instance labels (0 = background)")
    return np.concatenate([_frame_seg_scores(p, r) for p, r in zip(_stack(predicted), _stack(reference))])


def cell_instances(probability: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Instance labels of a prediction, slice by slice: 4-connected cells above `threshold`."""
    return np.stack([_components(p > threshold)[1] for p in _stack(np.asarray(probability))]).reshape(
        np.shape(probability))


def seg(predicted: np.ndarray, reference: np.ndarray) -> float:
    """CTC SEG: mean Jaccard index over all reference objects (0 when there are none)."""
    scores = seg_scores(predicted, reference)
    return float(scores.mean()) if scores.size else 0.0


def _frame_seg_scores(predicted: np.ndarray, reference: np.ndarray) -> np.ndarray:
    objects, reference = np.unique(reference, return_inverse=True)
    predicted_objects, predicted = np.unique(predicted, return_inverse=True)
    reference, predicted = reference.reshape(-1), predicted.reshape(-1)
    width = len(predicted_objects)
    overlap = np.bincount(reference * width + predicted, minlength=len(objects) * width).reshape(len(objects), width)
    reference_size, predicted_size = overlap.sum(axis=1), overlap.sum(axis=0)
    if predicted_objects[0] == 0:
        overlap[:, 0] = 0  # background matches nothing
    if objects[0] == 0:
        overlap, reference_size = overlap[1:], reference_size[1:]
    best = overlap.argmax(axis=1)
    shared = overlap[np.arange(len(overlap)), best]
    union = reference_size + predicted_size[best] - shared
    return np.where(2 * shared > reference_size, shared / np.maximum(union, 1), 0.0)


# --- Keras --------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="unet")
class PixelError(keras.metrics.Metric):
    """The ISBI 2012 pixel error as a streaming Keras metric (see `pixel_error_sweep`).

    Counts TP, FP and FN of the cell class at every threshold of the reference grid over
    all pixels seen, so the epoch value is the pixel error of the epoch's pixels together.
    Takes sparse labels and the softmax output (channel 1 = cell).
    """

    def __init__(self, name: str = "pixel_error", **kwargs):
        super().__init__(name=name, **kwargs)
        # Double precision: the reference compares in double, and counts pass 2^24.
        self.thresholds = keras.ops.convert_to_tensor(isbi_thresholds(), "float64")
        self.counts = [
            self.add_variable(shape=(len(isbi_thresholds()),), initializer="zeros", dtype="float64", name=name)
            for name in ("true_positives", "false_positives", "false_negatives")
        ]

    def update_state(self, y_true, y_pred, sample_weight=None) -> None:
        cell = keras.ops.reshape(keras.ops.cast(y_true, "bool"), (-1, 1))
        predicted = keras.ops.reshape(keras.ops.cast(y_pred[..., 1], "float64"), (-1, 1)) > self.thresholds
        for count, hits in zip(self.counts, (predicted & cell, predicted & ~cell, ~predicted & cell)):
            count.assign_add(keras.ops.sum(keras.ops.cast(hits, "float64"), axis=0))

    def result(self):
        tp, fp, fn = self.counts
        precision = keras.ops.where(fp > 0, tp / keras.ops.maximum(tp + fp, 1), 1.0)
        recall = keras.ops.where(fn > 0, tp / keras.ops.maximum(tp + fn, 1), 1.0)
        f_score = keras.ops.where(
            precision + recall > 0, 2 * precision * recall / keras.ops.maximum(precision + recall, 1e-300), 0.0
        )
        return keras.ops.cast(1.0 - keras.ops.max(f_score), "float32")

    def reset_state(self) -> None:
        for count in self.counts:
            count.assign(keras.ops.zeros_like(count))


def training_metrics(num_classes: int) -> list[keras.metrics.Metric]:
    """Unweighted metrics that Keras reports per epoch (and TensorBoard plots)."""
    return [
        keras.metrics.SparseCategoricalAccuracy(name="pixel_accuracy"),
        keras.metrics.IoU(
            num_classes=num_classes,
            target_class_ids=[1],
            sparse_y_true=True,
            sparse_y_pred=False,
            name="cell_iou",
        ),
        PixelError(),
    ]
