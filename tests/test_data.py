"""Data set loading and its one-line errors for bad input."""

import numpy as np
import pytest
import tifffile

from pipeline import data
from pipeline.config import DataConfig
from pipeline.errors import PipelineError


def imwrite(path, stack):
    tifffile.imwrite(path, stack, photometric="minisblack")


def isbi_folder(tmp_path, slices=5, labels=None, size=32):
    rng = np.random.default_rng(0)
    imwrite(tmp_path / "train-volume.tif", rng.integers(0, 255, (slices, size, size), dtype=np.uint8))
    if labels is None:
        labels = np.where(rng.uniform(size=(slices, size, size)) > 0.3, 255, 0).astype(np.uint8)
    imwrite(tmp_path / "train-labels.tif", labels)
    imwrite(tmp_path / "test-volume.tif", rng.integers(0, 255, (3, size, size), dtype=np.uint8))
    return DataConfig(dataset="isbi2012", data_dir=str(tmp_path), val_slices=2)


def test_isbi2012_holds_out_the_last_slices(tmp_path):
    splits = data.load(isbi_folder(tmp_path))
    assert [len(splits[s].images) for s in data.SPLITS] == [3, 2, 3]
    assert splits["test"].instances is None
    volume = tifffile.imread(tmp_path / "train-volume.tif")
    np.testing.assert_array_equal(splits["val"].images[..., 0], volume[3:])
    labels = tifffile.imread(tmp_path / "train-labels.tif")
    np.testing.assert_array_equal(splits["train"].labels, labels[:3] == 255)


def test_missing_and_empty_data_folders(tmp_path):
    with pytest.raises(PipelineError, match=f"^{tmp_path / 'nope'}: data folder does not exist$"):
        data.load(DataConfig(dataset="isbi2012", data_dir=str(tmp_path / "nope")))
    with pytest.raises(PipelineError, match="data folder is empty"):
        data.load(DataConfig(dataset="isbi2012", data_dir=str(tmp_path)))
    (tmp_path / "train-volume.tif").write_bytes(b"")
    with pytest.raises(PipelineError, match="train-labels.tif: missing ISBI 2012 file"):
        data.load(DataConfig(dataset="isbi2012", data_dir=str(tmp_path)))


def test_labels_that_do_not_match_the_images(tmp_path):
    labels = np.full((4, 32, 32), 255, np.uint8)
    with pytest.raises(PipelineError, match=r"train-labels.tif: 4 labels of \(32, 32\) px do not match"):
        data.load(isbi_folder(tmp_path, labels=labels))
    with pytest.raises(PipelineError, match="train-labels.tif: 5 labels of .32, 30. px"):
        data.load(isbi_folder(tmp_path, labels=np.full((5, 32, 30), 255, np.uint8)))


def test_labels_that_are_not_binary(tmp_path):
    labels = np.full((5, 32, 32), 255, np.uint8)
    labels[0, 0, :3] = [0, 17, 128]
    with pytest.raises(PipelineError, match=r"train-labels.tif: labels must be binary .* found 0, 17, 128, 255"):
        data.load(isbi_folder(tmp_path, labels=labels))


def test_corrupt_tiff_and_wrong_dtype(tmp_path):
    config = isbi_folder(tmp_path)
    (tmp_path / "test-volume.tif").write_bytes(b"not a tiff at all")
    with pytest.raises(PipelineError, match="test-volume.tif: corrupt or unreadable TIFF"):
        data.load(config)
    imwrite(tmp_path / "test-volume.tif", np.zeros((2, 32, 32), np.float32))
    with pytest.raises(PipelineError, match="test-volume.tif: expected 8-bit grey images, got float32"):
        data.load(config)


def test_synthetic_splits_are_distinct_and_reproducible():
    config = DataConfig(image_size=64, num_train=2, num_val=1, num_test=1)
    first, second = data.load(config), data.load(config)
    np.testing.assert_array_equal(first["train"].images, second["train"].images)
    assert not np.array_equal(first["train"].images[0], first["test"].images[0])
    assert first["val"].images.shape == (1, 64, 64, 1)
