"""Any model in one command (`--model PATH`: a run, a .keras file, an export version, a zoo zip)
and ensembles of several (predict, evaluate, crossval): the mean of their probabilities of cell."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile

from pipeline.cli import main
from pipeline.config import resolve as configuration
from pipeline.data.synthetic import synthetic_em_image
from pipeline.files import model_file, model_source
from pipeline.files.rundir import RunDir
from pipeline.inference.segmenter import Ensemble, Segmenter, load_model
from pipeline.metrics.report import report_for, summary
from pipeline.training.model import unet

QUICK = ["--preset", "smoke", "--set", "model.base_filters=2", "--set", "train.epochs=1",
         "--set", "train.steps_per_epoch=2", "--set", "train.batch_size=1", "--set", "train.val_tiles_per_image=1"]
# The second model: another seed, another depth and other tiles, so that each member tiles its own way.
OTHER = ["--set", "train.seed=1", "--set", "model.depth=2", "--set", "predict.tile_size=60"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Two tiny trained runs (`--stage all`: evaluated, exported into the run) and a test image."""
    root = tmp_path_factory.mktemp("ensemble")
    first, second = root / "a", root / "b"
    assert main(["--stage", "all", "--run-dir", str(first), *QUICK]) == 0
    assert main(["--stage", "all", "--run-dir", str(second), *QUICK, *OTHER]) == 0
    tifffile.imwrite(root / "em.tif", synthetic_em_image(100, 3)[0])
    return {"a": first, "b": second, "image": root / "em.tif", "root": root}


def member(run: Path):
    """(model, settings) of a run's best model, as the run predicts with it."""
    return load_model(RunDir(run).best_model), RunDir(run).model_settings(configuration.load(RunDir(run).config))


def test_an_ensemble_is_the_mean_of_its_models(runs):
    image = tifffile.imread(runs["image"])[..., None]
    (model_a, config_a), (model_b, config_b) = member(runs["a"]), member(runs["b"])
    assert (config_a.model.depth, config_b.model.depth) == (3, 2)  # each tiles with its own settings
    alone_a, alone_b = Segmenter(model_a, config_a)(image), Segmenter(model_b, config_b)(image)
    assert np.abs(alone_a - alone_b).max() > 1e-3  # two different models
    np.testing.assert_array_equal(Ensemble([(model_a, config_a)])(image), alone_a)
    np.testing.assert_allclose(Ensemble([(model_a, config_a), (model_a, config_a)])(image), alone_a, atol=1e-7)
    pair = Ensemble([(model_a, config_a), (model_b, config_b)])
    np.testing.assert_allclose(pair(image), (alone_a.astype(np.float64) + alone_b) / 2, atol=1e-7)
    assert len(pair.seconds) == 2 and min(pair.seconds) > 0


def test_predict_with_any_form_of_a_model_gives_the_runs_masks(runs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where runs/ would appear
    version = runs["a"] / "export" / "unet" / "1"
    assert main(["--stage", "predict", "--run-dir", str(runs["a"]), "--input", str(runs["image"]),
                 "--output", str(tmp_path / "in-run")]) == 0
    expected = tifffile.imread(tmp_path / "in-run" / "em_mask.tif")
    for index, path in enumerate([runs["a"], runs["a"] / "train" / "best.keras", version,
                                  version / model_source.EXPORT_PACKAGE]):
        out = tmp_path / f"model-{index}"
        assert main(["--stage", "predict", "--model", str(path), "--input", str(runs["image"]),
                     "--output", str(out)]) == 0, path
        np.testing.assert_array_equal(tifffile.imread(out / "em_mask.tif"), expected)
    assert not (tmp_path / "runs").exists()

    # Two models: the mean of their probabilities, thresholded.
    assert main(["--stage", "predict", "--model", str(runs["a"]), "--model", str(version), "--model", str(runs["b"]),
                 "--input", str(runs["image"]), "--output", str(tmp_path / "three")]) == 0
    assert main(["--stage", "predict", "--model", str(runs["b"]), "--input", str(runs["image"]),
                 "--output", str(tmp_path / "b")]) == 0
    probabilities = [tifffile.imread(tmp_path / name / "em_prob.tif") for name in ("in-run", "b")]
    np.testing.assert_allclose(tifffile.imread(tmp_path / "three" / "em_prob.tif"),
                               (2 * probabilities[0].astype(np.float64) + probabilities[1]) / 3, atol=1e-6)
    assert not (tmp_path / "runs").exists()


def test_one_model_predicts_a_large_image_chunk_by_chunk_an_ensemble_refuses(runs, tmp_path, capsys):
    whole, chunked = tmp_path / "whole", tmp_path / "chunked"
    small = ["--set", "predict.max_whole_pixels=4000", "--set", "predict.chunk_size=60"]
    assert main(["--stage", "predict", "--model", str(runs["a"]), "--input", str(runs["image"]),
                 "--output", str(whole)]) == 0
    assert main(["--stage", "predict", "--model", str(runs["a"]), "--input", str(runs["image"]),
                 "--output", str(chunked), *small]) == 0
    assert "predicted chunk by chunk" in capsys.readouterr().err
    np.testing.assert_allclose(tifffile.imread(chunked / "em_prob.tif"), tifffile.imread(whole / "em_prob.tif"),
                               atol=1e-5)
    assert main(["--stage", "predict", "--model", str(runs["a"]), "--model", str(runs["b"]), "--input",
                 str(runs["image"]), "--output", str(tmp_path / "pair"), *small]) == 2
    assert capsys.readouterr().err == (f"error: {runs['image']}: larger than predict.max_whole_pixels, so predicted "
                                       "chunk by chunk, which takes one model; give it one --model\n")
    assert not (tmp_path / "pair").exists()


def test_model_refusals_are_one_line_and_write_nothing(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plain, other_classes = tmp_path / "plain.keras", tmp_path / "three-classes.keras"
    config = configuration.load(RunDir(runs["a"]).config)
    unet(config.model).save(plain)  # Keras' own file, without the settings it was trained with
    three = configuration.apply_overrides(config, {"model": {"num_classes": 3}}, "test")
    model_file.save(unet(three.model), other_classes, three)
    (tmp_path / "notes.txt").write_text("not a model")
    (tmp_path / "empty").mkdir()
    shutil.copytree(runs["a"] / "export" / "unet" / "1", tmp_path / "bare-version",
                    ignore=shutil.ignore_patterns("assets.extra"))
    out = tmp_path / "out"
    common = ["--stage", "predict", "--input", str(runs["image"]), "--output", str(out)]
    kinds = "a run directory, a .keras file, an export version folder or a bioimage.io package (.zip)"
    for models, error in [
        ([tmp_path / "missing.keras"], f"{tmp_path / 'missing.keras'}: no such file or folder (--model takes {kinds})"),
        ([tmp_path / "notes.txt"], f"{tmp_path / 'notes.txt'}: not a model (--model takes {kinds})"),
        ([plain], f"{plain}: holds no settings it was trained with (a .keras file of another program, or saved "
                  "before models carried them); give its run directory instead"),
        ([tmp_path / "empty"], f"{tmp_path / 'empty'}: neither a run directory (train/best.keras) nor an export "
                               "version (assets.extra/bioimageio.zip)"),
        ([tmp_path / "bare-version"], f"{tmp_path / 'bare-version'}: an export version without its zoo package "
                                      "assets.extra/bioimageio.zip, which --model reads (a SavedModel cannot be read "
                                      "back as a Keras model); export the run again"),
        ([runs["a"], other_classes], f"{other_classes}: model.num_classes=3, but {runs['a']} has 2; the models of one "
                                     "ensemble must read the same images and give the same classes"),
    ]:
        assert main([*common, *(arg for model in models for arg in ("--model", str(model)))]) == 2
        assert capsys.readouterr().err == f"error: {error}\n"
    assert main(["--stage", "predict", "--model", str(runs["a"]), "--input", str(runs["image"])]) == 2
    assert capsys.readouterr().err == "error: predict --model needs --output: the folder its predictions go to\n"
    assert main([*common, "--model", str(runs["a"]), "--model", str(runs["b"]), "--runner", "beam"]) == 2
    assert capsys.readouterr().err == ("error: --runner beam takes one --model; an ensemble predicts in this process "
                                       "(--runner local)\n")
    assert main([*common, "--model", str(runs["a"]), "--preset", "smoke"]) == 2
    assert capsys.readouterr().err.startswith("error: predict --model takes the settings its models were trained with")
    assert not out.exists() and not (tmp_path / "runs").exists()


def test_evaluate_with_two_models_writes_a_report_naming_them(runs, capsys):
    run = RunDir(runs["a"])
    own = run.report.read_text()
    command = ["--stage", "evaluate", "--run-dir", str(runs["a"]), "--model", str(runs["a"]), "--model", str(runs["b"])]
    assert main(command) == 0
    report = json.loads(run.models_report_of().read_text())
    assert report["models"] == [str(runs["a"]), str(runs["b"])]
    assert len(report["prediction_seconds"]) == 2 and report["model_selection"].startswith("not known")
    assert run.report.read_text() == own  # the run's own report is left as it was
    # The report scores the mean of the two models' probabilities on the run's test split.
    test = np.load(run.prepared("test"))
    (model_a, config_a), (model_b, config_b) = member(runs["a"]), member(runs["b"])
    pair = Ensemble([(model_a, config_a), (model_b, config_b)])
    probabilities = [pair(image[:h, :w]) for image, (h, w) in zip(test["images"], test["sizes"])]
    truth = [cells[:h, :w] > 0 for cells, (h, w) in zip(test["instances"], test["sizes"])]
    expected = summary(report_for(probabilities, truth, config_a.predict.threshold,
                                  [cells[:h, :w] for cells, (h, w) in zip(test["instances"], test["sizes"])]))
    assert summary(report)["rand_error"] == pytest.approx(expected["rand_error"], abs=1e-6)
    capsys.readouterr()
    assert main(command) == 2
    assert capsys.readouterr().err == f"error: {run.models_report_of()}: already exists (pass --overwrite to replace it)\n"
