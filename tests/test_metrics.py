"""Metrics worked out by hand, against a plain reference-order oracle, and on real ISBI labels."""

import numpy as np
import pytest
import tifffile

from pipeline import metrics
from pipeline.errors import PipelineError
from pipeline.metrics import (MERGER, SPLIT, foreground_iou, isbi_thresholds, pixel_accuracy, pixel_error,
                              rand_error_sweep, seg, warping_error_sweep, warping_mismatches, warping_thresholds)

from conftest import ISBI_DIR


# --- an independent oracle: the reference's warping loop, one pixel at a time -----------

def _ring(labels, y, x):
    return [labels[y + dy][x + dx] for dy, dx in ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))]


def _groups(cells, adjacent):
    """Connected groups of a set of (dy, dx) positions under `adjacent`."""
    groups, left = [], set(cells)
    while left:
        stack = [left.pop()]
        group = set(stack)
        while stack:
            p = stack.pop()
            for q in [q for q in left if adjacent(p, q)]:
                left.remove(q)
                group.add(q)
                stack.append(q)
        groups.append(group)
    return groups


def oracle_is_simple(labels, y, x):
    """METRICS.md's definition, straight from the 3x3 neighbourhood."""
    ring = dict(zip([(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)], _ring(labels, y, x)))
    four = lambda p, q: abs(p[0] - q[0]) + abs(p[1] - q[1]) == 1
    eight = lambda p, q: max(abs(p[0] - q[0]), abs(p[1] - q[1])) == 1
    cells = _groups([p for p, v in ring.items() if v], four)
    touching = [g for g in cells if g & {(-1, 0), (1, 0), (0, -1), (0, 1)}]
    return len(touching) == 1 and len(_groups([p for p, v in ring.items() if not v], eight)) == 1


def oracle_warp(truth, probability, t):
    """Warps like the reference: sequential visits, column-major then stable by key."""
    height, width = truth.shape
    labels = [[0] * (width + 2)] + [[0] + [int(v) for v in row] + [0] for row in truth] + [[0] * (width + 2)]
    predicted = [[0] * (width + 2)] + [[0] + [int(v > t) for v in row] + [0] for row in probability] + [[0] * (width + 2)]
    before = None
    while True:
        mismatches = [(x, y) for x in range(1, width + 1) for y in range(1, height + 1) if labels[y][x] != predicted[y][x]]
        if not mismatches or len(mismatches) == before:
            return np.array(labels, bool)[1:-1, 1:-1]
        before = len(mismatches)
        key = lambda p: -float(np.float32(abs(float(probability[p[1] - 1][p[0] - 1]) - t)))
        for x, y in sorted(mismatches, key=key):
            if oracle_is_simple(labels, y, x):
                labels[y][x] ^= 1


def test_vectorised_warping_visits_in_the_reference_order():
    rng = np.random.default_rng(0)
    for trial in range(60):
        truth = rng.random((9, 11)) < rng.uniform(0.3, 0.8)
        probability = rng.random((9, 11))
        if trial % 2:
            probability = np.round(probability * 3) / 3  # many equal keys: scan order decides
        for t in (0.0, 0.30000000000000004, 0.5):
            np.testing.assert_array_equal(metrics.warp_truth(truth, probability, t), oracle_warp(truth, probability, t))


def test_simple_point_table_matches_the_definition():
    for code in range(256):
        labels = [[0] * 3 for _ in range(3)]
        for bit, (dy, dx) in enumerate(((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))):
            labels[1 + dy][1 + dx] = (code >> bit) & 1
        assert metrics._SIMPLE[code] == oracle_is_simple(labels, 1, 1), code


# --- thresholds and pixel error -------------------------------------------------------

def test_threshold_grid_is_the_reference_double_accumulator():
    grid = isbi_thresholds()
    assert len(grid) == 11
    assert grid[3] == 0.30000000000000004 and grid[8] == 0.7999999999999999
    assert grid[9] == 0.8999999999999999 and grid[10] == 0.9999999999999999
    assert warping_thresholds() == grid[:10]


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


# --- warping and Rand error by hand -----------------------------------------------------

def test_split_of_a_5x5_cell():
    truth = np.ones((5, 5), bool)
    probability = np.ones((5, 5))
    probability[:, 2] = 0  # a membrane line cuts the cell in two
    # Warping erases the line from the top until its last pixel, which would cut the
    # cell: that one pixel is a split, at every threshold.
    kinds = warping_mismatches(probability, truth, 0.5)
    assert np.argwhere(kinds == SPLIT).tolist() == [[4, 2]] and np.count_nonzero(kinds) == 1
    sweep = warping_error_sweep(probability, truth)
    assert sweep.error == 1 / 25 and sweep.threshold == 0.0
    # Rand: truth one segment of 25; proposal 10 + 10 + 5 singletons:
    # TP = 100 + 100 + 5 = TP + FP, TP + FN = 625.
    r = 205 / 625
    assert rand_error_sweep(probability, truth).error == pytest.approx(1 - 2 * r / (1 + r))
    assert pixel_error(probability, truth)[0] == pytest.approx(1 / 9)  # p = 1, r = 0.8


def test_merger_bridge_through_a_membrane():
    truth = np.ones((5, 5), bool)
    truth[:, 2] = False
    probability = truth.astype(float)
    probability[2, 2] = 1.0  # one pixel joins the two cells
    kinds = warping_mismatches(probability, truth, 0.5)
    assert np.argwhere(kinds == MERGER).tolist() == [[2, 2]] and np.count_nonzero(kinds) == 1
    assert warping_error_sweep(probability, truth).error == 1 / 25


def test_hole_and_object_deletion_do_not_count():
    truth = np.ones((5, 5), bool)
    hole = np.ones((5, 5))
    hole[2, 2] = 0
    assert warping_error_sweep(hole, truth).error == 0.0
    assert pixel_error(hole, truth)[0] > 0
    truth = np.zeros((7, 7), bool)
    truth[2:5, 2:5] = True  # a 3x3 object that the proposal misses
    assert warping_error_sweep(np.zeros((7, 7)), truth).error == 0.0


def test_identical_labels_give_zero_errors():
    truth = np.zeros((6, 6), np.uint8)
    truth[1:3, 1:5] = truth[4:6, :] = 255
    probability = truth / 255.0
    for sweep in (metrics.pixel_error_sweep, rand_error_sweep, warping_error_sweep, metrics.v_rand_sweep,
                  metrics.v_info_sweep):
        assert sweep(probability, truth).error == 0.0, sweep.__name__


# --- ground truth without membrane or without cells --------------------------------------

_SWEEPS = (metrics.pixel_error_sweep, rand_error_sweep, warping_error_sweep, metrics.v_rand_sweep, metrics.v_info_sweep)


def test_truth_without_membrane_scores_zero_at_threshold_zero_whatever_is_predicted():
    truth = np.ones((12, 12), bool)
    membranes = np.full((12, 12), 0.9, np.float32)
    membranes[:, 5] = membranes[6, :] = 0.05  # four predicted cells: at t >= 0.05 a split cell
    warning = metrics.truth_warning(truth)
    assert warning.startswith("ground truth has no membrane pixels; warping, Rand and pixel errors, 1-Vrand and "
                              "1-Vinfo are 0 (at threshold 0.0)")
    for sweep in _SWEEPS:
        assert (sweep(membranes, truth).error, sweep(membranes, truth).threshold) == (0.0, 0.0), sweep.__name__
        assert max(sweep(membranes, truth).errors) > 0, sweep.__name__  # the membranes count at higher thresholds
    # "unless a probability is exactly 0": then threshold 0.0 sees the membranes too.
    membranes[:, 5] = 0.0
    assert rand_error_sweep(membranes, truth).error > 0 and metrics.pixel_error_sweep(membranes, truth).error > 0


def test_truth_without_cells_leaves_only_pixel_accuracy_meaningful():
    truth = np.zeros((12, 12), np.uint8)
    rng = np.random.default_rng(5)
    probability = rng.uniform(0.0, 1.0, (12, 12)).astype(np.float32)
    probability[2:9, 3:8] = 0.99  # a confident false cell
    warning = metrics.truth_warning(truth)
    assert warning == ("ground truth has no cell pixels; Rand and warping errors, 1-Vrand and 1-Vinfo are 0 by "
                       "definition, pixel error is 1 if a probability is exactly 1 and 0 otherwise, IoU is 0 if any "
                       "pixel is predicted cell and 1 otherwise, and SEG (where scored) is 0")
    for sweep in (rand_error_sweep, warping_error_sweep, metrics.v_rand_sweep, metrics.v_info_sweep):
        assert set(sweep(probability, truth).errors) == {0.0}, sweep.__name__
    assert pixel_error(probability, truth)[0] == 0.0
    assert foreground_iou(probability, truth) == 0.0 and foreground_iou(probability / 2, truth) == 1.0
    assert seg(metrics.cell_instances(probability), truth) == 0.0
    assert pixel_accuracy(probability, truth) == np.mean(probability <= 0.5)
    probability[0, 0] = 1.0
    assert pixel_error(probability, truth)[0] == 1.0


def test_truth_with_cells_and_membrane_has_no_warning():
    truth = np.ones((3, 8, 8), bool)
    assert metrics.truth_warning(truth[0]) is not None
    truth[1:, :, 4] = False
    # A stack counts as a whole: its summed counts mean something though slice 0 has no membrane.
    assert metrics.truth_warning(truth) is None and metrics.truth_warning(truth[1]) is None


# --- SEG ------------------------------------------------------------------------------

def test_seg_by_hand():
    reference = np.array([[1, 1, 1, 1, 0, 2, 2, 0]])
    predicted = np.array([[5, 5, 5, 0, 0, 7, 0, 7]])
    # object 1: 3 of 4 pixels in 5: J = 3/4. Object 2: 1 of 2 is not more than half: 0.
    assert seg(predicted, reference) == pytest.approx(0.375)
    assert seg(np.zeros((2, 2), int), np.zeros((2, 2), int)) == 0.0


def test_seg_agrees_with_py_ctcmetrics(tmp_path):
    representations = pytest.importorskip("ctc_metrics.utils.representations", reason="py-ctcmetrics not installed")
    from ctc_metrics.metrics import seg as ctc_seg

    rng = np.random.default_rng(3)
    labels_ref, ious, ours = [], [], []
    for frame in range(6):
        reference = np.kron(rng.integers(0, 6, (8, 8)), np.ones((4, 4), int)).astype(np.uint16)
        predicted = np.where(rng.random(reference.shape) < 0.15, rng.integers(0, 9, reference.shape),
                             np.roll(reference, frame % 3, axis=1)).astype(np.uint16)
        tifffile.imwrite(tmp_path / f"ref{frame}.tif", reference)
        tifffile.imwrite(tmp_path / f"res{frame}.tif", predicted)
        refs, _, _, _, iou = representations.match(str(tmp_path / f"ref{frame}.tif"), str(tmp_path / f"res{frame}.tif"))
        labels_ref.append(refs)
        ious.append(iou)
        ours.append((predicted, reference))
    expected = ctc_seg(labels_ref, ious)
    assert seg(np.stack([p for p, _ in ours]), np.stack([r for _, r in ours])) == pytest.approx(expected, abs=1e-12)


# --- bad input --------------------------------------------------------------------------

@pytest.mark.parametrize("probability, truth, message", [
    (np.zeros((4, 4)), np.zeros((4, 5)), "differs from ground truth shape"),
    (np.full((4, 4), 1.5), np.zeros((4, 4)), "outside [0, 1]"),
    (np.zeros((4, 4)), np.arange(16).reshape(4, 4), "ground truth is not binary"),
    (np.full((4, 4), np.nan), np.zeros((4, 4)), "NaN"),
])
def test_bad_input_is_a_one_line_error(probability, truth, message):
    for metric in (metrics.pixel_error_sweep, rand_error_sweep, warping_error_sweep):
        with pytest.raises(PipelineError, match=message.replace("[", r"\[").replace("]", r"\]")) as error:
            metric(probability, truth)
        assert "\n" not in str(error.value)


# --- real ISBI 2012 labels --------------------------------------------------------------

@pytest.fixture(scope="module")
def isbi_truth():
    path = ISBI_DIR / "train-labels.tif"
    if not path.is_file():
        pytest.skip(f"real ISBI 2012 labels not found at {path}")
    return tifffile.imread(path)[0] > 0


def test_real_labels_against_themselves_score_zero(isbi_truth):
    probability = isbi_truth.astype(np.float32)
    assert pixel_error(probability, isbi_truth)[0] == 0.0
    assert rand_error_sweep(probability, isbi_truth).error == 0.0
    assert np.count_nonzero(warping_mismatches(probability, isbi_truth, 0.5)) == 0


def test_real_labels_deleted_membrane_is_a_merger(isbi_truth):
    cells = metrics.cell_instances(isbi_truth.astype(float))
    y = isbi_truth.shape[0] // 2
    # The first run of membrane on the middle row with different cells at its two ends.
    edges = np.flatnonzero(np.diff(isbi_truth[y].astype(int)))
    start, stop = next((a + 1, b + 1) for a, b in zip(edges[::2], edges[1::2])
                       if isbi_truth[y, a] and cells[y, a] != cells[y, b + 1])
    probability = isbi_truth.astype(np.float32)
    probability[y, start:stop] = 1.0  # the membrane between them deleted on this row
    # Warping grows one cell along the bridge; the last pixel would join the two.
    kinds = warping_mismatches(probability, isbi_truth, 0.5)
    assert np.count_nonzero(kinds) == 1 and np.count_nonzero(kinds[y, start:stop] == MERGER) == 1


def test_real_labels_membrane_across_a_cell_is_a_split(isbi_truth):
    cells = metrics.cell_instances(isbi_truth.astype(float))
    label = np.argmax(np.bincount(cells.ravel())[1:]) + 1  # the largest cell
    rows = np.flatnonzero((cells == label).any(axis=1))
    y = rows[len(rows) // 2]
    probability = isbi_truth.astype(np.float32)
    probability[y, cells[y] == label] = 0.0  # membrane drawn across the cell's middle row
    kinds = warping_mismatches(probability, isbi_truth, 0.5)
    assert np.count_nonzero(kinds == SPLIT) >= 1 and np.count_nonzero(kinds == MERGER) == 0


def test_streaming_pixel_error_equals_the_reference_over_batches():
    from pipeline.metrics import PixelError, pixel_error

    rng = np.random.default_rng(11)
    truth = rng.integers(0, 2, size=(3, 2, 16, 16))
    cell = rng.uniform(size=(3, 2, 16, 16)).astype(np.float32)
    cell[0, 0, :4] = 0.5  # on a grid value: strict comparison in double decides
    metric = PixelError()
    for labels, probability in zip(truth, cell):
        metric.update_state(labels, np.stack([1 - probability, probability], -1))
    expected, _ = pixel_error(cell.reshape(6, 16, 16), truth.reshape(6, 16, 16))
    assert float(metric.result()) == pytest.approx(expected, abs=1e-7)
    metric.reset_state()
    metric.update_state(truth[0], np.stack([1 - truth[0], truth[0]], -1).astype(np.float32))
    assert float(metric.result()) == 0.0
