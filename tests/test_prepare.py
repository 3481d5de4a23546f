"""Stage `prepare`: the splits and their manifest, written together, and never over a trained model."""

import hashlib
import json

import numpy as np

from pipeline.cli import main
from pipeline.files.rundir import RunDir

QUICK = ["--preset", "smoke", "--set", "data.num_train=1", "--set", "data.num_val=1", "--set", "data.num_test=1"]


def hashes(folder) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_prepare_writes_every_split_and_the_manifest_of_its_settings(tmp_path):
    run = RunDir(tmp_path / "run")
    assert main(["--stage", "prepare", "--run-dir", str(run), *QUICK]) == 0
    manifest = json.loads(run.manifest.read_text())
    assert manifest["counts"] == {"train": 1, "val": 1, "test": 1}
    assert manifest["settings"]["weight_map"]["w0"] == 10.0
    with np.load(run.prepared("train")) as train, np.load(run.prepared("test")) as test:
        assert train["weights"].shape == train["instances"].shape and "weights" not in test
    assert sorted(p.name for p in run.manifest.parent.iterdir()) == ["manifest.json", "test.npz", "train.npz", "val.npz"]


def test_a_failed_prepare_keeps_the_data_prepared_before(tmp_path, capsys):
    run = RunDir(tmp_path / "run")
    assert main(["--stage", "prepare", "--run-dir", str(run), *QUICK]) == 0
    before = hashes(run.root)
    args = ["--stage", "prepare", "--run-dir", str(run), "--dataset", "image_folder", "--data-dir", str(tmp_path / "none")]
    assert main(args) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'none'}: data folder does not exist\n"
    assert hashes(run.root) == before


def test_preparing_again_over_a_trained_model_needs_overwrite(tmp_path, capsys):
    run = RunDir(tmp_path / "run")
    assert main(["--stage", "prepare", "--run-dir", str(run), *QUICK]) == 0
    run.best_model.parent.mkdir()
    run.best_model.write_bytes(b"a trained model")
    before = hashes(run.root)
    assert main(["--stage", "prepare", "--run-dir", str(run)]) == 2
    assert "the run has a trained model" in capsys.readouterr().err and hashes(run.root) == before
    assert main(["--stage", "prepare", "--run-dir", str(run), "--overwrite", "--set", "data.seed=1"]) == 0
    assert hashes(run.root)[str(run.prepared("train"))] != before[str(run.prepared("train"))]
