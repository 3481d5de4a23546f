"""Reading one image or label file, the way every data set that reads files does.

Images that are not 8-bit (the CTC's 16-bit frames, 16-bit or float user images) are
scaled robustly to 8 bits per image: the 1st and 99.8th percentiles map to 0 and 255,
values beyond are clipped, so that a few hot or dead pixels do not squash the contrast.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline import io
from pipeline.errors import PipelineError

# Robust 8-bit scaling: these percentiles of each image map to 0 and 255 (as in CSBDeep).
PERCENTILES = (1.0, 99.8)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """An image as uint8: 8-bit images unchanged, others scaled robustly by percentiles.

    The `PERCENTILES` (1st, 99.8th) of the image map to 0 and 255; values beyond are
    clipped. A constant image becomes all 0.
    """
    if image.dtype == np.uint8:
        return image
    low, high = np.percentile(image, PERCENTILES)
    if not high > low:
        return np.zeros(image.shape, np.uint8)
    scaled = (image.astype(np.float64) - low) / (high - low)
    return np.round(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)


def read_grey_image(path: Path) -> np.ndarray:
    """One grey image file as [H, W, 1] uint8 (see `to_uint8`); a stack or colour image is refused."""
    return to_uint8(_one_image(path))[..., None]


def _one_image(path: Path) -> np.ndarray:
    """The one grey [H, W] image of a file (colour by `io.COLOUR_AS_GREY`); a stack is refused."""
    stack = io.read_stack(path)
    if len(stack) != 1:
        raise PipelineError(f"{path}: expected one image, got a stack of {len(stack)}")
    return stack[0, ..., 0]


def read_label_image(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """A label image (0 = background, k > 0 = object k) as int32, checked against its image's shape."""
    labels = _one_image(path)
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
