"""The TFDS builders in datasets/: built into temporary folders and read back.

The builder modules are loaded by file path under unique names, never as `datasets.*`:
the project must not create or shadow a top-level `datasets` package.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from fakes import CTC_ANNOTATED, CTC_NAME, touching_cells, write_ctc, write_image_folder, write_isbi
from pipeline import data as pipeline_data
from pipeline.config import DataConfig
from pipeline.errors import PipelineError
from pipeline.weight_map import instances_from_binary, separate_instances

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT / "datasets"
BUILDERS = ("synthetic_em", "isbi2012", "ctc2d", "image_folder")
ISBI_DIR = ROOT.parent / "shared" / "data" / "isbi2012"  # as in conftest.py
SPLITS = {"train": "train", "validation": "val", "test": "test"}  # TFDS -> pipeline.data


def load_builder_module(name: str):
    """Imports datasets/<name>/<name>_dataset_builder.py as `unet_builders_<name>`, once.

    Once per process, because importing registers the builder's name with TFDS (which is
    what lets `tfds.builder(name)` find it) and a second registration would be refused.
    """
    module_name = f"unet_builders_{name}"
    if module_name not in sys.modules:
        path = DATASETS / name / f"{name}_dataset_builder.py"
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[module_name]
            raise
    return sys.modules[module_name]


def read_split(builder: tfds.core.DatasetBuilder, split: str) -> list[dict]:
    return list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))


def manual_config(folder: Path) -> tfds.download.DownloadConfig:
    return tfds.download.DownloadConfig(manual_dir=str(folder))


# --- layout -------------------------------------------------------------------------------


def test_datasets_folder_is_not_a_package():
    assert not (DATASETS / "__init__.py").exists(), "datasets/ must never be an importable package"
    for name in BUILDERS:
        assert (DATASETS / name / "__init__.py").is_file()
        source = (DATASETS / name / f"{name}_dataset_builder.py").read_text()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{name}: relative import of {node.module!r}"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                imported = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                assert not any(m and m.split(".")[0] == "datasets" for m in imported), name


# --- synthetic_em ----------------------------------------------------------------------------


def test_synthetic_em_default_config_is_the_pipeline_default(tmp_path):
    module = load_builder_module("synthetic_em")
    builder = module.Builder(data_dir=str(tmp_path))  # not built: only the metadata
    assert builder.builder_config.name == "default"
    assert builder.builder_config.data_config() == DataConfig()
    size = DataConfig().image_size
    assert builder.info.features["image"].shape == (size, size, 1)
    assert builder.info.features["instances"].shape == (size, size)


@pytest.fixture(scope="module")
def synthetic_small(tmp_path_factory):
    module = load_builder_module("synthetic_em")
    data_dir = tmp_path_factory.mktemp("tfds_synthetic")
    builder = module.Builder(data_dir=str(data_dir), config="small")
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


# --- isbi2012 --------------------------------------------------------------------------------

NUM_SLICES, NUM_TEST, SIZE = 7, 3, 32


@pytest.fixture(scope="module")
def fake_isbi(tmp_path_factory) -> dict:
    """Manual files shaped like ISBI 2012: 7 labelled and 3 test slices of 32x32."""
    folder = tmp_path_factory.mktemp("isbi_manual")
    return {"folder": folder, **write_isbi(folder, NUM_SLICES, NUM_TEST, SIZE)}


@pytest.fixture(scope="module")
def isbi_fake_built(fake_isbi, tmp_path_factory):
    module = load_builder_module("isbi2012")
    builder = module.Builder(data_dir=str(tmp_path_factory.mktemp("tfds_isbi")))
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
    module = load_builder_module("isbi2012")
    test = read_split(isbi_fake_built, "test")
    assert len(test) == NUM_TEST
    for index, example in enumerate(test):
        assert example["id"].decode() == f"test_{index:03d}"
        assert example["slice"] == index
        assert not example["labelled"]
        np.testing.assert_array_equal(example["image"][..., 0], fake_isbi["test"][index])
        assert example["label"].shape == (SIZE, SIZE, 1) and not example["label"].any()
        assert example["instances"].shape == (SIZE, SIZE)
        assert (example["instances"] == module.UNLABELLED_INSTANCE).all()
    assert module.UNLABELLED_INSTANCE < 0  # never a valid instance id


def test_isbi2012_missing_file_is_the_pipeline_error(fake_isbi, tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    for key in ("train", "labels"):  # no test-volume.tif
        name = pipeline_data.ISBI_FILES[key]
        (manual / name).write_bytes((fake_isbi["folder"] / name).read_bytes())
    builder = load_builder_module("isbi2012").Builder(data_dir=str(tmp_path / "out"))
    with pytest.raises(PipelineError, match=r"test-volume\.tif: missing ISBI 2012 file") as caught:
        builder.download_and_prepare(download_config=manual_config(manual))
    assert type(caught.value) is PipelineError and "\n" not in str(caught.value)


def test_isbi2012_empty_manual_dir_shows_the_instructions(tmp_path):
    (tmp_path / "manual").mkdir()
    builder = load_builder_module("isbi2012").Builder(data_dir=str(tmp_path / "out"))
    with pytest.raises(AssertionError, match=r"train-labels\.tif") as caught:
        builder.download_and_prepare(download_config=manual_config(tmp_path / "manual"))
    assert "isbi-2012-segmentation-challenge" in str(caught.value)


@pytest.mark.skipif(
    not all((ISBI_DIR / name).is_file() for name in pipeline_data.ISBI_FILES.values()),
    reason=f"real ISBI 2012 files not found in {ISBI_DIR}",
)
def test_isbi2012_real_data(tmp_path):
    builder = load_builder_module("isbi2012").Builder(data_dir=str(tmp_path))
    builder.download_and_prepare(download_config=manual_config(ISBI_DIR))
    expected = pipeline_data.load(DataConfig(dataset="isbi2012", data_dir=str(ISBI_DIR)))
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


# --- ctc2d -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ctc_built(tmp_path_factory):
    """ctc2d/PhC-C2DH-U373 built from a fake training zip in the manual directory."""
    manual = tmp_path_factory.mktemp("ctc_manual")
    write_ctc(manual, as_zip=True)
    module = load_builder_module("ctc2d")
    builder = module.Builder(data_dir=str(tmp_path_factory.mktemp("tfds_ctc")), config=CTC_NAME)
    builder.download_and_prepare(download_config=manual_config(manual))
    return builder, manual


def test_ctc2d_configs_are_the_paper_sets():
    module = load_builder_module("ctc2d")
    assert [c.name for c in module.Builder.BUILDER_CONFIGS] == ["PhC-C2DH-U373", "DIC-C2DH-HeLa"]
    assert pipeline_data.CTC2D_URL.format(name=CTC_NAME) == (
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
    builder = load_builder_module("ctc2d").Builder(data_dir=str(tmp_path / "out"), config=CTC_NAME)
    builder.download_and_prepare(download_config=manual_config(tmp_path / "manual"))
    assert builder.info.splits["train"].num_examples == len(CTC_ANNOTATED["01"])


def test_ctc2d_ground_truth_without_image_names_the_file(tmp_path):
    root = write_ctc(tmp_path / "manual")
    (root / "01" / "t002.tif").unlink()
    builder = load_builder_module("ctc2d").Builder(data_dir=str(tmp_path / "out"), config=CTC_NAME)
    with pytest.raises(PipelineError, match=r"01_GT/SEG/man_seg002.tif: ground-truth frame with no matching image"):
        builder.download_and_prepare(download_config=manual_config(tmp_path / "manual"))


# --- image_folder ----------------------------------------------------------------------------


def test_image_folder_builder(tmp_path):
    write_image_folder(tmp_path / "manual")
    builder = load_builder_module("image_folder").Builder(data_dir=str(tmp_path / "out"))
    builder.download_and_prepare(download_config=manual_config(tmp_path / "manual"))
    examples = read_split(builder, "train")
    expected = pipeline_data.read_image_folder(tmp_path / "manual")
    assert [e["id"].decode() for e in examples] == ["a", "b", "c"]
    for example, source in zip(examples, expected):
        assert example["image"].dtype == example["label"].dtype == np.uint8
        np.testing.assert_array_equal(example["image"], source.image)
        np.testing.assert_array_equal(example["instances"], source.instances)
        np.testing.assert_array_equal(example["label"][..., 0] == 255, separate_instances(source.instances) > 0)
    assert [e["image"].shape for e in examples] == [(72, 72, 1), (72, 72, 1), (64, 70, 1)]


def test_image_folder_builder_errors_name_the_file(tmp_path):
    root = write_image_folder(tmp_path / "manual")
    (root / "images" / "b.tif").unlink()
    builder = load_builder_module("image_folder").Builder(data_dir=str(tmp_path / "out"))
    with pytest.raises(PipelineError, match=r"masks/b.tif: mask with no image"):
        builder.download_and_prepare(download_config=manual_config(root))
