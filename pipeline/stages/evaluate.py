"""Stage `evaluate`: score predictions with the challenges' metrics, as JSON, table and pictures.

Two ways in: `run` predicts a labelled split of the run with the trained model (by
default the test split, or the validation split where the test split has no labels, as
ISBI 2012's challenge volume); `score_files` scores any probability map against
ground truth files, without a run directory or a model. What the report holds and how
it is shown: `pipeline.metrics.report`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np

from pipeline import data
from pipeline.config.schema import Config, TrainConfig
from pipeline.console import progress_bar
from pipeline.errors import PipelineError
from pipeline.files import io, model_source, rundir
from pipeline.files.model_source import ModelSource
from pipeline.files.rundir import RunDir
from pipeline.inference.segmenter import Ensemble, Segmenter, load_model
from pipeline.metrics.common import check_pair
from pipeline.metrics.report import panel, report_for, summary, table


def evaluate_model(model: keras.Model, images: np.ndarray, truth: np.ndarray, config: Config,
                   instances: np.ndarray | None = None, sizes: np.ndarray | None = None,
                   sequences: list[str] | None = None) -> dict:
    """Scores a model on whole images [N, H, W, C] against cell masks [N, H, W].

    `sizes` [N, 2] crops each image and its labels to its own size first (prepared
    splits of different image sizes are padded to the largest); `sequences` (with
    `instances`) adds SEG per sequence. Returns `report_for`'s report, plus the
    predicted probabilities under the key "probabilities" (not written to JSON).
    """
    return evaluate_segmenter(Segmenter(model, config), images, truth, config, instances, sizes, sequences)


def evaluate_segmenter(segment: Callable[[np.ndarray], np.ndarray], images: np.ndarray, truth: np.ndarray,
                       config: Config, instances: np.ndarray | None = None, sizes: np.ndarray | None = None,
                       sequences: list[str] | None = None) -> dict:
    """`evaluate_model` with any image -> probability of cell function (an `Ensemble`, say);
    `config` gives the threshold and the labelling of the report."""
    sizes = [image.shape[:2] for image in images] if sizes is None else [tuple(size) for size in sizes]
    crops = [(slice(0, height), slice(0, width)) for height, width in sizes]
    progress = progress_bar(len(images), "image")
    probabilities = []
    for image, crop in zip(images, crops):
        probabilities.append(segment(image[crop]))
        progress.add(1)
    truth = [cells[crop] for cells, crop in zip(truth, crops)]
    instances = None if instances is None else [labels[crop] for labels, crop in zip(instances, crops)]
    report = report_for(probabilities, truth, config.predict.threshold, instances, sequences,
                        method=config.predict.instances, min_size=config.predict.min_size)
    return report | {"probabilities": probabilities}


def run(config: Config, run: RunDir, requested: str | None = None, models: list[ModelSource] | None = None,
        output: Path | None = None, overwrite: bool = False, selection: str | None = None) -> dict:
    """Scores the best model on the `requested` split: by default test, or val where test has no labels.

    `models` (`files.model_source.opened`) are scored instead of the run's model, as their
    ensemble (one model alone, or their mean probability of cell), with the run's settings
    for the report (threshold, labelling): the report names them and goes to `output`, or
    by default to <run>/evaluation[/<split>]/models/report.json, never over the run's own
    report; an existing one is refused unless `overwrite`. Its panels go to the folder
    beside it named after it (`report_panels/`). What chose such models is not known here,
    and the report says so, unless the caller knows and says it in `selection` (a
    cross-validation's ensemble, whose members it checked).

    The default split's report and panels go to <run>/evaluation/, where export looks for
    them; another split's to <run>/evaluation/<split>/. With
    `predict.test_time_augmentation`, the split is scored with it (the report's main
    values) and once more without it, under "without_test_time_augmentation" (`summary`'s
    values), to show what the averaging buys. For data sets whose
    examples form sequences (Cell Tracking Challenge) the report adds SEG per sequence
    ("seg_per_sequence") and overall ("seg"); for those with a published result (ISBI 2012)
    it adds that row ("paper").
    """
    test = rundir.load_split(run, "test", config)
    default = "test" if "instances" in test else "val"  # ISBI 2012's test labels are secret
    split_name = requested or default
    split = test if split_name == "test" else rundir.load_split(run, split_name, config)
    if "instances" not in split:
        raise PipelineError(f"{run.prepared(split_name)}: the {split_name} split has no labels to score against; "
                            f"score --split {default}")
    other = None if split_name == default else split_name  # where its report goes
    if models is None:
        config = run.model_settings(config)
        named = {"model_sha256": io.sha256(run.trained_model())}  # which model scored: `RunDir.model_report`
        members = [(load_model(run.best_model), config)]
        path = run.report_of(other)
    else:
        model_source.check_compatible(models, config.model.input_channels)
        path = Path(output) if output is not None else run.models_report_of(other)
        io.check_output_file(path)
        io.refuse_existing([path], overwrite)
        members = [(load_model(source.file), source.config) for source in models]
        named = {"models": [str(source.named) for source in models]}
    dataset = data.DATASETS[config.data.dataset]
    sequences = None
    if dataset.sequence_of is not None and "ids" in split:  # runs prepared before ids were kept have none
        sequences = [dataset.sequence_of(str(example)) for example in split["ids"]]

    def evaluate(segment: Ensemble) -> dict:
        return evaluate_segmenter(segment, split["images"], split["instances"] > 0, config,
                                  split["instances"], split.get("sizes"), sequences)

    ensemble = Ensemble(members)
    report = evaluate(ensemble)
    probabilities = report.pop("probabilities")
    if models is None:
        selection = _selection(split_name, dataset.held_out_test(config.data), config.train)
    elif selection is None:
        selection = "not known: models from outside this run's training, which may have trained on these images"
    if models is not None:
        # Each model's seconds of prediction in this pass, tracing its graph included, in the order of "models".
        named["prediction_seconds"] = ensemble.seconds
    report = {"split": split_name, "dataset": config.data.dataset, "model_selection": selection} | named | report
    if any(settings.predict.test_time_augmentation for _, settings in members):
        report["without_test_time_augmentation"] = summary(evaluate(Ensemble([(model, _plain(settings))
                                                                              for model, settings in members])))
    if dataset.reference is not None:
        report["paper"] = dataset.reference.row(split_name)
    if models is None:
        run.save_config(config)
    _write(report, path, overwrite=models is None or overwrite)
    for index, (image, probability, cells) in enumerate(zip(split["images"], probabilities, split["instances"] > 0)):
        height, width = probability.shape
        picture = panel(probability, cells[:height, :width], report["threshold"], image[:height, :width],
                        report["segmentation"])
        target = run.panel(index, other) if models is None else _panels(path) / f"panel_{index:03d}.png"
        io.write_png(target, picture, overwrite=True)
    return report


def _plain(settings: Config) -> Config:
    """`settings` without test-time augmentation."""
    return dataclasses.replace(settings, predict=dataclasses.replace(settings.predict, test_time_augmentation=False))


def _panels(report: Path) -> Path:
    """The folder of a report's error pictures, beside it: `<report without suffix>_panels/`."""
    return report.with_suffix("").with_name(report.stem + "_panels")


def _selection(split_name: str, held_out: bool, train: TrainConfig) -> str:
    """Whether the scored images chose the model, in words for the report."""
    if split_name == "test" and held_out and train.include_validation:
        return ("held out: the test split never chose the model; trained on the validation split too "
                "(train.include_validation), the last epoch kept")
    if split_name == "test" and held_out and train.select_by == "last":
        return "held out: the test split never chose the model (train.select_by=last: the last epoch kept)"
    if split_name == "test" and held_out:
        return "held out: the test split never chose the model (the validation split did)"
    if train.include_validation:
        return (f"none: the {split_name} images scored here were also trained on (train.include_validation); "
                "no held-out score exists for this model; a cross-validation of its recipe estimates one "
                "(--stage crossval; export.crossval records it with the export)")
    if train.select_by == "last":
        return (f"held out: the {split_name} images scored here were not trained on and chose nothing "
                "(train.select_by=last: the last epoch kept)")
    return (f"not held out: the {split_name} images scored here also chose the model, a flattering score "
            "(docs/evaluation.md, 'Model selection and the score')")


def score_files(prediction: Path, ground_truth: Path, output: Path | None = None, threshold: float = 0.5,
                overwrite: bool = False) -> dict:
    """Scores a probability-of-cell TIFF (image or stack) against ISBI-style labels.

    Prints the table; writes the JSON report to `output` when given, and the error
    pictures into the folder `<output without suffix>_panels/` beside it. An existing
    report is refused before any reading unless `overwrite`. Warnings name the ground
    truth file, and in a stack the slice.
    """
    if output is not None:
        io.check_output_file(Path(output))
        io.refuse_existing([Path(output)], overwrite)
    probability, truth = _read_grey(prediction, "prediction"), _read_grey(ground_truth, "ground truth")
    if probability.shape != truth.shape:
        raise PipelineError(f"{prediction}: shape {probability.shape} differs from {ground_truth}'s {truth.shape}")
    if probability.dtype.kind != "f":
        raise PipelineError(f"{prediction}: pixel type {probability.dtype}; expected a float probability of cell in [0, 1]")
    try:
        probability, cells = check_pair(probability, truth)
    except PipelineError as error:
        raise PipelineError(f"{prediction} vs {ground_truth}: {error}") from None
    # A stack's warnings name its slices, which `report_for` scores as its images.
    names = [str(ground_truth)] if truth.ndim == 2 else [f"{ground_truth} slice {i}" for i in range(len(cells))]
    report = ({"prediction": str(prediction), "ground_truth": str(ground_truth)}
              | report_for(probability, cells, threshold, names=names))
    if output is not None:
        _write(report, Path(output), overwrite)
        folder = _panels(Path(output))
        for index, (p, t) in enumerate(zip(probability, cells)):
            io.write_png(folder / f"panel_{index:03d}.png", panel(p, t, threshold), overwrite=True)
    else:
        print(table(report))
    return report


def _read_grey(path: Path, role: str) -> np.ndarray:
    """A grey image [H, W] or stack [D, H, W], whatever its file calls the slice axis (`io.read_slices`)."""
    stack = io.read_slices(path, role)
    return stack[0] if len(stack) == 1 else stack


def _write(report: dict, path: Path, overwrite: bool = True) -> None:
    io.atomic_write_text(path, json.dumps(report, indent=2), overwrite)
    print(table(report))
    print(f"evaluation report -> {path}")
