"""The BioImage Model Zoo package of an export version: the network for the zoo's tools.

One zip, `bioimage.io` model description format 0.5 (FORMAT_VERSION):

    rdf.yaml          the description: axes, sizes, pre- and post-processing, files and their SHA-256
    model.keras       keras_v3 weights: the zoo network (`zoo_network`), without training state
    tf_saved_model.zip  tensorflow_saved_model_bundle weights: the same network as a SavedModel
                      (endpoint `serve`, returning {"probabilities": ...}), zipped as the spec asks
    model.onnx        onnx weights, converted by tf2onnx (the `onnx` extra; without it the package
                      has the other two, and the export says so)
    test_input.npy    the center of the example image [1, y, x, C] float32, at most
                      `predict.tile_size` on a side, as read (before normalisation)
    test_output.npy   the model's mask for it [1, y, x, classes] (after the post-processing)
    sample_input.tif, sample_output.tif   the same two as TIFF, for people and viewers
    cover.png         the test input beside its mask: image pixels only, no padding
    README.md         what the model expects and gives, its training data and run, its citation

Conventions of the description:
- Tensors are (batch, y, x, channel), as Keras takes them. The zoo network takes an image
  of any size from `minimum_size` up: it mirror-pads it to the next valid tile size,
  as overlap-tile prediction does (the context on the top and left, whatever completes a
  valid size on the bottom and right), runs the U-Net once and crops the output back to
  the input's size. So each side is a `ParameterizedSize` with step 1 and the output a
  `SizeReference` to the input's, without offset or halo, and the mask equals `predict`'s.
- Pre-processing is the training's `normalize`, spelled as the spec's
  `zero_mean_unit_variance` over y, x and channel of each image. `normalize` divides by
  the standard deviation (a constant image gives zeros), the spec by std + eps (eps =
  1e-6, its default and what bioimageio.core applies whatever the file says): the two
  agree to a relative 1e-6 / std, so to 1e-6 for grey-value images (std >= 1), and differ
  only for images with a standard deviation near 1e-6 or below, which the spec flattens.
- The output is the network's softmax binarized at `predict.threshold` (the spec's
  `binarize`, `p > threshold` as `predict`): channel `cell` is the mask. Without the
  post-processing (`bioimageio predict --skip-postprocessing`), the softmax itself.
- authors, maintainers and git_repo come from the `export` settings, the training data
  (data set, its settings, the run) from the configuration and the provenance.
- Validated by bioimageio.spec when it is installed, before the package is written: an
  invalid description is refused in one line.

Written as plain YAML, so that exporting needs no `bioimageio` package; the tests check
the package with the zoo's own validator and model test (`bioimageio.core.test_model`),
for each of the three weight formats.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.util
import io as bytes_io
import stat
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

from pipeline import quiet
from pipeline.config.schema import Config
from pipeline.data import DATASETS
from pipeline.data.synthetic import synthetic_em_image
from pipeline.display import grey8
from pipeline.errors import PipelineError
from pipeline.mirror import mirror_indices
from pipeline.files import io
from pipeline.normalization import normalize
from pipeline.sizes import alignment, context, smallest_input_size

FORMAT_VERSION = "0.5.12"  # the newest the zoo's validator (bioimageio.spec 0.5.12) knows
LICENSE = "CC-BY-4.0"  # the repository has no license of its own; the zoo's usual one for models
CITATION = {
    "text": "Ronneberger, O., Fischer, P. and Brox, T. U-Net: Convolutional Networks for Biomedical "
            "Image Segmentation. MICCAI 2015, LNCS 9351, 234-241.",
    "doi": "10.1007/978-3-319-24574-4_28",
}
INPUT, OUTPUT = "input", "mask"  # tensor ids
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
# The values the README's accuracy section states, with their names (export.HEADLINE's, in words).
ACCURACY_NAMES = {"rand_error": "Rand error", "warping_error": "warping error", "pixel_error": "pixel error",
                  "foreground_iou": "cell IoU", "seg": "SEG"}


def minimum_size(config: Config) -> int:
    """The smallest side the zoo network takes: that of the smallest valid tile's output, so
    that padding by the context on both sides gives at least the smallest valid tile."""
    return smallest_input_size(config.model.depth, config.model.padding) - 2 * context(
        config.model.depth, config.model.padding)


def input_axes(config: Config) -> list[dict]:
    """(batch, y, x, channel), each side any size from `minimum_size`."""
    model = config.model
    size = {"min": minimum_size(config), "step": 1}
    return [
        {"type": "batch"},
        *({"type": "space", "id": side, "size": dict(size)} for side in ("y", "x")),  # dict(): no YAML alias
        {"type": "channel", "channel_names": [f"channel{i}" for i in range(model.input_channels)]},
    ]


def output_axes(config: Config) -> list[dict]:
    """(batch, y, x, class): each side the input's."""
    model = config.model
    names = [*CLASS_NAMES, *(f"class{i}" for i in range(len(CLASS_NAMES), model.num_classes))]
    return [
        {"type": "batch"},
        *({"type": "space", "id": side, "size": {"tensor_id": INPUT, "axis_id": side}} for side in ("y", "x")),
        {"type": "channel", "channel_names": names[: model.num_classes]},
    ]


def zoo_network(model: keras.Model, config: Config) -> keras.Model:
    """`model` on normalised images [B, y, x, C] of any size from `minimum_size`: mirror-padded
    to the next valid tile size as overlap-tile prediction pads (`tiling.padding`), the
    U-Net run once, its output [B, y, x, classes] cropped back to the input's size.

    Built of Keras' own operations only, so that the .keras file loads wherever Keras does
    (`keras.saving.load_model`, safe mode, without this project) and converts to a
    SavedModel and ONNX as it is. A pass over the padded image equals the overlap-tile
    one: both pad the context before and align the pooling grid at the same origin.
    """
    image = keras.Input((None, None, config.model.input_channels), name=INPUT)
    padded = keras.ops.take(image, _padded_positions(image, 1, config), axis=1)
    padded = keras.ops.take(padded, _padded_positions(image, 2, config), axis=2)
    output = model(padded, training=False)
    output = keras.ops.take(output, _positions(_ones(image, 1, slice(None))), axis=1)
    output = keras.ops.take(output, _positions(_ones(image, 2, slice(None))), axis=2)
    return keras.Model(image, output, name="zoo_network")


def _ones(image: keras.KerasTensor, axis: int, part: slice) -> keras.KerasTensor:
    """Ones along `part` of spatial `axis` (1 or 2) of the first image: a length from the
    input's dynamic shape in operations that a functional model saves (Keras' `arange`
    needs a static length)."""
    key = [0, 0, 0, 0]
    key[axis] = part
    return keras.ops.ones_like(image[tuple(key)])


def _positions(ones: keras.KerasTensor) -> keras.KerasTensor:
    """0, 1, ..., len(ones) - 1."""
    return keras.ops.cast(keras.ops.cumsum(ones), "int32") - 1


def _padded_positions(image: keras.KerasTensor, axis: int, config: Config) -> keras.KerasTensor:
    """The source pixel of every position of `axis` padded to the next valid size.

    The padded side is smallest + n * alignment with n = ceil((size - minimum) / alignment),
    and n is the length of every alignment-th pixel from `minimum` on; the context comes
    first. Pixels outside the image are reflected as `pipeline.mirror` says.
    """
    depth, padding = config.model.depth, config.model.padding
    smallest, step = smallest_input_size(depth, padding), alignment(depth)
    steps = keras.ops.repeat(_ones(image, axis, slice(minimum_size(config), None, step)), step)
    padded = keras.ops.concatenate([steps, keras.ops.repeat(_ones(image, axis, slice(0, 1)), smallest)])
    size = keras.ops.cast(keras.ops.sum(_ones(image, axis, slice(None))), "int32")
    border = context(depth, padding)
    return mirror_indices(_positions(padded) - border, size, lowest=-border)


def example_input(image: np.ndarray | None, config: Config) -> np.ndarray:
    """The test input: the center of `image` [H, W, C], at most `predict.tile_size` on a side,
    as float32; without an image, a synthetic EM image of that side."""
    side, channels = config.predict.tile_size, config.model.input_channels
    if image is None:
        grey = synthetic_em_image(side, seed=0)[0]
        image = np.repeat(grey[..., None], channels, axis=-1)
    top, left = (max(0, (extent - side) // 2) for extent in image.shape[:2])
    return image[top : top + side, left : left + side].astype(np.float32)


def predict_mask(network: keras.Model, image: np.ndarray, config: Config) -> np.ndarray:
    """The zoo network's output for one image [y, x, C], normalised as in training, and binarized
    as the description's post-processing does: [1, y, x, classes], 1.0 where p > threshold."""
    probabilities = network(normalize(tf.constant(image[None])), training=False).numpy()
    if not np.isfinite(probabilities).all():
        raise PipelineError("BioImage Model Zoo package: the model's output for the test input is not finite")
    return (probabilities > config.predict.threshold).astype(np.float32)


def cover(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The test input (first channel, 8-bit) beside its cell mask: image pixels only, no padding."""
    return np.concatenate([grey8(image[..., 0]), np.where(mask[0, ..., 1] > 0, 255, 0).astype(np.uint8)], axis=1)


def _file(name: str, files: dict[str, bytes]) -> dict:
    """A file entry of the description: its name in the package and its SHA-256."""
    return {"source": name, "sha256": hashlib.sha256(files[name]).hexdigest()}


def _names(field: str) -> list[str]:
    """The names of an `export` setting that lists them separated by ";"."""
    return [name.strip() for name in field.split(";") if name.strip()]


def people(config: Config) -> dict:
    """authors, maintainers (GitHub users) and git_repo of the description, from `export`."""
    export = config.export
    entries = {"authors": [{"name": name} for name in _names(export.authors)],
               "maintainers": [{"github_user": user} for user in _names(export.maintainers)]}
    return entries | ({"git_repo": export.git_repo} if export.git_repo else {})


def training_data(config: Config, provenance: dict | None) -> str:
    """What the model learnt from, in words: the data set, its own settings, the run."""
    data = config.data
    settings = ", ".join(f"data.{name}={getattr(data, name)}" for name in DATASETS[data.dataset].settings)
    where = f" from {data.data_dir}" if data.data_dir else ""
    run = (provenance or {}).get("run_dir")
    return (f"data set `{data.dataset}`{where} ({settings}), seed {config.train.seed}"
            + (f"; run {run}, model SHA-256 {provenance['model_sha256']}" if run else ""))


def description(config: Config, version: int, files: dict[str, bytes], provenance: dict | None) -> dict:
    """The model description (rdf.yaml) of the package whose other files are `files`."""
    model = config.model
    return {
        "format_version": FORMAT_VERSION,
        "type": "model",
        "name": "U-Net cells and membranes (unet-pipeline)",
        "description": (
            f"U-Net (Ronneberger et al. 2015) trained by unet-pipeline on {training_data(config, provenance)}: "
            f"mask of {', '.join(CLASS_NAMES)} per pixel for an image of any size, {model.padding} convolutions, "
            f"depth {model.depth}, {model.base_filters} channels at the first level."
        ),
        "version": version,
        **people(config),
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
            "description": f"1 where the softmax of the class exceeds {config.predict.threshold}, else 0; "
                           "channel cell is predict's mask",
            "axes": output_axes(config),
            "test_tensor": _file("test_output.npy", files),
            "sample_tensor": _file("sample_output.tif", files),
            "data": {"type": "float32", "range": [0.0, 1.0]},
            "postprocessing": [{"id": "binarize", "kwargs": {"threshold": config.predict.threshold}}],
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


def accuracy(provenance: dict | None) -> str:
    """What is known of the model's accuracy, in words: its evaluation on images that were or were not
    held out (as the report says), and the accuracy a cross-validation of its recipe estimates."""
    provenance = provenance or {}
    lines = []
    evaluation = provenance.get("evaluation")
    if evaluation:
        values = ", ".join(f"{name} {evaluation[key]:.4g}" for key, name in ACCURACY_NAMES.items() if key in evaluation)
        lines.append(f"Scored by unet-pipeline's `evaluate` on the {evaluation['split']} split of "
                     f"`{evaluation['dataset']}`: {values}{_segmentation(evaluation.get('segmentation'))}. "
                     f"Model selection: {evaluation.get('model_selection') or 'not recorded'}.")
    else:
        lines.append(f"No evaluation of this model was recorded ({provenance.get('evaluation_note', 'none given')}).")
    estimate = provenance.get("crossval_estimate")
    if estimate:
        spread = estimate["across_folds"]
        values = ", ".join(f"{name} {spread[key]['mean']:.4g} (sd {spread[key]['std']:.2g})"
                           for key, name in ACCURACY_NAMES.items() if key in spread)
        lines.append(f"Estimated by a {estimate['folds']}-fold cross-validation of the same recipe over "
                     f"{estimate['slices']} labelled images ({estimate['crossval']}; {estimate['steps']:,} steps, "
                     f"seed {estimate['seed']}, test-time averaging "
                     f"{'on' if estimate['test_time_augmentation'] else 'off'}): each fold's model scored on the "
                     f"images it never saw, the mean (and standard deviation) over the folds: {values}; "
                     f"warping error pooled over all images {estimate['pooled_warping_error']:.4g}"
                     f"{_segmentation(estimate.get('segmentation'))}.")
    return "\n\n".join(lines)


def _segmentation(method: str | None) -> str:
    """How the errors' cells were separated, in words where it is not the challenge's reading of the map."""
    if method in (None, "components"):  # records written before the setting are components'
        return ""
    return (f" (the cells at each threshold as `predict.instances={method}` separates them, not each 4-connected "
            "component as the challenge reads a map)")


def readme(config: Config, version: int, provenance: dict | None) -> str:
    """The package's documentation: what goes in, what comes out, where it came from."""
    model = config.model
    smallest = minimum_size(config)
    classes = ", ".join(output_axes(config)[-1]["channel_names"])
    return f"""# U-Net cells and membranes (unet-pipeline, export version {version})

The segmentation network of Ronneberger, Fischer and Brox, *U-Net: Convolutional Networks
for Biomedical Image Segmentation* (MICCAI 2015, doi:10.1007/978-3-319-24574-4_28),
trained by unet-pipeline: depth {model.depth}, {model.base_filters} channels at the first
level, {model.padding} convolutions.

## Input

A 2-D image of any size, at least {smallest} pixels on a side, axes (batch, y, x, channel),
{model.input_channels} channel(s), any grey values. The pre-processing normalises each
image to zero mean and unit variance over all its pixels, as in training.

## Output

A mask of the input's size, axes (batch, y, x, class), classes {classes}: 1 where the
class's softmax exceeds {config.predict.threshold} (the post-processing `binarize`), else 0;
channel `cell` is the mask that unet-pipeline's `predict` writes. Without the
post-processing (`bioimageio predict --skip-postprocessing`) the softmax itself.

The network extends the image by mirroring at its borders to the next size the U-Net
takes and crops its output back, as unet-pipeline's overlap-tile prediction does: the
mask of a whole image is the project's own. A tool that cuts an image into blocks gets
another result near the blocks' borders; give it the whole image.

## Training data

{training_data(config, provenance)}. `rdf.yaml`'s `config.unet_pipeline` holds the whole
training configuration and the run's provenance (its evaluation, when it had one).

## Accuracy

{accuracy(provenance)} The metrics: unet-pipeline's docs/evaluation.md (errors: lower is better).

## Files

Three weight formats of the same network, each reproducing `test_output.npy` from
`test_input.npy`: `model.keras` (keras_v3; `keras.saving.load_model("model.keras")`, Keras 3
with the TensorFlow backend), `tf_saved_model.zip` (a TensorFlow SavedModel, endpoint
`serve`) and, where the exporter had tf2onnx, `model.onnx` (ONNX opset {ONNX_OPSET}), which
deepImageJ, QuPath and ONNX Runtime run. `test_input.npy` is the center of an image the
model was validated on, `cover.png` shows it beside its mask, `sample_input.tif` and
`sample_output.tif` are the two as TIFF.

## Validation

`bioimageio test bioimageio.zip` (bioimageio.core) checks the description, reproduces the
test output with each weight format, and runs the network on the three smallest sizes with
batches of 1 and 2; unet-pipeline's tests run it on a trained model, and compare
`bioimageio predict` with the project's `predict` on images of 384, 512, 700 x 1000 and
2048 pixels.
"""


def package_contents(model: keras.Model, config: Config, image: np.ndarray | None = None) -> dict[str, bytes]:
    """The package's files that do not depend on its version, by name: the test and sample
    tensors, the weights and the cover. The long part (the weight formats), so that an export
    makes it before it takes the export root's lock. `model` is the U-Net, which the package
    holds as its `zoo_network`; `image` [H, W, C] gives the test tile (default: synthetic).

    Without tf2onnx (the `onnx` extra) there are no ONNX weights, and a notice says so.
    """
    if not onnx_available():  # never silently a package with fewer weights
        print(ONNX_NOTICE, flush=True)
    network = zoo_network(model, config)
    tile = example_input(image, config)
    probabilities = predict_mask(network, tile, config)
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
    files |= weight_files(network)
    files["cover.png"] = _png(cover(tile, probabilities))
    return files


def package_files(
    contents: dict[str, bytes], config: Config, version: int, provenance: dict | None,
) -> dict[str, bytes]:
    """Every file of the package by name, rdf.yaml first: `contents` (`package_contents`) with
    the README and the description of this version."""
    files = contents | {"README.md": readme(config, version, provenance).encode()}
    rdf = yaml.safe_dump(description(config, version, files, provenance), sort_keys=False)
    return {RDF: rdf.encode()} | files


def onnx_available() -> bool:
    """Whether tf2onnx is installed (the `onnx` extra), so that the package gets ONNX weights."""
    return importlib.util.find_spec("tf2onnx") is not None


def weight_files(network: keras.Model) -> dict[str, bytes]:
    """The network in each weight format, by file name: keras_v3, SavedModel and, with tf2onnx, ONNX."""
    files = {WEIGHTS: _keras_file(network), SAVED_MODEL: _saved_model_zip(network)}
    if onnx_available():
        files[ONNX] = onnx_file(network)
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


def onnx_file(network: keras.Model) -> bytes:
    """The network as ONNX (opset ONNX_OPSET), converted by tf2onnx from the same function: any
    Keras model of [B, y, x, C] float32 images (the zoo network, or the bare U-Net on tiles)."""
    import tf2onnx  # the `onnx` extra: only where onnx_available()

    function, spec = _endpoint(network)
    with quiet.device_probe_hidden():
        proto, _ = tf2onnx.convert.from_function(function, input_signature=[spec], opset=ONNX_OPSET)
    return proto.SerializeToString()


def _zip(files: dict[str, bytes]) -> bytes:
    """A zip archive of `files` (name -> bytes), deflated, every member of mode MEMBER_MODE."""
    buffer, now = bytes_io.BytesIO(), time.localtime()[:6]
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            member = zipfile.ZipInfo(name, date_time=now)
            member.external_attr = (stat.S_IFREG | MEMBER_MODE) << 16  # a regular file, as zipfile marks one
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
    target: Path, contents: dict[str, bytes], config: Config, version: int, provenance: dict | None = None,
) -> Path:
    """Writes the package zip of `contents` (`package_contents`) as `version` to `target`,
    atomically, once bioimageio.spec (where installed) finds its description valid."""
    package = _zip(package_files(contents, config, version, provenance))
    with io.atomic_path(target) as temporary:
        temporary.write_bytes(package)
        validate(temporary)
    return target


def validate(package: Path) -> None:
    """Refuses, in one line, a package that bioimageio.spec (where installed) finds invalid.

    The checks of the description, without running the network (what `bioimageio test`
    adds). Settings reach the description unchecked by the
    configuration (`export.git_repo`, `export.maintainers`), so this is their check.
    """
    if importlib.util.find_spec("bioimageio") is None or importlib.util.find_spec("bioimageio.spec") is None:
        return
    from bioimageio.spec import InvalidDescr, load_description

    # Without its I/O checks, which would fetch git_repo and the citation's DOI: an export needs no network.
    described = load_description(package, perform_io_checks=False)
    if isinstance(described, InvalidDescr):
        error = described.validation_summary.errors[0]
        where = ".".join(str(part) for part in error.loc)
        raise PipelineError(f"BioImage Model Zoo package: rdf.yaml is invalid at {where}: {error.msg}")


def keras_weights(package: Path) -> bytes:
    """The U-Net of a package's keras_v3 weights, as a .keras file (fine-tuning and `--model` read it).

    The package holds its `zoo_network`, which wraps the U-Net; a package written before
    holds the U-Net itself.

    One line for a file that is no package of ours: not a zip, no rdf.yaml, no keras_v3
    weights, or weights the zip does not hold.
    """
    with _opened(package) as archive:
        source = _keras_weights_entry(_description(archive, package))
        if source is None:
            raise PipelineError(f"{package}: {RDF} lists no keras_v3 weights (weights: keras_v3: source)")
        if source not in archive.namelist():
            raise PipelineError(f"{package}: {RDF} names keras_v3 weights {source!r}, which the zip does not hold")
        weights = archive.read(source)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / WEIGHTS
        path.write_bytes(weights)
        network = keras.saving.load_model(path, compile=False)
    inner = [layer for layer in network.layers if isinstance(layer, keras.Model)]
    return _keras_file(inner[0]) if network.name == "zoo_network" and inner else weights


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
