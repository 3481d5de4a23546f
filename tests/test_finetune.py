"""Fine-tuning (`--init-from`): training starts from another model's weights, or is refused in one line."""

import re
import shutil
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest
import yaml

from pipeline.cli import main
from pipeline.config import resolve as configuration
from pipeline.errors import PipelineError
from pipeline.training.finetune import copy_weights, initial_weights_file, load_initial_model
from pipeline.training.model import compiled_model
from test_training import finished, kill_after_epochs, pipeline_process, weights

# The user's own images: another data seed and only two training images.
OWN = ["--preset", "smoke", "--set", "data.seed=1", "--set", "data.num_train=2"]
# One step so small that the weights stay the starting ones to float precision.
ONE_TINY_STEP = ["--set", "train.epochs=1", "--set", "train.steps_per_epoch=1", "--set", "train.learning_rate=1e-10"]


@pytest.fixture(scope="module")
def own_images(tmp_path_factory) -> Path:
    """A prepared smoke run of OWN, copied by each test that trains in it."""
    run_dir = tmp_path_factory.mktemp("own") / "run"
    assert main(["--stage", "prepare", "--run-dir", str(run_dir), *OWN]) == 0
    return run_dir


def package(model_file: Path, target: Path, description: dict | None = None) -> Path:
    """A bioimage.io package of the form this project exports: rdf.yaml naming the .keras file in the zip."""
    if description is None:  # a source relative to the package, as bioimage.io may write it
        description = {"format_version": "0.5.3", "type": "model", "weights": {"keras_v3": {"source": "./unet.keras"}}}
    with zipfile.ZipFile(target, "w") as archive:
        archive.writestr("rdf.yaml", yaml.safe_dump(description))
        archive.write(model_file, "unet.keras")
    return target


def contents(folder: Path) -> dict[str, tuple[bytes | None, int]]:
    """Every file and folder under `folder` with its bytes (None for a folder) and modification time."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
            for p in folder.rglob("*")}


@pytest.mark.parametrize("kind", ["run directory", ".keras file", "exported package", "package zip"])
def test_fine_tuning_starts_from_the_source_weights(kind, smoke_run, own_images, tmp_path, capsys):
    best = smoke_run["run_dir"] / "train" / "best.keras"
    init_from = {"run directory": smoke_run["run_dir"], ".keras file": best,
                 "exported package": smoke_run["exports"] / "unet" / "1" / "assets.extra" / "bioimageio.zip",
                 "package zip": package(best, tmp_path / "unet.zip")}[kind]
    run_dir = shutil.copytree(own_images, tmp_path / "run")
    assert main(["--stage", "train", "--run-dir", str(run_dir), "--init-from", str(init_from), *ONE_TINY_STEP]) == 0

    named = best if kind == "run directory" else init_from
    assert f"parameters) from the weights of {named} on " in capsys.readouterr().out
    assert configuration.load(run_dir / "config.yaml").train.init_from == str(init_from)
    source, tuned = weights(best), weights(run_dir / "train" / "last.keras")
    assert len(source) == len(tuned)
    for a, b in zip(source, tuned):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-7)


@pytest.mark.parametrize(("setting", "message"), [
    ("model.depth=2", "trained with model.depth=3, this run has 2"),
    ("model.input_channels=2", "trained with model.input_channels=1, this run has 2"),
    ("model.base_filters=4", "trained with model.base_filters=8, this run has 4"),
    ("model.num_classes=3", "trained with model.num_classes=2, this run has 3"),
    ("model.padding=same", "trained with model.padding='valid', this run has 'same'"),
])
def test_a_model_of_another_shape_is_refused_in_one_line_and_changes_nothing(
        setting, message, smoke_run, own_images, tmp_path, capsys):
    run_dir = shutil.copytree(own_images, tmp_path / "run")
    before = contents(run_dir)
    args = ["--stage", "train", "--run-dir", str(run_dir), "--init-from", str(smoke_run["run_dir"]), "--set", setting]
    assert main(args) == 2
    assert capsys.readouterr().err == f"error: {smoke_run['run_dir'] / 'train' / 'best.keras'}: {message}\n"
    assert contents(run_dir) == before


def test_drop_out_and_training_settings_may_differ(smoke_run, own_images, tmp_path):
    run_dir = shutil.copytree(own_images, tmp_path / "run")
    args = ["--stage", "train", "--run-dir", str(run_dir), "--init-from", str(smoke_run["run_dir"]), *ONE_TINY_STEP,
            "--set", "model.dropout=0.0", "--set", "train.tile_size=124", "--set", "train.optimizer=sgd"]
    assert main(args) == 0
    for a, b in zip(weights(smoke_run["run_dir"] / "train" / "best.keras"), weights(run_dir / "train" / "last.keras")):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-7)


def start_from(path: Path) -> keras.Model:
    """What training does with train.init_from=path, up to the first step, for the smoke preset's U-Net."""
    source = initial_weights_file(str(path))
    model = compiled_model(configuration.preset("smoke"))
    copy_weights(load_initial_model(source), model, source)
    return model


def not_a_unet(path: Path) -> Path:
    keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="dense")]).save(path)
    return path


def text(path: Path) -> Path:
    path.write_text("no model")
    return path


@pytest.mark.parametrize(("make", "problem"), [
    (lambda tmp, best: tmp, "train/best.keras: not found; run --stage train first"),
    (lambda tmp, best: shutil.copy(best, tmp / "unet.h5"), "takes a run directory, a .keras file or a bioimage.io"),
    (lambda tmp, best: tmp / "missing.keras", "missing.keras: no such file"),
    (lambda tmp, best: text(tmp / "text.keras"), "text.keras: not a .keras model file (not a zip archive)"),
    (lambda tmp, best: not_a_unet(tmp / "dense.keras"), "dense.keras: not a U-Net of this pipeline"),
    (lambda tmp, best: text(tmp / "text.zip"), "text.zip: not a zip archive"),
    (lambda tmp, best: package(best, tmp / "p.zip", {"type": "model"}),
     "p.zip: rdf.yaml lists no keras_v3 weights"),
    (lambda tmp, best: package(best, tmp / "p.zip", {"weights": {"keras_v3": {"source": "other.keras"}}}),
     "p.zip: rdf.yaml names keras_v3 weights 'other.keras', which the zip does not hold"),
])
def test_what_holds_no_usable_model_is_refused_in_one_line(make, problem, smoke_run, tmp_path):
    path = make(tmp_path, smoke_run["run_dir"] / "train" / "best.keras")
    with pytest.raises(PipelineError, match=re.escape(problem)) as refused:
        start_from(path)
    assert "\n" not in str(refused.value)


def test_a_zip_without_rdf_yaml_is_refused(smoke_run, tmp_path):
    with zipfile.ZipFile(tmp_path / "p.zip", "w") as archive:
        archive.write(smoke_run["run_dir"] / "train" / "best.keras", "unet.keras")
    with pytest.raises(PipelineError, match=r"p\.zip: holds no rdf\.yaml, so not a bioimage\.io package"):
        start_from(tmp_path / "p.zip")


def test_an_interrupted_fine_tuning_resumes_from_its_backup_not_from_init_from(smoke_run, own_images, tmp_path):
    source = Path(shutil.copy(smoke_run["run_dir"] / "train" / "best.keras", tmp_path / "source.keras"))
    # Without drop-out: its random masks are drawn afresh after a resume (see test_training).
    args = ["--init-from", str(source), *OWN, "--set", "train.epochs=6", "--set", "train.steps_per_epoch=4",
            "--set", "model.dropout=0.0"]
    straight = shutil.copytree(own_images, tmp_path / "straight")
    finished(pipeline_process(["--stage", "train", "--run-dir", str(straight), *args]))

    killed = shutil.copytree(own_images, tmp_path / "killed")
    process = pipeline_process(["--stage", "train", "--run-dir", str(killed), *args])
    kill_after_epochs(process, killed, 2)
    # Were init_from read again, the resumed run would start from these weights (or stop).
    source.write_bytes((smoke_run["run_dir"] / "train" / "best.keras").read_bytes()[:100])

    output = finished(pipeline_process(["--stage", "train", "--run-dir", str(killed), *args]))
    assert f"from the weights of {source} on " in output and "resuming after epoch" in output
    for a, b in zip(weights(straight / "train" / "last.keras"), weights(killed / "train" / "last.keras")):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


def test_stage_all_refuses_weights_that_do_not_fit_before_preparing(smoke_run, tmp_path, capsys):
    run_dir = tmp_path / "new"
    status = main(["--stage", "all", "--preset", "smoke", "--run-dir", str(run_dir),
                   "--init-from", str(smoke_run["run_dir"]), "--set", "model.base_filters=4"])
    assert status == 2 and "trained with model.base_filters=8, this run has 4" in capsys.readouterr().err
    assert not run_dir.exists()
