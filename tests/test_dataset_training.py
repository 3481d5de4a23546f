"""The pipeline prepares and trains (`smoke` preset, a few steps) from every data set, colour images included."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf
import tifffile

from fakes import CTC_NAME, write_colour_folder, write_ctc, write_image_folder
from pipeline import data
from pipeline.cli import main
from pipeline.config.resolve import load
from pipeline.config.schema import DataConfig
from pipeline.files import rundir
from pipeline.files.rundir import RunDir
from test_data import isbi_folder

FEW_STEPS = ["--set", "train.epochs=1", "--set", "train.steps_per_epoch=2", "--set", "train.val_tiles_per_image=1"]


def prepare_and_train(run_dir, dataset: str, data_dir=None, *extra: str) -> None:
    common = ["--preset", "smoke", "--run-dir", str(run_dir), "--dataset", dataset, *FEW_STEPS, *extra]
    if data_dir is not None:
        common += ["--data-dir", str(data_dir)]
    assert main(["--stage", "prepare", *common]) == 0
    assert main(["--stage", "train", *common]) == 0
    history = (run_dir / "train" / "history.csv").read_text().splitlines()
    assert len(history) == 2 and "nan" not in history[1]


def test_trains_from_fake_ctc2d_with_separated_cells(tmp_path):
    write_ctc(tmp_path / "data", as_zip=True)
    run_dir = tmp_path / "run"
    prepare_and_train(run_dir, f"ctc2d/{CTC_NAME}", tmp_path / "data")
    config = load(run_dir / "config.yaml")
    train, test = rundir.load_split(RunDir(run_dir), "train", config), rundir.load_split(RunDir(run_dir), "test", config)
    # Training targets have the 1-px border between the touching cells; the test ground truth is as given.
    assert (train["instances"][0] == 1).sum() == (train["instances"][0] == 2).sum() - 20
    assert (test["instances"][0] == 1).sum() == (test["instances"][0] == 2).sum()
    assert "weights" not in test


def test_trains_from_an_image_folder_of_mixed_sizes(tmp_path):
    write_image_folder(tmp_path / "data")
    run_dir = tmp_path / "run"
    prepare_and_train(run_dir, "image_folder", tmp_path / "data", "--set", "data.val_images=1")
    config = load(run_dir / "config.yaml")
    val = rundir.load_split(RunDir(run_dir), "val", config)
    np.testing.assert_array_equal(val["sizes"], [[64, 70]])
    train = rundir.load_split(RunDir(run_dir), "train", config)
    assert train["images"].shape == (2, 72, 72, 1) and (train["weights"] > 0).all()


def test_padding_gets_zero_weight(tmp_path):
    write_image_folder(tmp_path / "data")
    run_dir = tmp_path / "run"
    assert main(["--stage", "prepare", "--preset", "smoke", "--run-dir", str(run_dir), "--dataset", "image_folder",
                 "--data-dir", str(tmp_path / "data"), "--set", "data.val_images=2"]) == 0
    val = rundir.load_split(RunDir(run_dir), "val", load(run_dir / "config.yaml"))
    weights = val["weights"][1]  # c.tif, 64x70, padded to 72x72
    assert (weights[:64, :70] > 0).all() and not weights[64:].any() and not weights[:, 70:].any()


def test_an_rgb_image_folder_runs_every_stage_with_a_three_channel_model(tmp_path, capsys):
    images = write_colour_folder(tmp_path / "data")
    run_dir = tmp_path / "run"
    args = ["--preset", "smoke", "--run-dir", str(run_dir), "--dataset", "image_folder",
            "--data-dir", str(tmp_path / "data"), "--set", f"export.root={tmp_path / 'saved'}", *FEW_STEPS]
    # A 1-channel model refuses real colour, in one line naming the file, and writes nothing.
    assert main(["--stage", "all", *args]) == 2
    assert capsys.readouterr().err == (
        f"error: {tmp_path / 'data' / 'images' / 'a.png'}: colour image (3 channels) but the model takes 1 channel; "
        "convert it to grey or train with model.input_channels=3\n"
    )
    assert not (run_dir / "prepared").exists()

    assert main(["--stage", "all", *args, "--set", "model.input_channels=3"]) == 0
    config = load(run_dir / "config.yaml")
    assert rundir.load_split(RunDir(run_dir), "train", config)["images"].shape == (2, 72, 72, 3)
    # The test split is c.tif, 64 x 70 px: predicted at its own size.
    assert tifffile.imread(run_dir / "predictions" / "test_000_prob.tif").shape == (64, 70)
    # The export takes [H, W, 3] images.
    served = tf.saved_model.load(str(run_dir / "export" / "unet" / "1")).signatures["segment_uint8"]
    assert served(image=tf.constant(images["a.png"]))["mask"].shape == (72, 72)
    # An RGB TIFF as --input.
    rgb_tiff, out = tmp_path / "data" / "images" / "b.tif", tmp_path / "out"
    assert main(["--stage", "predict", "--run-dir", str(run_dir), "--input", str(rgb_tiff), "--output", str(out)]) == 0
    assert tifffile.imread(out / "b_prob.tif").shape == (72, 72)


def test_training_refuses_data_prepared_for_other_channels(tmp_path, capsys):
    write_image_folder(tmp_path / "data")
    run_dir = tmp_path / "run"
    args = ["--preset", "smoke", "--run-dir", str(run_dir), "--dataset", "image_folder",
            "--data-dir", str(tmp_path / "data")]
    assert main(["--stage", "prepare", *args]) == 0
    assert main(["--stage", "train", *args, "--set", "model.input_channels=3"]) == 2
    assert capsys.readouterr().err == (f"error: {run_dir / 'prepared' / 'train.npz'}: images of 1 channel(s) were "
                                       "prepared, but model.input_channels=3; run --stage prepare again\n")


def test_trains_from_isbi2012_files(tmp_path):
    isbi_folder(tmp_path / "data", slices=5, size=96)
    args = ["--set", "data.val_slices=2", "--set", "data.test_slices=1"]
    prepare_and_train(tmp_path / "run", "isbi2012", tmp_path / "data", *args)
    assert main(["--stage", "evaluate", "--run-dir", str(tmp_path / "run")]) == 0
    report = json.loads((tmp_path / "run" / "evaluation" / "report.json").read_text())
    assert report["split"] == "test" and report["model_selection"].startswith("held out")


def test_changed_weight_map_settings_need_a_new_prepare(tmp_path):
    write_image_folder(tmp_path / "data")
    run_dir = tmp_path / "run"
    args = ["--preset", "smoke", "--run-dir", str(run_dir), "--dataset", "image_folder", "--data-dir", str(tmp_path / "data")]
    assert main(["--stage", "prepare", *args]) == 0
    before = rundir.load_split(RunDir(run_dir), "train", load(run_dir / "config.yaml"))["instances"]
    config_before = (run_dir / "config.yaml").read_bytes()
    assert main(["--stage", "train", *args, "--set", "weight_map.separation=3"]) == 2  # stale: refused
    assert (run_dir / "config.yaml").read_bytes() == config_before  # and nothing saved
    assert main(["--stage", "prepare", *args, "--set", "weight_map.separation=3"]) == 0
    manifest = json.loads(RunDir(run_dir).manifest.read_text())
    assert manifest["settings"]["weight_map"]["separation"] == 3
    after = rundir.load_split(RunDir(run_dir), "train", load(run_dir / "config.yaml"))["instances"]
    assert (after[1] > 0).sum() < (before[1] > 0).sum()


def test_trains_from_the_synthetic_default(tmp_path):
    prepare_and_train(tmp_path / "run", "synthetic")


# --- a data set added the way docs/datasets.md says, without editing pipeline/ -----------------


def read_squares(config: DataConfig) -> dict[str, data.Split]:
    """Splits of 96 px images: a 4 x 4 grid of bright square cells, 20 px, 4 px apart, on dark noise."""
    del config  # nothing to configure: the same squares every time
    rng = np.random.default_rng(0)
    cells = np.zeros((96, 96), np.int32)
    for index in range(16):
        row, column = divmod(index, 4)
        cells[4 + 24 * row : 24 + 24 * row, 4 + 24 * column : 24 + 24 * column] = index + 1

    def split(count: int) -> data.Split:
        noise = rng.normal(0, 20, (count, 96, 96))
        images = np.clip(np.where(cells > 0, 180, 60) + noise, 0, 255).astype(np.uint8)
        return data.Split(images[..., None], np.repeat(cells[None], count, axis=0))

    return {"train": split(3), "val": split(1), "test": split(1)}


@pytest.fixture
def squares():
    """The squares data set, registered for one test."""
    dataset = data.register(data.Dataset(
        name="squares", read=read_squares, labels="instances",
        recipes={"smoke": {"predict": {"tiles_per_batch": 2}}},
    ))
    yield dataset
    del data.DATASETS[dataset.name]


def test_a_registered_data_set_is_prepared_and_trained(tmp_path, squares):
    run_dir = tmp_path / "run"
    prepare_and_train(run_dir, squares.name)
    config = load(run_dir / "config.yaml")
    assert config.data.dataset == "squares" and config.predict.tiles_per_batch == 2  # its recipe for smoke
    assert json.loads(RunDir(run_dir).manifest.read_text())["counts"] == {"train": 3, "val": 1, "test": 1}
    train = rundir.load_split(RunDir(run_dir), "train", config)
    assert train["images"].shape == (3, 96, 96, 1) and train["weights"].shape == (3, 96, 96)
