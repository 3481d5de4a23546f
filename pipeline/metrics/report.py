"""The evaluation report: every metric of a prediction, as JSON, a text table and pictures.

`score` scores one image or stack, `report_for` a set of images (per image, mean and
overall, with SEG per sequence for Cell Tracking Challenge data, and StarDist's
object matching wherever reference instances are given); `table` prints a
report and `panel` draws one image's errors. No model and no TensorFlow: the
`evaluate` stage feeds it its predictions, and any other tool's can be scored alike.
"""

from __future__ import annotations

import cv2
import numpy as np

from pipeline.display import bgr8, grey8
from pipeline.inference.labelling.instances import cell_instances, cell_segments
from pipeline.metrics import common, ctc, isbi, matching, warping

# Error picture colours (BGR): false membrane, missed membrane, split, merger.
COLOURS = {"false_membrane": (255, 128, 0), "missed_membrane": (0, 215, 255),
           "split": (0, 0, 255), "merger": (255, 0, 255)}

# The segmentation metrics score the cells as `method` separates them; the pixel error the map itself.
_SEGMENT_SWEEPS = {
    "rand_error": isbi.rand_error_sweep,
    "warping_error": warping.warping_error_sweep,
    "v_rand_error": isbi.v_rand_sweep,
    "v_info_error": isbi.v_info_sweep,
}


def score(probability: np.ndarray, truth: np.ndarray, threshold: float = 0.5,
          instances: np.ndarray | None = None, method: str = "components", min_size: int = 1) -> dict:
    """Every metric of one image [H, W] or stack [D, H, W] (counts summed over slices).

    Returns the headline values (lowest error over the ISBI grid) with the threshold
    that reached them, the warping error's split and merger pixels at its threshold
    ("warping_pixels"), the errors per threshold, foreground IoU and pixel accuracy at
    `threshold`, and, when ground-truth `instances` are given, CTC SEG and the object
    matching ("instance_matching", `matching.record`) of the prediction's instances as
    `predict` writes them (`instances.cell_instances` at `threshold` by `method`, without
    objects under `min_size` pixels). The Rand, warping, V_rand and V_info errors score
    the cells at each threshold as `method` separates them (`instances.cell_segments`;
    "components" is the challenge's reading of a map). V_rand and V_info are reported as
    errors, 1 - V, so that lower is better everywhere. A ground truth without membrane
    or without cell pixels adds "warning": which values it makes meaningless.
    """
    probability, cells = common.check_pair(probability, truth)
    result, curves = {}, {}
    sweeps = [("pixel_error", isbi.pixel_error_sweep(probability, cells))]
    sweeps += [(name, sweep_of(probability, cells, method)) for name, sweep_of in _SEGMENT_SWEEPS.items()]
    for name, sweep in sweeps:
        result[name], result[f"{name}_threshold"] = sweep.error, sweep.threshold
        curves[name] = dict(zip(map(repr, sweep.thresholds), sweep.errors))
    result["warping_pixels"] = warping.splits_and_mergers(probability, cells, result["warping_error_threshold"], method)
    result["foreground_iou"] = isbi.foreground_iou(probability, cells, threshold)
    result["pixel_accuracy"] = isbi.pixel_accuracy(probability, cells, threshold)
    if instances is not None:
        reference = np.asarray(instances).reshape(probability.shape)
        predicted = cell_instances(probability, threshold, method, min_size)
        result["seg"] = ctc.seg(predicted, reference)
        result["instance_matching"] = matching.record(matching.match(predicted, reference))
    warning = common.truth_warning(cells)
    return result | ({} if warning is None else {"warning": warning}) | {"per_threshold": curves}


def report_for(probabilities: list[np.ndarray], truth: list[np.ndarray], threshold: float,
               instances: list[np.ndarray] | None = None, sequences: list[str] | None = None,
               names: list[str] | None = None, method: str = "components", min_size: int = 1) -> dict:
    """Report of a set of images: headline values at the top, overall, mean and per image.

    "overall" sums the counts over the images, as the challenge does for a stack; for
    images of different sizes, which make no stack, the headline values are the means.
    With the `sequences` the images belong to (and their `instances`), the report adds
    CTC SEG per sequence and overall (see `seg_per_sequence`). With `instances`,
    "instance_matching" matches the objects of all images pooled (counts summed, as in
    "overall", but for images of any sizes); "mean_per_image" leaves it out, since a
    mean of per-image ratios is not StarDist's figure for a data set. "warnings" lists,
    one line each, the images whose ground truth leaves some values meaningless (see
    `score`), called by their `names` (default "image <index>"). The prediction's
    instances are found by `method` and `min_size`, as in `score`.
    """
    finding = {"method": method, "min_size": min_size}
    per_image = [
        score(p, t, threshold, None if instances is None else instances[i], **finding) | {"image": i}
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
                        None if instances is None else np.stack(instances), **finding)
    headline = mean if overall is None else overall
    report = ({key: headline[key] for key in ("warping_error", "rand_error", "pixel_error")}
              | {"warnings": warnings, "threshold": threshold, "segmentation": method, "overall": overall,
                 "mean_per_image": mean, "per_image": per_image})
    if instances is not None:
        report["instance_matching"] = matching.record(matching.pool(
            matching.match(cell_instances(p, threshold, method, min_size), r)
            for p, r in zip(probabilities, instances)))
    if sequences is not None:
        report |= seg_per_sequence(probabilities, instances, sequences, threshold, **finding)
    return report


def seg_per_sequence(probabilities: list[np.ndarray], instances: list[np.ndarray], sequences: list[str],
                     threshold: float, method: str = "components", min_size: int = 1) -> dict:
    """CTC SEG per sequence and overall: {"seg": overall, "seg_per_sequence": {sequence: SEG}}.

    `sequences[i]` names the sequence of image i. A sequence's SEG is the mean Jaccard
    index over all reference objects of all its frames, as py-ctcmetrics computes it for
    one sequence; the overall SEG pools the objects of all sequences the same way, so it
    is not the mean of the per-sequence values. Frames may differ in size.
    """
    scores: dict[str, list[np.ndarray]] = {}
    for probability, reference, sequence in zip(probabilities, instances, sequences):
        scores.setdefault(sequence, []).append(
            ctc.seg_scores(cell_instances(probability, threshold, method, min_size), reference))
    per_sequence = {sequence: ctc.mean_seg(np.concatenate(frames)) for sequence, frames in sorted(scores.items())}
    return {"seg": ctc.mean_seg(np.concatenate([frame for frames in scores.values() for frame in frames])),
            "seg_per_sequence": per_sequence}


def summary(report: dict) -> dict:
    """The values of a report's summary row, with the thresholds that reached them.

    The overall values (for images of different sizes, the means per image), and the
    overall and per-sequence SEG and the pooled object matching where the report has them.
    """
    values = report["mean_per_image"] if report["overall"] is None else report["overall"]
    row = {key: value for key, value in values.items() if key != "per_threshold"}
    return row | {key: report[key] for key in ("seg", "seg_per_sequence", "instance_matching") if key in report}


def table(report: dict) -> str:
    """The report as a text table: per image, mean, overall, SEG per sequence, no TTA, and the paper's row.

    Rows whose ground truth leaves values meaningless end their label in "!", and the
    report's warnings follow the table, one per line. A column key "record.field" is a
    field of a nested record (the object matching's), "-" where a row has none.
    """
    columns = [("warping_error", "warping", ".6f"), ("warping_pixels.splits", "splits", "d"),
               ("warping_pixels.mergers", "mergers", "d"), ("rand_error", "Rand", ".4f"), ("pixel_error", "pixel", ".4f"),
               ("v_rand_error", "1-Vrand", ".4f"), ("v_info_error", "1-Vinfo", ".4f"),
               ("foreground_iou", "IoU cell", ".4f"), ("pixel_accuracy", "accuracy", ".4f"), ("seg", "SEG", ".4f"),
               ("instance_matching.accuracy", "AP@0.5", ".4f"), ("instance_matching.f1", "F1@0.5", ".4f"),
               ("instance_matching.mean_accuracy_over_iou_thresholds", "AP.5:.95", ".4f")]
    columns = [c for c in columns if c[0].split(".")[0] in report["per_image"][0].keys() | report.keys()]
    header = f"{'image':>10}" + "".join(f"{title:>11}" for _, title, _ in columns)

    def row(label: str, values: dict) -> str:
        label += "!" if "warning" in values else ""
        cells = [(_field(values, key), fmt) for key, _, fmt in columns]
        return f"{label:>10}" + "".join(f"{'-':>11}" if value is None else f"{value:>11{fmt}}" for value, fmt in cells)

    rows = [row(str(r["image"]), r) for r in report["per_image"]]
    rows.append(row("mean", report["mean_per_image"]))
    if report["overall"] is not None:  # None for images of different sizes
        rows.append(row("overall", report["overall"]))
    elif "instance_matching" in report:  # the matching pools the objects of images of any sizes
        rows.append(row("overall", {"instance_matching": report["instance_matching"]}))
    rows += [row(f"seq {sequence}", {"seg": value}) for sequence, value in report.get("seg_per_sequence", {}).items()]
    notes = []
    if "instance_matching" in report:
        notes.append("AP@0.5, F1@0.5: StarDist's accuracy TP/(TP+FP+FN) and F1 of objects matched at IoU >= 0.5; "
                     "AP.5:.95: mean AP over IoU 0.5, 0.55, ..., 0.95; objects pooled over images, no mean")
    if "without_test_time_augmentation" in report:
        rows.append(row("no TTA", report["without_test_time_augmentation"]))
        notes.append("no TTA: the same model without test-time augmentation; the rows above average the "
                     "8 rotations and flips")
    if "paper" in report:
        rows.append(row("paper*", report["paper"]))
        notes.append(f"* {report['paper']['note']}")
    source = f"{report['dataset']} {report['split']} split" if "dataset" in report else report.get("prediction", "")
    title = (f"{source}: lowest errors over the ISBI threshold grid; IoU, accuracy, SEG and object matching at "
             f"threshold {report['threshold']}")
    if report.get("segmentation", "components") != "components":  # reports written before it are components'
        notes.append(f"warping, splits, mergers, Rand, 1-Vrand, 1-Vinfo: the cells at each threshold as "
                     f"predict.instances={report['segmentation']} separates them, not each 4-connected component "
                     "as the challenge reads a map")
    if "model_selection" in report:
        notes.append(f"model selection: {report['model_selection']}")
    notes += [f"! {warning}" for warning in report["warnings"]]
    return "\n".join([title, header, *rows, *notes])


def _field(values: dict, key: str) -> float | None:
    """A table cell's value: `values[key]`, or for "record.field" `values[record][field]`; None if absent."""
    for part in key.split("."):
        values = values.get(part) if isinstance(values, dict) else None
    return values


def panel(probability: np.ndarray, truth: np.ndarray, threshold: float, image: np.ndarray | None = None,
          method: str = "components") -> np.ndarray:
    """BGR picture: [input [H, W, C] (in colour where RGB),] ground truth, prediction at `threshold`
    (its cells as `method` separates them), errors.

    Errors: false membrane (predicted membrane on a cell) and missed membrane
    (predicted cell on a membrane) in their colours, and on top the split and merger
    pixels of the warping error at the same threshold (see `COLOURS`).
    """
    predicted = cell_segments(probability, threshold, method)
    errors = np.full(truth.shape + (3,), 255, np.uint8)
    errors[truth & ~predicted] = COLOURS["false_membrane"]
    errors[~truth & predicted] = COLOURS["missed_membrane"]
    kinds = warping.warping_mismatches(probability, truth, threshold, method)
    errors[kinds == warping.SPLIT] = COLOURS["split"]
    errors[kinds == warping.MERGER] = COLOURS["merger"]
    tiles = [cv2.cvtColor(grey8(mask, (0, 1)), cv2.COLOR_GRAY2BGR) for mask in (truth, predicted)] + [errors]
    if image is not None:
        tiles.insert(0, bgr8(image))
    gap = np.full((truth.shape[0], 4, 3), 128, np.uint8)
    return np.concatenate([part for tile in tiles for part in (tile, gap)][:-1], axis=1)
