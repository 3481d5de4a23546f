"""Tests of pipeline.data.weight_map against values worked out by hand and a brute-force reference."""

import math

import numpy as np
import pytest

from pipeline.data.weight_map import (
    border_distances, class_balance, instances_from_binary, separate_instances, weight_map,
)

W0, SIGMA = 10.0, 5.0


def border_term(d1: float, d2: float, w0: float = W0, sigma: float = SIGMA) -> float:
    return w0 * math.exp(-((d1 + d2) ** 2) / (2 * sigma**2))


def brute_force_distances(instances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """d1, d2 from every pixel to every pixel of every instance; inf where missing."""
    rows, cols = np.indices(instances.shape)
    per_instance = []
    for label in np.unique(instances[instances > 0]):
        r, c = np.nonzero(instances == label)
        dist = np.hypot(rows[..., None] - r, cols[..., None] - c).min(axis=-1)
        per_instance.append(dist)
    per_instance += [np.full(instances.shape, np.inf)] * 2
    ordered = np.sort(np.stack(per_instance), axis=0)
    return ordered[0], ordered[1]


def random_rectangles(seed: int, size: int, count: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    instances = np.zeros((size, size), np.int32)
    for label in range(1, count + 1):
        r, c = rng.integers(0, size - 2, 2)
        h, w = rng.integers(1, 9, 2)
        instances[r : r + h, c : c + w] = label  # later rectangles may cover earlier ones
    return instances


def test_single_cell_is_class_balance_only():
    instances = np.zeros((10, 10), np.int32)
    instances[3:7, 3:7] = 1  # 16 cell pixels, 84 background pixels
    w = weight_map(instances)
    assert w.dtype == np.float32 and w.shape == (10, 10)
    np.testing.assert_allclose(w[instances == 1], 1 / (2 * 0.16), rtol=1e-6)
    np.testing.assert_allclose(w[instances == 0], 1 / (2 * 0.84), rtol=1e-6)
    assert w[4, 4] == pytest.approx(3.125)
    assert float(w.astype(np.float64).mean()) == pytest.approx(1.0, rel=1e-6)
    np.testing.assert_array_equal(weight_map(instances, balance_classes=False), 1.0)


@pytest.mark.parametrize("value", [0, 1])
def test_single_class_image_is_all_ones(value):
    instances = np.full((8, 9), value, np.int32)
    np.testing.assert_array_equal(weight_map(instances), 1.0)


def test_two_squares_with_one_pixel_gap():
    instances = np.zeros((16, 13), np.int32)
    instances[8:12, 2:6] = 1
    instances[8:12, 7:11] = 2  # column 6 is a one-pixel gap between the squares
    w = weight_map(instances).astype(np.float64)
    wc_cell, wc_bg = 208 / (2 * 32), 208 / (2 * 176)

    np.testing.assert_allclose(w[instances > 0], wc_cell, rtol=1e-6)
    for row in range(8, 12):  # in the gap both squares are one pixel away
        assert w[row, 6] == pytest.approx(wc_bg + W0 * math.exp(-4 / 50), rel=1e-6)
    for k in range(1, 9):  # k rows above the gap: both corners at sqrt(k^2 + 1)
        d = math.sqrt(k * k + 1)
        assert w[8 - k, 6] == pytest.approx(wc_bg + border_term(d, d), rel=1e-6)
    # Left of the left square: 2 px to it and 7 px to the right square.
    assert w[9, 0] == pytest.approx(wc_bg + border_term(2, 7), rel=1e-6)


@pytest.mark.parametrize("seed, sigma", [(0, 5.0), (1, 2.0), (2, 1.0)])
def test_matches_brute_force(seed, sigma):
    instances = random_rectangles(seed, size=64, count=8)
    d1, d2 = brute_force_distances(instances)
    wc = class_balance((instances > 0).astype(np.int32)).astype(np.float64)
    expected = wc + np.where(instances == 0, W0 * np.exp(-((d1 + d2) ** 2) / (2 * sigma**2)), 0)
    np.testing.assert_allclose(weight_map(instances, sigma=sigma), expected, rtol=0, atol=1e-4)


def test_border_distances_match_brute_force_and_truncate():
    instances = random_rectangles(3, size=48, count=6)
    expected_d1, expected_d2 = brute_force_distances(instances)
    d1, d2 = border_distances(instances, np.inf)
    np.testing.assert_allclose(d1, expected_d1, atol=1e-4)
    np.testing.assert_allclose(d2, expected_d2, atol=1e-4)
    d1, d2 = border_distances(instances, 6.0)
    np.testing.assert_allclose(d1, np.where(expected_d1 <= 6, expected_d1, np.inf), atol=1e-4)
    np.testing.assert_allclose(d2, np.where(expected_d2 <= 6, expected_d2, np.inf), atol=1e-4)


def test_class_balance_has_mean_one_for_any_labels():
    semantic = np.array([[0, 0, 0, 5], [5, 7, 7, 7]], np.int64)  # fractions 3/8, 2/8, 3/8
    w = class_balance(semantic)
    a, b = 1 / (3 * 3 / 8), 1 / (3 * 2 / 8)
    np.testing.assert_allclose(w, [[a, a, a, b], [b, a, a, a]], rtol=1e-6)
    assert float(w.astype(np.float64).mean()) == pytest.approx(1.0)


def test_instances_from_binary_uses_4_connectivity():
    labels = np.zeros((6, 6), np.uint8)
    labels[1:3, 1:3] = 255
    labels[3:5, 3:5] = 255  # touches the first blob only at a corner
    instances = instances_from_binary(labels)
    assert instances.dtype == np.int32
    assert set(np.unique(instances)) == {0, 1, 2}
    assert instances[0, 0] == 0 and instances[1, 1] != instances[4, 4]
    np.testing.assert_array_equal(instances > 0, labels > 0)


@pytest.mark.parametrize(
    "bad", [np.zeros((4, 4), np.float32), np.zeros((2, 4, 4), np.int32), np.zeros(4, np.int32)]
)
def test_rejects_non_2d_integer_input(bad):
    for function in (weight_map, instances_from_binary, class_balance):
        with pytest.raises(ValueError, match="2-D integer"):
            function(bad)


def test_realistic_grid_of_touching_cells():
    labels = np.zeros((512, 512), np.uint8)
    for r in range(0, 512, 30):  # 28x28 cells, 2-px membranes: 18 x 18 cells, clipped at the edges
        for c in range(0, 512, 30):
            labels[r : r + 28, c : c + 28] = 1
    instances = instances_from_binary(labels)
    assert instances.max() == 324
    w = weight_map(instances)
    assert w.shape == (512, 512) and np.isfinite(w).all()
    # In a 2-px gap between two cells each pixel is 1 px from one cell and 2 px from the other.
    gap_pixel = (100, 58)
    wc_bg = class_balance(labels)[gap_pixel]
    assert w[gap_pixel] == pytest.approx(wc_bg + border_term(1, 2), rel=1e-5)


def test_separation_borders_between_touching_instances():
    instances = np.zeros((8, 12), np.int32)
    instances[1:7, 1:6] = 2
    instances[1:7, 6:11] = 1  # touches instance 2 along a whole column
    separated = separate_instances(instances)
    assert separated.dtype == np.int32
    # The lower-numbered instance yields one column; nothing else changes.
    np.testing.assert_array_equal(separated[1:7, 6], 0)
    expected = instances.copy()
    expected[:, 6] = 0
    np.testing.assert_array_equal(separated, expected)
    wide = separate_instances(instances, width=3)
    np.testing.assert_array_equal(wide[1:7, 6:9], 0)
    np.testing.assert_array_equal(wide[1:7, 9:11], 1)
    np.testing.assert_array_equal(wide[:, :6], instances[:, :6])


def test_separation_leaves_4_connected_components_alone():
    rng = np.random.default_rng(0)
    labels = (rng.uniform(size=(40, 40)) > 0.4).astype(np.uint8)  # many diagonal contacts
    instances = instances_from_binary(labels)
    np.testing.assert_array_equal(separate_instances(instances, 1), instances)


def test_separated_cells_get_the_border_weight():
    instances = np.zeros((12, 16), np.int32)
    instances[2:10, 2:8] = 1
    instances[2:10, 8:14] = 2
    separated = separate_instances(instances)
    w = weight_map(separated)
    wc_bg = class_balance((separated > 0).astype(np.int32))[5, 7]
    assert separated[5, 7] == 0  # the inserted border: 1 px from both cells
    assert w[5, 7] == pytest.approx(wc_bg + border_term(1, 1), rel=1e-6)


@pytest.mark.parametrize("width", [0, -1, 1.5, True])
def test_separation_width_must_be_a_positive_integer(width):
    with pytest.raises(ValueError, match="width must be an integer >= 1"):
        separate_instances(np.zeros((4, 4), np.int32), width)
