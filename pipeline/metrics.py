"""Segmentation metrics, for training (Keras metrics) and evaluation (NumPy).

Conventions (ISBI 2012): `probability` is the probability of **cell** in [0, 1];
`truth` is True (or 1/255) for cell and False (0) for membrane. A pixel is predicted
cell at threshold t when probability > t, strictly, compared in double precision.
"""

from __future__ import annotations

import keras
import numpy as np


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


def _f_score(tp: int, fp: int, fn: int) -> float:
    precision = tp / (tp + fp) if fp else 1.0
    recall = tp / (tp + fn) if fn else 1.0
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def pixel_error(probability: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """ISBI 2012 pixel error: 1 - max over the threshold grid of the cell-class F-score.

    Works on one image or a stack (counts are added over all pixels). Returns
    (error, threshold that reached it).
    """
    probability = np.asarray(probability, np.float64)
    truth = np.asarray(truth) > 0
    best = (-1.0, 0.0)
    for t in isbi_thresholds():
        predicted = probability > t
        tp = int(np.count_nonzero(predicted & truth))
        fp = int(np.count_nonzero(predicted & ~truth))
        fn = int(np.count_nonzero(~predicted & truth))
        best = max(best, (_f_score(tp, fp, fn), -t))
    return 1.0 - best[0], -best[1]


def foreground_iou(probability: np.ndarray, truth: np.ndarray, threshold: float = 0.5) -> float:
    """Intersection over union of the cell class at `threshold` (1 when both are empty)."""
    predicted = np.asarray(probability, np.float64) > threshold
    truth = np.asarray(truth) > 0
    union = np.count_nonzero(predicted | truth)
    return float(np.count_nonzero(predicted & truth) / union) if union else 1.0


def pixel_accuracy(probability: np.ndarray, truth: np.ndarray, threshold: float = 0.5) -> float:
    """Fraction of pixels whose class at `threshold` is right."""
    predicted = np.asarray(probability, np.float64) > threshold
    return float(np.mean(predicted == (np.asarray(truth) > 0)))


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
    ]
