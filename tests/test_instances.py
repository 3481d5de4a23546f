"""Cell instances: components against a flood fill by hand, the watershed's cuts, min_size,
label types, stacks, the measurements and the outlines."""

from collections import deque

import cv2
import numpy as np
import pytest
import tifffile

from pipeline.files import io
from pipeline.inference.labelling.instances import cell_instances, cell_mask, label_image, measure, outlines


def flood_fill(cells: np.ndarray) -> list[set[tuple[int, int]]]:
    """The 4-connected components of a mask, by breadth-first search, in raster order of their first pixel."""
    seen = np.zeros(cells.shape, bool)
    found = []
    for start in zip(*np.nonzero(cells)):
        if seen[start]:
            continue
        component, queue = set(), deque([start])
        seen[start] = True
        while queue:
            y, x = queue.popleft()
            component.add((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < cells.shape[0] and 0 <= nx < cells.shape[1] and cells[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        found.append(component)
    return found


def labelled(labels: np.ndarray) -> list[set[tuple[int, int]]]:
    """The pixels of labels 1..N, in that order."""
    return [set(zip(*np.nonzero(labels == k))) for k in range(1, labels.max() + 1)]


def discs_with_bridge(radii: tuple[int, int], bridge: int = 3) -> tuple[np.ndarray, tuple, tuple]:
    """A probability of cell: two discs 4 px apart, joined by a bridge `bridge` px wide; and their centres."""
    probability = np.zeros((70, 110), np.float32)
    first = (35, 8 + radii[0])
    second = (35, first[1] + radii[0] + 4 + radii[1])
    for (y, x), radius in zip((first, second), radii):
        cv2.circle(probability, (x, y), radius, 1.0, -1)
    probability[35 - bridge // 2:35 + bridge // 2 + 1, first[1]:second[1]] = 1.0
    return probability, first, second


@pytest.mark.parametrize("seed", range(4))
def test_components_are_the_4_connected_cells_of_a_flood_fill_numbered_in_raster_order(seed):
    rng = np.random.default_rng(seed)
    probability = rng.random((30, 40))
    labels = cell_instances(probability, 0.45)
    assert labels.dtype == np.int32
    assert labelled(labels) == flood_fill(probability > 0.45)


def test_diagonal_neighbours_are_two_cells():
    probability = np.array([[1, 0], [0, 1]], np.float32)
    np.testing.assert_array_equal(cell_instances(probability), [[1, 0], [0, 2]])


def test_the_threshold_is_compared_in_double_precision():
    # float32(0.4) is 0.4000000059604645: above the double 0.4, as pipeline.metrics.common has it.
    probability = np.full((2, 2), 0.4, np.float32)
    assert cell_mask(probability, 0.4).all()
    assert cell_instances(probability, 0.4).max() == 1


@pytest.mark.parametrize("radii", [(15, 15), (20, 8)])
def test_watershed_splits_discs_joined_by_a_thin_bridge_that_components_merge(radii):
    probability, first, second = discs_with_bridge(radii)
    assert cell_instances(probability).max() == 1
    labels = cell_instances(probability, method="watershed")
    assert labels.max() == 2
    assert labels[first] != labels[second] and 0 not in (labels[first], labels[second])
    # Only a cut across the 3 px bridge is lost, one pixel wide.
    assert not labels[probability <= 0.5].any()
    assert np.count_nonzero((probability > 0.5) & (labels == 0)) == 3


def test_watershed_leaves_whole_cells_and_wide_joins_alone():
    probability = np.zeros((60, 90), np.float32)
    cv2.ellipse(probability, (25, 30), (20, 10), 30, 0, 360, 1.0, -1)  # one elongated cell
    cv2.rectangle(probability, (50, 5), (85, 20), 1.0, -1)  # one rectangle
    probability[35:55, 50:85] = 1.0
    probability[20:35, 60:75] = 1.0  # joins the rectangles: a neck wider than half their width
    expected = cell_instances(probability)
    assert expected.max() == 2
    np.testing.assert_array_equal(cell_instances(probability, method="watershed"), expected)


def test_watershed_cuts_where_the_probability_dips():
    # Equal discs, but the bridge's probability dips at column 40, off its middle (column 53).
    probability, first, second = discs_with_bridge((15, 15))
    probability[34:37, 40] = 0.6
    labels = cell_instances(probability, method="watershed")
    assert labels.max() == 2
    np.testing.assert_array_equal(np.flatnonzero((probability[35] > 0.5) & (labels[35] == 0)), [40])


def test_min_size_drops_small_objects_and_renumbers_the_rest():
    probability = np.zeros((20, 30))
    probability[1, 1] = 1  # 1 px
    probability[3:6, 3:8] = 1  # 15 px
    probability[10:14, 2:6] = 1  # 16 px
    probability[2:4, 20:25] = 1  # 10 px
    probability[12:18, 20:28] = 1  # 48 px
    labels = cell_instances(probability, min_size=16)
    assert labelled(labels) == [c for c in flood_fill(probability > 0.5) if len(c) >= 16]
    assert sorted(np.unique(labels)) == [0, 1, 2]
    assert cell_instances(probability, min_size=1).max() == 5


def test_labels_are_uint16_up_to_65535_cells_and_uint32_beyond(tmp_path):
    assert label_image(np.array([[0, 65535]], np.int32)).dtype == np.uint16
    assert label_image(np.zeros((2, 2), np.int32)).dtype == np.uint16
    # 265 x 265 = 70,225 isolated pixels, each its own 4-connected cell.
    probability = np.zeros((530, 530), np.float32)
    probability[::2, ::2] = 1
    labels = cell_instances(probability, min_size=1)
    assert labels.max() == 265 * 265
    stored = label_image(labels)
    assert stored.dtype == np.uint32
    io.encode_tiff(tmp_path / "labels.tif", stored)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "labels.tif"), labels)


@pytest.mark.parametrize("method", ["components", "watershed"])
def test_a_stack_is_labelled_slice_by_slice(method):
    probability = np.stack([discs_with_bridge((15, 15))[0], np.random.default_rng(0).random((70, 110)),
                            np.zeros((70, 110))])
    labels = cell_instances(probability, 0.5, method, min_size=2)
    assert labels.shape == probability.shape
    for slice_labels, slice_probability in zip(labels, probability):
        np.testing.assert_array_equal(slice_labels, cell_instances(slice_probability, 0.5, method, min_size=2))
    assert labels[1].max() > 1 and labels[2].max() == 0  # each slice numbered from 1


def test_measurements_agree_with_numpy():
    rng = np.random.default_rng(5)
    probability = rng.uniform(0.6, 1.0, (40, 50))
    probability[rng.random((40, 50)) < 0.45] = 0.1
    labels = cell_instances(probability)
    table = measure(labels, probability)
    assert table.shape == (labels.max(), 9)
    for row in table:
        rows, cols = np.nonzero(labels == row[0])
        expected = [row[0], rows.size, rows.mean(), cols.mean(), rows.min(), cols.min(), rows.max(), cols.max(),
                    probability[rows, cols].mean()]
        np.testing.assert_allclose(row, expected, rtol=1e-12)
    assert measure(np.zeros((3, 3), np.int32), np.zeros((3, 3))).shape == (0, 9)
    with pytest.raises(ValueError, match="2 is missing"):
        measure(np.array([[1, 3]]), np.ones((1, 2)))


def test_outlines_are_each_cells_own_edge_pixels():
    labels = np.zeros((8, 10), np.int32)
    labels[1:6, 1:5] = 1
    labels[1:6, 5:9] = 2  # touches cell 1
    labels[6:8, 0:3] = 3  # at the image's border
    edge = outlines(labels)
    ring = np.ones((5, 4), bool)
    ring[1:-1, 1:-1] = False
    np.testing.assert_array_equal(edge[1:6, 1:5], ring)
    np.testing.assert_array_equal(edge[1:6, 5:9], ring)
    # The image's border is no edge: only cell 3's top row and right column are.
    np.testing.assert_array_equal(edge[6:8, 0:3], [[True, True, True], [False, False, True]])
    assert not edge[labels == 0].any()
