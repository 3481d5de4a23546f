"""What the metric families share: the ISBI conventions, their checks, the threshold grid.

Conventions (ISBI 2012), shared by every metric of `pipeline.metrics`:

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
import numpy as np

from pipeline.errors import PipelineError


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
    return as_stack(probability), as_stack(binary_truth(truth))


def check_instances(predicted: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Checks a pair of instance label images; returns them as [D, H, W] stacks.

    Labels are integers in [0, 2**31), 0 = background (below 2**31 so that a label
    pair's index, reference * (largest predicted + 1) + predicted, fits in int64).
    Raises a one-line PipelineError naming the problem: different shapes, not an image
    or stack, labels that are not integers or outside that range.
    """
    predicted, reference = np.asarray(predicted), np.asarray(reference)
    if predicted.shape != reference.shape:
        raise PipelineError(f"prediction shape {predicted.shape} differs from ground truth shape {reference.shape}")
    if predicted.ndim not in (2, 3) or predicted.size == 0:
        raise PipelineError(f"expected an image [H, W] or a stack [D, H, W], got shape {predicted.shape}")
    for name, labels in (("predicted", predicted), ("reference", reference)):
        if labels.dtype.kind not in "biu":
            raise PipelineError(f"{name} instances have pixel type {labels.dtype}; expected integer labels "
                                "(0 = background)")
        if labels.min() < 0 or labels.max() >= 2 ** 31:
            raise PipelineError(f"{name} instance labels span [{labels.min()}, {labels.max()}], outside [0, 2**31)")
    return as_stack(predicted), as_stack(reference)


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


def as_stack(array: np.ndarray) -> np.ndarray:
    """An image [H, W] as a stack of one [1, H, W]; a stack unchanged."""
    return array[None] if array.ndim == 2 else array


def components(cells: np.ndarray, connectivity: int = 4) -> tuple[int, np.ndarray]:
    """(number of labels including 0, int32 labels): connected components of a mask."""
    return cv2.connectedComponents(cells.astype(np.uint8), connectivity=connectivity, ltype=cv2.CV_32S)


DENSE_CONTINGENCY = 1 << 22  # largest label table counted densely (32 MiB of int64)


def contingency(truth_labels: np.ndarray, proposal_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Counts n_ij over the ground truth's labelled pixels: (i, j, n_ij) of every nonzero entry.

    i = ground-truth label (>= 1; 0 is left out), j = proposal label (0 = proposal
    membrane or background). The Rand error's table and object matching's overlaps.
    """
    inside = truth_labels > 0
    width = int(proposal_labels.max()) + 1
    pairs = truth_labels[inside].astype(np.int64) * width + proposal_labels[inside]
    if (int(truth_labels.max()) + 1) * width <= DENSE_CONTINGENCY:
        counts = np.bincount(pairs, minlength=1)  # a dense table is faster than sorting
        pairs = np.flatnonzero(counts)
        counts = counts[pairs]
    else:
        pairs, counts = np.unique(pairs, return_counts=True)
    return pairs // width, pairs % width, counts
