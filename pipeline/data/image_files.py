"""Reading one image or label file, the way every data set that reads files does.

Images are read with the channels their file declares (`io.read_stack`), as many as the
model takes; a colour image meets a 1-channel model through `io.COLOUR_AS_GREY`.

Images that are not 8-bit (the CTC's 16-bit frames, 16-bit or float user images) are
scaled robustly to 8 bits per image: the 1st and 99.8th percentiles over all its pixels
and channels map to 0 and 255, values beyond are clipped, so that a few hot or dead
pixels do not squash the contrast. One scale for all channels, not one per channel: the
channels keep their ratios (the colour of a stain), and the 8-bit image stays a linear
function of the file's, which `pipeline.normalization` then standardises as it does the
raw file at prediction time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.files import io

# Robust 8-bit scaling: these percentiles of each image map to 0 and 255 (as in CSBDeep).
PERCENTILES = (1.0, 99.8)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """An image as uint8: 8-bit images unchanged, others scaled robustly by percentiles.

    The `PERCENTILES` (1st, 99.8th) of the image, over all its channels, map to 0 and
    255; values beyond are clipped. A constant image becomes all 0.
    """
    if image.dtype == np.uint8:
        return image
    low, high = np.percentile(image, PERCENTILES)
    if not high > low:
        return np.zeros(image.shape, np.uint8)
    scaled = (image.astype(np.float64) - low) / (high - low)
    return np.round(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)


def read_image(path: Path, channels: int | None = 1) -> np.ndarray:
    """One image file as [H, W, C] uint8 (see `to_uint8`); a stack is refused.

    C is `channels`, by `io.COLOUR_AS_GREY` for a colour file and a 1-channel model (a
    file with other channels is refused in one line naming it), or with None the file's own.
    """
    return to_uint8(_one_image(path, channels))


def _one_image(path: Path, channels: int | None) -> np.ndarray:
    """The one [H, W, C] image of a file (see `read_image`); a stack is refused."""
    stack = io.read_stack(path, channels)
    if len(stack) != 1:
        raise PipelineError(f"{path}: expected one image, got a stack of {len(stack)}")
    return stack[0]


def read_label_image(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """A label image (0 = background, k > 0 = object k) as int32, checked against its image's shape."""
    labels = _one_image(path, 1)[..., 0]
    if labels.dtype.kind not in "iu":
        raise PipelineError(f"{path}: unexpected label values: labels must be integers, got {labels.dtype} pixels")
    if labels.min() < 0:
        raise PipelineError(f"{path}: unexpected label values: negative label {labels.min()}")
    if labels.max() > np.iinfo(np.int32).max:
        raise PipelineError(f"{path}: unexpected label values: label {labels.max()} exceeds int32")
    if labels.shape != tuple(shape[:2]):
        raise PipelineError(
            f"{path}: labels of {labels.shape[0]}x{labels.shape[1]} px do not match "
            f"the image's {shape[0]}x{shape[1]} px"
        )
    return labels.astype(np.int32)
