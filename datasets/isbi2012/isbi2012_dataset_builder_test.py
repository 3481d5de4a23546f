"""The isbi2012 builder, built from fake (and, where present, the real) files and read back.

Imported by pytest as `isbi2012.isbi2012_dataset_builder_test` (datasets/ first on
`sys.path`, as `tfds build datasets/isbi2012` has it), so the builder module is
`isbi2012.isbi2012_dataset_builder`, exactly what the `tfds` command imports, and never
`datasets.*`: the project must not create or shadow a top-level `datasets` package.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from fakes import ISBI_DIR, write_isbi
from pipeline import data as pipeline_data
from pipeline.config.schema import DataConfig
from pipeline.data.weight_map import instances_from_binary
from pipeline.errors import PipelineError

from . import isbi2012_dataset_builder

SPLITS = {"train": "train", "validation": "val", "test": "test"}  # TFDS -> pipeline.data
NUM_SLICES, NUM_TEST, SIZE = 7, 3, 32


def read_split(builder: tfds.core.DatasetBuilder, split: str) -> list[dict]:
    return list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))


def manual_config(folder: Path) -> tfds.download.DownloadConfig:
    return tfds.download.DownloadConfig(manual_dir=str(folder))


@pytest.fixture(scope="module")
def fake_isbi(tmp_path_factory) -> dict:
    """Manual files shaped like ISBI 2012: 7 labelled and 3 test slices of 32x32."""
    folder = tmp_path_factory.mktemp("isbi_manual")
    return {"folder": folder, **write_isbi(folder, NUM_SLICES, NUM_TEST, SIZE)}


@pytest.fixture(scope="module")
def isbi_fake_built(fake_isbi, tmp_path_factory):
    builder = isbi2012_dataset_builder.Builder(data_dir=str(tmp_path_factory.mktemp("tfds_isbi")))
    builder.download_and_prepare(download_config=manual_config(fake_isbi["folder"]))
    return builder


def test_isbi2012_holds_out_the_last_slices_in_order(isbi_fake_built, fake_isbi):
    val = DataConfig().val_slices
    cut = NUM_SLICES - val
    train, validation = read_split(isbi_fake_built, "train"), read_split(isbi_fake_built, "validation")
    assert (len(train), len(validation)) == (cut, val)
    for split, examples, first in (("train", train, 0), ("validation", validation, cut)):
        for index, example in enumerate(examples):
            section = first + index
            assert example["id"].decode() == f"{split}_{index:03d}"
            assert example["slice"] == section
            assert example["labelled"]
            assert example["image"].shape == example["label"].shape == (SIZE, SIZE, 1)
            np.testing.assert_array_equal(example["image"][..., 0], fake_isbi["train"][section])
            np.testing.assert_array_equal(example["label"][..., 0], fake_isbi["labels"][section])
            np.testing.assert_array_equal(
                example["instances"], instances_from_binary(fake_isbi["labels"][section])
            )


def test_isbi2012_test_split_is_marked_unlabelled(isbi_fake_built, fake_isbi):
    test = read_split(isbi_fake_built, "test")
    assert len(test) == NUM_TEST
    for index, example in enumerate(test):
        assert example["id"].decode() == f"test_{index:03d}"
        assert example["slice"] == index
        assert not example["labelled"]
        np.testing.assert_array_equal(example["image"][..., 0], fake_isbi["test"][index])
        assert example["label"].shape == (SIZE, SIZE, 1) and not example["label"].any()
        assert example["instances"].shape == (SIZE, SIZE)
        assert (example["instances"] == isbi2012_dataset_builder.UNLABELLED_INSTANCE).all()
    assert isbi2012_dataset_builder.UNLABELLED_INSTANCE < 0  # never a valid instance id


def test_isbi2012_missing_file_is_the_pipeline_error(fake_isbi, tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    for key in ("train", "labels"):  # no test-volume.tif
        name = pipeline_data.isbi2012.FILES[key]
        (manual / name).write_bytes((fake_isbi["folder"] / name).read_bytes())
    builder = isbi2012_dataset_builder.Builder(data_dir=str(tmp_path / "out"))
    with pytest.raises(PipelineError, match=r"test-volume\.tif: missing ISBI 2012 file") as caught:
        builder.download_and_prepare(download_config=manual_config(manual))
    assert type(caught.value) is PipelineError and "\n" not in str(caught.value)


def test_isbi2012_empty_manual_dir_shows_the_instructions(tmp_path):
    (tmp_path / "manual").mkdir()
    builder = isbi2012_dataset_builder.Builder(data_dir=str(tmp_path / "out"))
    with pytest.raises(AssertionError, match=r"train-labels\.tif") as caught:
        builder.download_and_prepare(download_config=manual_config(tmp_path / "manual"))
    assert "isbi-2012-segmentation-challenge" in str(caught.value)


@pytest.mark.skipif(
    not all((ISBI_DIR / name).is_file() for name in pipeline_data.isbi2012.FILES.values()),
    reason=f"real ISBI 2012 files not found in {ISBI_DIR}",
)
def test_isbi2012_real_data(tmp_path):
    builder = isbi2012_dataset_builder.Builder(data_dir=str(tmp_path))
    builder.download_and_prepare(download_config=manual_config(ISBI_DIR))
    expected = pipeline_data.load(DataConfig(dataset="isbi2012", data_dir=str(ISBI_DIR), test_slices=0))
    counts = {"train": 16, "validation": 4, "test": 30}
    for split, source in SPLITS.items():
        examples = read_split(builder, split)
        assert len(examples) == counts[split]
        assert [e["id"].decode() for e in examples] == [f"{split}_{i:03d}" for i in range(counts[split])]
        first = 16 if split == "validation" else 0
        assert [int(e["slice"]) for e in examples] == list(range(first, first + counts[split]))
        for index, example in enumerate(examples):
            assert example["image"].shape == example["label"].shape == (512, 512, 1)
            assert example["instances"].shape == (512, 512)
            assert bool(example["labelled"]) == (split != "test")
            np.testing.assert_array_equal(example["image"], expected[source].images[index])
            if split != "test":
                assert set(np.unique(example["label"])) == {0, 255}
                np.testing.assert_array_equal(example["instances"], expected[source].instances[index])
