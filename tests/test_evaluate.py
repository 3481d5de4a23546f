"""Scoring prediction files from the command line, without a run directory or model."""

import json

import cv2
import numpy as np
import tifffile

from pipeline.cli import main


def _pair(tmp_path):
    truth = np.full((3, 24, 24), 255, np.uint8)
    truth[:, :, 11] = 0  # two cells per slice
    probability = (truth / 255.0).astype(np.float32)
    probability[1, 5, 11] = 1.0  # slice 1: one-pixel merger
    tifffile.imwrite(tmp_path / "gt.tif", truth)
    tifffile.imwrite(tmp_path / "pred.tif", probability)
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
    assert "overall" in capsys.readouterr().out
    panel = cv2.imread(str(tmp_path / "out" / "report_panels" / "panel_001.png"))
    assert panel.shape == (24, 3 * 24 + 2 * 4, 3)
    assert tuple(panel[5, 2 * 28 + 11]) == (255, 0, 255)  # the merger pixel in its colour


def test_bad_prediction_file_is_a_one_line_error(tmp_path, capsys):
    prediction, truth = _pair(tmp_path)
    tifffile.imwrite(prediction, np.full((3, 24, 24), 2.0, np.float32))
    assert main(["--stage", "evaluate", "--prediction", str(prediction), "--ground-truth", str(truth)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "outside [0, 1]" in error
    assert main(["--stage", "evaluate", "--prediction", str(prediction)]) == 2
    assert "--ground-truth" in capsys.readouterr().err


def test_images_of_different_sizes_are_scored_on_their_own_pixels():
    from pipeline.evaluate import report_for

    rng = np.random.default_rng(4)
    truth = [rng.integers(0, 2, (20, 30)).astype(bool), rng.integers(0, 2, (12, 16)).astype(bool)]
    perfect = [t.astype(np.float32) for t in truth]
    report = report_for(perfect, truth, 0.5)
    assert report["overall"] is None
    assert report["pixel_error"] == report["rand_error"] == report["warping_error"] == 0.0
    assert [row["foreground_iou"] for row in report["per_image"]] == [1.0, 1.0]
