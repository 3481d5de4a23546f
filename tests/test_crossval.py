"""k-fold cross-validation (`--stage crossval`): the folds' splits, the command end to end, its report and resume."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from pipeline import data
from pipeline.cli import main
from pipeline.config import resolve as configuration
from pipeline.config.schema import Config, DataConfig
from pipeline.data.isbi2012 import FILES, fold_parts
from pipeline.errors import PipelineError
from pipeline.files import bioimageio
from pipeline.files.rundir import RunDir
from pipeline.inference.segmenter import Ensemble
from pipeline.metrics import crossval
from pipeline.metrics.report import report_for, summary
from pipeline.stages import crossval as crossval_stage
from pipeline.stages.export import PACKAGE_FILE, PROVENANCE_FILE
from fakes import imwrite
from test_data import isbi_folder
from test_ensemble import member

SLICES, FOLDS = 6, 3
SIZE = 96
TINY = ["--preset", "smoke", "--dataset", "isbi2012", "--set", f"data.folds={FOLDS}",
        "--set", "model.base_filters=2", "--set", "train.epochs=1", "--set", "train.steps_per_epoch=2",
        "--set", "train.batch_size=1", "--set", "train.val_tiles_per_image=1"]


def cell_grid_isbi(folder: Path) -> None:
    """ISBI 2012's three stacks, small: square cells between 2-px membranes, shifted from slice to slice,
    so that a network's first steps give few large segments (random labels make scoring slow)."""
    rows = np.arange(SIZE)
    labels = np.stack([np.where(((rows[:, None] + shift) % 24 < 2) | ((rows[None, :] + shift) % 24 < 2), 0, 255)
                       for shift in range(SLICES)]).astype(np.uint8)
    images = (255 - labels * 0.6 + np.random.default_rng(0).normal(0, 10, labels.shape)).clip(0, 255).astype(np.uint8)
    for name, stack in ((FILES["train"], images), (FILES["labels"], labels), (FILES["test"], images[:2])):
        imwrite(folder / name, stack)


@pytest.mark.parametrize("count, folds", [(20, 5), (20, 4), (6, 3), (12, 3)])
def test_folds_are_consecutive_disjoint_and_cover_every_slice(count, folds):
    parts = [fold_parts(count, folds, fold) for fold in range(folds)]
    tests = [part["test"] for part in parts]
    np.testing.assert_array_equal(np.concatenate(tests), np.arange(count))  # each slice tested once, in order
    for fold, part in enumerate(parts):
        assert set(np.diff(part["test"])) <= {1}  # consecutive
        np.testing.assert_array_equal(part["val"], tests[(fold + 1) % folds])
        together = np.concatenate([part["train"], part["val"], part["test"]])
        np.testing.assert_array_equal(np.sort(together), np.arange(count))  # disjoint, complete


def test_folds_must_divide_the_slices():
    with pytest.raises(PipelineError, match=r"^data.folds=3: the 20 labelled slices of train-volume.tif do not split "
                                            r"into 3 folds of equal size; choose a divisor of 20$"):
        fold_parts(20, 3, 0)


def test_a_fold_reads_its_slices_named_by_their_place(tmp_path):
    config = isbi_folder(tmp_path, slices=SLICES)
    splits = data.load(DataConfig(**{**config.__dict__, "folds": FOLDS, "fold": 2}))
    assert splits["test"].ids == ["train_004", "train_005"] and splits["val"].ids == ["train_000", "train_001"]
    assert splits["train"].ids == ["train_002", "train_003"]
    assert data.DATASETS["isbi2012"].held_out_test(DataConfig(dataset="isbi2012", folds=FOLDS, test_slices=0))


def test_pooling_folds_scores_all_their_slices_as_one_stack():
    # The warping error and pixel accuracy of all slices together, from the folds' reports alone.
    rng = np.random.default_rng(3)
    rows = np.arange(40)
    truth = [((rows[:, None] + s) % 13 > 1) & ((rows[None, :] + 2 * s) % 11 > 1) for s in range(4)]
    probability = [np.clip(t * 0.7 + rng.normal(0.15, 0.25, t.shape), 0, 1) for t in truth]
    whole = report_for(probability, truth, 0.5)
    folds = [crossval.Fold(i, [f"s{2 * i}", f"s{2 * i + 1}"], [40 * 40] * 2,
                           report_for(probability[2 * i: 2 * i + 2], truth[2 * i: 2 * i + 2], 0.5)) for i in range(2)]
    pooled = crossval.aggregate(folds)["pooled"]
    assert whole["overall"]["warping_error"] > 0
    assert pooled["warping_error"] == pytest.approx(whole["overall"]["warping_error"])
    assert pooled["warping_error_threshold"] == pytest.approx(whole["overall"]["warping_error_threshold"])
    assert pooled["pixel_accuracy"] == pytest.approx(whole["overall"]["pixel_accuracy"])
    with pytest.raises(PipelineError, match=r"^the folds' test splits overlap: \['s0'\]$"):
        crossval.aggregate([folds[0], dataclasses.replace(folds[1], slices=["s0", "s9"])])


@pytest.mark.parametrize("assignment, message", [
    ("data.folds=2", "data.folds=2: must be 0 (off) or at least 3: one fold is tested, the next validates, "
                     "the others train"),
    ("data.fold=3", "data.fold=3: must lie in [0, 2] with data.folds=3"),
    ("data.fold=-1", "data.fold=-1: must be at least 0"),
])
def test_fold_settings_are_checked(assignment, message):
    config = configuration.apply_overrides(Config(), configuration.parse_set(["data.folds=3", assignment]), "--set")
    with pytest.raises(PipelineError, match=f"^{re.escape(message)}$"):
        configuration.validate(config)
    no_folds = configuration.apply_overrides(Config(), configuration.parse_set(["data.fold=1"]), "--set")
    with pytest.raises(PipelineError, match=r"^data.fold=1: needs data.folds > 0$"):
        configuration.validate(no_folds)


def test_crossval_refusals_are_one_line_and_change_nothing(tmp_path, capsys):
    cell_grid_isbi(tmp_path / "data")
    run_dir = tmp_path / "cv"
    common = ["--stage", "crossval", "--run-dir", str(run_dir), "--data-dir", str(tmp_path / "data"), *TINY]
    for extra, error in [
        (["--set", "data.folds=4"], "error: data.folds=4: the 6 labelled slices of train-volume.tif do not split "
                                    "into 4 folds of equal size; choose a divisor of 6\n"),
        (["--set", "data.fold=5"], "error: data.fold=5: must lie in [0, 2] with data.folds=3\n"),
    ]:
        assert main([*common, *extra]) == 2
        assert capsys.readouterr().err == error
        assert not run_dir.exists()
    assert main(["--stage", "crossval", "--run-dir", str(run_dir), "--preset", "smoke"]) == 2
    assert capsys.readouterr().err == ("error: --stage crossval: the synthetic data set has no folds "
                                       "(data.folds belongs to: isbi2012)\n")
    assert not run_dir.exists()


@pytest.fixture(scope="module")
def two_crossvals(tmp_path_factory) -> dict[str, Path]:
    """Two tiny cross-validations of the same folds, seeds 0 and 1."""
    root = tmp_path_factory.mktemp("crossvals")
    cell_grid_isbi(root / "data")
    runs = {}
    for seed in (0, 1):
        runs[seed] = root / f"cv{seed}"
        assert main(["--stage", "crossval", "--run-dir", str(runs[seed]), "--data-dir", str(root / "data"), *TINY,
                     "--set", f"train.seed={seed}"]) == 0
    return runs | {"root": root}


def test_crossval_trains_every_fold_reports_them_and_resumes(two_crossvals, tmp_path, capsys):
    run_dir = shutil.copytree(two_crossvals[0], tmp_path / "cv")  # `--stage crossval` with TINY, seed 0
    report = json.loads((run_dir / "crossval" / "report.json").read_text())
    assert (run_dir / "crossval" / "report.md").read_text().startswith("# Cross-validation")

    # Every slice is scored once, by the fold whose model never trained on it.
    names = [f"train_{i:03d}" for i in range(SLICES)]
    assert [row["slice"] for row in report["slices"]] == names
    assert sorted(name for fold in report["folds"] for name in fold["slices"]) == names
    for index, fold in enumerate(report["folds"]):
        fold_run = run_dir / "folds" / f"fold-{index}"
        fold_report = json.loads((fold_run / "evaluation" / "report.json").read_text())
        assert fold_report["model_selection"].startswith("held out")
        assert fold["slices"] == names[2 * index: 2 * index + 2]
        trained_on = {str(i) for split in ("train", "val") for i in np.load(fold_run / "prepared" / f"{split}.npz")["ids"]}
        assert trained_on == set(names) - set(fold["slices"])
        assert fold["rand_error"] == fold_report["overall"]["rand_error"]
        for row, per_image in zip([r for r in report["slices"] if r["fold"] == index], fold_report["per_image"]):
            assert row["warping_error"] == per_image["warping_error"]
    # The spread over folds is recomputed from the folds' values.
    for key in ("rand_error", "warping_error", "pixel_error", "foreground_iou"):
        values = [fold[key] for fold in report["folds"]]
        spread = report["across_folds"][key]
        assert spread["mean"] == pytest.approx(np.mean(values))
        assert spread["std"] == pytest.approx(np.std(values, ddof=1))
        assert (spread["min"], spread["max"]) == (min(values), max(values))
        assert report["mean_per_slice"][key] == pytest.approx(np.mean([r[key] for r in report["slices"]]))
    # Pooled over all slices, no less than the folds' mean, whose thresholds each fold chose for itself.
    assert report["pooled"]["slices"] == SLICES
    assert report["pooled"]["warping_error"] >= np.mean([f["warping_error"] for f in report["folds"]]) - 1e-12
    assert "train.seed=0" in " ".join(report["protocol"])
    # Minutes per fold: its epochs' wall time (TINY trains one epoch a fold).
    for index in range(FOLDS):
        seconds = json.loads((run_dir / "folds" / f"fold-{index}" / "train" / "epoch_seconds.json").read_text())
        assert len(seconds["epoch_seconds"]) == 1 and seconds["epoch_seconds"][0] > 0
        assert report["training_minutes"][f"fold-{index}"] == pytest.approx(sum(seconds["epoch_seconds"]) / 60)
    # A fold with an epoch that an earlier version did not time takes the minutes that version kept.
    (run_dir / "folds" / "fold-0" / "train" / "epoch_seconds.json").write_text('{"epoch_seconds": [null]}')
    (run_dir / "crossval" / "timing.json").write_text('{"fold-0": 90.0}')
    assert crossval_stage.training_minutes(RunDir(run_dir)) == report["training_minutes"] | {"fold-0": 1.5}

    # A second command finds every fold evaluated: nothing is trained or scored again.
    models = {path: path.stat().st_mtime_ns for path in run_dir.glob("folds/*/train/best.keras")}
    reports = {path: path.stat().st_mtime_ns for path in run_dir.glob("folds/*/evaluation/report.json")}
    capsys.readouterr()
    assert main(["--stage", "crossval", "--run-dir", str(run_dir)]) == 0
    assert capsys.readouterr().out.count("evaluated already") == FOLDS
    assert {path: path.stat().st_mtime_ns for path in models} == models
    assert {path: path.stat().st_mtime_ns for path in reports} == reports
    assert json.loads((run_dir / "crossval" / "report.json").read_text())["folds"] == report["folds"]

    # A fold whose report is gone is evaluated again, and only that one; a change of recipe is refused.
    (run_dir / "folds" / "fold-1" / "evaluation" / "report.json").unlink()
    assert main(["--stage", "crossval", "--run-dir", str(run_dir)]) == 0
    assert capsys.readouterr().out.count("evaluated already") == FOLDS - 1
    assert {path: path.stat().st_mtime_ns for path in models} == models
    assert main(["--stage", "crossval", "--run-dir", str(run_dir), "--set", "train.epochs=2"]) == 2
    assert "the run's model was trained with train.epochs=1, not 2" in capsys.readouterr().err
    # Other prediction settings score every fold again, and train nothing: a report never mixes them.
    assert main(["--stage", "crossval", "--run-dir", str(run_dir), "--set", "predict.instances=watershed"]) == 0
    out = capsys.readouterr().out
    assert "evaluated already" not in out and out.count(": evaluate (") == FOLDS and ": train (" not in out
    assert {path: path.stat().st_mtime_ns for path in models} == models
    rescored = json.loads((run_dir / "crossval" / "report.json").read_text())
    assert rescored["configuration"]["predict"]["instances"] == "watershed"
    assert "predict.instances=watershed separates them" in rescored["protocol"][0]
    assert all(json.loads(path.read_text())["segmentation"] == "watershed" for path in reports)
    # The folds are runs of their own; the cross-validation's folder is not one.
    assert main(["--stage", "evaluate", "--run-dir", str(run_dir)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {run_dir}: a cross-validation (--stage crossval)")


def test_crossval_ensemble_scores_each_fold_with_its_models(two_crossvals, capsys):
    cv0, cv1 = RunDir(two_crossvals[0]), RunDir(two_crossvals[1])
    own = cv0.crossval_report.read_text()
    assert main(["--stage", "crossval", "--run-dir", str(cv0), "--model", str(cv1)]) == 0
    report = json.loads(cv0.crossval_ensemble_report([cv1]).read_text())
    assert report["members"] == [str(cv0), str(cv1)]
    assert cv0.crossval_report.read_text() == own
    # Its training cost is both members'; each fold's models held out its slices, and it says so.
    own_minutes, their_minutes = (json.loads(cv.crossval_report.read_text())["training_minutes"] for cv in (cv0, cv1))
    assert report["training_minutes"] == {fold: pytest.approx(own_minutes[fold] + their_minutes[fold])
                                          for fold in own_minutes}
    assert "train.seed 0, 1" in report["protocol"][0]
    for index in range(FOLDS):
        fold_report = json.loads(cv0.crossval_ensemble_fold([cv1], index).read_text())
        assert fold_report["model_selection"].startswith("held out")
    assert "## Cost" in cv0.crossval_ensemble_summary([cv1]).read_text()
    for index, row in enumerate(report["folds"]):
        fold = cv0.fold(index)
        members = [member(cv.fold(index).root) for cv in (cv0, cv1)]
        test = np.load(fold.prepared("test"))
        probabilities = [Ensemble(members)(image[:h, :w]) for image, (h, w) in zip(test["images"], test["sizes"])]
        truth = [cells[:h, :w] > 0 for cells, (h, w) in zip(test["instances"], test["sizes"])]
        expected = summary(report_for(probabilities, truth, members[0][1].predict.threshold))
        assert row["rand_error"] == pytest.approx(expected["rand_error"], abs=1e-6)
        assert row["pixel_error"] == pytest.approx(expected["pixel_error"], abs=1e-6)
        cost = report["cost"]["folds"][index]
        assert cost["ensemble_seconds"] > cost["one_model_seconds"] > 0
    assert report["cost"]["ratio"] > 1
    # Across folds, the same aggregate as the single-model report.
    values = [row["rand_error"] for row in report["folds"]]
    assert report["across_folds"]["rand_error"]["mean"] == pytest.approx(np.mean(values))

    # Refusals, in one line: the report exists, a fold not trained, other data.
    capsys.readouterr()
    assert main(["--stage", "crossval", "--run-dir", str(cv0), "--model", str(cv1)]) == 2
    assert capsys.readouterr().err == (f"error: {cv0.crossval_ensemble_report([cv1])}: already exists "
                                       "(pass --overwrite to replace it)\n")
    broken = RunDir(two_crossvals["root"] / "broken")
    shutil.copytree(cv1.root, broken.root)
    broken.fold(1).best_model.unlink()
    assert main(["--stage", "crossval", "--run-dir", str(cv0), "--model", str(broken), "--overwrite"]) == 2
    assert capsys.readouterr().err == (f"error: {broken.fold(1)}: not trained; finish --stage crossval "
                                       f"--run-dir {broken} first\n")
    other = RunDir(two_crossvals["root"] / "other")
    shutil.copytree(cv1.root, other.root)
    other.config.write_text(other.config.read_text().replace(str(two_crossvals["root"] / "data"), "elsewhere"))
    assert main(["--stage", "crossval", "--run-dir", str(cv0), "--model", str(other), "--overwrite"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {other}: cross-validates with data.data_dir='elsewhere'")
    shifted = RunDir(two_crossvals["root"] / "shifted")
    shutil.copytree(cv1.root, shifted.root)
    arrays = dict(np.load(shifted.fold(0).prepared("test")))
    np.savez(shifted.fold(0).prepared("test"), **(arrays | {"ids": arrays["ids"][::-1]}))
    for cv, error in [
        (shifted, f"{shifted.fold(0)}: tests other slices than {cv0.fold(0)}"),
        (cv0, f"{cv0}: named twice; an ensemble's members are different cross-validations"),
        (RunDir(two_crossvals["root"] / "data"), f"{two_crossvals['root'] / 'data'}: not a cross-validation (no "
                                                 f"config.yaml and folds/); run --stage crossval --run-dir "
                                                 f"{two_crossvals['root'] / 'data'} first"),
    ]:
        assert main(["--stage", "crossval", "--run-dir", str(cv0), "--model", str(cv), "--overwrite"]) == 2
        assert capsys.readouterr().err == f"error: {error}\n"
    namesake = RunDir(two_crossvals["root"] / "elsewhere" / cv1.root.name)
    shutil.copytree(cv1.root, namesake.root)
    assert main(["--stage", "crossval", "--run-dir", str(cv0), "--model", str(cv1), "--model", str(namesake)]) == 2
    assert capsys.readouterr().err == (f"error: {namesake}: another member's folder has the name "
                                       f"{cv1.root.name!r}, which names the ensemble's report folder; rename one\n")
    assert not cv0.crossval_ensemble([cv1, namesake]).exists()
    joined = RunDir(two_crossvals["root"] / f"{cv1.root.name}+x")
    shutil.copytree(cv1.root, joined.root)
    assert main(["--stage", "crossval", "--run-dir", str(cv0), "--model", str(joined)]) == 2
    assert capsys.readouterr().err == (f"error: {joined}: a member's folder name holds '+', which joins the "
                                       "members' names in the ensemble's report folder; rename it\n")
    assert not cv0.crossval_ensemble([joined]).exists()

    # An ensemble of other members is written beside the first, which stays as it was.
    copy = RunDir(two_crossvals["root"] / "copy")
    shutil.copytree(cv1.root, copy.root)
    assert main(["--stage", "crossval", "--run-dir", str(cv0), "--model", str(copy), "--model", str(cv1)]) == 0
    assert json.loads(cv0.crossval_ensemble_report([copy, cv1]).read_text())["members"] == [str(cv0), str(copy),
                                                                                             str(cv1)]
    assert json.loads(cv0.crossval_ensemble_report([cv1]).read_text()) == report


def test_the_levers_table_pairs_each_cross_validation_with_the_first_fold_by_fold(two_crossvals):
    """scripts/compare_crossvals.py on the two seeds' reports (and the ensemble's, where written)."""
    reports = [json.loads(RunDir(two_crossvals[seed]).crossval_report.read_text()) for seed in (0, 1)]
    first, second = crossval.compare(reports)
    assert first["changes"] == [] and second["changes"] == ["train.seed=1"]
    assert first["rand_error_difference"]["mean"] == 0 and first["rand_error_difference"]["lower_in"] == 0
    differences = [ours["rand_error"] - theirs["rand_error"] for ours, theirs in zip(*(r["folds"] for r in reports))]
    assert second["rand_error_difference"]["mean"] == pytest.approx(np.mean(differences))
    assert second["rand_error_difference"]["std"] == pytest.approx(np.std(differences, ddof=1))
    assert second["rand_error_difference"]["lower_in"] == sum(d < 0 for d in differences)
    assert second["steps"] == 1 * reports[1]["configuration"]["train"]["steps_per_epoch"]
    assert set(second["training_minutes"]) == {f"fold-{i}" for i in range(FOLDS)}
    assert crossval_stage.ensemble_minutes([{"fold-0": 2.0, "fold-1": 3.0}, {"fold-0": 5.0}]) == {"fold-0": 7.0}
    other_preset = json.loads(json.dumps(reports[1]))
    other_preset["configuration"]["preset"] = "cpu"
    other_preset["configuration"]["export"]["crossval"] = "elsewhere"  # exports are no recipe
    assert crossval.settings_changes(reports[0]["configuration"], other_preset["configuration"]) == [
        "preset=cpu", "train.seed=1"]

    script = Path(__file__).resolve().parents[1] / "scripts" / "compare_crossvals.py"
    printed = subprocess.run([sys.executable, str(script), str(two_crossvals[0]), str(two_crossvals[1])],
                             capture_output=True, text=True, check=True).stdout.splitlines()
    assert printed[0].startswith("| recipe | run | steps |") and len(printed) == 6
    assert printed[3].startswith(f"| `train.seed=1` | {two_crossvals[1]} |")
    # The two seeds are one recipe: its mean over them, with their spread.
    (group,) = crossval.seeds(reports)
    assert (group["changes"], group["runs"], group["seeds"]) == ([], [0, 1], [0, 1])
    means = [report["across_folds"]["rand_error"]["mean"] for report in reports]
    assert group["rand_error"]["mean"] == pytest.approx(np.mean(means))
    assert group["rand_error"]["std"] == pytest.approx(np.std(means, ddof=1))
    assert group["warping_error"]["mean"] == pytest.approx(np.mean([r["pooled"]["warping_error"] for r in reports]))
    assert printed[5].startswith(f"- the first over 2 seeds (train.seed 0, 1: {two_crossvals[0]}, {two_crossvals[1]}): "
                                 f"Rand {np.mean(means):.4f} (sd {np.std(means, ddof=1):.4f} over the seeds)")
    assert crossval.seeds([reports[0], other_preset]) == []  # another recipe, one seed each
    # Cross-validations of other folds do not compare; a folder without a report is one line.
    shifted = json.loads(json.dumps(reports[1]))
    shifted["folds"][0]["slices"] = shifted["folds"][0]["slices"][::-1]
    with pytest.raises(PipelineError, match="^the cross-validations test other slices in their folds"):
        crossval.compare([reports[0], shifted])
    refused = subprocess.run([sys.executable, str(script), str(two_crossvals["root"])], capture_output=True, text=True)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert refused.stderr.startswith(f"error: {two_crossvals['root']}: no cross-validation report")


def test_the_final_model_exports_the_accuracy_its_recipes_cross_validation_estimates(two_crossvals, tmp_path,
                                                                                      capsys):
    """The final model on every labelled slice has no held-out score: its export records the
    cross-validation's figures (`export.crossval`), if the cross-validation is of its recipe."""
    cv0 = RunDir(two_crossvals[0])
    final = RunDir(tmp_path / "final")
    every_slice = [arg.replace(f"data.folds={FOLDS}", "data.test_slices=0") for arg in TINY]
    assert main(["--stage", "all", "--run-dir", str(final.root), "--data-dir", str(two_crossvals["root"] / "data"),
                 *every_slice, "--set", "train.include_validation=true", "--set", "train.seed=5",
                 "--set", f"export.crossval={cv0}"]) == 0
    provenance = json.loads((final.export_root / "unet" / "1" / PROVENANCE_FILE).read_text())
    cv_report = json.loads(cv0.crossval_report.read_text())
    estimate = provenance["crossval_estimate"]
    assert estimate["crossval"] == str(cv0.crossval_report)
    assert (estimate["folds"], estimate["slices"], estimate["seed"]) == (FOLDS, SLICES, 0)
    assert estimate["across_folds"] == cv_report["across_folds"]
    assert estimate["pooled_warping_error"] == cv_report["pooled"]["warping_error"]
    assert estimate["segmentation"] == provenance["evaluation"]["segmentation"] == "components"
    selection = provenance["evaluation"]["model_selection"]  # what it was scored on, it trained on
    assert selection.startswith("none") and "a cross-validation of its recipe estimates one" in selection
    with zipfile.ZipFile(final.export_root / "unet" / "1" / PACKAGE_FILE) as package:
        readme = package.read("README.md").decode()
    rand = cv_report["across_folds"]["rand_error"]
    assert (f"Estimated by a {FOLDS}-fold cross-validation of the same recipe over {SLICES} labelled images "
            f"({cv0.crossval_report}; 2 steps, seed 0, test-time averaging off)") in readme
    assert f"Rand error {rand['mean']:.4g} (sd {rand['std']:.2g})" in readme
    assert "predict.instances" not in readme  # the challenge's reading of the map goes without saying
    watershed = bioimageio.accuracy(provenance | {"crossval_estimate": estimate | {"segmentation": "watershed"}})
    assert watershed.count("predict.instances") == 1
    assert "pooled over all images" in watershed.split("`predict.instances=watershed` separates them")[0]

    # A cross-validation of another recipe, or an ensemble's, estimates nothing for it: refused, nothing written.
    for name, change, error in [
        ("longer", lambda report: report["configuration"]["train"].update(epochs=3),
         "cross-validates train.epochs=3, the model was trained with 1; it estimates only a model of its recipe"),
        ("ensemble", lambda report: report.update(members=[str(cv0), "other"]),
         "an ensemble's cross-validation, which estimates an ensemble, not one model"),
    ]:
        report = json.loads(json.dumps(cv_report))
        change(report)
        (tmp_path / f"{name}.json").write_text(json.dumps(report))
        capsys.readouterr()
        assert main(["--stage", "export", "--run-dir", str(final.root), "--set", f"export.root={tmp_path / 'saved'}",
                     "--set", f"export.crossval={tmp_path / f'{name}.json'}"]) == 2
        assert capsys.readouterr().err == f"error: {tmp_path / f'{name}.json'}: {error}\n"
        assert not (tmp_path / "saved").exists()

    # --stage all refuses it before preparing and training, not after; so too a file that is no
    # cross-validation's report (a fold's evaluation report, or no JSON at all).
    fold_report = cv0.fold(0).report
    (tmp_path / "garbage.json").write_text("not JSON")
    for source, error in [
        (tmp_path / "longer.json", "cross-validates train.epochs=3, the model was trained with 1; it estimates only "
                                   "a model of its recipe"),
        (fold_report, "not a cross-validation report (it lacks across_folds, configuration, folds, pooled, slices)"),
        (tmp_path / "garbage.json", "not a cross-validation report (Expecting value: line 1 column 1 (char 0))"),
    ]:
        other = tmp_path / "refused"
        capsys.readouterr()
        assert main(["--stage", "all", "--run-dir", str(other), "--data-dir", str(two_crossvals["root"] / "data"),
                     *every_slice, "--set", "train.include_validation=true", "--set", f"export.crossval={source}"]) == 2
        assert capsys.readouterr().err == f"error: {source}: {error}\n"
        assert not other.exists()
