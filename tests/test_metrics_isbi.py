"""The ISBI 2012 pixel and Rand errors, IoU and accuracy, worked out by hand."""

import numpy as np
import pytest

from pipeline.metrics.isbi import foreground_iou, pixel_accuracy, pixel_error, rand_error_sweep


def test_pixel_error_by_hand():
    truth = np.array([[1, 1, 0, 0]])
    # t = 0: predicted cells {0, 1, 2}: TP 2, FP 1, FN 0 -> p = 2/3, r = 1, F = 0.8.
    # t = 0.1 .. 0.5: {0, 2}: F = 0.5.  t = 0.6 .. 0.8: {0}: p = 1, r = 0.5, F = 2/3.
    probability = np.array([[0.9, 0.1, 0.6, 0.0]], np.float32)
    assert pixel_error(probability, truth) == (pytest.approx(0.2), 0.0)
    assert pixel_error(probability[:, :2], truth[:, :2]) == (0.0, 0.0)  # first best threshold


def test_threshold_is_strict_and_perfect_prediction_scores_zero():
    truth = np.array([[255, 0]])
    assert pixel_error(np.array([[1.0, 0.0]], np.float32), truth)[0] == 0.0
    # A pixel exactly at the threshold is membrane: 0.5 is not above the grid value 0.5.
    assert pixel_error(np.array([[0.6, 0.5]]), truth) == (0.0, 0.5)
    # In double, 0.4 is not above the grid value 0.4, so t = 0.4 separates the pixels ...
    assert pixel_error(np.array([[0.5, 0.4]], np.float64), truth) == (0.0, 0.4)
    # ... but float32(0.4) = 0.4000000059604645 is, as in the reference.
    assert pixel_error(np.array([[0.5, 0.4]], np.float32), truth)[0] == pytest.approx(1 / 3)


def test_float_grid_values_decide_the_threshold():
    truth = np.array([[1, 0]])
    # 0.3 is not above 0.30000000000000004, so the 4th grid value is the first perfect one.
    assert pixel_error(np.array([[0.35, 0.3]]), truth) == (0.0, 0.30000000000000004)
    # 1.0 is above the last value 0.9999999999999999; 0.95 is not: only it separates them.
    assert pixel_error(np.array([[1.0, 0.95]]), truth) == (0.0, 0.9999999999999999)


def test_all_cell_and_all_membrane_proposals():
    truth = np.zeros((4, 4), np.uint8)
    truth[:, :3] = 255  # 12 cells, 4 membrane, one segment of 12
    all_cell, all_membrane = np.ones((4, 4)), np.zeros((4, 4))
    # all cell: TP 12, FP 4 at every t: p = 3/4, r = 1.
    assert pixel_error(all_cell, truth)[0] == pytest.approx(1 - 2 * 0.75 / 1.75)
    # all membrane: nothing predicted: p = 1 (no FP), r = 0, F = 0.
    assert pixel_error(all_membrane, truth)[0] == 1.0
    # Rand, all membrane: 12 singletons: TP = 12, TP + FP = 12, TP + FN = 144.
    r = 12 / 144
    assert rand_error_sweep(all_membrane, truth).error == pytest.approx(1 - 2 * r / (1 + r))
    assert rand_error_sweep(all_cell, truth).error == 0.0  # one segment over all cells


def test_stack_adds_counts_before_the_f_score():
    truth = np.ones((3, 2, 4), np.uint8)
    probability = np.ones((3, 2, 4))
    probability[0, 0, :] = 0  # slice 0: 4 of 8 cells missed; the others perfect
    # Summed: TP 20, FN 4: r = 5/6, F = 10/11. Averaging slices would give (1/3)(1 - 2/3).
    assert pixel_error(probability, truth)[0] == pytest.approx(1 - 10 / 11)
    assert pixel_error(probability, truth)[0] != pytest.approx(np.mean([pixel_error(p, truth[0])[0] for p in probability]))


def test_foreground_iou_and_accuracy():
    truth = np.array([[1, 1, 0, 0]])
    probability = np.array([[0.9, 0.2, 0.7, 0.1]])
    assert foreground_iou(probability, truth) == pytest.approx(1 / 3)
    assert pixel_accuracy(probability, truth) == 0.5
    assert foreground_iou(np.zeros((2, 2)), np.zeros((2, 2))) == 1.0
