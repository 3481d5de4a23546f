"""A layer's pixels as a model reads them, and the cells of a probability map as `predict` labels
them: the parts of segmenting that need no network, so napari's process does them without TensorFlow.

Every rule is the library's: the channels of an image and a model (`io.as_model_channels`,
`io.COLOUR_AS_GREY`) and labelling (`inference.labelling.instances`); the network runs in
the model process (`child`, with `inference.segmenter.Segmenter`, as predict's one-model
`Ensemble`), so a layer's labels equal predict's for its pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.files import io
from pipeline.inference.labelling import instances


def model_stack(data: np.ndarray, rgb: bool, name: str, channels: int) -> np.ndarray:
    """A layer's pixels as [N, H, W, `channels`]: its last two (or, for an RGB layer, the two before
    its colour axis) axes are an image's, any before them its slices. Refused in one line naming the
    layer: fewer than two image axes, a pixel type no image file has, pixels the network cannot read
    (`io.unreadable_pixels`), and other channels than the model's (`io.as_model_channels`: grey
    stored as colour is grey)."""
    array = np.asarray(data)
    spatial = array.ndim - int(rgb)
    named = Path(f"layer {name}")
    if spatial < 2 or 0 in array.shape:
        raise PipelineError(f"{named}: shape {array.shape} is not an image (two axes, none empty)")
    if array.dtype.kind not in "uif":
        raise PipelineError(f"{named}: unsupported pixel type {array.dtype}")
    if count := io.unreadable_pixels(array):
        raise io.unreadable_pixels_error(named, count)
    height, width = array.shape[spatial - 2:spatial]
    stack = array.reshape(-1, height, width, array.shape[-1] if rgb else 1)
    return io.as_model_channels(stack, channels, named)


def cells(probability: np.ndarray, threshold: float, method: str, min_size: int) -> np.ndarray:
    """The label image of a probability of cell of any shape [..., H, W], slice by slice, as
    predict writes NAME_labels.tif (`instances.cell_instances`, `instances.label_image`)."""
    slices = probability.reshape(-1, *probability.shape[-2:])
    labels = instances.cell_instances(slices, threshold, method, min_size)
    return instances.label_image(labels).reshape(probability.shape)
