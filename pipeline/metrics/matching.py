"""Object-level matching of instance segmentations, as StarDist's `stardist.matching.matching` reports it.

Predicted and reference objects (instance labels, 0 = background; a stack's objects
are per slice) are matched one-to-one by their intersection over union
IoU(R, S) = |R and S| / |R or S|, the sizes counted over the whole image. At an IoU
threshold tau a pair may match when IoU >= tau; the matching takes the most pairs and,
among those, the largest sum of IoU. From it, with n_true reference and n_pred
predicted objects (StarDist's definitions, each 0 when its denominator is 0):

- TP = matched pairs, FP = n_pred - TP, FN = n_true - TP
- precision = TP / (TP + FP), recall = TP / (TP + FN)
- accuracy = TP / (TP + FP + FN) (the "AP" of the StarDist papers), f1 = 2 TP / (2 TP + FP + FN)
- mean_matched_score = sum of the matched pairs' IoU / TP
- mean_true_score = the same sum / n_true
- panoptic_quality = the same sum / (TP + FP / 2 + FN / 2) (Kirillov et al. 2019)

So a prediction and a reference without any object score 0, not 1, as in StarDist.
Stacks and sets of images add TP, n_true, n_pred and the IoU sum over their slices
before the ratios, as `stardist.matching.matching_dataset` (by_image=False) does.

Only tau >= 0.5: there every object has at most one partner with IoU >= tau (save
exact halves at 0.5, see `_match_slice`), so the matching needs no assignment solver;
StarDist's scipy `linear_sum_assignment` for tau < 0.5 is not a dependency here.
IoU is compared with tau in double precision, as StarDist does; for the decimal
thresholds of `IOU_THRESHOLDS` that decides as exact arithmetic would.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np

from pipeline.errors import PipelineError
from pipeline.metrics.common import check_instances, contingency

# 0.5, 0.55, ..., 0.95 as the doubles nearest those decimals (np.linspace(0.5, 0.95, 10)
# gives 0.8999999999999999 for 0.9; no IoU of an image lies between the two). An IoU
# n / u differs from k / 20 by 0 or at least 1 / (20 u), far above the doubles' spacing.
IOU_THRESHOLDS: tuple[float, ...] = tuple(round(0.5 + 0.05 * k, 2) for k in range(10))


@dataclasses.dataclass(frozen=True)
class MatchedObjects:
    """The matching at IoU >= 0.5, from which the statistics at every tau >= 0.5 follow.

    `ious`: the IoU of each matched pair, in no particular order; `n_true`, `n_pred`:
    the numbers of reference and predicted objects. The matching at tau > 0.5 is the
    pairs of this one with IoU >= tau (no other pair reaches tau).
    """

    ious: np.ndarray
    n_true: int
    n_pred: int


def match(predicted: np.ndarray, reference: np.ndarray) -> MatchedObjects:
    """The matched objects of instance labels [H, W] or [D, H, W], slice by slice, pooled.

    Labels are integers in [0, 2**31), 0 = background; a label names one object per
    slice, whether connected or not. Raises a PipelineError on a bad pair.
    """
    predicted, reference = check_instances(predicted, reference)
    return pool(_match_slice(p, r) for p, r in zip(predicted, reference))


def pool(parts: Iterable[MatchedObjects]) -> MatchedObjects:
    """Matchings of slices or images taken together: their objects side by side."""
    parts = list(parts)
    return MatchedObjects(np.concatenate([np.zeros(0), *(part.ious for part in parts)]),
                          sum(part.n_true for part in parts), sum(part.n_pred for part in parts))


def statistics(matched: MatchedObjects, threshold: float = 0.5) -> dict:
    """StarDist's record at IoU threshold `threshold` >= 0.5 (see the module docstring).

    Keys as StarDist names them ("thresh" as "iou_threshold"; its "criterion" is always
    IoU here): iou_threshold, tp, fp, fn, precision, recall, accuracy, f1, n_true,
    n_pred, mean_true_score, mean_matched_score, panoptic_quality.
    """
    if not 0.5 <= threshold <= 1.0:
        raise PipelineError(f"IoU threshold {threshold} is outside [0.5, 1]; below 0.5 the matching needs an "
                            "assignment solver, which this project does not use")
    ious = matched.ious[matched.ious >= threshold]
    tp, matched_iou = len(ious), float(ious.sum())
    fp, fn = matched.n_pred - tp, matched.n_true - tp
    return {"iou_threshold": threshold, "tp": tp, "fp": fp, "fn": fn,
            "precision": _ratio(tp, tp + fp), "recall": _ratio(tp, tp + fn),
            "accuracy": _ratio(tp, tp + fp + fn), "f1": _ratio(2 * tp, 2 * tp + fp + fn),
            "n_true": matched.n_true, "n_pred": matched.n_pred,
            "mean_true_score": _ratio(matched_iou, matched.n_true), "mean_matched_score": _ratio(matched_iou, tp),
            "panoptic_quality": _ratio(matched_iou, tp + (fp + fn) / 2)}


def record(matched: MatchedObjects) -> dict:
    """What the evaluation report carries: `statistics` at 0.5, accuracy and F1 over the sweep.

    Adds "accuracy_per_iou_threshold" and "f1_per_iou_threshold" ({repr(tau): value}
    for tau in `IOU_THRESHOLDS`) and their plain means over those 10 thresholds,
    "mean_accuracy_over_iou_thresholds" and "mean_f1_over_iou_thresholds".
    """
    sweep = [statistics(matched, tau) for tau in IOU_THRESHOLDS]
    per_threshold = {key: {repr(tau): row[key] for tau, row in zip(IOU_THRESHOLDS, sweep)}
                     for key in ("accuracy", "f1")}
    return (statistics(matched, 0.5)
            | {f"{key}_per_iou_threshold": values for key, values in per_threshold.items()}
            | {f"mean_{key}_over_iou_thresholds": float(np.mean(list(values.values())))
               for key, values in per_threshold.items()})


def _match_slice(predicted: np.ndarray, reference: np.ndarray) -> MatchedObjects:
    """The matching at IoU >= 0.5 of one slice's instance labels.

    IoU >= 1/2 means |R and S| >= |R or S| / 2 >= max(|R|, |S|) / 2, so a second
    partner S' of R (disjoint from S) needs |R and S'| >= |R| / 2 as well: both are
    then exactly |R| / 2, S and S' are the two halves of R, and both IoUs are exactly
    1/2 (likewise for two halves R, R' of one S). Such a pair of ties is all that can
    compete, and any one of it gives the same TP and IoU sum; we keep the first.
    """
    # Shifted by one, the reference background counts as a label too, so the table holds
    # every pixel and gives both sides' object sizes (int64: the shift must not wrap).
    i, j, overlap = contingency(reference.astype(np.int64) + 1, predicted)
    reference_objects, row = np.unique(i - 1, return_inverse=True)
    predicted_objects, column = np.unique(j, return_inverse=True)
    reference_size = np.bincount(row, weights=overlap)
    predicted_size = np.bincount(column, weights=overlap)
    iou = overlap / (reference_size[row] + predicted_size[column] - overlap)
    candidate = (reference_objects[row] > 0) & (j > 0) & (iou >= 0.5)
    row, column, iou = row[candidate], column[candidate], iou[candidate]
    once = np.unique(row, return_index=True)[1]  # one partner per reference object
    column, iou = column[once], iou[once]
    once = np.unique(column, return_index=True)[1]  # and one per predicted object
    return MatchedObjects(iou[once], int(np.count_nonzero(reference_objects)),
                          int(np.count_nonzero(predicted_objects)))


def _ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, or 0 when the denominator is 0 (StarDist's convention)."""
    return numerator / denominator if denominator else 0.0
