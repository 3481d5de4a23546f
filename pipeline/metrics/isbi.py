"""The ISBI 2012 challenge's segmentation metrics, as its Fiji scripts compute them.

Pixel error (1 - F-score of the cell class), foreground-restricted Rand error, and the
2015 leaderboard's 1 - V_rand and 1 - V_info after thinning the proposal's membranes,
each swept over the reference's threshold grid; foreground IoU and pixel accuracy at
one threshold. Conventions: `pipeline.metrics.common`; exact definitions:
`docs/metrics.md`. The segment metrics (Rand, V_rand, V_info) score the cells as the
challenge reads a map, each 4-connected component of probability > t one segment, or, with
`method="watershed"`, as the predict stage's labels separate them (`cell_segments`).
"""

from __future__ import annotations

import numpy as np

from pipeline.inference.labelling.instances import cell_segments
from pipeline.metrics.common import Sweep, check_pair, components, contingency, isbi_thresholds



def _f_score(tp: float, fp: float, fn: float) -> float:
    """F-score of the counts; precision (recall) is 1 without false positives (negatives)."""
    precision = tp / (tp + fp) if fp else 1.0
    recall = tp / (tp + fn) if fn else 1.0
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


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


def rand_error_sweep(probability: np.ndarray, truth: np.ndarray, method: str = "components") -> Sweep:
    """Foreground-restricted Rand error (1 - F-score of the Rand index) per threshold.

    Ground truth segments: 4-connected components of its cells; its membrane pixels
    are dropped. Proposal segments: 4-connected components of probability > t, after
    `method` cut its thin necks (`cell_segments`); its membrane pixels are singletons.
    Sums are added over slices.
    """
    return _segment_sweep(probability, truth, _cell_components, _rand_f_score, method)


def v_rand_sweep(probability: np.ndarray, truth: np.ndarray, method: str = "components") -> Sweep:
    """1 - V_rand per threshold, after thinning the proposal's membranes (see `thin_membranes`)."""
    return _segment_sweep(probability, truth, thin_membranes, _rand_f_score, method)


def v_info_sweep(probability: np.ndarray, truth: np.ndarray, method: str = "components") -> Sweep:
    """1 - V_info per threshold, after thinning the proposal's membranes.

    V_info = 2 I(A; B) / (H(A) + H(B)) over the ground truth's cell pixels, with the
    same segments as `v_rand_sweep` (proposal membrane pixels are singletons); 1 when
    both entropies are 0.
    """
    return _segment_sweep(probability, truth, thin_membranes, _info_f_score, method)


def _cell_components(cells: np.ndarray) -> np.ndarray:
    return components(cells)[1]


def thin_membranes(cells: np.ndarray) -> np.ndarray:
    """Proposal segments with membranes thinned: 4-connected cells grown into membrane.

    A membrane pixel joins a cell when its labelled 4-neighbours all belong to that
    one cell; repeated until nothing changes. What is left as membrane (label 0) are
    the lines, at most a pixel or two wide, where different cells meet, and membrane
    touching no cell at all. (The 2015 ISBI leaderboard's V_rand/V_info thin the
    proposal; this is our reading of that step, not checked against Fiji's code.)
    """
    labels = components(cells)[1]
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


def _segment_sweep(probability, truth, segment, statistics, method) -> Sweep:
    """1 - F over the 11-value grid of a pair-counting statistic of the segmentations.

    `segment(cells) -> labels` makes the proposal's segments of the cells that `method`
    separates (`cell_segments`); `statistics(i, j, n)` returns (TP, FP, FN)-like sums,
    added over the slices before the F-score.
    """
    probability, truth = check_pair(probability, truth)
    truth_labels = [_cell_components(cells) for cells in truth]
    errors = []
    for t in isbi_thresholds():
        sums = np.zeros(3)
        for labels, slice_probability in zip(truth_labels, probability):
            sums += statistics(*contingency(labels, segment(cell_segments(slice_probability, t, method))))
        errors.append(1.0 - _f_score(*sums))
    return Sweep(tuple(isbi_thresholds()), tuple(errors))
