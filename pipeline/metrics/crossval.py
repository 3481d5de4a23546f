"""The cross-validation report: the folds' evaluation reports as one, with their spread and every slice.

Each fold's model is scored on its own test slices by `stages.evaluate`
(`metrics.report.report_for`); `aggregate` puts those reports together: per fold its
slices and values, every slice's values, the mean, standard deviation and range over the
folds, and what can be pooled over all held-out slices. `markdown` shows it as tables;
`compare` and `comparison_markdown` set several cross-validations of the same folds against
the first (the levers table of docs/results.md); `seeds` gives a recipe's mean over its
seeds; `estimate`, the accuracy it estimates for a model of its recipe without a held-out
score (`export_estimate`: for the run that `export.crossval` names it for). No model and no
TensorFlow.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from pipeline.config.schema import Config
from pipeline.errors import PipelineError
from pipeline.files import rundir
from pipeline.metrics.report import summary

# The values the report carries, with their titles in the tables (lower is better, IoU and accuracy aside).
KEYS = {"warping_error": "warping", "rand_error": "Rand", "pixel_error": "pixel", "v_rand_error": "1-Vrand",
        "v_info_error": "1-Vinfo", "foreground_iou": "IoU cell", "pixel_accuracy": "accuracy"}
# Why the other values are not pooled over all slices: their counts are not in the folds' reports.
NOT_POOLED = ("Rand, pixel, V_rand and V_info errors and cell IoU are ratios of counts (pairs of pixels, "
              "F-scores) that the folds' reports do not keep: over all slices they are given as the mean per "
              "slice and the mean over folds, never pooled")


@dataclasses.dataclass(frozen=True)
class Fold:
    """One fold's evaluation: its index, its test slices' names and pixel counts, and evaluate's report."""

    index: int
    slices: list[str]
    pixels: list[int]
    report: dict


def aggregate(folds: list[Fold]) -> dict:
    """The cross-validation report of `folds` (see the module doc).

    "folds": per fold its slices and values (the fold's overall values, as evaluate's
    summary row); "slices": every slice's values with its fold, in slice order;
    "across_folds": per value the mean, sample standard deviation (n - 1), minimum and
    maximum of the folds' values; "mean_per_slice": the mean over all slices; "pooled":
    the warping error and pixel accuracy of all held-out slices together, as one stack is
    scored (their pixel counts added over the slices), and the threshold of the warping error.
    """
    seen = [name for fold in folds for name in fold.slices]
    if len(set(seen)) != len(seen):
        raise PipelineError(f"the folds' test splits overlap: {sorted({n for n in seen if seen.count(n) > 1})}")
    rows = [_fold_row(fold) for fold in folds]
    slices = sorted((_slice_row(fold, index) for fold in folds for index in range(len(fold.slices))),
                    key=lambda row: row["slice"])
    keys = [key for key in KEYS if all(key in row for row in rows)]
    return {
        "folds": rows,
        "slices": slices,
        "across_folds": {key: _spread([row[key] for row in rows]) for key in keys},
        "mean_per_slice": {key: float(np.mean([row[key] for row in slices])) for key in keys},
        "pooled": _pooled(folds),
        "not_pooled": NOT_POOLED,
    }


def cost(seconds: list[list[float]]) -> dict:
    """The cost of an ensemble from each fold's seconds of prediction per member (the first
    member is the one model it is set against): per fold the ensemble's seconds (its
    members' added) and one model's, and over all folds the two totals and their ratio."""
    rows = [{"fold": index, "ensemble_seconds": float(sum(members)), "one_model_seconds": float(members[0])}
            for index, members in enumerate(seconds)]
    ensemble, one = (sum(row[key] for row in rows) for key in ("ensemble_seconds", "one_model_seconds"))
    return {"folds": rows, "ensemble_seconds": ensemble, "one_model_seconds": one,
            "ratio": ensemble / one if one > 0 else float("nan")}


def _fold_row(fold: Fold) -> dict:
    values = summary(fold.report)
    return {"fold": fold.index, "slices": fold.slices} | {key: values[key] for key in KEYS if key in values}


def _slice_row(fold: Fold, index: int) -> dict:
    values = fold.report["per_image"][index]
    return {"slice": fold.slices[index], "fold": fold.index} | {key: values[key] for key in KEYS if key in values}


def _spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value), minimum and maximum."""
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "min": float(np.min(values)), "max": float(np.max(values))}


def _pooled(folds: list[Fold]) -> dict:
    """The warping error of all slices as one stack (mismatched pixels added, the lowest over the
    thresholds, as `metrics.warping` scores a stack) and the pixel accuracy (correct pixels added)."""
    rows = [row for fold in folds for row in fold.report["per_image"]]
    pixels = np.array([count for fold in folds for count in fold.pixels], float)
    curves = [row["per_threshold"]["warping_error"] for row in rows]
    thresholds = list(curves[0])
    if any(list(curve) != thresholds for curve in curves):
        raise PipelineError("the folds' reports score the warping error at different thresholds; evaluate them again")
    errors = [float(np.dot(pixels, [curve[t] for curve in curves]) / pixels.sum()) for t in thresholds]
    best = int(np.argmin(errors))
    accuracy = float(np.dot(pixels, [row["pixel_accuracy"] for row in rows]) / pixels.sum())
    return {"warping_error": errors[best], "warping_error_threshold": float(thresholds[best]),
            "pixel_accuracy": accuracy, "slices": len(rows)}


def markdown(report: dict) -> str:
    """The report as Markdown: the protocol, the folds with their spread and the pooled values, every slice."""
    keys = list(report["across_folds"])
    header = "| | slices | " + " | ".join(KEYS[key] for key in keys) + " |"
    rule = "| --- " * (len(keys) + 2) + "|"

    def row(label: str, slices: str, values: dict) -> str:
        return f"| {label} | {slices} | " + " | ".join(_number(values.get(key)) for key in keys) + " |"

    spread = report["across_folds"]
    folds = [row(f"fold {r['fold']}", _span(r["slices"]), r) for r in report["folds"]]
    summary_rows = [row(f"{name} over folds", "", {key: spread[key][name] for key in keys})
                    for name in ("mean", "std", "min", "max")]
    pooled = report["pooled"]
    slices = [row(r["slice"], f"fold {r['fold']}", r) for r in report["slices"]]
    return "\n".join([
        "# Cross-validation" + (f": ensemble of {len(report['members'])}" if "members" in report else ""), "",
        *(f"- {line}" for line in report.get("protocol", [])), "",
        "## Folds", "", "Each fold's values over its test slices (counts added over them, as evaluate's "
        "overall row).", "", header, rule, *folds, *summary_rows,
        row("mean per slice", f"{len(report['slices'])}", report["mean_per_slice"]), "",
        f"Pooled over all {pooled['slices']} held-out slices: warping error {pooled['warping_error']:.6f} "
        f"(threshold {pooled['warping_error_threshold']:g}), pixel accuracy {pooled['pixel_accuracy']:.4f}. "
        f"{report['not_pooled']}.", "",
        "## Every slice", "", header.replace("slices", "fold"), rule, *slices, "",
        *(_cost_lines(report["cost"]) if "cost" in report else []),
    ])


def _cost_lines(cost: dict) -> list[str]:
    """The ensemble's cost as a table: seconds of prediction per fold, the ensemble's and one model's."""
    rows = [f"| fold {row['fold']} | {row['ensemble_seconds']:.2f} | {row['one_model_seconds']:.2f} |"
            for row in cost["folds"]]
    return ["## Cost", "", "Seconds of prediction of each fold's test slices, measured in the same pass (the "
            "ensemble's members' seconds added; one model: the first cross-validation's; tracing included).", "",
            "| | ensemble | one model |", "| --- | --- | --- |", *rows,
            f"| all folds | {cost['ensemble_seconds']:.2f} | {cost['one_model_seconds']:.2f} |", "",
            f"The ensemble takes {cost['ratio']:.1f} times one model's prediction time.", ""]


# The values a comparison of recipes pairs fold by fold: the challenge's two rankings' errors.
COMPARED = ("rand_error", "warping_error")
# Settings that differ between cross-validations of one protocol without making another recipe: where
# the data is, which fold, and what an export of the folds' models would say (none is exported).
NOT_RECIPE = ("data.data_dir", "data.fold")
NOT_RECIPE_SECTIONS = ("export",)


def compare(reports: list[dict]) -> list[dict]:
    """Each cross-validation report (`aggregate`'s, with its "configuration") against the first.

    Per report: the settings in which it differs from the first ("changes", "dotted.key=value"),
    its steps, its training minutes per fold where recorded, its mean and spread over the folds,
    the pooled warping error, and per COMPARED value the paired difference to the first, fold by
    fold (mean and sample standard deviation of the differences, and in how many folds it is
    lower): the folds differ far more from each other than recipes do, so only pairs of the
    same fold compare. Refuses reports whose folds test other slices.
    """
    first = reports[0]
    slices = [row["slices"] for row in first["folds"]]
    rows = []
    for report in reports:
        if [row["slices"] for row in report["folds"]] != slices:
            raise PipelineError("the cross-validations test other slices in their folds; compare only "
                                "cross-validations of the same data.folds on the same data")
        train = report["configuration"]["train"]
        row = {"changes": settings_changes(first["configuration"], report["configuration"]),
               "steps": train["epochs"] * train["steps_per_epoch"], "members": len(report.get("members", [])) or 1,
               "training_minutes": report.get("training_minutes"),
               "across_folds": report["across_folds"], "pooled_warping_error": report["pooled"]["warping_error"]}
        for key in COMPARED:
            differences = [ours[key] - theirs[key] for ours, theirs in zip(report["folds"], first["folds"])]
            row[f"{key}_difference"] = _spread(differences) | {
                "lower_in": sum(difference < 0 for difference in differences), "folds": len(differences)}
        rows.append(row)
    return rows


# What a model may change against the cross-validation that estimates its accuracy (`estimate`): which
# slices train and which are held out, the seed, and how training runs rather than what it learns.
NOT_ESTIMATED = ("data.data_dir", "data.folds", "data.fold", "data.test_slices", "data.val_slices",
                 "train.seed", "train.include_validation", "train.select_by", "train.early_stopping_patience",
                 "train.strategy", "train.jit_compile", "train.keep_freed_memory")

def estimate(report: dict, model: dict, source: str) -> dict:
    """The accuracy that cross-validation `report` (`aggregate`'s, with its "configuration"; read
    from `source`) estimates for a model trained with the settings `model` (the sections of
    `Config.to_dict` that a model file records) and never scored on held-out slices, as the
    final model on every labelled slice.

    Refuses, in one line, a model of another recipe: any setting of `model` but those
    NOT_ESTIMATED that differs. The estimate: the folds, slices, steps, seed, test-time
    averaging and segmentation (`predict.instances`) of the cross-validation, the mean,
    spread and range over the folds of its values, and the pooled warping error.
    """
    if report.get("members"):
        raise PipelineError(f"{source}: an ensemble's cross-validation, which estimates an ensemble, not one model")
    theirs = report["configuration"]
    for change in settings_changes(theirs, model):
        key = change.split("=", 1)[0]
        section, _, field = key.partition(".")
        if key not in NOT_ESTIMATED:
            raise PipelineError(f"{source}: cross-validates {key}={theirs[section].get(field)!r}, the model was "
                                f"trained with {change.split('=', 1)[1]}; it estimates only a model of its recipe")
    train = theirs["train"]
    return {"crossval": source, "folds": len(report["folds"]), "slices": len(report["slices"]),
            "steps": train["epochs"] * train["steps_per_epoch"], "seed": train["seed"],
            "test_time_augmentation": theirs["predict"]["test_time_augmentation"],
            "segmentation": theirs["predict"]["instances"],
            "across_folds": report["across_folds"], "pooled_warping_error": report["pooled"]["warping_error"]}


def export_estimate(config: Config) -> dict | None:
    """`estimate` for the model of a run with `config`, from the cross-validation `export.crossval`
    names (a run directory or a report file), or None where it names none.

    Refuses, in one line, a path without a report, a file that is not one, and a cross-validation
    of another recipe: checked before training too, so that an hour of it never ends refused.
    """
    if not config.export.crossval:
        return None
    source = rundir.crossval_report_file(Path(config.export.crossval))
    try:
        report = json.loads(source.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PipelineError(f"{source}: not a cross-validation report ({error})") from None
    if not isinstance(report, dict) or not REPORT_KEYS <= report.keys():
        raise PipelineError(f"{source}: not a cross-validation report (it lacks {', '.join(sorted(REPORT_KEYS))})")
    trained = {section: config.to_dict()[section] for section in rundir.TRAINED_SECTIONS}
    return estimate(report, trained, str(source))


# What `estimate` reads of a report.
REPORT_KEYS = frozenset({"configuration", "folds", "slices", "across_folds", "pooled"})


def settings_changes(first: dict, other: dict) -> list[str]:
    """The settings of configuration `other` (`Config.to_dict`) that differ from `first`'s, as key=value."""
    changes = []
    for section, fields in other.items():
        if section in NOT_RECIPE_SECTIONS:
            continue
        if not isinstance(fields, dict):  # a top-level setting, the preset's name
            changes += [f"{section}={fields}"] if first.get(section) != fields else []
            continue
        for field, value in fields.items():
            key = f"{section}.{field}"
            if key not in NOT_RECIPE and first.get(section, {}).get(field) != value:
                changes.append(f"{key}={value}")
    return changes


def comparison_markdown(rows: list[dict], labels: list[str]) -> str:
    """`compare`'s rows as a table, each labelled (by its run, say) and named by its changes."""
    header = ("| recipe | run | steps | Rand, mean (sd) over folds | Rand against the first, mean (sd) of the "
              "folds' differences | lower in | warping pooled | warping against the first | pixel | cell IoU | "
              "minutes per fold |")
    lines = [header, "| --- " * header.count(" | ") + "| --- |"]
    for row, label in zip(rows, labels, strict=True):
        spread, rand, warping = row["across_folds"], row["rand_error_difference"], row["warping_error_difference"]
        minutes = row["training_minutes"]
        recipe = ", ".join(f"`{change}`" for change in row["changes"]) or "the first"
        if row["members"] > 1:
            recipe += f" (ensemble of {row['members']})"
        lines.append(
            f"| {recipe} | {label} | {row['steps']:,} | {spread['rand_error']['mean']:.4f} "
            f"({spread['rand_error']['std']:.4f}) | {rand['mean']:+.4f} ({rand['std']:.4f}) | "
            f"{rand['lower_in']}/{rand['folds']} | {row['pooled_warping_error']:.6f} | {warping['mean']:+.6f} | "
            f"{spread['pixel_error']['mean']:.4f} | {_number(spread.get('foreground_iou', {}).get('mean'))} | "
            f"{'-' if not minutes else f'{sum(minutes.values()) / len(minutes):.1f}'} |")
    return "\n".join(lines)


def seeds(reports: list[dict]) -> list[dict]:
    """The recipes that several of `reports` train with other seeds and no other change (ensembles
    aside), as the project's goals are stated, the mean of the seeds with their spread: per recipe
    its changes against the first report, the reports' indices and seeds, and over the seeds the
    mean and sample standard deviation of the Rand error (each report's mean over the folds) and
    of the pooled warping error."""
    groups: dict[tuple[str, ...], list[int]] = {}
    for index, report in enumerate(reports):
        if not report.get("members"):
            changes = settings_changes(reports[0]["configuration"], report["configuration"])
            groups.setdefault(tuple(c for c in changes if not c.startswith("train.seed=")), []).append(index)
    return [{"changes": list(recipe), "runs": indices,
             "seeds": [reports[index]["configuration"]["train"]["seed"] for index in indices],
             "rand_error": _spread([reports[index]["across_folds"]["rand_error"]["mean"] for index in indices]),
             "warping_error": _spread([reports[index]["pooled"]["warping_error"] for index in indices])}
            for recipe, indices in groups.items() if len(indices) > 1]


def seeds_markdown(groups: list[dict], labels: list[str]) -> str:
    """`seeds`' recipes, a line each, naming their runs by `labels` (one per report)."""
    return "\n".join(
        f"- {', '.join(f'`{change}`' for change in group['changes']) or 'the first'} over "
        f"{len(group['runs'])} seeds (train.seed {', '.join(map(str, group['seeds']))}: "
        f"{', '.join(labels[index] for index in group['runs'])}): Rand {group['rand_error']['mean']:.4f} "
        f"(sd {group['rand_error']['std']:.4f} over the seeds), warping pooled "
        f"{group['warping_error']['mean']:.6f} (sd {group['warping_error']['std']:.6f})" for group in groups)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.6f}" if abs(value) < 0.01 else f"{value:.4f}"


def _span(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}"
