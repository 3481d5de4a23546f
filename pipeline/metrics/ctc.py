"""The Cell Tracking Challenge's SEG measure and the instances it is scored on.

SEG: the mean Jaccard index over all reference objects, each matched by the segmented
object that covers more than half of it (`docs/metrics.md`); py-ctcmetrics, the
challenge's own Python code, gives the same numbers. A prediction's instances come
from `pipeline.inference.labelling.instances.cell_instances`, as the predict stage's label images do.
"""

from __future__ import annotations

import numpy as np

from pipeline.errors import PipelineError
from pipeline.metrics.common import as_stack

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
    return np.concatenate([_frame_seg_scores(p, r) for p, r in zip(as_stack(predicted), as_stack(reference))])


def seg(predicted: np.ndarray, reference: np.ndarray) -> float:
    """CTC SEG: mean Jaccard index over all reference objects (0 when there are none)."""
    return mean_seg(seg_scores(predicted, reference))


def mean_seg(scores: np.ndarray) -> float:
    """SEG of reference objects' scores (`seg_scores`, of any frames pooled): their mean, 0 without any."""
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
