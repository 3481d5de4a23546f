"""What the napari widget segments with, without Qt: the model `predict --model` reads, a layer's
pixels as that model reads them, and the cells of a probability map as `predict` labels them.

Every rule is the library's: which model a path names (`files.model_source`), the channels
of an image and a model (`io.as_model_channels`, `io.COLOUR_AS_GREY`), segmenting
(`inference.segmenter.Segmenter`, as predict's one-model `Ensemble`) and labelling
(`inference.labelling.instances`); so a layer's labels equal predict's for its pixels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Generator
from pathlib import Path

import keras
import numpy as np

from pipeline.config.schema import Config
from pipeline.errors import PipelineError
from pipeline.files import io, model_source
from pipeline.inference.labelling import instances
from pipeline.inference.segmenter import Segmenter, load_model


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model ready to segment: what the user named, the network, its settings, its segmenter."""

    named: Path
    model: keras.Model
    config: Config
    segmenter: Segmenter


def load(path: Path) -> LoadedModel:
    """The model `path` names, in any form `predict --model` takes (`model_source.KINDS`); one
    line for a path that names none. Loaded inside `opened`: a package's weights exist only there."""
    with model_source.opened([Path(path)]) as [source]:
        model = load_model(source.file)
    return LoadedModel(source.named, model, source.config, Segmenter(model, source.config))


def model_stack(data: np.ndarray, rgb: bool, name: str, channels: int) -> np.ndarray:
    """A layer's pixels as [N, H, W, `channels`]: its last two (or, for an RGB layer, the two before
    its colour axis) axes are an image's, any before them its slices. Refused in one line naming the
    layer: fewer than two image axes, a pixel type no image file has, NaN or infinite pixels, and
    other channels than the model's (`io.as_model_channels`: grey stored as colour is grey)."""
    array = np.asarray(data)
    spatial = array.ndim - int(rgb)
    named = Path(f"layer {name}")
    if spatial < 2 or 0 in array.shape:
        raise PipelineError(f"{named}: shape {array.shape} is not an image (two axes, none empty)")
    if array.dtype.kind not in "uif":
        raise PipelineError(f"{named}: unsupported pixel type {array.dtype}")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise PipelineError(f"{named}: {np.count_nonzero(~np.isfinite(array))} NaN/infinite pixel values")
    height, width = array.shape[spatial - 2:spatial]
    stack = array.reshape(-1, height, width, array.shape[-1] if rgb else 1)
    return io.as_model_channels(stack, channels, named)


def segment(segmenter: Segmenter, stack: np.ndarray) -> Generator[int, None, np.ndarray]:
    """Segments the images of `stack` [N, H, W, C] one by one, yielding how many are done (where a
    worker reports progress and may be stopped); returns their probability of cell [N, H, W]."""
    probability = np.empty(stack.shape[:3], np.float32)
    for index, image in enumerate(stack):
        probability[index] = segmenter(image)
        yield index + 1
    return probability


def cells(probability: np.ndarray, threshold: float, method: str, min_size: int) -> np.ndarray:
    """The label image of a probability of cell of any shape [..., H, W], slice by slice, as
    predict writes NAME_labels.tif (`instances.cell_instances`, `instances.label_image`)."""
    slices = probability.reshape(-1, *probability.shape[-2:])
    labels = instances.cell_instances(slices, threshold, method, min_size)
    return instances.label_image(labels).reshape(probability.shape)
