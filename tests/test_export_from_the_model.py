"""The export needs only the model: its settings and example input, and the run's evaluation of it if there is one."""

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np

from pipeline.cli import main
from pipeline.config import resolve as configuration
from pipeline.files.bioimageio import example_input
from pipeline.files.rundir import RunDir
from pipeline.stages.export import PACKAGE_FILE, PROVENANCE_FILE


def export(run: Path, root: Path, *extra: str) -> Path:
    """`--stage export` of `run` into `root`; its version 1."""
    assert main(["--stage", "export", "--run-dir", str(run), "--set", f"export.root={root}", *extra]) == 0
    return root / "unet" / "1"


def package_tile(version: Path) -> np.ndarray:
    with zipfile.ZipFile(version / PACKAGE_FILE) as package, package.open("test_input.npy") as file:
        return np.load(file)[0]


def test_an_export_needs_nothing_but_the_model_file(smoke_run, tmp_path):
    run = RunDir(tmp_path / "run")
    run.train.mkdir(parents=True)
    shutil.copy(RunDir(smoke_run["run_dir"]).best_model, run.best_model)
    version = export(run.root, tmp_path / "saved", "--preset", "smoke")
    provenance = json.loads((version / PROVENANCE_FILE).read_text())
    assert provenance["evaluation"] is None and provenance["evaluation_note"] == f"{run.report} does not exist"
    config = run.model_settings(configuration.preset("smoke"))
    assert provenance["configuration"]["model"] == config.to_dict()["model"]  # the settings inside the model file
    np.testing.assert_array_equal(package_tile(version), example_input(None, config))  # the synthetic image's
    assert sorted(path.name for path in run.root.iterdir()) == [".lock", "config.yaml", "train"]


def test_without_prepared_data_or_evaluation_the_export_takes_the_example_that_training_recorded(smoke_run,
                                                                                                tmp_path):
    run = RunDir(shutil.copytree(smoke_run["run_dir"], tmp_path / "run"))
    shutil.rmtree(run.root / "prepared")
    shutil.rmtree(run.evaluation)
    version = export(run.root, tmp_path / "saved")
    config = run.model_settings(configuration.load(run.config))
    np.testing.assert_array_equal(package_tile(version), example_input(run.example(), config))
    assert json.loads((version / PROVENANCE_FILE).read_text())["evaluation"] is None
