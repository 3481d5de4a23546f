import numpy as np
import pytest

from pipeline.metrics import foreground_iou, isbi_thresholds, pixel_accuracy, pixel_error


def test_threshold_grid_is_the_reference_double_accumulator():
    grid = isbi_thresholds()
    assert len(grid) == 11
    assert grid[3] == 0.30000000000000004 and grid[8] == 0.7999999999999999
    assert grid[9] == 0.8999999999999999 and grid[10] == 0.9999999999999999


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
    # In double, 0.4 is not above the grid value 0.4, so t = 0.4 separates the pixels ...
    assert pixel_error(np.array([[0.5, 0.4]], np.float64), truth) == (0.0, 0.4)
    # ... but float32(0.4) = 0.4000000059604645 is, as in the reference.
    assert pixel_error(np.array([[0.5, 0.4]], np.float32), truth)[0] == pytest.approx(1 / 3)


def test_foreground_iou_and_accuracy():
    truth = np.array([[1, 1, 0, 0]])
    probability = np.array([[0.9, 0.2, 0.7, 0.1]])
    assert foreground_iou(probability, truth) == pytest.approx(1 / 3)
    assert pixel_accuracy(probability, truth) == 0.5
    assert foreground_iou(np.zeros((2, 2)), np.zeros((2, 2))) == 1.0
