"""Stage `evaluate`: scoring prediction files without a run, and a run's model on its test split."""

import json

import cv2
import keras
import numpy as np
import pytest
import tifffile

from fakes import CTC_NAME, write_ctc
from pipeline.cli import main
from pipeline.config.resolve import load
from pipeline.files.rundir import RunDir
from pipeline.metrics.report import summary
from pipeline.training.model import unet
from test_gpu_command import fake_isbi
from test_report import NO_CELL, NO_MEMBRANE


def _pair(tmp_path):
    truth = np.full((3, 24, 24), 255, np.uint8)
    truth[:, :, 11] = 0  # two cells per slice
    probability = (truth / 255.0).astype(np.float32)
    probability[1, 5, 11] = 1.0  # slice 1: one-pixel merger
    tifffile.imwrite(tmp_path / "gt.tif", truth, photometric="minisblack")  # 3 slices, not RGB
    tifffile.imwrite(tmp_path / "pred.tif", probability, photometric="minisblack")
    return tmp_path / "pred.tif", tmp_path / "gt.tif"


def test_scores_any_prediction_and_writes_headline_keys(tmp_path, capsys):
    prediction, truth = _pair(tmp_path)
    output = tmp_path / "out" / "report.json"
    args = ["--stage", "evaluate", "--prediction", str(prediction), "--ground-truth", str(truth), "--output", str(output)]
    assert main(args) == 0
    report = json.loads(output.read_text())
    assert report["warping_error"] == 1 / (3 * 24 * 24)
    assert report["pixel_error"] > 0 and report["rand_error"] > 0
    assert [row["warping_error"] for row in report["per_image"]] == [0.0, 1 / (24 * 24), 0.0]
    assert len(report["overall"]["per_threshold"]["warping_error"]) == 10
    out = capsys.readouterr().out
    assert "overall" in out
    assert report["warnings"] == [] and "!" not in out  # cells and membrane in every slice
    assert not any("warning" in row for row in [*report["per_image"], report["overall"]])
    panel = cv2.imread(str(tmp_path / "out" / "report_panels" / "panel_001.png"))
    assert panel.shape == (24, 3 * 24 + 2 * 4, 3)
    assert tuple(panel[5, 2 * 28 + 11]) == (255, 0, 255)  # the merger pixel in its colour


def test_an_existing_report_is_replaced_only_with_overwrite(tmp_path, capsys):
    prediction, truth = _pair(tmp_path)
    output = tmp_path / "report.json"
    output.write_text("an earlier report")
    args = ["--stage", "evaluate", "--prediction", str(prediction), "--ground-truth", str(truth), "--output", str(output)]
    assert main(args) == 2
    assert capsys.readouterr().err == f"error: {output}: already exists (pass --overwrite to replace it)\n"
    assert output.read_text() == "an earlier report" and not (tmp_path / "report_panels").exists()
    assert main([*args, "--overwrite"]) == 0
    assert json.loads(output.read_text())["warping_error"] == 1 / (3 * 24 * 24)


def test_bad_prediction_file_is_a_one_line_error(tmp_path, capsys):
    prediction, truth = _pair(tmp_path)
    tifffile.imwrite(prediction, np.full((3, 24, 24), 2.0, np.float32), photometric="minisblack")
    assert main(["--stage", "evaluate", "--prediction", str(prediction), "--ground-truth", str(truth)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "outside [0, 1]" in error
    assert main(["--stage", "evaluate", "--prediction", str(prediction)]) == 2
    assert "--ground-truth" in capsys.readouterr().err


def test_score_files_warns_about_each_degenerate_slice(tmp_path, capsys):
    truth = np.full((3, 16, 16), 255, np.uint8)
    truth[0, :, 7] = 0
    truth[1] = 0  # slice 1: all membrane; slice 2: all cell
    probability = np.where(truth[0] > 0, 0.9, 0.1).astype(np.float32)[None].repeat(3, axis=0)
    tifffile.imwrite(tmp_path / "gt.tif", truth, photometric="minisblack")  # 3 slices, not RGB
    tifffile.imwrite(tmp_path / "pred.tif", probability, photometric="minisblack")
    gt, output = tmp_path / "gt.tif", tmp_path / "report.json"
    assert main(["--stage", "evaluate", "--prediction", str(tmp_path / "pred.tif"), "--ground-truth", str(gt),
                 "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    assert [line.split(";")[0] for line in report["warnings"]] == [
        f"{gt} slice 1: ground truth has no cell pixels", f"{gt} slice 2: ground truth has no membrane pixels"]
    assert report["warnings"][0].startswith(f"{gt} slice 1: {NO_CELL}")
    assert report["warnings"][1].startswith(f"{gt} slice 2: {NO_MEMBRANE}")
    assert ["warning" in row for row in report["per_image"]] == [False, True, True]
    assert "warning" not in report["overall"]  # the stack as a whole has cells and membrane
    out = capsys.readouterr().out
    assert all(f"\n! {line}\n" in out for line in report["warnings"])

    # A single image is named by its file alone, and with it the whole report is degenerate.
    tifffile.imwrite(gt, truth[2])
    tifffile.imwrite(tmp_path / "pred.tif", probability[2])
    assert main(["--stage", "evaluate", "--prediction", str(tmp_path / "pred.tif"), "--ground-truth", str(gt)]) == 0
    out = capsys.readouterr().out
    assert f"\n! {gt}: {NO_MEMBRANE}" in out and "\n  overall! " in out


def _ctc_run(tmp_path):
    """A prepared fake CTC run (smoke preset) whose best model is the untrained network."""
    write_ctc(tmp_path / "data")
    run_dir = tmp_path / "run"
    assert main(["--stage", "prepare", "--preset", "smoke", "--run-dir", str(run_dir), "--dataset", f"ctc2d/{CTC_NAME}",
                 "--data-dir", str(tmp_path / "data")]) == 0
    config = load(run_dir / "config.yaml")
    keras.utils.set_random_seed(0)
    best = RunDir(run_dir).best_model
    best.parent.mkdir()
    unet(config.model).save(best)
    return run_dir


def test_test_time_augmentation_is_scored_with_and_without(tmp_path, capsys):
    run_dir = _ctc_run(tmp_path)
    evaluate_args = ["--stage", "evaluate", "--run-dir", str(run_dir)]
    assert main(evaluate_args) == 0
    plain = json.loads((run_dir / "evaluation" / "report.json").read_text())
    assert "without_test_time_augmentation" not in plain and "no TTA" not in capsys.readouterr().out
    # The CTC test split is sequence 02, whose ids the prepared split keeps.
    assert plain["seg_per_sequence"] == {"02": plain["seg"]} and plain["seg"] == plain["overall"]["seg"]

    assert main([*evaluate_args, "--set", "predict.test_time_augmentation=true"]) == 0
    report = json.loads((run_dir / "evaluation" / "report.json").read_text())
    assert report.keys() == plain.keys() | {"without_test_time_augmentation"}
    without = report["without_test_time_augmentation"]
    assert without == summary(plain)
    assert without["warping_error"] == plain["warping_error"] and without["seg_per_sequence"] == {"02": plain["seg"]}
    assert summary(report) != without  # the averaging changes the prediction
    out = capsys.readouterr().out
    assert "\n   overall " in out and "\n    no TTA " in out


def test_another_split_is_scored_into_its_own_folder(tmp_path, capsys):
    run_dir = _ctc_run(tmp_path)
    evaluate_args = ["--stage", "evaluate", "--run-dir", str(run_dir)]
    assert main([*evaluate_args, "--split", "val"]) == 0
    report = json.loads((run_dir / "evaluation" / "val" / "report.json").read_text())
    val_images = len(np.load(run_dir / "prepared" / "val.npz")["images"])
    assert report["split"] == "val" and len(report["per_image"]) == val_images
    assert report["model_selection"].startswith("not held out")  # the smoke preset chooses by validation loss
    assert (run_dir / "evaluation" / "val" / f"panel_{val_images - 1:03d}.png").is_file()
    assert not (run_dir / "evaluation" / "report.json").exists()  # the default split's, which export records
    assert f"evaluation report -> {run_dir / 'evaluation' / 'val' / 'report.json'}" in capsys.readouterr().out

    assert main([*evaluate_args, "--split", "test"]) == 0  # the default split, in the default place
    assert json.loads((run_dir / "evaluation" / "report.json").read_text())["split"] == "test"
    assert main(["--stage", "train", "--run-dir", str(run_dir), "--split", "val"]) == 2
    assert "--split" in capsys.readouterr().err


def test_an_unlabelled_test_split_is_refused_in_one_line(tmp_path, capsys):
    fake_isbi(tmp_path / "isbi", slices=6, size=200)
    run_dir = tmp_path / "run"
    assert main(["--stage", "prepare", "--preset", "smoke", "--run-dir", str(run_dir), "--dataset", "isbi2012",
                 "--data-dir", str(tmp_path / "isbi"), "--set", "data.test_slices=0"]) == 0
    capsys.readouterr()
    assert main(["--stage", "evaluate", "--run-dir", str(run_dir), "--split", "test"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and str(run_dir / "prepared" / "test.npz") in error and "--split val" in error
    assert not (run_dir / "evaluation").exists()


def _score(prediction, truth, capsys) -> tuple[dict, str]:
    """The report of scoring two files through the command line, and what it printed on stderr."""
    output = prediction.parent / f"report-{prediction.stem}-{truth.stem}.json"
    assert main(["--stage", "evaluate", "--prediction", str(prediction), "--ground-truth", str(truth),
                 "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    return {key: value for key, value in report.items() if key not in ("prediction", "ground_truth")}, \
        capsys.readouterr().err


@pytest.mark.parametrize("axes", [None, "ZYX", "CYX", "TYX"])
def test_imagej_stacks_are_scored_whatever_their_slice_axis_is_called(tmp_path, capsys, axes):
    prediction, truth = _pair(tmp_path)
    expected, _ = _score(prediction, truth, capsys)
    metadata = {} if axes is None else {"metadata": {"axes": axes}}  # None: tifffile's own choice, CYX
    for path in (prediction, truth):
        imagej = path.with_name(f"imagej-{path.name}")
        tifffile.imwrite(imagej, tifffile.imread(path), imagej=True, **metadata)
        with tifffile.TiffFile(imagej) as tiff:
            assert tiff.series[0].axes == (axes or "CYX")
    imagej_prediction, imagej_truth = (path.with_name(f"imagej-{path.name}") for path in (prediction, truth))
    for pair in ((imagej_prediction, truth), (prediction, imagej_truth), (imagej_prediction, imagej_truth)):
        report, err = _score(*pair, capsys)
        assert report == expected and err == ""


def test_evaluation_errors_name_the_file_and_never_a_model(tmp_path, capsys):
    prediction, truth = _pair(tmp_path)
    colour = np.stack([tifffile.imread(truth)[0]] * 3, -1)
    colour[5, 5, 1] = 0  # real colour: G differs from R in one pixel
    tifffile.imwrite(tmp_path / "colour.tif", colour, photometric="rgb")
    two_axes = tmp_path / "zc.tif"
    tifffile.imwrite(two_axes, np.zeros((3, 2, 24, 24), np.uint8), imagej=True, metadata={"axes": "ZCYX"})
    for args, named in (((prediction, tmp_path / "colour.tif"), "the ground truth file has 3 values per pixel"),
                        ((tmp_path / "colour.tif", truth), "the prediction file has 3 values per pixel"),
                        ((two_axes, truth), "axes ZCYX of shape (3, 2, 24, 24) are not one image or stack")):
        assert main(["--stage", "evaluate", "--prediction", str(args[0]), "--ground-truth", str(args[1])]) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and named in error and "model" not in error


def test_grey_stored_as_colour_is_scored_as_grey(tmp_path, capsys):
    prediction, truth = _pair(tmp_path)
    expected, _ = _score(prediction, truth, capsys)
    rgb = tmp_path / "rgb.tif"
    tifffile.imwrite(rgb, np.stack([tifffile.imread(truth)] * 3, -1), photometric="rgb")  # 3 RGB slices
    report, err = _score(prediction, rgb, capsys)
    assert report == expected and err == f"notice: {rgb}: colour image with identical R, G and B channels read as grey\n"
