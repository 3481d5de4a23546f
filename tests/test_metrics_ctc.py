"""The Cell Tracking Challenge's SEG, by hand and against the challenge's own py-ctcmetrics."""

import numpy as np
import pytest
import tifffile

from pipeline.inference.labelling.instances import cell_instances
from pipeline.metrics.ctc import seg


def test_seg_by_hand():
    reference = np.array([[1, 1, 1, 1, 0, 2, 2, 0]])
    predicted = np.array([[5, 5, 5, 0, 0, 7, 0, 7]])
    # object 1: 3 of 4 pixels in 5: J = 3/4. Object 2: 1 of 2 is not more than half: 0.
    assert seg(predicted, reference) == pytest.approx(0.375)
    assert seg(np.zeros((2, 2), int), np.zeros((2, 2), int)) == 0.0


def test_seg_scores_the_cells_that_predict_labels():
    # Cells touching diagonally are two 4-connected instances, as in NAME_labels.tif.
    reference = np.kron(np.array([[1, 0], [0, 2]]), np.ones((2, 2), int))
    probability = np.where(reference > 0, 0.9, 0.1)
    predicted = cell_instances(probability, 0.5)
    np.testing.assert_array_equal(predicted, cell_instances(probability, 0.5, "components", min_size=1))
    np.testing.assert_array_equal(predicted, reference)
    assert seg(predicted, reference) == 1.0


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
