"""Stage `crossval`: k-fold cross-validation over a data set's labelled images, one report.

The labelled images are cut into `data.folds` folds of consecutive images (the data set
owns the cut: `pipeline.data.isbi2012.fold_parts`). Fold i is a run directory of its own,
`<run>/folds/fold-i/`, whose test split is fold i; its model trains on every other fold
(the next fold is its validation split, trained on too: `train.include_validation`, the
last epoch kept), so that nothing but the recipe chooses the model, exactly as the final
model trains on all labelled images. `pipeline.cli` runs prepare, train and evaluate in
each fold, as far as `remaining` says, since no stage calls another; `run` then writes
the report over the folds (`pipeline.metrics.crossval`). A killed cross-validation resumes:
a fold whose report scored its model is not redone, a fold part-trained resumes
by the train stage's own resume.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from pipeline.config import resolve as configuration
from pipeline.config.schema import Config
from pipeline.data import DATASETS
from pipeline.errors import PipelineError
from pipeline.files import io, rundir
from pipeline.files.rundir import RunDir
from pipeline.metrics import crossval

DEFAULT_FOLDS = 5  # ISBI 2012's 20 labelled slices: folds of 4, as many as the test split without folds
FOLD_STAGES = ("prepare", "train", "evaluate")
# An ensemble's members hold the same folds (`check_ensemble`), so each fold's models never saw its slices.
ENSEMBLE_SELECTION = ("held out: each member is this fold's model of a cross-validation of the same folds, trained "
                      "on the other folds' slices, the last epoch kept; the slices scored here chose nothing")


def settings(config: Config) -> Config:
    """The configuration every fold shares: `config` with its folds (default 5) and the protocol's
    training (the validation fold trained on, the last epoch kept), checked again."""
    if "folds" not in DATASETS[config.data.dataset].settings:
        having = ", ".join(name for name, dataset in DATASETS.items() if "folds" in dataset.settings)
        raise PipelineError(f"--stage crossval: the {config.data.dataset} data set has no folds "
                            f"(data.folds belongs to: {having})")
    data = dataclasses.replace(config.data, folds=config.data.folds or DEFAULT_FOLDS, fold=0)
    train = dataclasses.replace(config.train, include_validation=True, select_by="last")
    config = dataclasses.replace(config, data=data, train=train)
    configuration.validate(config)
    return config


def folds(config: Config, run: RunDir) -> list[tuple[Config, RunDir]]:
    """Each fold's configuration and run directory."""
    return [(dataclasses.replace(config, data=dataclasses.replace(config.data, fold=index)), run.fold(index))
            for index in range(config.data.folds)]


def check(config: Config, run: RunDir, overwrite: bool) -> None:
    """Refuses a run directory of another kind, and a configuration that a fold's model contradicts."""
    if run.manifest.exists() or run.train.exists():
        raise PipelineError(f"{run}: holds a run of its own (prepared/, train/), not a cross-validation; "
                            "use a new --run-dir")
    for fold_config, fold in folds(config, run):
        fold.check_changes(fold_config, FOLD_STAGES, overwrite)


def remaining(config: Config, fold: RunDir, overwrite: bool) -> tuple[str, ...]:
    """The stages fold `fold` still needs: all with `overwrite`; none once its report scored its model
    with the command's prediction settings (other ones score it again: a report never mixes them)."""
    prepared = fold.manifest.exists() and rundir.prepared_with(fold, config)
    if overwrite or not prepared:
        return FOLD_STAGES
    trained = fold.best_model.exists() and not fold.backup().exists()
    if not trained:
        return FOLD_STAGES[1:]
    evaluated, _ = fold.model_report()
    scored_alike = evaluated is not None and fold.saved_config().predict == config.predict
    return () if scored_alike else FOLD_STAGES[2:]


def run(config: Config, run: RunDir) -> dict:
    """Writes `<run>/crossval/report.json` and `report.md` from the folds' evaluation reports."""
    results = [_fold_result(index, fold) for index, (_, fold) in enumerate(folds(config, run))]
    minutes = training_minutes(run)
    report = ({"protocol": protocol(config, minutes)} | crossval.aggregate(results)
              | {"training_minutes": minutes, "configuration": config.to_dict()})
    spread = _write(report, run.crossval_report, run.crossval_summary)
    print(f"cross-validation over {config.data.folds} folds: Rand error {spread['mean']:.4f} "
          f"(sd {spread['std']:.4f}, {spread['min']:.4f}-{spread['max']:.4f}), pooled warping error "
          f"{report['pooled']['warping_error']:.6f} -> {run.crossval_summary}")
    return report


def _write(report: dict, path: Path, summary: Path) -> dict:
    """Writes `report` as JSON to `path` and as Markdown to `summary`; returns its Rand error across the folds."""
    io.atomic_write_text(path, json.dumps(report, indent=2))
    io.atomic_write_text(summary, crossval.markdown(report))
    return report["across_folds"]["rand_error"]


def require_crossvals(runs: list[RunDir]) -> None:
    """Refuses, in one line, a folder of `runs` that is no cross-validation, or one named twice."""
    for index, cv in enumerate(runs):
        if cv.saved_config() is None or not cv.folds.is_dir():
            raise PipelineError(f"{cv}: not a cross-validation (no config.yaml and folds/); "
                                f"run --stage crossval --run-dir {cv} first")
        if any(cv.root.resolve() == other.root.resolve() for other in runs[:index]):
            raise PipelineError(f"{cv}: named twice; an ensemble's members are different cross-validations")
        if index and "+" in cv.root.name:  # ["a+b", "c"] and ["a", "b+c"] would share one report folder
            raise PipelineError(f"{cv}: a member's folder name holds '+', which joins the members' names in the "
                                "ensemble's report folder; rename it")
        if any(cv.root.name == other.root.name for other in runs[1:index]):
            raise PipelineError(f"{cv}: another member's folder has the name {cv.root.name!r}, which names the "
                                "ensemble's report folder; rename one")


def check_ensemble(config: Config, run: RunDir, members: list[RunDir], overwrite: bool) -> None:
    """Refuses, in one line, cross-validations (`members`, `require_crossvals`) that cannot join
    `run`'s in an ensemble: other data or folds than `run`'s (`config`), a fold not trained or
    testing other slices; and existing reports unless `overwrite`."""
    runs = [run, *members]
    for cv in members:
        _refuse_other_data(settings(cv.saved_config()), config, cv, run)
    for index in range(config.data.folds):
        for cv in runs:
            if not cv.fold(index).best_model.exists() or cv.fold(index).backup().exists():
                raise PipelineError(f"{cv.fold(index)}: not trained; finish --stage crossval --run-dir {cv} first")
        slices = _test_slices(run.fold(index))
        for cv in members:
            if _test_slices(cv.fold(index)) != slices:
                raise PipelineError(f"{cv.fold(index)}: tests other slices than {run.fold(index)}")
    reports = [run.crossval_ensemble_report(members), run.crossval_ensemble_summary(members),
               *(run.crossval_ensemble_fold(members, index) for index in range(config.data.folds))]
    io.refuse_existing(reports, overwrite)


def _refuse_other_data(theirs: Config, ours: Config, cv: RunDir, run: RunDir) -> None:
    """One line naming the first data field in which cross-validation `cv` differs from `run`."""
    mine, other = rundir.data_settings(ours), rundir.data_settings(theirs)
    for section, fields in mine.items():
        for field, value in fields.items():
            if other[section][field] != value:
                raise PipelineError(f"{cv}: cross-validates with {section}.{field}={other[section][field]!r}, "
                                    f"{run} with {value!r}; an ensemble's folds must hold the same slices")


def _test_slices(fold: RunDir) -> list[str]:
    with np.load(rundir.require(fold.prepared("test"), "crossval")) as test:
        return [str(name) for name in test["ids"]]


def ensemble_run(config: Config, run: RunDir, members: list[RunDir]) -> dict:
    """Writes `<run>/crossval/ensemble/A+B/report.json` and `report.md` from the folds' ensemble reports
    (`crossval_ensemble_fold`, which evaluate wrote): the aggregate of `run`'s own report, the
    member cross-validations, and the cost: seconds of prediction per fold, the ensemble's
    against one model's (`run`'s fold model), both from the same pass."""
    results = [_fold_result(index, fold, run.crossval_ensemble_fold(members, index))
               for index, (_, fold) in enumerate(folds(config, run))]
    cost = crossval.cost([result.report["prediction_seconds"] for result in results])
    runs = [str(cv) for cv in (run, *members)]
    seeds = ", ".join(str(settings(cv.saved_config()).train.seed) for cv in (run, *members))
    minutes = ensemble_minutes([training_minutes(cv) for cv in (run, *members)])
    lines = [f"Ensemble: each fold's slices are scored by the mean probability of cell of the fold's models of "
             f"{len(runs)} cross-validations ({', '.join(runs)}; train.seed {seeds}), each model tiling with its "
             "own settings. The minutes of training below are the members' added: what the ensemble costs."]
    report = ({"protocol": lines + protocol(config, minutes), "members": runs} | crossval.aggregate(results)
              | {"cost": cost, "training_minutes": minutes, "configuration": config.to_dict()})
    spread = _write(report, run.crossval_ensemble_report(members), run.crossval_ensemble_summary(members))
    print(f"ensemble of {len(runs)} cross-validations over {config.data.folds} folds: Rand error "
          f"{spread['mean']:.4f} (sd {spread['std']:.4f}), {cost['ratio']:.1f}x one model's prediction time "
          f"-> {run.crossval_ensemble_summary(members)}")
    return report


def _fold_result(index: int, fold: RunDir, path: Path | None = None) -> crossval.Fold:
    """A fold's evaluation report (its own, or the one at `path`) with its test slices' names and
    pixel counts (from its prepared data)."""
    report = json.loads(rundir.require(path or fold.report, "crossval").read_text())
    with np.load(fold.prepared("test")) as test:
        names, sizes = [str(name) for name in test["ids"]], test["sizes"]
    return crossval.Fold(index, names, [int(height) * int(width) for height, width in sizes], report)


def training_minutes(run: RunDir) -> dict[str, float]:
    """Minutes each fold trained, by fold name: the wall time of its epochs (`RunDir.epoch_times`,
    complete however often its training was killed), or where some epochs were not timed (trained
    by an earlier version), the seconds of the commands that finished training it
    (`RunDir.crossval_timing`, which that version kept). Folds with neither are left out."""
    commands = json.loads(run.crossval_timing.read_text()) if run.crossval_timing.exists() else {}
    minutes = {}
    for fold in sorted(run.folds.glob("fold-*")):
        epochs = rundir.epoch_seconds(RunDir(fold).epoch_times)
        if epochs and None not in epochs:
            minutes[fold.name] = sum(epochs) / 60
        elif fold.name in commands:
            minutes[fold.name] = commands[fold.name] / 60
    return minutes


def ensemble_minutes(members: list[dict[str, float]]) -> dict[str, float]:
    """The minutes of training per fold of an ensemble: its members' (`training_minutes`) added,
    for the folds that every member recorded."""
    folds = set.intersection(*(set(minutes) for minutes in members))
    return {fold: sum(minutes[fold] for minutes in members) for fold in sorted(folds)}


def protocol(config: Config, training: dict[str, float]) -> list[str]:
    """The protocol in words: folds, training, budget against the recipe's, the minutes of
    training per fold (`training`), the final model."""
    train = config.train
    steps = train.epochs * train.steps_per_epoch
    recipe = configuration.preset(config.preset, config.data.dataset).train
    recipe_steps = recipe.epochs * recipe.steps_per_epoch
    budget = ("the recipe's own budget" if steps == recipe_steps else
              f"a {'shorter' if steps < recipe_steps else 'longer'} budget than the recipe's {recipe_steps:,} "
              f"steps{' (screening)' if steps < recipe_steps else ''}")
    minutes = ", ".join(f"{fold} {minutes:.1f}" for fold, minutes in training.items())
    return [
        f"{config.data.folds} folds of consecutive labelled slices of the {config.data.dataset} data set "
        f"(data.folds={config.data.folds}); fold i's model is scored on fold i's slices once, and trained on all "
        "the other folds' slices (the next fold is its validation split, trained on too: "
        "train.include_validation=true, train.select_by=last), so no slice scored here chose the model: "
        "no epoch, no early stop. As evaluate (and the challenge) scores, each error is the lowest over the "
        "ISBI threshold grid, on the scored slices themselves; cell IoU and accuracy are at predict.threshold."
        + ("" if config.predict.instances == "components" else
           f" The warping, Rand, V_rand and V_info errors score the cells at each threshold as "
           f"predict.instances={config.predict.instances} separates them (thin necks cut), not each 4-connected "
           "component as the challenge reads a map."),
        f"Preset {config.preset}: {train.epochs} epochs x {train.steps_per_epoch} steps = {steps:,} steps, "
        f"{budget}; train.seed={train.seed}.",
        "Minutes of training per fold (the wall time of its epochs, added over every command that trained "
        "it, not its start-up (reading the data, building the model); folds trained by earlier versions: the "
        f"commands that finished training them): {minutes or 'not recorded'}.",
        "Recipes are compared on this report (another seed: the same command with --set train.seed=N and "
        "another --run-dir), never on the slices a README figure is quoted from.",
        "The final model trains on every labelled slice with the same steps (docs/results.md, "
        "'Cross-validation'); no held-out score exists for it, and this report's figures are its estimate.",
    ]
