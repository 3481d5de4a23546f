"""The run directory's owner: who writes, which settings a run fixes, how a run is picked."""

import hashlib
import json
import os

import numpy as np
import pytest

from pipeline.config import resolve as configuration
from pipeline.errors import PipelineError
from pipeline.files import rundir
from pipeline.files.rundir import RunDir


@pytest.mark.parametrize("tf_config,chief", [
    (None, True),
    ({"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 0}}, True),
    ({"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 1}}, False),
    ({"cluster": {"chief": ["c:1"], "worker": ["a:1"]}, "task": {"type": "chief", "index": 0}}, True),
    ({"cluster": {"chief": ["c:1"], "worker": ["a:1"]}, "task": {"type": "worker", "index": 0}}, False),
])
def test_is_chief_names_the_one_process_that_writes_shared_files(monkeypatch, tf_config, chief):
    monkeypatch.setenv("TF_CONFIG", json.dumps(tf_config) if tf_config else "")
    assert rundir.is_chief() is chief


def test_every_path_comes_from_the_run_directory(tmp_path):
    run = RunDir(tmp_path / "r")
    assert run.best_model == tmp_path / "r" / "train" / "best.keras"
    assert run.last_model(2) == tmp_path / "r" / "train" / "worker-2" / "last.keras"
    assert run.backup() == tmp_path / "r" / "train" / "backup"
    assert run.panel(3) == tmp_path / "r" / "evaluation" / "panel_003.png"
    assert run.export_root == tmp_path / "r" / "export"


def test_save_config_keeps_a_different_earlier_one(tmp_path):
    run = RunDir(tmp_path)
    smoke = configuration.preset("smoke")
    run.save_config(smoke)
    run.save_config(smoke)
    assert not (tmp_path / "config.1.yaml").exists()
    run.save_config(configuration.apply_overrides(smoke, {"predict": {"threshold": 0.4}}, "test"))
    assert configuration.load(tmp_path / "config.1.yaml") == smoke
    assert run.saved_config().predict.threshold == 0.4


def test_a_trained_model_fixes_what_it_was_trained_with(tmp_path):
    run = RunDir(tmp_path)
    smoke = configuration.preset("smoke")
    run.save_config(smoke)
    run.best_model.parent.mkdir()
    run.best_model.write_bytes(b"model")
    changed = configuration.apply_overrides(smoke, {"augment": {"flip": False}}, "test")
    with pytest.raises(PipelineError, match="trained with augment.flip=True, not False"):
        run.check_changes(changed, ("evaluate",), overwrite=False)
    run.check_changes(changed, ("train",), overwrite=True)  # training again from scratch may change it
    run.check_changes(configuration.apply_overrides(smoke, {"predict": {"threshold": 0.3}}, "test"),
                      ("predict",), overwrite=False)


def test_prepared_data_fixes_its_data_settings_until_prepared_again(tmp_path):
    run = RunDir(tmp_path)
    smoke = configuration.preset("smoke")
    run.save_config(smoke)
    run.manifest.parent.mkdir()
    run.manifest.write_text("{}")
    changed = configuration.apply_overrides(smoke, {"weight_map": {"w0": 3.0}}, "test")
    with pytest.raises(PipelineError, match="prepared with weight_map.w0=10.0, not 3.0; run --stage prepare again"):
        run.check_changes(changed, ("train",), overwrite=False)
    run.check_changes(changed, ("prepare",), overwrite=False)


def test_a_file_is_not_a_run_directory(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(PipelineError, match="run directory is a file"):
        RunDir(tmp_path / "f")


def test_latest_is_the_run_prepare_last_marked(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PipelineError, match="no run prepared from this folder yet"):
        rundir.latest()
    for name in ("zzz-named", "20260101-000000-cpu"):
        run = RunDir(rundir.RUNS / name)
        run.save_config(configuration.preset("smoke"))
    rundir.mark_latest(run)
    assert rundir.latest() == run
    assert "using run directory runs/20260101-000000-cpu" in capsys.readouterr().out
    run.config.unlink()
    with pytest.raises(PipelineError, match="holds no run any more"):
        rundir.latest()


def test_the_run_model_is_described_by_the_settings_inside_it_and_an_older_file_by_the_run(tmp_path):
    """A model saved with its configuration (`model_file.save`) overrides what config.yaml says
    of the sections it was trained with; a .keras file saved before models carried it (as
    every main before this change saved) keeps the run's configuration and still loads."""
    import keras

    from pipeline.files import model_file

    run = RunDir(tmp_path / "r")
    run.train.mkdir(parents=True)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.save(run.best_model)  # as the main before model files carried their settings
    command = configuration.apply_overrides(configuration.preset("smoke"), {"model": {"base_filters": 16},
                                                                             "predict": {"threshold": 0.3}}, "test")
    assert run.model_settings(command) == command
    assert keras.saving.load_model(run.best_model, compile=False).count_params() == 3

    trained = configuration.preset("smoke")
    model_file.save(model, run.best_model, trained)
    settings = run.model_settings(command)
    assert settings.model == trained.model and settings.predict.threshold == 0.3  # predict settings stay the command's
    assert keras.saving.load_model(run.best_model, compile=False).count_params() == 3


def test_a_damaged_model_file_is_named_in_one_line(tmp_path):
    from pipeline.files import model_file

    (tmp_path / "best.keras").write_text("not a zip")
    with pytest.raises(PipelineError, match="best.keras: cannot read the configuration"):
        model_file.trained_config(tmp_path / "best.keras")


def test_a_model_file_with_its_settings_keeps_keras_three_members(tmp_path):
    """Keras extracts an archive of more than three members to disk on every load: the
    settings go into its metadata, not a member of their own."""
    import zipfile

    import keras

    from pipeline.files import model_file

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model_file.save(model, tmp_path / "m.keras", configuration.preset("smoke"))
    assert len(zipfile.ZipFile(tmp_path / "m.keras").namelist()) == 3
    assert model_file.trained_config(tmp_path / "m.keras") == configuration.preset("smoke")


def test_data_prepared_before_a_data_field_existed_still_loads(tmp_path):
    """A manifest that lacks a field added since (here data.folds, data.fold) was prepared with
    that field's default; a field it records with another value is still refused."""
    run = RunDir(tmp_path)
    smoke = configuration.preset("smoke")
    settings = rundir.data_settings(smoke)
    for field in ("folds", "fold"):
        del settings["data"][field]
    run.manifest.parent.mkdir()
    run.manifest.write_text(json.dumps({"settings": settings}))
    np.savez(run.prepared("train"), images=np.zeros((1, 4, 4, 1), np.float32))
    assert rundir.load_split(run, "train", smoke)["images"].shape == (1, 4, 4, 1)
    with pytest.raises(PipelineError, match="prepared with other data/weight-map settings"):
        rundir.load_split(run, "train", configuration.apply_overrides(smoke, {"data": {"folds": 5}}, "test"))


def test_the_models_report_is_the_one_that_names_its_bytes(tmp_path):
    run = RunDir(tmp_path)
    run.train.mkdir()
    run.best_model.write_bytes(b"a model")
    assert run.model_report() == (None, f"{run.report} does not exist")
    run.evaluation.mkdir()
    report = {"overall": {"rand_error": 0.1}, "model_sha256": hashlib.sha256(b"a model").hexdigest()}
    run.report.write_text(json.dumps(report))
    os.utime(run.report, (1, 1))  # its time says nothing: a copied or restored run has any order of times
    assert run.model_report() == (report, None)
    run.best_model.write_bytes(b"another model")  # trained again since
    assert run.model_report() == (None, f"{run.report} scored another model than {run.best_model}")
    run.report.write_text('{"overall": {"rand_error": 0.1}}')  # written before reports named their model
    assert run.model_report() == (None, f"{run.report} scored another model than {run.best_model}")


def test_the_example_input_is_the_images_centre_at_most_512_pixels_square(tmp_path):
    run = RunDir(tmp_path)
    assert run.example() is None
    image = np.arange(600 * 300 * 2).reshape(600, 300, 2).astype(np.uint16)
    run.save_example(image)
    np.testing.assert_array_equal(run.example(), image[44:556])
    assert not [path for path in run.train.iterdir() if path.name.startswith(".")]  # written atomically
