"""StarDist's object matching: against a brute-force matcher, by hand, on stacks, and bad input."""

import itertools
import json
import re

import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.metrics.matching import IOU_THRESHOLDS, match, pool, record, statistics


def brute_force_counts(predicted: np.ndarray, reference: np.ndarray, tau: float) -> tuple[int, float, int, int]:
    """(TP, IoU sum of the matched pairs, n_true, n_pred) of one slice, trying every assignment.

    Every one-to-one assignment of reference to predicted objects is tried; its matches
    are its pairs with IoU >= tau, and the best has the most matches, then the largest
    IoU sum (StarDist's objective, solved there by linear_sum_assignment).
    """
    true = [label for label in np.unique(reference) if label]
    pred = [label for label in np.unique(predicted) if label]
    iou = {(r, s): np.count_nonzero((reference == r) & (predicted == s))
           / np.count_nonzero((reference == r) | (predicted == s)) for r in true for s in pred}
    best = (0, 0.0)
    for size in range(min(len(true), len(pred)) + 1):
        for chosen in itertools.combinations(true, size):
            for partners in itertools.permutations(pred, size):
                scores = [iou[pair] for pair in zip(chosen, partners) if iou[pair] >= tau]
                best = max(best, (len(scores), sum(scores)))
    return *best, len(true), len(pred)


def stardist_statistics(tp: int, matched_iou: float, n_true: int, n_pred: int) -> dict:
    """StarDist's formulas (stardist/matching.py), written out on their own."""
    fp, fn = n_pred - tp, n_true - tp
    return {"tp": tp, "fp": fp, "fn": fn, "n_true": n_true, "n_pred": n_pred,
            "precision": tp / (tp + fp) if tp > 0 else 0, "recall": tp / (tp + fn) if tp > 0 else 0,
            "accuracy": tp / (tp + fp + fn) if tp > 0 else 0, "f1": 2 * tp / (2 * tp + fp + fn) if tp > 0 else 0,
            "mean_true_score": matched_iou / n_true if n_true > 0 else 0.0,
            "mean_matched_score": matched_iou / tp if tp > 0 else 0.0,
            "panoptic_quality": matched_iou / (tp + fp / 2 + fn / 2) if tp + fp / 2 + fn / 2 > 0 else 0.0}


def assert_statistics(ours: dict, expected: dict) -> None:
    assert {key: ours[key] for key in expected} == pytest.approx(expected, abs=1e-12)
    assert all(type(ours[key]) is int for key in ("tp", "fp", "fn", "n_true", "n_pred"))


def random_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Labels of 2x2 blocks (so halves and exact IoU ties occur) and a prediction: the
    reference with a fraction of pixels relabelled, its labels permuted, sometimes shifted."""
    reference = np.kron(rng.integers(0, 5, (3, 3)), np.ones((2, 2), int))
    relabelled = rng.random(reference.shape) < rng.uniform(0.0, 0.4)
    noisy = np.where(relabelled, rng.integers(0, 6, reference.shape), reference)
    predicted = rng.permutation(8)[np.roll(noisy, rng.integers(0, 2), axis=1)]
    return predicted, reference


@pytest.mark.parametrize("seed", range(40))
def test_matches_a_brute_force_matcher_at_every_threshold_of_the_sweep(seed):
    predicted, reference = random_pair(np.random.default_rng(seed))
    matched = match(predicted, reference)
    for tau in IOU_THRESHOLDS:
        assert_statistics(statistics(matched, tau), stardist_statistics(*brute_force_counts(predicted, reference, tau)))


def test_stacks_sum_counts_over_slices_before_the_ratios():
    rng = np.random.default_rng(7)
    pairs = [random_pair(rng) for _ in range(4)]
    predicted, reference = np.stack([p for p, _ in pairs]), np.stack([r for _, r in pairs])
    stacked, pooled = match(predicted, reference), pool(match(p, r) for p, r in pairs)
    for tau in IOU_THRESHOLDS:
        counts = np.sum([brute_force_counts(p, r, tau) for p, r in pairs], axis=0)
        expected = stardist_statistics(int(counts[0]), counts[1], int(counts[2]), int(counts[3]))
        assert_statistics(statistics(stacked, tau), expected)
        assert statistics(pooled, tau) == statistics(stacked, tau)
    # The same label in two slices is two objects.
    one = np.zeros((2, 4, 4), np.uint8)
    one[:, 1:3, 1:3] = 1
    assert {key: statistics(match(one, one))[key] for key in ("n_true", "n_pred", "tp")} == {"n_true": 2, "n_pred": 2,
                                                                                         "tp": 2}


def _blocks(*spans: tuple[int, int, int]) -> np.ndarray:
    """A 4x8 label image: (label, first column, last column + 1) over all 4 rows."""
    labels = np.zeros((4, 8), np.int32)
    for label, start, stop in spans:
        labels[:, start:stop] = label
    return labels


ALL = _blocks((1, 0, 8))
TWO = _blocks((1, 0, 4), (2, 4, 8))
SHIFTED = _blocks((1, 0, 5), (2, 5, 8))  # TWO with the boundary one column right: IoU 4/5 and 3/4
ZERO = np.zeros((4, 8), np.int32)


@pytest.mark.parametrize("case, predicted, reference, counts", [
    # counts at tau = 0.5: (TP, FP, FN, IoU sum)
    ("perfect, other labels", _blocks((9, 0, 4), (3, 4, 8)), TWO, (2, 0, 0, 2.0)),
    ("split into halves: IoU exactly 0.5 twice, one matches", TWO, ALL, (1, 1, 0, 0.5)),
    ("merged halves", ALL, TWO, (1, 0, 1, 0.5)),
    ("split 5 + 3 columns: IoU 5/8 and 3/8", _blocks((1, 0, 5), (2, 5, 8)), ALL, (1, 1, 0, 0.625)),
    ("missing object", _blocks((1, 0, 4)), TWO, (1, 0, 1, 1.0)),
    ("extra object on background", _blocks((4, 0, 2), (5, 2, 4)), _blocks((1, 0, 2)), (1, 1, 0, 1.0)),
    ("touching, boundary one column off", SHIFTED, TWO, (2, 0, 0, 1.55)),
    ("empty prediction", ZERO, TWO, (0, 0, 2, 0.0)),
    ("empty reference", TWO, ZERO, (0, 2, 0, 0.0)),
    ("both empty: 0, as in StarDist, not 1", ZERO, ZERO, (0, 0, 0, 0.0)),
])
def test_hand_built_cases(case, predicted, reference, counts):
    tp, fp, fn, matched_iou = counts
    expected = stardist_statistics(tp, matched_iou, tp + fn, tp + fp)
    assert_statistics(statistics(match(predicted, reference)), expected)
    brute_force = stardist_statistics(*brute_force_counts(predicted, reference, 0.5))
    assert_statistics(statistics(match(predicted, reference)), brute_force)


def test_touching_objects_by_threshold_and_the_record():
    # IoU 4/5 and 3/4: both match up to 0.75, the first alone at 0.8 (IoU >= tau, equality included).
    result = record(match(SHIFTED, TWO))
    accuracy = [1.0] * 6 + [1 / 3] + [0.0] * 3
    f1 = [1.0] * 6 + [0.5] + [0.0] * 3
    assert list(result["accuracy_per_iou_threshold"]) == ["0.5", "0.55", "0.6", "0.65", "0.7", "0.75", "0.8", "0.85",
                                                          "0.9", "0.95"]
    assert list(result["accuracy_per_iou_threshold"].values()) == pytest.approx(accuracy)
    assert list(result["f1_per_iou_threshold"].values()) == pytest.approx(f1)
    assert result["mean_accuracy_over_iou_thresholds"] == pytest.approx(np.mean(accuracy))
    assert result["mean_f1_over_iou_thresholds"] == pytest.approx(np.mean(f1))
    assert result["iou_threshold"] == 0.5 and result["mean_true_score"] == pytest.approx(0.775)
    assert result["panoptic_quality"] == pytest.approx(0.775) and result["mean_matched_score"] == pytest.approx(0.775)
    assert json.loads(json.dumps(result)) == result  # plain Python values, as the JSON report needs


@pytest.mark.parametrize("dtype, label", [(np.uint8, 255), (np.uint16, 65535), (np.int32, 2 ** 31 - 1),
                                          (np.int64, 2 ** 31 - 1)])
def test_labels_of_any_integer_type_up_to_2_to_the_31(dtype, label):
    # The type's largest label: were label + 1 to wrap around, it would fall on the background.
    predicted = np.where(SHIFTED == 2, label, SHIFTED).astype(dtype)
    reference = np.where(TWO == 1, label, TWO).astype(dtype)
    assert statistics(match(predicted, reference)) == statistics(match(SHIFTED, TWO))


@pytest.mark.parametrize("predicted, reference, message", [
    (np.zeros((4, 4), int), np.zeros((4, 5), int), "differs from ground truth shape"),
    (np.zeros(4, int), np.zeros(4, int), "expected an image [H, W] or a stack"),
    (np.zeros((4, 4)), np.zeros((4, 4), int), "predicted instances have pixel type float64"),
    (np.zeros((4, 4), int), np.full((4, 4), -1), "reference instance labels span [-1, -1]"),
    (np.full((4, 4), 2 ** 31), np.zeros((4, 4), int), "outside [0, 2**31)"),
])
def test_bad_input_is_a_one_line_error(predicted, reference, message):
    with pytest.raises(PipelineError, match=re.escape(message)):
        match(predicted, reference)


def test_thresholds_below_one_half_are_refused():
    with pytest.raises(PipelineError, match="below 0.5 the matching needs an assignment solver"):
        statistics(match(TWO, TWO), 0.45)
