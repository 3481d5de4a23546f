"""Stage `evaluate`: overlap-tile prediction of a labelled split, scored per image."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np

from pipeline import io, metrics, rundir
from pipeline.config import Config
from pipeline.predict import Segmenter, load_model


def evaluate_model(model: keras.Model, images: np.ndarray, truth: np.ndarray, config: Config) -> dict:
    """Scores a model on whole images [N, H, W, C] against cell masks [N, H, W].

    Returns per-image and overall pixel error (ISBI 2012 definition), foreground IoU
    and pixel accuracy at the configured threshold.
    """
    segment = Segmenter(model, config)
    threshold = config.predict.threshold
    progress = keras.utils.Progbar(len(images), unit_name="image")
    probabilities, per_image = [], []
    for index, (image, cells) in enumerate(zip(images, truth)):
        probability = segment(image)
        probabilities.append(probability)
        per_image.append(_scores(probability, cells, threshold) | {"image": index})
        progress.add(1)
    overall = _scores(np.stack(probabilities), truth, threshold)
    mean = {key: float(np.mean([row[key] for row in per_image])) for key in overall}
    return {"threshold": threshold, "overall": overall, "mean_per_image": mean, "per_image": per_image}


def _scores(probability: np.ndarray, truth: np.ndarray, threshold: float) -> dict:
    error, best_threshold = metrics.pixel_error(probability, truth)
    return {
        "pixel_error": error,
        "pixel_error_threshold": best_threshold,
        "foreground_iou": metrics.foreground_iou(probability, truth, threshold),
        "pixel_accuracy": metrics.pixel_accuracy(probability, truth, threshold),
    }


def run(config: Config, run_dir: Path) -> dict:
    """Evaluates the best model on the test split (or val, when test has no labels)."""
    model = load_model(run_dir)
    split_name = "test"
    split = rundir.load_split(run_dir, split_name, config)
    if "instances" not in split:  # ISBI 2012's test labels are secret
        split_name = "val"
        split = rundir.load_split(run_dir, split_name, config)
    report = evaluate_model(model, split["images"], split["instances"] > 0, config)
    report = {"split": split_name, "dataset": config.data.dataset} | report
    path = Path(run_dir) / "evaluation" / "report.json"
    io.atomic_write_text(path, json.dumps(report, indent=2))
    print(_table(report))
    print(f"evaluation report -> {path}")
    return report


def _table(report: dict) -> str:
    header = f"{'image':>8} {'pixel error':>12} {'IoU (cell)':>11} {'accuracy':>9}"
    rows = [
        f"{row['image']:>8} {row['pixel_error']:>12.4f} {row['foreground_iou']:>11.4f} {row['pixel_accuracy']:>9.4f}"
        for row in report["per_image"]
    ]
    for label, key in (("mean", "mean_per_image"), ("overall", "overall")):
        row = report[key]
        rows.append(f"{label:>8} {row['pixel_error']:>12.4f} {row['foreground_iou']:>11.4f} {row['pixel_accuracy']:>9.4f}")
    title = f"{report['dataset']} {report['split']} split, threshold {report['threshold']}:"
    return "\n".join([title, header, *rows])
