"""A model and a run directory saved before the package move (issue 29) keep loading and predicting.

`tests/data/pre_move_run/` is a run directory (its config.yaml and train/best.keras) that
the flat `pipeline/` of commit e19dc8b trained: `--preset smoke` with model.depth=2,
model.base_filters=2, train.epochs=1, train.steps_per_epoch=2, train.batch_size=1.
`tests/data/pre_move_probabilities.npy` is what that code's `Segmenter` predicted for
`IMAGE`. Keras finds the file's registered objects by their package name
(`register_keras_serializable(package=...)`), not by module path, so moving modules must not
change either.
"""

import shutil
from pathlib import Path

import numpy as np
import tifffile

from pipeline.cli import main
from pipeline.config import resolve as configuration
from pipeline.files.rundir import RunDir
from pipeline.inference.segmenter import Segmenter, load_model
from pipeline.training.finetune import load_initial_model

DATA = Path(__file__).resolve().parent / "data"
IMAGE = np.random.default_rng(0).integers(0, 256, (64, 80), dtype=np.uint8)


def _run(tmp_path: Path) -> RunDir:
    """A copy of the saved run directory: the stages lock and write into the run they use."""
    shutil.copytree(DATA / "pre_move_run", tmp_path / "run")
    return RunDir(tmp_path / "run")


def test_the_settings_inside_a_model_saved_before_the_move_are_read(tmp_path):
    config = _run(tmp_path).model_settings(configuration.preset("smoke"))
    assert (config.model.depth, config.model.base_filters, config.train.batch_size) == (2, 2, 1)


def test_a_model_saved_before_the_move_predicts_what_it_predicted_then(tmp_path):
    run = _run(tmp_path)
    config = run.model_settings(configuration.preset("smoke"))
    probability = Segmenter(load_model(run.best_model), config)(IMAGE[..., None])
    np.testing.assert_allclose(probability, np.load(DATA / "pre_move_probabilities.npy"), atol=1e-6)


def test_a_model_saved_before_the_move_can_start_a_fine_tuning(tmp_path):
    model = load_initial_model(_run(tmp_path).best_model)
    assert model.count_params() == 434


def test_predict_segments_with_a_run_directory_saved_before_the_move(tmp_path):
    run = _run(tmp_path)
    tifffile.imwrite(tmp_path / "cells.tif", IMAGE)
    output = tmp_path / "out"
    assert main(["--stage", "predict", "--run-dir", str(run), "--input", str(tmp_path / "cells.tif"),
                 "--output", str(output)]) == 0
    np.testing.assert_allclose(tifffile.imread(output / "cells_prob.tif"),
                               np.load(DATA / "pre_move_probabilities.npy"), atol=1e-6)
