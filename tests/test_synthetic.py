"""Tests of the synthetic EM data set generator."""

import cv2
import numpy as np
import pytest

from pipeline.data.synthetic import synthetic_em_image, synthetic_em_stack


@pytest.fixture(scope="module")
def sample() -> tuple[np.ndarray, np.ndarray]:
    return synthetic_em_image(160, seed=7)


@pytest.fixture(scope="module")
def full_size() -> tuple[np.ndarray, np.ndarray]:
    return synthetic_em_image(384, seed=3)


def test_same_seed_same_arrays_different_seed_different_image():
    a_img, a_inst = synthetic_em_image(128, seed=1)
    b_img, b_inst = synthetic_em_image(128, seed=1)
    c_img, _ = synthetic_em_image(128, seed=2)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_inst, b_inst)
    assert np.mean(a_img != c_img) > 0.5


@pytest.mark.parametrize("size, shape", [(128, (128, 128)), ((96, 144), (96, 144))])
def test_dtypes_and_shapes(size, shape):
    img, inst = synthetic_em_image(size, seed=0)
    assert img.dtype == np.uint8 and img.shape == shape
    assert inst.dtype == np.int32 and inst.shape == shape


def test_membrane_fraction_and_cell_count_at_full_size(full_size):
    _, inst = full_size
    assert 0.15 < np.mean(inst == 0) < 0.40
    # Cells ~20-60 px across at cell_size=40: on the order of a hundred in 384 x 384.
    assert 50 < inst.max() < 250


def test_cell_size_scales_cells_not_image():
    _, small = synthetic_em_image(192, seed=4, cell_size=20.0)
    _, large = synthetic_em_image(192, seed=4, cell_size=40.0)
    assert small.max() > 2.5 * large.max()


def test_instances_are_single_4_connected_components_numbered_1_to_n(sample):
    _, inst = sample
    ids = np.unique(inst)
    assert ids[0] == 0 and np.array_equal(ids, np.arange(inst.max() + 1))
    for i in ids[1:]:
        n, _ = cv2.connectedComponents((inst == i).astype(np.uint8), connectivity=4)
        assert n == 2, f"cell {i} has {n - 1} pieces"


def test_no_two_cells_are_8_adjacent(sample):
    _, inst = sample
    for a, b in [
        (inst[:, :-1], inst[:, 1:]),
        (inst[:-1, :], inst[1:, :]),
        (inst[:-1, :-1], inst[1:, 1:]),
        (inst[:-1, 1:], inst[1:, :-1]),
    ]:
        assert not np.any((a > 0) & (b > 0) & (a != b))


def test_membrane_is_darker_but_darkness_alone_is_not_the_label(full_size):
    img, inst = full_size
    cell, mem = img[inst > 0].astype(float), img[inst == 0].astype(float)
    assert cell.mean() - mem.mean() > 40
    # Organelle blobs: a few percent of cell pixels are darker than typical membrane.
    assert np.mean(cell < np.median(mem)) > 0.01


def test_stack_shapes_and_distinct_images():
    imgs, insts = synthetic_em_stack(3, (96, 128), seed=5)
    assert imgs.shape == insts.shape == (3, 96, 128)
    assert imgs.dtype == np.uint8 and insts.dtype == np.int32
    assert not np.array_equal(imgs[0], imgs[1]) and not np.array_equal(imgs[1], imgs[2])
    again, _ = synthetic_em_stack(3, (96, 128), seed=5)
    np.testing.assert_array_equal(imgs, again)
    other, _ = synthetic_em_stack(3, (96, 128), seed=6)
    assert all(not np.array_equal(x, y) for x in imgs for y in other)
