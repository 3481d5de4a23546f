"""The BioImage Model Zoo package as the zoo's own validator, its model test and Keras read it."""

import io
import sys
import warnings
import zipfile

import cv2
import keras
import numpy as np
import pytest
import tifffile
import yaml
import bioimageio.core
from bioimageio.spec.model import v0_5

from pipeline.config import resolve as configuration
from pipeline.files import rundir
from pipeline.files.bioimageio import ONNX_NOTICE, input_axes, output_axes, package_files, write_package
from pipeline.files.rundir import RunDir
from pipeline.inference.segmenter import load_model
from pipeline.normalization import normalize
from pipeline.sizes import is_valid_input_size, output_size
from pipeline.stages.export import PACKAGE_FILE
from pipeline.training.model import unet


@pytest.fixture(scope="module")
def package(smoke_run) -> dict:
    """The package `--stage export` wrote for the smoke run, with the run's config and model."""
    run = RunDir(smoke_run["run_dir"])
    return {"path": smoke_run["exports"] / "unet" / "1" / PACKAGE_FILE, "run": run,
            "config": configuration.load(smoke_run["exported_config"]), "model": load_model(run.best_model)}


def read(package: dict, name: str) -> bytes:
    with zipfile.ZipFile(package["path"]) as archive:
        return archive.read(name)


def npy(package: dict, name: str) -> np.ndarray:
    with zipfile.ZipFile(package["path"]) as archive, archive.open(name) as file:
        return np.load(file)


WEIGHT_FORMATS = ("keras_v3", "onnx", "tensorflow_saved_model_bundle")


@pytest.mark.parametrize("weight_format", WEIGHT_FORMATS)
def test_the_zoo_validates_the_package_and_reproduces_its_test_output(package, weight_format, tmp_path, monkeypatch):
    """`bioimageio test` for each weight format: what deepImageJ and QuPath (ONNX, SavedModel) run."""
    monkeypatch.chdir(tmp_path)  # bioimageio.core unzips the SavedModel into the working directory
    summary = bioimageio.core.test_model(package["path"], weight_format=weight_format)
    assert summary.status == "passed", summary.format()
    passed = {detail.name for detail in summary.details if detail.status == "passed"}
    assert f"Reproduce test outputs from test inputs ({weight_format})" in passed
    # The zoo ran the network on sizes n = 0, 1, 2 of the parametrized sides, with 1 and 2 images.
    assert sum(name.startswith(f"Run {weight_format} inference for inputs with") for name in passed) == 6


def test_without_tf2onnx_the_package_has_the_other_two_formats_and_the_export_says_so(tmp_path, monkeypatch, capsys):
    """The `onnx` extra not installed: None in sys.modules is Python's own 'cannot be imported'."""
    monkeypatch.setitem(sys.modules, "tf2onnx", None)
    config = configuration.preset("smoke")
    path = write_package(tmp_path / "bioimageio.zip", unet(config.model), config, 1)
    assert capsys.readouterr().out.splitlines() == [ONNX_NOTICE]
    rdf = yaml.safe_load(zipfile.ZipFile(path).read("rdf.yaml"))
    assert set(rdf["weights"]) == {"keras_v3", "tensorflow_saved_model_bundle"}
    assert bioimageio.core.load_model_description(path, perform_io_checks=True).weights.onnx is None


def test_the_zoo_pre_processing_is_the_training_normalisation(package):
    """The zoo allows outputs 1e-3 apart; the description's pre-processing is much closer to ours."""
    tile = npy(package, "test_input.npy")
    ours = package["model"](normalize(tile), training=False).numpy()
    zoo = bioimageio.core.predict(model=bioimageio.core.load_model_description(package["path"]), inputs=tile)
    np.testing.assert_allclose(zoo.members["probabilities"].data.to_numpy(), ours, atol=1e-5)
    np.testing.assert_allclose(npy(package, "test_output.npy"), ours, atol=1e-6)


def test_the_test_tile_is_the_center_of_the_runs_first_validation_image(package):
    """The example input that training recorded beside the model (`RunDir.example`)."""
    config = package["config"]
    image = rundir.load_split(package["run"], "val", config)["images"][0]
    side, border = config.predict.tile_size, (image.shape[0] - config.predict.tile_size) // 2  # square images
    center = image[border : border + side, border : border + side]
    np.testing.assert_array_equal(npy(package, "test_input.npy")[0], center)
    cover = cv2.imdecode(np.frombuffer(read(package, "cover.png"), np.uint8), cv2.IMREAD_UNCHANGED)
    out = output_size(side, config.model.depth, config.model.padding)
    assert cover.shape == (out, 2 * out) and set(np.unique(cover[:, out:])) <= {0, 255}


def test_the_keras_v3_weights_are_the_runs_model_without_training_state(package, tmp_path):
    """What `--init-from` and any Keras user read: rdf.yaml's weights.keras_v3.source."""
    rdf = yaml.safe_load(read(package, "rdf.yaml"))
    source = rdf["weights"]["keras_v3"]["source"]
    (tmp_path / source).write_bytes(read(package, source))
    model = keras.saving.load_model(tmp_path / source)
    assert not model.compiled  # loaded as the zoo loads it (compile=True): nothing to compile
    for ours, theirs in zip(package["model"].get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(ours, theirs)
    assert rdf["config"]["unet_pipeline"]["configuration"] == package["config"].to_dict()
    assert rdf["config"]["unet_pipeline"]["run_dir"] == str(package["run"].root.resolve())


@pytest.mark.parametrize("preset,padding", [("paper", "valid"), ("smoke", "valid"), ("cpu", "same")])
def test_the_described_sizes_are_exactly_the_networks_valid_tile_sizes(preset, padding):
    config = configuration.apply_overrides(configuration.preset(preset), {"model": {"padding": padding}}, "test")
    depth = config.model.depth
    inputs = v0_5.InputTensorDescr(id=v0_5.TensorId("input"), axes=input_axes(config))
    outputs = v0_5.OutputTensorDescr(id=v0_5.TensorId("probabilities"), axes=output_axes(config))
    for side in ("y", "x"):
        [axis] = [a for a in inputs.axes if a.id == side]
        [out_axis] = [a for a in outputs.axes if a.id == side]
        for size in range(1, 1200):
            try:
                axis.size.validate_size(size)
            except ValueError:
                assert not is_valid_input_size(size, depth, padding), size
                continue
            assert is_valid_input_size(size, depth, padding), size
            assert out_axis.size.get_size(out_axis, axis, ref_size=size) == output_size(size, depth, padding)


def test_a_colour_models_sample_tiffs_are_written_without_a_warning_and_read_back_as_written():
    """3 channels: tifffile warns that it will change how it stores them unless told."""
    config = configuration.apply_overrides(configuration.preset("smoke"), {"model": {"input_channels": 3}}, "test")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", module="tifffile")
        files = package_files(unet(config.model), config, 1, None, None)
    tile = np.load(io.BytesIO(files["test_input.npy"]))[0]
    np.testing.assert_array_equal(tifffile.imread(io.BytesIO(files["sample_input.tif"])), tile)
