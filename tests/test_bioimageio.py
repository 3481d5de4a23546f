"""The BioImage Model Zoo package as the zoo's own validator, its model test and Keras read it."""

import io
import sys
import warnings
import zipfile

import cv2
import keras
import numpy as np
import pytest
import tensorflow as tf
import tifffile
import yaml
import bioimageio.core
from bioimageio.spec.model import v0_5

from pipeline.config import resolve as configuration
from pipeline.files import rundir
from pipeline.data.synthetic import synthetic_em_image
from pipeline.display import grey8
from pipeline.errors import PipelineError
from pipeline.files.bioimageio import (
    ONNX_NOTICE, input_axes, keras_weights, minimum_size, output_axes, package_contents, write_package, zoo_network,
)
from pipeline.files.rundir import RunDir
from pipeline.inference.segmenter import load_model, segmentation_function
from pipeline.inference.tiling import overlap_tile_predict
from pipeline.normalization import normalize
from pipeline.sizes import context, is_valid_input_size
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
    path = write_package(tmp_path / "bioimageio.zip", package_contents(unet(config.model), config), config, 1)
    assert capsys.readouterr().out.splitlines() == [ONNX_NOTICE]
    rdf = yaml.safe_load(zipfile.ZipFile(path).read("rdf.yaml"))
    assert set(rdf["weights"]) == {"keras_v3", "tensorflow_saved_model_bundle"}
    assert bioimageio.core.load_model_description(path, perform_io_checks=True).weights.onnx is None


def test_the_zoo_pre_processing_is_the_training_normalisation(package, tmp_path, monkeypatch):
    """The zoo allows outputs 1e-3 apart; the description's pre-processing is much closer to ours."""
    monkeypatch.chdir(tmp_path)  # bioimageio.core may pick the SavedModel, which it unzips here
    tile = npy(package, "test_input.npy")
    ours = zoo_network(package["model"], package["config"])(normalize(tile), training=False).numpy()
    zoo = bioimageio.core.predict(model=bioimageio.core.load_model_description(package["path"]), inputs=tile,
                                  skip_postprocessing=True)
    np.testing.assert_allclose(zoo.members["mask"].data.to_numpy(), ours, atol=1e-5)
    np.testing.assert_array_equal(npy(package, "test_output.npy"), ours > package["config"].predict.threshold)


def test_the_test_input_and_cover_are_the_center_of_the_runs_first_validation_image(package):
    """The example input that training recorded beside the model (`RunDir.example`): image pixels, no padding."""
    config = package["config"]
    image = rundir.load_split(package["run"], "val", config)["images"][0]
    side = min(config.predict.tile_size, image.shape[0])
    border = (image.shape[0] - side) // 2  # square images
    center = image[border : border + side, border : border + side]
    np.testing.assert_array_equal(npy(package, "test_input.npy")[0], center)
    cover = cv2.imdecode(np.frombuffer(read(package, "cover.png"), np.uint8), cv2.IMREAD_UNCHANGED)
    assert cover.shape == (side, 2 * side)
    np.testing.assert_array_equal(cover[:, :side], grey8(center[..., 0]))
    np.testing.assert_array_equal(cover[:, side:], npy(package, "test_output.npy")[0, ..., 1] * 255)


def test_the_keras_v3_weights_are_the_runs_model_without_training_state(package, tmp_path):
    """What any Keras user reads (rdf.yaml's weights.keras_v3.source), and the U-Net inside
    it, which `--init-from` and `--model` read (`keras_weights`)."""
    rdf = yaml.safe_load(read(package, "rdf.yaml"))
    source = rdf["weights"]["keras_v3"]["source"]
    (tmp_path / source).write_bytes(read(package, source))
    model = keras.saving.load_model(tmp_path / source)  # safe mode: Keras' own operations only
    assert not model.compiled  # loaded as the zoo loads it (compile=True): nothing to compile
    (tmp_path / "unet.keras").write_bytes(keras_weights(package["path"]))
    unet_only = keras.saving.load_model(tmp_path / "unet.keras")
    assert unet_only.name == package["model"].name
    for loaded in (model, unet_only):
        for ours, theirs in zip(package["model"].get_weights(), loaded.get_weights(), strict=True):
            np.testing.assert_array_equal(ours, theirs)
    assert rdf["config"]["unet_pipeline"]["configuration"] == package["config"].to_dict()
    assert rdf["config"]["unet_pipeline"]["run_dir"] == str(package["run"].root.resolve())


@pytest.mark.parametrize("preset,padding", [("paper", "valid"), ("smoke", "valid"), ("cpu", "same")])
def test_the_described_sizes_are_any_from_the_minimum_and_the_output_is_the_inputs(preset, padding):
    config = configuration.apply_overrides(configuration.preset(preset), {"model": {"padding": padding}}, "test")
    inputs = v0_5.InputTensorDescr(id=v0_5.TensorId("input"), axes=input_axes(config))
    outputs = v0_5.OutputTensorDescr(id=v0_5.TensorId("mask"), axes=output_axes(config))
    smallest = minimum_size(config)
    # Padded by the context on both sides, the smallest side is the smallest valid tile.
    assert is_valid_input_size(smallest + 2 * context(config.model.depth, padding), config.model.depth, padding)
    for side in ("y", "x"):
        [axis] = [a for a in inputs.axes if a.id == side]
        [out_axis] = [a for a in outputs.axes if a.id == side]
        for size in range(1, 1200):
            if size < smallest:
                with pytest.raises(ValueError):
                    axis.size.validate_size(size)
                continue
            axis.size.validate_size(size)
            assert out_axis.size.get_size(out_axis, axis, ref_size=size) == size


def test_the_zoo_network_mirrors_as_overlap_tile_prediction_on_sides_smaller_than_its_context():
    """Sides from the minimum up, where the padding reflects more than once: `pipeline.mirror`'s rule."""
    config = configuration.preset("smoke")
    model = unet(config.model)
    network = zoo_network(model, config)
    rng = np.random.default_rng(0)
    for height, width in ((4, 4), (5, 11), (23, 9), (61, 50)):
        image = rng.normal(size=(height, width, 1)).astype(np.float32)
        ours = overlap_tile_predict(model, image, config.model.depth, config.predict.tile_size)
        np.testing.assert_allclose(network(image[None])[0], ours, atol=1e-5)


def test_a_colour_models_sample_tiffs_are_written_without_a_warning_and_read_back_as_written():
    """3 channels: tifffile warns that it will change how it stores them unless told."""
    config = configuration.apply_overrides(configuration.preset("smoke"), {"model": {"input_channels": 3}}, "test")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", module="tifffile")
        files = package_contents(unet(config.model), config)
    tile = np.load(io.BytesIO(files["test_input.npy"]))[0]
    np.testing.assert_array_equal(tifffile.imread(io.BytesIO(files["sample_input.tif"])), tile)


# How far the formats' probabilities of cell may lie apart (tf2onnx's ONNX matched Keras to 1.7e-6):
# a pixel this close to the threshold may fall on either side of it.
FORMATS_AGREE = 1e-5


@pytest.fixture(scope="module")
def images(package) -> list[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """Synthetic EM images of 384, 512, 700 x 1000 and 2048 px ([y, x, 1]) and what `predict` gives
    each: its mask and probabilities."""
    large = synthetic_em_image(2048, seed=1)[0][..., None]
    segment = tf.function(segmentation_function(package["model"], package["config"]))
    return [(image, {name: tensor.numpy() for name, tensor in segment(tf.constant(image)).items()}) for image in
            [synthetic_em_image(side, seed=side)[0][..., None] for side in (384, 512)] + [large[:700, :1000], large]]


@pytest.mark.parametrize("weight_format", WEIGHT_FORMATS)
def test_bioimageio_predict_gives_predicts_mask_on_images_of_any_size(package, images, weight_format, tmp_path,
                                                                       monkeypatch):
    monkeypatch.chdir(tmp_path)  # bioimageio.core unzips the SavedModel into the working directory
    pipeline = bioimageio.core.create_prediction_pipeline(
        bioimageio.core.load_model_description(package["path"]), weight_format=weight_format)
    for image, ours in images:
        zoo = bioimageio.core.predict(model=pipeline, inputs=image[None].astype(np.float32))
        mask = zoo.members["mask"].data.to_numpy()[0, ..., 1]
        assert mask.shape == ours["mask"].shape
        # Equal but where the probability of cell lies within the formats' rounding of the threshold.
        cell, threshold = ours["probabilities"][..., 1], package["config"].predict.threshold
        np.testing.assert_array_equal(np.where(cell > threshold, 255, 0), ours["mask"])  # channel 1 is cell
        decided = np.abs(cell - threshold) > FORMATS_AGREE
        np.testing.assert_array_equal((mask * 255)[decided], ours["mask"][decided])
        assert decided.mean() > 0.9999


def test_the_description_names_the_export_settings_people_data_and_threshold(tmp_path):
    config = configuration.apply_overrides(configuration.preset("smoke"), {
        "export": {"authors": "Ada Lovelace; Alan Turing", "maintainers": "ada", "git_repo": "https://github.com/o/r"},
        "predict": {"threshold": 0.7},
    }, "test")
    contents = package_contents(unet(config.model), config)
    path = write_package(tmp_path / "bioimageio.zip", contents, config, 3,
                         provenance={"run_dir": "/runs/x", "model_sha256": "ab" * 32})
    with zipfile.ZipFile(path) as archive:
        assert {member.external_attr >> 16 for member in archive.infolist()} == {0o100644}
        rdf = yaml.safe_load(archive.read("rdf.yaml"))
    assert rdf["authors"] == [{"name": "Ada Lovelace"}, {"name": "Alan Turing"}]
    assert rdf["maintainers"] == [{"github_user": "ada"}] and rdf["git_repo"] == "https://github.com/o/r"
    assert rdf["outputs"][0]["postprocessing"] == [{"id": "binarize", "kwargs": {"threshold": 0.7}}]
    assert "data set `synthetic` (data.seed=0" in rdf["description"] and "run /runs/x" in rdf["description"]
    described = bioimageio.core.load_model_description(path, perform_io_checks=False)  # no network
    assert str(described.git_repo) == "https://github.com/o/r"


def test_an_invalid_description_is_refused_in_one_line_and_writes_nothing(tmp_path):
    config = configuration.apply_overrides(configuration.preset("smoke"), {"export": {"git_repo": "not a url"}}, "test")
    with pytest.raises(PipelineError, match=r"^BioImage Model Zoo package: rdf.yaml is invalid at git_repo: [^\n]*$"):
        write_package(tmp_path / "bioimageio.zip", package_contents(unet(config.model), config), config, 1)
    assert list(tmp_path.iterdir()) == []
