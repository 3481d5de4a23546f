"""The warping error against a plain reference-order oracle, by hand, and on real ISBI labels."""

import numpy as np
import pytest
import tifffile

from pipeline.inference.labelling.instances import cell_instances
from pipeline.metrics import warping
from pipeline.metrics.isbi import pixel_error, rand_error_sweep
from pipeline.metrics.warping import (MERGER, SPLIT, splits_and_mergers, warp_truth, warping_error_sweep,
                                      warping_mismatches)

from fakes import ISBI_DIR


# --- an independent oracle: the reference's warping loop, one pixel at a time ---------

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
            np.testing.assert_array_equal(warp_truth(truth, probability, t), oracle_warp(truth, probability, t))


def test_simple_point_table_matches_the_definition():
    for code in range(256):
        labels = [[0] * 3 for _ in range(3)]
        for bit, (dy, dx) in enumerate(((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))):
            labels[1 + dy][1 + dx] = (code >> bit) & 1
        assert warping._SIMPLE[code] == oracle_is_simple(labels, 1, 1), code


# --- warping and Rand error by hand ---------------------------------------------------

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


def test_splits_and_mergers_of_a_stack_add_up_to_the_warping_error():
    split_truth = np.ones((5, 5), bool)
    split = np.ones((5, 5))
    split[:, 2] = 0
    merger_truth = np.ones((5, 5), bool)
    merger_truth[:, 2] = False
    merger = merger_truth.astype(float)
    merger[2, 2] = 1.0
    probability, truth = np.stack([split, merger]), np.stack([split_truth, merger_truth])
    assert splits_and_mergers(probability, truth, 0.5) == {"splits": 1, "mergers": 1}
    assert warping_error_sweep(probability, truth).error == 2 / probability.size
    assert splits_and_mergers(merger_truth.astype(float), merger_truth, 0.5) == {"splits": 0, "mergers": 0}


def test_hole_and_object_deletion_do_not_count():
    truth = np.ones((5, 5), bool)
    hole = np.ones((5, 5))
    hole[2, 2] = 0
    assert warping_error_sweep(hole, truth).error == 0.0
    assert pixel_error(hole, truth)[0] > 0
    truth = np.zeros((7, 7), bool)
    truth[2:5, 2:5] = True  # a 3x3 object that the proposal misses
    assert warping_error_sweep(np.zeros((7, 7)), truth).error == 0.0


# --- real ISBI 2012 labels ------------------------------------------------------------

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
    cells = cell_instances(isbi_truth.astype(float))
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
    cells = cell_instances(isbi_truth.astype(float))
    label = np.argmax(np.bincount(cells.ravel())[1:]) + 1  # the largest cell
    rows = np.flatnonzero((cells == label).any(axis=1))
    y = rows[len(rows) // 2]
    probability = isbi_truth.astype(np.float32)
    probability[y, cells[y] == label] = 0.0  # membrane drawn across the cell's middle row
    kinds = warping_mismatches(probability, isbi_truth, 0.5)
    assert np.count_nonzero(kinds == SPLIT) >= 1 and np.count_nonzero(kinds == MERGER) == 0
