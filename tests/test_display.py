"""Display scaling: values to 8-bit grey for pictures."""

import numpy as np

from pipeline.display import grey8


def test_bounds_map_to_black_and_white_and_beyond_them_is_clipped():
    values = np.array([-1.0, 0.0, 1.0, 1.999, 2.0, 3.0])
    np.testing.assert_array_equal(grey8(values, (0.0, 2.0)), [0, 0, 127, 254, 255, 255])  # truncated, not rounded
    assert grey8(np.array([False, True]), (0, 1)).tolist() == [0, 255]


def test_default_bounds_ignore_a_few_extreme_pixels():
    values = np.append(np.arange(1000.0), 1e6)  # one hot pixel
    grey = grey8(values)
    assert grey.dtype == np.uint8 and grey[0] == 0 and grey[-1] == 255
    assert 120 < grey[500] < 135  # the rest keeps its contrast instead of turning black


def test_equal_bounds_split_black_from_white():
    assert grey8(np.full((2, 2), 7.0)).tolist() == [[0, 0], [0, 0]]
    assert grey8(np.array([6.0, 7.0, 8.0]), (7.0, 7.0)).tolist() == [0, 0, 255]
