"""Fine-tuning (`train.init_from`): the freshly built U-Net gets the weights of another model.

The weights come from another run's best model, a .keras file or a bioimage.io package
this project exported, layer by layer, once their shapes are checked against this run's
`model` section. A resumed fine-tuning takes its weights from the backup, not from
`init_from` again (`pipeline.stages.train`).
"""

from __future__ import annotations

import tempfile
import zipfile
from pathlib import Path

import keras

from pipeline.config.schema import Config
from pipeline.errors import PipelineError
from pipeline.files import bioimageio, rundir
from pipeline.files.rundir import RunDir
from pipeline.training.model import unet


# The `model` settings that fix a U-Net's weights, in the order a mismatch is reported:
# another depth changes the layers themselves, so it is named before the channel counts.
ARCHITECTURE = ("depth", "input_channels", "base_filters", "num_classes", "padding")


def initial_weights_file(init_from: str) -> Path:
    """The file `train.init_from` names: a run directory's train/best.keras, a .keras file or a package zip."""
    path = Path(init_from)
    if path.is_dir():
        return rundir.require(RunDir(path).best_model, "train")
    if path.suffix not in (".keras", ".zip"):
        raise PipelineError(f"{path}: train.init_from takes a run directory, a .keras file or a bioimage.io "
                            "package (.zip)")
    if not path.is_file():
        raise PipelineError(f"{path}: no such file (train.init_from)")
    return path


def load_initial_model(source: Path) -> keras.Model:
    """The model in `source` (from `initial_weights_file`), without its training configuration."""
    if source.suffix == ".zip":
        return _load_package(source)
    return _load_keras(source, source)


def _load_keras(path: Path, named: Path) -> keras.Model:
    """Reads a .keras file; `named` is the file the user gave, for the message."""
    # Keras answers "File not found" for a file that is there but not a zip archive.
    if not zipfile.is_zipfile(path):
        raise PipelineError(f"{named}: not a .keras model file (not a zip archive)")
    try:
        return keras.saving.load_model(path, compile=False)
    except (KeyError, OSError, ValueError) as error:
        raise PipelineError(f"{named}: cannot be read as a Keras model ({str(error).splitlines()[0]})") from None


def _load_package(path: Path) -> keras.Model:
    """The Keras model of a bioimage.io package, from the keras_v3 weights it names."""
    with tempfile.TemporaryDirectory() as folder:
        # Keras reads a path; the model is in memory once loaded, so the copy can go.
        extracted = Path(folder) / "model.keras"
        extracted.write_bytes(bioimageio.keras_weights(path))
        return _load_keras(extracted, path)


def architecture(model: keras.Model, named: Path) -> dict[str, int | str]:
    """The ARCHITECTURE settings of a U-Net that `pipeline.training.model.unet` built, read from its layers."""
    try:
        first, classifier = model.get_layer("down0_conv1"), model.get_layer("classifier")
    except ValueError:
        raise PipelineError(f"{named}: not a U-Net of this pipeline (no layers down0_conv1 and classifier)") from None
    _, _, channels, filters = first.kernel.shape
    return {
        "depth": 1 + sum(layer.name.endswith("_upconv") for layer in model.layers),  # one per level above the bottom
        "input_channels": channels,
        "base_filters": filters,
        "num_classes": classifier.kernel.shape[-1],
        # Same shapes, but the weights learnt features of zero-padded or of unpadded
        # convolutions: the skip connections' crops differ too.
        "padding": first.padding,
    }


def _weight_shapes(model: keras.Model) -> dict[str, list[tuple[int, ...]]]:
    """Each layer's weight shapes, by layer name (layers without weights left out)."""
    return {layer.name: [tuple(weight.shape) for weight in layer.weights] for layer in model.layers if layer.weights}


def copy_weights(source: keras.Model, model: keras.Model, named: Path) -> None:
    """Gives `model` the weights of `source`, layer by layer, or refuses with the first mismatch.

    The mismatch is named in the configuration's terms where it is one of ARCHITECTURE
    (`runs/a/train/best.keras: trained with model.base_filters=16, this run has 8`), else
    by layer. Nothing is copied unless every layer fits.
    """
    trained, wanted = architecture(source, named), architecture(model, named)
    for field in ARCHITECTURE:
        if trained[field] != wanted[field]:
            raise PipelineError(f"{named}: trained with model.{field}={trained[field]!r}, "
                                f"this run has {wanted[field]!r}")
    shapes, expected = _weight_shapes(source), _weight_shapes(model)
    for name in sorted(shapes.keys() | expected.keys()):
        if shapes.get(name) != expected.get(name):
            raise PipelineError(f"{named}: layer {name} has weights of shapes {shapes.get(name)}, "
                                f"this run's U-Net {expected.get(name)}")
    for name in expected:
        model.get_layer(name).set_weights(source.get_layer(name).get_weights())


def check_initial_weights(config: Config) -> None:
    """Refuses, with one line, weights that `train.init_from` names but this run's U-Net
    cannot take: for `--stage all`, before `prepare` writes anything."""
    source = initial_weights_file(config.train.init_from)
    copy_weights(load_initial_model(source), unet(config.model), source)
