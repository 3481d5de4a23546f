"""The image_folder builder, built from a fake folder of images and masks and read back.

Imported by pytest as `image_folder.image_folder_dataset_builder_test` (datasets/ first on
`sys.path`, as `tfds build datasets/image_folder` has it), so the builder module is
`image_folder.image_folder_dataset_builder`, exactly what the `tfds` command imports, and
never `datasets.*`: the project must not create or shadow a top-level `datasets` package.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from fakes import write_colour_folder, write_image_folder
from pipeline import data as pipeline_data
from pipeline.data.weight_map import separate_instances
from pipeline.errors import PipelineError

from . import image_folder_dataset_builder


def read_split(builder: tfds.core.DatasetBuilder, split: str) -> list[dict]:
    return list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))


def manual_config(folder: Path) -> tfds.download.DownloadConfig:
    return tfds.download.DownloadConfig(manual_dir=str(folder))


def test_image_folder_builder(tmp_path):
    write_image_folder(tmp_path / "manual")
    builder = image_folder_dataset_builder.Builder(data_dir=str(tmp_path / "out"))
    builder.download_and_prepare(download_config=manual_config(tmp_path / "manual"))
    examples = read_split(builder, "train")
    expected = pipeline_data.image_folder.read_pairs(tmp_path / "manual")
    assert [e["id"].decode() for e in examples] == ["a", "b", "c"]
    for example, source in zip(examples, expected):
        assert example["image"].dtype == example["label"].dtype == np.uint8
        np.testing.assert_array_equal(example["image"], source.image)
        np.testing.assert_array_equal(example["instances"], source.instances)
        np.testing.assert_array_equal(example["label"][..., 0] == 255, separate_instances(source.instances) > 0)
    assert [e["image"].shape for e in examples] == [(72, 72, 1), (72, 72, 1), (64, 70, 1)]


def test_image_folder_builder_keeps_the_channels_of_the_files(tmp_path):
    written = write_colour_folder(tmp_path / "manual")
    builder = image_folder_dataset_builder.Builder(data_dir=str(tmp_path / "out"))
    builder.download_and_prepare(download_config=manual_config(tmp_path / "manual"))
    assert builder.info.features["image"].shape == (None, None, None)
    examples = read_split(builder, "train")
    assert [e["image"].shape for e in examples] == [(72, 72, 3), (72, 72, 3), (64, 70, 3)]
    np.testing.assert_array_equal(examples[0]["image"], written["a.png"])  # R, G, B as in the file
    assert [e["label"].shape for e in examples] == [(72, 72, 1), (72, 72, 1), (64, 70, 1)]


def test_image_folder_builder_errors_name_the_file(tmp_path):
    root = write_image_folder(tmp_path / "manual")
    (root / "images" / "b.tif").unlink()
    builder = image_folder_dataset_builder.Builder(data_dir=str(tmp_path / "out"))
    with pytest.raises(PipelineError, match=r"masks/b.tif: mask with no image"):
        builder.download_and_prepare(download_config=manual_config(root))
