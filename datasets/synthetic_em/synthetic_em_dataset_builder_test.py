"""The synthetic_em builder, built into a temporary folder and read back.

Imported by pytest as `synthetic_em.synthetic_em_dataset_builder_test` (datasets/ first on
`sys.path`, as `tfds build datasets/synthetic_em` has it), so the builder module is
`synthetic_em.synthetic_em_dataset_builder`, exactly what the `tfds` command imports, and
never `datasets.*`: the project must not create or shadow a top-level `datasets` package.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from pipeline import data as pipeline_data
from pipeline.config.schema import DataConfig

from . import synthetic_em_dataset_builder

SPLITS = {"train": "train", "validation": "val", "test": "test"}  # TFDS -> pipeline.data


def read_split(builder: tfds.core.DatasetBuilder, split: str) -> list[dict]:
    return list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))


def test_synthetic_em_default_config_is_the_pipeline_default(tmp_path):
    builder = synthetic_em_dataset_builder.Builder(data_dir=str(tmp_path))  # not built: only the metadata
    assert builder.builder_config.name == "default"
    assert builder.builder_config.data_config() == DataConfig()
    size = DataConfig().image_size
    assert builder.info.features["image"].shape == (size, size, 1)
    assert builder.info.features["instances"].shape == (size, size)


@pytest.fixture(scope="module")
def synthetic_small(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds_synthetic")
    builder = synthetic_em_dataset_builder.Builder(data_dir=str(data_dir), config="small")
    builder.download_and_prepare()
    return builder


def test_synthetic_em_small_splits(synthetic_small):
    config = synthetic_small.builder_config
    expected = pipeline_data.load(config.data_config())
    counts = {"train": config.num_train, "validation": config.num_val, "test": config.num_test}
    assert (config.image_size, counts) == (64, {"train": 2, "validation": 1, "test": 1})
    ids = []
    for split, source in SPLITS.items():
        examples = read_split(synthetic_small, split)
        assert len(examples) == synthetic_small.info.splits[split].num_examples == counts[split]
        for index, example in enumerate(examples):
            assert example["id"].decode() == f"{split}_{index:03d}"
            assert example["image"].shape == example["label"].shape == (64, 64, 1)
            assert example["image"].dtype == example["label"].dtype == np.uint8
            assert example["instances"].shape == (64, 64)
            assert example["instances"].dtype == np.int32
            assert set(np.unique(example["label"])) <= {0, 255}
            np.testing.assert_array_equal(example["label"][..., 0] == 255, example["instances"] > 0)
            # Identical to what the pipeline trains on, in the same order.
            np.testing.assert_array_equal(example["image"], expected[source].images[index])
            np.testing.assert_array_equal(example["instances"], expected[source].instances[index])
            ids.append(example["id"])
    assert len(set(ids)) == len(ids)


def test_synthetic_em_loads_by_name_after_import(synthetic_small):
    # tfds.builder-style use: importing the module registered "synthetic_em".
    data_dir = Path(synthetic_small.data_dir).parents[2]  # <data_dir>/synthetic_em/small/1.0.0
    builder = tfds.builder("synthetic_em/small", data_dir=str(data_dir))
    assert builder.is_prepared()
    assert builder.info.splits["train"].num_examples == 2
    image, label = next(iter(tfds.as_numpy(builder.as_dataset(split="test", as_supervised=True))))
    assert image.shape == label.shape == (64, 64, 1)
