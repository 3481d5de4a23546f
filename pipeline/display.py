"""Pictures for people: values scaled to 8-bit grey for panels, overlays and TensorBoard.

Its own module because the training callbacks, the evaluation report and the predict
stage all draw pictures, and none of them should import another for that.
"""

from __future__ import annotations

import cv2
import numpy as np

# Default bounds of an image's grey range: these percentiles map to black and white, so
# that a few extreme pixels do not leave the rest of the picture a flat grey.
DISPLAY_PERCENTILES = (0.5, 99.5)


def grey8(values: np.ndarray, bounds: tuple[float, float] | None = None) -> np.ndarray:
    """`values` scaled linearly to uint8 grey: `bounds` (low, high) map to 0 and 255.

    Values beyond the bounds are clipped; levels are truncated, not rounded. Without
    `bounds`, the values' `DISPLAY_PERCENTILES`. Equal bounds make everything at or
    below them black and everything above white.
    """
    values = np.asarray(values, np.float64)
    low, high = np.percentile(values, DISPLAY_PERCENTILES) if bounds is None else bounds
    return np.clip((values - low) / max(high - low, 1e-12) * 255, 0, 255).astype(np.uint8)


def bgr8(image: np.ndarray) -> np.ndarray:
    """An image [H, W, C] as an 8-bit BGR picture for OpenCV (see `grey8`): in colour where
    C = 3 (RGB), else its first channel in grey.

    One grey range for all channels, as the image is normalised: its colours keep their balance.
    """
    shown = image if image.shape[-1] == 3 else image[..., :1]
    return cv2.cvtColor(grey8(shown), cv2.COLOR_RGB2BGR if shown.shape[-1] == 3 else cv2.COLOR_GRAY2BGR)
