"""The ctc2d builder, built from fake Cell Tracking Challenge files and read back.

Imported by pytest as `ctc2d.ctc2d_dataset_builder_test` (datasets/ first on `sys.path`,
as `tfds build datasets/ctc2d` has it), so the builder module is
`ctc2d.ctc2d_dataset_builder`, exactly what the `tfds` command imports, and never
`datasets.*`: the project must not create or shadow a top-level `datasets` package.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from fakes import CTC_ANNOTATED, CTC_NAME, touching_cells, write_ctc
from pipeline import data as pipeline_data
from pipeline.config.schema import DataConfig
from pipeline.data.weight_map import separate_instances
from pipeline.errors import PipelineError

from . import ctc2d_dataset_builder


def read_split(builder: tfds.core.DatasetBuilder, split: str) -> list[dict]:
    return list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))


def manual_config(folder: Path) -> tfds.download.DownloadConfig:
    return tfds.download.DownloadConfig(manual_dir=str(folder))


@pytest.fixture(scope="module")
def ctc_built(tmp_path_factory):
    """ctc2d/PhC-C2DH-U373 built from a fake training zip in the manual directory."""
    manual = tmp_path_factory.mktemp("ctc_manual")
    write_ctc(manual, as_zip=True)
    builder = ctc2d_dataset_builder.Builder(data_dir=str(tmp_path_factory.mktemp("tfds_ctc")), config=CTC_NAME)
    builder.download_and_prepare(download_config=manual_config(manual))
    return builder, manual


def test_ctc2d_configs_are_the_paper_sets():
    assert [c.name for c in ctc2d_dataset_builder.Builder.BUILDER_CONFIGS] == ["PhC-C2DH-U373", "DIC-C2DH-HeLa"]
    assert pipeline_data.ctc2d.URL.format(name=CTC_NAME) == (
        "http://data.celltrackingchallenge.net/training-datasets/PhC-C2DH-U373.zip"
    )


def test_ctc2d_examples_are_the_annotated_frames(ctc_built):
    builder, manual = ctc_built
    expected = pipeline_data.load(DataConfig(dataset=f"ctc2d/{CTC_NAME}", data_dir=str(manual)))
    for split, sequence, source in (("train", "01", "train"), ("validation", "02", "val")):
        examples = read_split(builder, split)
        frames = CTC_ANNOTATED[sequence]
        assert len(examples) == builder.info.splits[split].num_examples == len(frames)
        for index, (example, frame) in enumerate(zip(examples, frames)):
            assert example["id"].decode() == f"{sequence}_t{frame:03d}"
            assert example["sequence"].decode() == sequence and example["frame"] == frame
            assert example["image"].shape == example["label"].shape == (64, 80, 1)
            assert example["image"].dtype == example["label"].dtype == np.uint8
            assert example["instances"].dtype == np.int32
            truth = touching_cells((64, 80), 10 * int(sequence) + frame)
            np.testing.assert_array_equal(example["instances"], truth)
            np.testing.assert_array_equal(example["image"], expected[source].images[index])
            # The semantic label has a background border where cells 1 and 2 touch.
            label = example["label"][..., 0]
            assert set(np.unique(label)) == {0, 255}
            np.testing.assert_array_equal(label == 255, separate_instances(truth) > 0)
            assert (label[truth == 1] == 0).sum() == 20


def test_ctc2d_builds_from_the_extracted_folder(tmp_path):
    write_ctc(tmp_path / "manual")
    builder = ctc2d_dataset_builder.Builder(data_dir=str(tmp_path / "out"), config=CTC_NAME)
    builder.download_and_prepare(download_config=manual_config(tmp_path / "manual"))
    assert builder.info.splits["train"].num_examples == len(CTC_ANNOTATED["01"])


def test_ctc2d_ground_truth_without_image_names_the_file(tmp_path):
    root = write_ctc(tmp_path / "manual")
    (root / "01" / "t002.tif").unlink()
    builder = ctc2d_dataset_builder.Builder(data_dir=str(tmp_path / "out"), config=CTC_NAME)
    with pytest.raises(PipelineError, match=r"01_GT/SEG/man_seg002.tif: ground-truth frame with no matching image"):
        builder.download_and_prepare(download_config=manual_config(tmp_path / "manual"))
