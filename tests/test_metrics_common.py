"""What the metric families share: the threshold grid, input checks, degenerate ground truth."""

import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.inference.labelling.instances import cell_instances
from pipeline.metrics.common import isbi_thresholds, truth_warning
from pipeline.metrics.ctc import seg
from pipeline.metrics.isbi import (foreground_iou, pixel_accuracy, pixel_error, pixel_error_sweep, rand_error_sweep,
                                   v_info_sweep, v_rand_sweep)
from pipeline.metrics.warping import warping_error_sweep, warping_thresholds

_SWEEPS = (pixel_error_sweep, rand_error_sweep, warping_error_sweep, v_rand_sweep, v_info_sweep)


def test_threshold_grid_is_the_reference_double_accumulator():
    grid = isbi_thresholds()
    assert len(grid) == 11
    assert grid[3] == 0.30000000000000004 and grid[8] == 0.7999999999999999
    assert grid[9] == 0.8999999999999999 and grid[10] == 0.9999999999999999
    assert warping_thresholds() == grid[:10]


def test_identical_labels_give_zero_errors():
    truth = np.zeros((6, 6), np.uint8)
    truth[1:3, 1:5] = truth[4:6, :] = 255
    probability = truth / 255.0
    for sweep in _SWEEPS:
        assert sweep(probability, truth).error == 0.0, sweep.__name__


# --- ground truth without membrane or without cells -----------------------------------

def test_truth_without_membrane_scores_zero_at_threshold_zero_whatever_is_predicted():
    truth = np.ones((12, 12), bool)
    membranes = np.full((12, 12), 0.9, np.float32)
    membranes[:, 5] = membranes[6, :] = 0.05  # four predicted cells: at t >= 0.05 a split cell
    warning = truth_warning(truth)
    assert warning.startswith("ground truth has no membrane pixels; warping, Rand and pixel errors, 1-Vrand and "
                              "1-Vinfo are 0 (at threshold 0.0)")
    for sweep in _SWEEPS:
        assert (sweep(membranes, truth).error, sweep(membranes, truth).threshold) == (0.0, 0.0), sweep.__name__
        assert max(sweep(membranes, truth).errors) > 0, sweep.__name__  # the membranes count at higher thresholds
    # "unless a probability is exactly 0": then threshold 0.0 sees the membranes too.
    membranes[:, 5] = 0.0
    assert rand_error_sweep(membranes, truth).error > 0 and pixel_error_sweep(membranes, truth).error > 0


def test_truth_without_cells_leaves_only_pixel_accuracy_meaningful():
    truth = np.zeros((12, 12), np.uint8)
    rng = np.random.default_rng(5)
    probability = rng.uniform(0.0, 1.0, (12, 12)).astype(np.float32)
    probability[2:9, 3:8] = 0.99  # a confident false cell
    warning = truth_warning(truth)
    assert warning == ("ground truth has no cell pixels; Rand and warping errors, 1-Vrand and 1-Vinfo are 0 by "
                       "definition, pixel error is 1 if a probability is exactly 1 and 0 otherwise, IoU is 0 if any "
                       "pixel is predicted cell and 1 otherwise, and SEG (where scored) is 0")
    for sweep in (rand_error_sweep, warping_error_sweep, v_rand_sweep, v_info_sweep):
        assert set(sweep(probability, truth).errors) == {0.0}, sweep.__name__
    assert pixel_error(probability, truth)[0] == 0.0
    assert foreground_iou(probability, truth) == 0.0 and foreground_iou(probability / 2, truth) == 1.0
    assert seg(cell_instances(probability), truth) == 0.0
    assert pixel_accuracy(probability, truth) == np.mean(probability <= 0.5)
    probability[0, 0] = 1.0
    assert pixel_error(probability, truth)[0] == 1.0


def test_truth_with_cells_and_membrane_has_no_warning():
    truth = np.ones((3, 8, 8), bool)
    assert truth_warning(truth[0]) is not None
    truth[1:, :, 4] = False
    # A stack counts as a whole: its summed counts mean something though slice 0 has no membrane.
    assert truth_warning(truth) is None and truth_warning(truth[1]) is None


# --- bad input ------------------------------------------------------------------------

@pytest.mark.parametrize("probability, truth, message", [
    (np.zeros((4, 4)), np.zeros((4, 5)), "differs from ground truth shape"),
    (np.full((4, 4), 1.5), np.zeros((4, 4)), "outside [0, 1]"),
    (np.zeros((4, 4)), np.arange(16).reshape(4, 4), "ground truth is not binary"),
    (np.full((4, 4), np.nan), np.zeros((4, 4)), "NaN"),
])
def test_bad_input_is_a_one_line_error(probability, truth, message):
    for metric in (pixel_error_sweep, rand_error_sweep, warping_error_sweep):
        with pytest.raises(PipelineError, match=message.replace("[", r"\[").replace("]", r"\]")) as error:
            metric(probability, truth)
        assert "\n" not in str(error.value)
