"""The BioImage Model Zoo package of an export version: the network for the zoo's tools.

One zip, `bioimage.io` model description format 0.5 (FORMAT_VERSION):

    rdf.yaml          the description: axes, sizes, pre-processing, files and their SHA-256
    model.keras       keras_v3 weights: the network alone, without training state
    tf_saved_model.zip  tensorflow_saved_model_bundle weights: the same network as a SavedModel
                      (endpoint `serve`, returning {"probabilities": ...}), zipped as the spec asks
    model.onnx        onnx weights, converted by tf2onnx (the `onnx` extra; without it the package
                      has the other two, and the export says so)
    test_input.npy    a tile [1, T, T, C] float32, as read (before normalisation)
    test_output.npy   the model's class probabilities for it [1, T - 2 context, ..., classes]
    sample_input.tif, sample_output.tif   the same two as TIFF, for people and viewers
    cover.png         the tile's output window beside its predicted mask
    README.md         what the model expects and gives, its training run, its citation

Conventions of the description:
- Tensors are (batch, y, x, channel), as Keras takes them. A side of the input is any of
  the network's valid tile sizes, `smallest_input_size + n * alignment` (a
  `ParameterizedSize`); the output is smaller by the context on each border, which the
  network has already cut off, so it is a `SizeReference` with offset `-2 * context`,
  not a halo (a halo would be cut off by the tool a second time).
- Pre-processing is the training's `normalize`, spelled as the spec's
  `zero_mean_unit_variance` over y, x and channel of each image. `normalize` divides by
  the standard deviation (a constant image gives zeros), the spec by std + eps (eps =
  1e-6, its default and what bioimageio.core applies whatever the file says): the two
  agree to a relative 1e-6 / std, so to 1e-6 for grey-value images (std >= 1), and differ
  only for images with a standard deviation near 1e-6 or below, which the spec flattens.
- The output is the network's softmax as it is: no post-processing.

Written as plain YAML, so that exporting needs no `bioimageio` package; the tests check
the package with the zoo's own validator and model test (`bioimageio.core.test_model`),
for each of the three weight formats.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.util
import io as bytes_io
import tempfile
import time
import zipfile
from pathlib import Path

import cv2
import keras
import numpy as np
import tensorflow as tf
import tifffile
import yaml

from pipeline.config.schema import Config
from pipeline.data.synthetic import synthetic_em_image
from pipeline.display import grey8
from pipeline.errors import PipelineError
from pipeline.files import io
from pipeline.mirror import mirror_pad_array
from pipeline.normalization import normalize
from pipeline.sizes import alignment, context, smallest_input_size

FORMAT_VERSION = "0.5.12"  # the newest the zoo's validator (bioimageio.spec 0.5.12) knows
LICENSE = "CC-BY-4.0"  # the repository has no license of its own; the zoo's usual one for models
AUTHORS = [{"name": "unet-pipeline contributors"}]
CITATION = {
    "text": "Ronneberger, O., Fischer, P. and Brox, T. U-Net: Convolutional Networks for Biomedical "
            "Image Segmentation. MICCAI 2015, LNCS 9351, 234-241.",
    "doi": "10.1007/978-3-319-24574-4_28",
}
INPUT, OUTPUT = "input", "probabilities"  # tensor ids
WEIGHTS, RDF = "model.keras", "rdf.yaml"
SAVED_MODEL, ONNX = "tf_saved_model.zip", "model.onnx"
SAVED_MODEL_ENDPOINT = "serve"  # the endpoint bioimageio.core's TensorFlow adapter calls first
# Opset 15: run by every ONNX Runtime since 1.10, which deepImageJ's (JDLL) and QuPath's
# (DJL) engines bundle, and tf2onnx's default.
ONNX_OPSET = 15
ONNX_NOTICE = ("notice: the BioImage Model Zoo package has keras_v3 and tensorflow_saved_model_bundle weights; "
               "ONNX weights need `pip install unet-pipeline[onnx]`")
# Members of the zip files get this mode, whatever the writer's umask: they are extracted
# on other machines, where only readable files are of use.
MEMBER_MODE = 0o644
# The pipeline's class order (ModelConfig.num_classes): 0 = membrane/background, 1 = cell.
CLASS_NAMES = ("background", "cell")


def input_axes(config: Config) -> list[dict]:
    """(batch, y, x, channel), each side any valid tile size: smallest + n * alignment."""
    model = config.model
    size = {"min": smallest_input_size(model.depth, model.padding), "step": alignment(model.depth)}
    return [
        {"type": "batch"},
        *({"type": "space", "id": side, "size": dict(size)} for side in ("y", "x")),  # dict(): no YAML alias
        {"type": "channel", "channel_names": [f"channel{i}" for i in range(model.input_channels)]},
    ]


def output_axes(config: Config) -> list[dict]:
    """(batch, y, x, class): each side the input's less the context the network cut off."""
    model = config.model
    offset = -2 * context(model.depth, model.padding)
    names = [*CLASS_NAMES, *(f"class{i}" for i in range(len(CLASS_NAMES), model.num_classes))]
    return [
        {"type": "batch"},
        *({"type": "space", "id": side, "size": {"tensor_id": INPUT, "axis_id": side, "offset": offset}}
          for side in ("y", "x")),
        {"type": "channel", "channel_names": names[: model.num_classes]},
    ]


def example_tile(image: np.ndarray | None, config: Config) -> np.ndarray:
    """The test input: a `predict.tile_size` square of `image` [H, W, C] as float32.

    The image's center, mirrored at the borders where it is smaller than the tile (as
    overlap-tile prediction extends it); without an image, a synthetic EM image.
    """
    side, channels = config.predict.tile_size, config.model.input_channels
    if image is None:
        grey = synthetic_em_image(side, seed=0)[0]
        image = np.repeat(grey[..., None], channels, axis=-1)
    short = [max(0, side - extent) for extent in image.shape[:2]]
    padded = mirror_pad_array(image, [(s // 2, s - s // 2) for s in short])
    top, left = ((extent - side) // 2 for extent in padded.shape[:2])
    return padded[top : top + side, left : left + side].astype(np.float32)


def predict_tile(model: keras.Model, tile: np.ndarray) -> np.ndarray:
    """The network's class probabilities for one tile [T, T, C], normalised as in training."""
    probabilities = model(normalize(tf.constant(tile[None])), training=False).numpy()
    if not np.isfinite(probabilities).all():
        raise PipelineError("BioImage Model Zoo package: the model's output for the test tile is not finite")
    return probabilities


def cover(tile: np.ndarray, probabilities: np.ndarray, config: Config) -> np.ndarray:
    """The tile's output window (first channel, 8-bit) beside its mask: a 2:1 picture."""
    border = context(config.model.depth, config.model.padding)
    side = probabilities.shape[1]
    window = grey8(tile[border : border + side, border : border + side, 0])
    mask = np.where(probabilities[0, ..., 1] > config.predict.threshold, 255, 0).astype(np.uint8)
    return np.concatenate([window, mask], axis=1)


def _file(name: str, files: dict[str, bytes]) -> dict:
    """A file entry of the description: its name in the package and its SHA-256."""
    return {"source": name, "sha256": hashlib.sha256(files[name]).hexdigest()}


def description(config: Config, version: int, files: dict[str, bytes], provenance: dict | None) -> dict:
    """The model description (rdf.yaml) of the package whose other files are `files`."""
    model = config.model
    return {
        "format_version": FORMAT_VERSION,
        "type": "model",
        "name": "U-Net cells and membranes (unet-pipeline)",
        "description": (
            f"U-Net (Ronneberger et al. 2015) trained by unet-pipeline on {config.data.dataset}: "
            f"probability of {', '.join(CLASS_NAMES)} per pixel, {model.padding} convolutions, "
            f"depth {model.depth}, {model.base_filters} channels at the first level."
        ),
        "version": version,
        "authors": AUTHORS,
        "cite": [CITATION],
        "license": LICENSE,
        "documentation": _file("README.md", files),
        "covers": [_file("cover.png", files)],
        "tags": ["2d", "unet", "semantic-segmentation", "cells", "cell-membrane", "tensorflow", "keras",
                 config.data.dataset],
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "inputs": [{
            "id": INPUT,
            "description": "image as read; normalised per image by the pre-processing",
            "axes": input_axes(config),
            "test_tensor": _file("test_input.npy", files),
            "sample_tensor": _file("sample_input.tif", files),
            "data": {"type": "float32"},
            "preprocessing": [
                {"id": "zero_mean_unit_variance", "kwargs": {"axes": ["y", "x", "channel"], "eps": 1e-6}},
            ],
        }],
        "outputs": [{
            "id": OUTPUT,
            "description": "softmax over the classes, for the input less its context on every border",
            "axes": output_axes(config),
            "test_tensor": _file("test_output.npy", files),
            "sample_tensor": _file("sample_output.tif", files),
            "data": {"type": "float32", "range": [0.0, 1.0]},
        }],
        "weights": weights(files),
        "config": {
            "bioimageio": {"architecture_type": "U-Net"},
            # What assets.extra/provenance.json holds, so that the package alone tells which
            # settings and run made it (for fine-tuning, and for repeating the run).
            "unet_pipeline": {"configuration": config.to_dict()} | (provenance or {}) | {"version": version},
        },
    }


def weights(files: dict[str, bytes]) -> dict:
    """The description's weights: keras_v3, the SavedModel and, where converted, ONNX, both from keras_v3."""
    entries = {
        "keras_v3": _file(WEIGHTS, files) | {
            "keras_version": keras.__version__, "backend": [keras.backend.backend(), tf.__version__]},
        "tensorflow_saved_model_bundle": _file(SAVED_MODEL, files) | {
            "tensorflow_version": tf.__version__, "parent": "keras_v3"},
    }
    if ONNX in files:
        entries["onnx"] = _file(ONNX, files) | {"opset_version": ONNX_OPSET, "parent": "keras_v3"}
    return entries


def readme(config: Config, version: int) -> str:
    """The package's documentation: what goes in, what comes out, where it came from."""
    model = config.model
    smallest, step = smallest_input_size(model.depth, model.padding), alignment(model.depth)
    border = context(model.depth, model.padding)
    tile = config.predict.tile_size
    return f"""# U-Net cells and membranes (unet-pipeline, export version {version})

The segmentation network of Ronneberger, Fischer and Brox, *U-Net: Convolutional Networks
for Biomedical Image Segmentation* (MICCAI 2015, doi:10.1007/978-3-319-24574-4_28),
trained by unet-pipeline on `{config.data.dataset}`: depth {model.depth},
{model.base_filters} channels at the first level, {model.padding} convolutions.

## Input

A 2-D image, axes (batch, y, x, channel), {model.input_channels} channel(s), any grey values.
Each side must be {smallest} + n * {step} pixels (n = 0, 1, 2, ...), for example {tile}.
The pre-processing normalises each image to zero mean and unit variance over all its
pixels, as in training: normalise the whole image, not each tile, to get the project's
own results.

## Output

The per-pixel softmax over the classes ({", ".join(output_axes(config)[-1]["channel_names"])}),
axes (batch, y, x, class). The network's convolutions are unpadded, so each side of the
output is {2 * border} pixels shorter than the input's: it covers the input less
{border} pixels on every border. To segment a whole image, tile it with an overlap of
{border} pixels on every side and extend it by mirroring at its borders. The project
calls a pixel cell where its probability exceeds {config.predict.threshold}.

## Files

`model.keras` (keras_v3) loads with `keras.saving.load_model("model.keras", compile=False)`,
Keras 3 with the TensorFlow backend. `test_input.npy` and `test_output.npy` are a tile and
the network's output for it; `cover.png` shows the tile's output window and its mask.
`sample_input.tif` and `sample_output.tif` are the same as TIFF. `rdf.yaml`'s
`config.unet_pipeline` holds the training configuration and provenance.

## Validation

`test_output.npy` is the network's output for `test_input.npy` normalised by unet-pipeline's
own training code. `bioimageio test bioimageio.zip` (bioimageio.core) reproduces it from the
description alone, for the keras_v3 weights, and runs the network on the three smallest
valid sizes with batches of 1 and 2; unet-pipeline's own tests run that check on a trained
model.
"""


def package_files(
    model: keras.Model, config: Config, version: int, image: np.ndarray | None, provenance: dict | None,
) -> dict[str, bytes]:
    """Every file of the package by name, rdf.yaml first."""
    tile = example_tile(image, config)
    probabilities = predict_tile(model, tile)
    files = {}
    for name, array in (("test_input.npy", tile[None]), ("test_output.npy", probabilities)):
        buffer = bytes_io.BytesIO()
        np.save(buffer, array)
        files[name] = buffer.getvalue()
    for name, array in (("sample_input.tif", tile), ("sample_output.tif", probabilities[0])):
        buffer = bytes_io.BytesIO()
        # The layout tifffile picks today, stated: unstated, 3 or 4 channels draw its warning
        # that a later version will store them as separate grey pages.
        tifffile.imwrite(buffer, array, photometric="rgb" if array.shape[-1] in (3, 4) else "minisblack")
        files[name] = buffer.getvalue()
    files |= weight_files(model)
    files["cover.png"] = _png(cover(tile, probabilities, config))
    files["README.md"] = readme(config, version).encode()
    rdf = yaml.safe_dump(description(config, version, files, provenance), sort_keys=False)
    return {RDF: rdf.encode()} | files


def onnx_available() -> bool:
    """Whether tf2onnx is installed (the `onnx` extra), so that the package gets ONNX weights."""
    return importlib.util.find_spec("tf2onnx") is not None


def weight_files(network: keras.Model) -> dict[str, bytes]:
    """The network in each weight format, by file name: keras_v3, SavedModel and, with tf2onnx, ONNX."""
    files = {WEIGHTS: _keras_file(network), SAVED_MODEL: _saved_model_zip(network)}
    if onnx_available():
        files[ONNX] = _onnx_file(network)
    return files


def _endpoint(network: keras.Model) -> tuple[tf.types.experimental.PolymorphicFunction, tf.TensorSpec]:
    """The network as a function of a float32 batch [B, y, x, C] returning {OUTPUT: probabilities}.

    A dict, because bioimageio.core's SavedModel adapter takes its outputs from one.
    """
    spec = tf.TensorSpec([None, None, None, network.input_shape[-1]], tf.float32, INPUT)
    return tf.function(lambda batch: {OUTPUT: network(batch, training=False)}), spec


def _saved_model_zip(network: keras.Model) -> bytes:
    """The network as a SavedModel (endpoint `serve`), zipped: the spec's tensorflow_saved_model_bundle."""
    function, spec = _endpoint(network)
    archive = keras.export.ExportArchive()
    archive.track(network)
    archive.add_endpoint(SAVED_MODEL_ENDPOINT, function, input_signature=[spec])
    with tempfile.TemporaryDirectory() as folder:
        archive.write_out(folder, verbose=False)
        return _zip({path.relative_to(folder).as_posix(): path.read_bytes()
                     for path in sorted(Path(folder).rglob("*")) if path.is_file()})


def _onnx_file(network: keras.Model) -> bytes:
    """The network as ONNX (opset ONNX_OPSET), converted by tf2onnx from the same function."""
    import tf2onnx  # the `onnx` extra: only where onnx_available()

    function, spec = _endpoint(network)
    proto, _ = tf2onnx.convert.from_function(function, input_signature=[spec], opset=ONNX_OPSET)
    return proto.SerializeToString()


def _zip(files: dict[str, bytes]) -> bytes:
    """A zip archive of `files` (name -> bytes), deflated, every member of mode MEMBER_MODE."""
    buffer, now = bytes_io.BytesIO(), time.localtime()[:6]
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            member = zipfile.ZipInfo(name, date_time=now)
            member.external_attr = MEMBER_MODE << 16
            archive.writestr(member, data, zipfile.ZIP_DEFLATED)
    return buffer.getvalue()


def _keras_file(model: keras.Model) -> bytes:
    """The model as a .keras file's bytes (Keras saves only to a path ending in .keras)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / WEIGHTS
        keras.saving.save_model(model, path)
        return path.read_bytes()


def _png(picture: np.ndarray) -> bytes:
    """An 8-bit grey picture as PNG bytes."""
    encoded, data = cv2.imencode(".png", picture)
    if not encoded:  # the pipeline's own picture: a bug, not a user's input
        raise ValueError(f"OpenCV could not encode a {picture.dtype} array of shape {picture.shape} as PNG")
    return data.tobytes()


def write_package(
    target: Path, model: keras.Model, config: Config, version: int,
    image: np.ndarray | None = None, provenance: dict | None = None,
) -> Path:
    """Writes the package zip to `target`, atomically; `image` [H, W, C] gives the test tile.

    Without tf2onnx (the `onnx` extra) the package has no ONNX weights, and a notice says so.

    `model` is the network for inference (as `inference.segmenter.load_model` gives it), so the
    weights hold no training state.
    """
    if not onnx_available():  # never silently a package with fewer weights
        print(ONNX_NOTICE, flush=True)
    package = _zip(package_files(model, config, version, image, provenance))
    with io.atomic_path(target) as temporary:
        temporary.write_bytes(package)
    return target


def keras_weights(package: Path) -> bytes:
    """The keras_v3 weights file that a package's rdf.yaml names (fine-tuning reads them).

    One line for a file that is no package of ours: not a zip, no rdf.yaml, no keras_v3
    weights, or weights the zip does not hold.
    """
    with _opened(package) as archive:
        source = _keras_weights_entry(_description(archive, package))
        if source is None:
            raise PipelineError(f"{package}: {RDF} lists no keras_v3 weights (weights: keras_v3: source)")
        if source not in archive.namelist():
            raise PipelineError(f"{package}: {RDF} names keras_v3 weights {source!r}, which the zip does not hold")
        return archive.read(source)


def trained_settings(package: Path) -> dict | None:
    """The training configuration that rdf.yaml's `config: unet_pipeline: configuration` holds
    (as `Config.to_dict` wrote it), or None for a package that holds none."""
    with _opened(package) as archive:
        description = _description(archive, package)
    settings: object = description
    for key in ("config", "unet_pipeline", "configuration"):
        settings = settings.get(key) if isinstance(settings, dict) else None
    return settings if isinstance(settings, dict) else None


def _opened(package: Path) -> zipfile.ZipFile:
    """The package's zip archive, or one line for a file that is not one."""
    if not zipfile.is_zipfile(package):
        raise PipelineError(f"{package}: not a zip archive, so not a bioimage.io package")
    return zipfile.ZipFile(package)


def _description(archive: zipfile.ZipFile, package: Path) -> object:
    """The package's rdf.yaml, read; one line where it is missing or not YAML."""
    if RDF not in archive.namelist():
        raise PipelineError(f"{package}: holds no {RDF}, so not a bioimage.io package")
    try:
        return yaml.safe_load(archive.read(RDF))
    except yaml.YAMLError as error:
        raise PipelineError(f"{package}: {RDF} is not valid YAML ({str(error).splitlines()[0]})") from None


def _keras_weights_entry(description: object) -> str | None:
    """rdf.yaml's `weights: keras_v3: source` as a name in the zip, or None where it has none."""
    weights = description.get("weights") if isinstance(description, dict) else None
    keras_v3 = weights.get("keras_v3") if isinstance(weights, dict) else None
    source = keras_v3.get("source") if isinstance(keras_v3, dict) else None
    # bioimage.io writes sources relative to the package: "./model.keras" is "model.keras".
    return source.removeprefix("./") if isinstance(source, str) else None
