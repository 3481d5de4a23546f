"""Stage `evaluate`: score predictions with the challenges' metrics, as JSON, table and pictures.

Two ways in: `run` predicts the run's labelled test split (ISBI 2012: the validation
slices) with the trained model; `score_files` scores any probability map against
ground truth files, without a run directory or a model.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import cv2
import keras
import numpy as np

from pipeline import io, metrics, rundir
from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.rundir import RunDir

# The paper's ISBI 2012 results, on the challenge's 30-slice test set (hidden labels).
PAPER_ISBI2012 = {"warping_error": 0.000353, "rand_error": 0.0382, "pixel_error": 0.0611}

# Error picture colours (BGR): false membrane, missed membrane, split, merger.
COLOURS = {"false_membrane": (255, 128, 0), "missed_membrane": (0, 215, 255),
           "split": (0, 0, 255), "merger": (255, 0, 255)}

_SWEEPS = {
    "pixel_error": metrics.pixel_error_sweep,
    "rand_error": metrics.rand_error_sweep,
    "warping_error": metrics.warping_error_sweep,
    "v_rand_error": metrics.v_rand_sweep,
    "v_info_error": metrics.v_info_sweep,
}


def score(probability: np.ndarray, truth: np.ndarray, threshold: float = 0.5,
          instances: np.ndarray | None = None) -> dict:
    """Every metric of one image [H, W] or stack [D, H, W] (counts summed over slices).

    Returns the headline values (lowest error over the ISBI grid) with the threshold
    that reached them, the errors per threshold, foreground IoU and pixel accuracy at
    `threshold`, and CTC SEG when ground-truth `instances` are given (the prediction's
    instances: 4-connected cells at `threshold`). V_rand and V_info are reported as
    errors, 1 - V, so that lower is better everywhere. A ground truth without membrane
    or without cell pixels adds "warning": which values it makes meaningless.
    """
    probability, cells = metrics.check_pair(probability, truth)
    result, curves = {}, {}
    for name, sweep_of in _SWEEPS.items():
        sweep = sweep_of(probability, cells)
        result[name], result[f"{name}_threshold"] = sweep.error, sweep.threshold
        curves[name] = dict(zip(map(repr, sweep.thresholds), sweep.errors))
    result["foreground_iou"] = metrics.foreground_iou(probability, cells, threshold)
    result["pixel_accuracy"] = metrics.pixel_accuracy(probability, cells, threshold)
    if instances is not None:
        reference = np.asarray(instances).reshape(probability.shape)
        result["seg"] = metrics.seg(metrics.cell_instances(probability, threshold), reference)
    warning = metrics.truth_warning(cells)
    return result | ({} if warning is None else {"warning": warning}) | {"per_threshold": curves}


def report_for(probabilities: list[np.ndarray], truth: list[np.ndarray], threshold: float,
               instances: list[np.ndarray] | None = None, sequences: list[str] | None = None,
               names: list[str] | None = None) -> dict:
    """Report of a set of images: headline values at the top, overall, mean and per image.

    "overall" sums the counts over the images, as the challenge does for a stack; for
    images of different sizes, which make no stack, the headline values are the means.
    With the `sequences` the images belong to (and their `instances`), the report adds
    CTC SEG per sequence and overall (see `seg_per_sequence`). "warnings" lists, one line
    each, the images whose ground truth leaves some values meaningless (see `score`),
    called by their `names` (default "image <index>").
    """
    per_image = [
        score(p, t, threshold, None if instances is None else instances[i]) | {"image": i}
        for i, (p, t) in enumerate(zip(probabilities, truth))
    ]
    names = [f"image {i}" for i in range(len(per_image))] if names is None else names
    warnings = [f"{name}: {row['warning']}" for name, row in zip(names, per_image, strict=True) if "warning" in row]
    scalar_keys = [key for key, value in per_image[0].items() if not isinstance(value, dict)
                   and not key.endswith("_threshold") and key not in ("image", "warning")]
    mean = {key: float(np.mean([row[key] for row in per_image])) for key in scalar_keys}
    overall = None
    if len({p.shape for p in probabilities}) == 1:
        overall = score(np.stack(probabilities), np.stack(truth), threshold,
                        None if instances is None else np.stack(instances))
    headline = mean if overall is None else overall
    report = ({key: headline[key] for key in ("warping_error", "rand_error", "pixel_error")}
              | {"warnings": warnings, "threshold": threshold, "overall": overall, "mean_per_image": mean,
                 "per_image": per_image})
    if sequences is not None:
        report |= seg_per_sequence(probabilities, instances, sequences, threshold)
    return report


def seg_per_sequence(probabilities: list[np.ndarray], instances: list[np.ndarray], sequences: list[str],
                     threshold: float) -> dict:
    """CTC SEG per sequence and overall: {"seg": overall, "seg_per_sequence": {sequence: SEG}}.

    `sequences[i]` names the sequence of image i. A sequence's SEG is the mean Jaccard
    index over all reference objects of all its frames, as py-ctcmetrics computes it for
    one sequence; the overall SEG pools the objects of all sequences the same way, so it
    is not the mean of the per-sequence values. Frames may differ in size.
    """
    scores: dict[str, list[np.ndarray]] = {}
    for probability, reference, sequence in zip(probabilities, instances, sequences):
        scores.setdefault(sequence, []).append(
            metrics.seg_scores(metrics.cell_instances(probability, threshold), reference))
    per_sequence = {sequence: _seg_of(frames) for sequence, frames in sorted(scores.items())}
    return {"seg": _seg_of([frame for frames in scores.values() for frame in frames]),
            "seg_per_sequence": per_sequence}


def _seg_of(frames: list[np.ndarray]) -> float:
    """SEG of the reference objects' scores of some frames (`metrics.seg_scores` per frame)."""
    scores = np.concatenate(frames)
    return float(scores.mean()) if scores.size else 0.0  # as metrics.seg without reference objects


def summary(report: dict) -> dict:
    """The values of a report's summary row, with the thresholds that reached them.

    The overall values (for images of different sizes, the means per image), and the
    overall and per-sequence SEG where the report has them.
    """
    values = report["mean_per_image"] if report["overall"] is None else report["overall"]
    row = {key: value for key, value in values.items() if key != "per_threshold"}
    return row | {key: report[key] for key in ("seg", "seg_per_sequence") if key in report}


def evaluate_model(model: keras.Model, images: np.ndarray, truth: np.ndarray, config: Config,
                   instances: np.ndarray | None = None, sizes: np.ndarray | None = None,
                   sequences: list[str] | None = None) -> dict:
    """Scores a model on whole images [N, H, W, C] against cell masks [N, H, W].

    `sizes` [N, 2] crops each image and its labels to its own size first (prepared
    splits of different image sizes are padded to the largest); `sequences` (with
    `instances`) adds SEG per sequence. Returns `report_for`'s report, plus the
    predicted probabilities under the key "probabilities" (not written to JSON).
    """
    from pipeline.predict import Segmenter  # TensorFlow only for this path

    sizes = [image.shape[:2] for image in images] if sizes is None else [tuple(size) for size in sizes]
    crops = [(slice(0, height), slice(0, width)) for height, width in sizes]
    segment = Segmenter(model, config)
    progress = keras.utils.Progbar(len(images), unit_name="image")
    probabilities = []
    for image, crop in zip(images, crops):
        probabilities.append(segment(image[crop]))
        progress.add(1)
    truth = [cells[crop] for cells, crop in zip(truth, crops)]
    instances = None if instances is None else [labels[crop] for labels, crop in zip(instances, crops)]
    report = report_for(probabilities, truth, config.predict.threshold, instances, sequences)
    return report | {"probabilities": probabilities}


def run(config: Config, run: RunDir) -> dict:
    """Evaluates the best model on the test split (or val, when test has no labels).

    With `predict.test_time_augmentation`, the split is scored with it (the report's
    main values) and once more without it, under "without_test_time_augmentation"
    (`summary`'s values), to show what the averaging buys. For Cell Tracking Challenge
    data the report adds SEG per sequence ("seg_per_sequence") and overall ("seg").
    """
    from pipeline.predict import load_model

    model = load_model(run)
    split_name = "test"
    split = rundir.load_split(run, split_name, config)
    if "instances" not in split:  # ISBI 2012's test labels are secret
        split_name = "val"
        split = rundir.load_split(run, split_name, config)
    sequences = None
    if config.data.dataset.startswith("ctc2d/") and "ids" in split:  # runs prepared before ids were kept have none
        sequences = [str(example).partition("_")[0] for example in split["ids"]]  # ids are <sequence>_tNNN

    def evaluate(settings: Config) -> dict:
        return evaluate_model(model, split["images"], split["instances"] > 0, settings, split["instances"],
                              split.get("sizes"), sequences)

    report = evaluate(config)
    probabilities = report.pop("probabilities")
    report = {"split": split_name, "dataset": config.data.dataset} | report
    if config.predict.test_time_augmentation:
        plain = dataclasses.replace(config, predict=dataclasses.replace(config.predict, test_time_augmentation=False))
        report["without_test_time_augmentation"] = summary(evaluate(plain))
    if config.data.dataset == "isbi2012":
        report["paper"] = PAPER_ISBI2012 | {"note": "the paper's numbers are on the ISBI 2012 test set (30 slices, "
                                            f"hidden labels); ours are on the {split_name} slices, a different test set"}
    run.save_config(config)
    _write(report, run.report)
    for index, (image, probability, cells) in enumerate(zip(split["images"], probabilities, split["instances"] > 0)):
        height, width = probability.shape
        picture = panel(probability, cells[:height, :width], report["threshold"], image[:height, :width, 0])
        io.write_png(run.panel(index), picture, overwrite=True)
    return report


def score_files(prediction: Path, ground_truth: Path, output: Path | None = None, threshold: float = 0.5) -> dict:
    """Scores a probability-of-cell TIFF (image or stack) against ISBI-style labels.

    Prints the table; writes the JSON report to `output` when given, and the error
    pictures into the folder `<output without suffix>_panels/` beside it. Warnings name
    the ground truth file, and in a stack the slice.
    """
    if output is not None:
        io.check_output_file(Path(output))
    probability, truth = _read_grey(prediction), _read_grey(ground_truth)
    if probability.shape != truth.shape:
        raise PipelineError(f"{prediction}: shape {probability.shape} differs from {ground_truth}'s {truth.shape}")
    if probability.dtype.kind != "f":
        raise PipelineError(f"{prediction}: pixel type {probability.dtype}; expected a float probability of cell in [0, 1]")
    try:
        probability, cells = metrics.check_pair(probability, truth)
    except PipelineError as error:
        raise PipelineError(f"{prediction} vs {ground_truth}: {error}") from None
    # A stack's warnings name its slices, which `report_for` scores as its images.
    names = [str(ground_truth)] if truth.ndim == 2 else [f"{ground_truth} slice {i}" for i in range(len(cells))]
    report = ({"prediction": str(prediction), "ground_truth": str(ground_truth)}
              | report_for(probability, cells, threshold, names=names))
    if output is not None:
        _write(report, Path(output))
        folder = Path(output).with_suffix("").with_name(Path(output).stem + "_panels")
        for index, (p, t) in enumerate(zip(probability, cells)):
            io.write_png(folder / f"panel_{index:03d}.png", panel(p, t, threshold), overwrite=True)
    else:
        print(table(report))
    return report


def _read_grey(path: Path) -> np.ndarray:
    """A grey image [H, W] or stack [D, H, W] as its file's axes say."""
    stack = io.read_stack(path)[..., 0]
    return stack[0] if len(stack) == 1 else stack


def _write(report: dict, path: Path) -> None:
    io.atomic_write_text(path, json.dumps(report, indent=2))
    print(table(report))
    print(f"evaluation report -> {path}")


def table(report: dict) -> str:
    """The report as a text table: per image, mean, overall, SEG per sequence, no TTA, and the paper's row.

    Rows whose ground truth leaves values meaningless end their label in "!", and the
    report's warnings follow the table, one per line.
    """
    columns = [("warping_error", "warping", ".6f"), ("rand_error", "Rand", ".4f"), ("pixel_error", "pixel", ".4f"),
               ("v_rand_error", "1-Vrand", ".4f"), ("v_info_error", "1-Vinfo", ".4f"),
               ("foreground_iou", "IoU cell", ".4f"), ("pixel_accuracy", "accuracy", ".4f"), ("seg", "SEG", ".4f")]
    columns = [c for c in columns if c[0] in report["mean_per_image"]]
    header = f"{'image':>10}" + "".join(f"{title:>11}" for _, title, _ in columns)

    def row(label: str, values: dict) -> str:
        label += "!" if "warning" in values else ""
        return f"{label:>10}" + "".join(
            f"{values[key]:>11{fmt}}" if key in values else f"{'-':>11}" for key, _, fmt in columns)

    rows = [row(str(r["image"]), r) for r in report["per_image"]]
    rows.append(row("mean", report["mean_per_image"]))
    if report["overall"] is not None:  # None for images of different sizes
        rows.append(row("overall", report["overall"]))
    rows += [row(f"seq {sequence}", {"seg": value}) for sequence, value in report.get("seg_per_sequence", {}).items()]
    notes = []
    if "without_test_time_augmentation" in report:
        rows.append(row("no TTA", report["without_test_time_augmentation"]))
        notes.append("no TTA: the same model without test-time augmentation; the rows above average the "
                     "8 rotations and flips")
    if "paper" in report:
        rows.append(row("paper*", report["paper"]))
        notes.append(f"* {report['paper']['note']}")
    source = f"{report['dataset']} {report['split']} split" if "dataset" in report else report.get("prediction", "")
    title = (f"{source}: lowest errors over the ISBI threshold grid; IoU, accuracy and SEG at "
             f"threshold {report['threshold']}")
    notes += [f"! {warning}" for warning in report["warnings"]]
    return "\n".join([title, header, *rows, *notes])


def panel(probability: np.ndarray, truth: np.ndarray, threshold: float, image: np.ndarray | None = None) -> np.ndarray:
    """BGR picture: [input,] ground truth, prediction at `threshold`, and its errors.

    Errors: false membrane (predicted membrane on a cell) and missed membrane
    (predicted cell on a membrane) in their colours, and on top the split and merger
    pixels of the warping error at the same threshold (see `COLOURS`).
    """
    predicted = probability > threshold
    errors = np.full(truth.shape + (3,), 255, np.uint8)
    errors[truth & ~predicted] = COLOURS["false_membrane"]
    errors[~truth & predicted] = COLOURS["missed_membrane"]
    kinds = metrics.warping_mismatches(probability, truth, threshold)
    errors[kinds == metrics.SPLIT] = COLOURS["split"]
    errors[kinds == metrics.MERGER] = COLOURS["merger"]
    tiles = [_grey(truth, 0, 1), _grey(predicted, 0, 1), errors]
    if image is not None:
        tiles.insert(0, _grey(image, *np.percentile(image, (0.5, 99.5))))
    gap = np.full((truth.shape[0], 4, 3), 128, np.uint8)
    return np.concatenate([part for tile in tiles for part in (tile, gap)][:-1], axis=1)


def _grey(values: np.ndarray, low: float, high: float) -> np.ndarray:
    values = values.astype(np.float64)
    scaled = np.clip((values - low) / max(high - low, 1e-12) * 255, 0, 255).astype(np.uint8)
    return cv2.cvtColor(scaled, cv2.COLOR_GRAY2BGR)
