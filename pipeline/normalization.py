"""Input normalisation, the one convention shared by training and inference.

A network's outputs mean something only for inputs scaled as in its training, so the
training tiles (`input_pipeline`) and every whole-image prediction (`inference`: the
predict and evaluate stages and the exported SavedModel) normalise with `normalize`.
Each image is normalised whole, before mirror padding and tiling, so that a pixel gets
the same value in every tile that contains it. An image larger than memory is never held
whole: `large_image.statistics` computes the same mean and standard deviation (this
module's rule) in one streaming pass, and each chunk is normalised with them by
`standardize`.

The rule: (image - mean) / standard deviation, over all pixels and channels of one
image, computed in float64 and returned as float32. It never depends on the image's
magnitude: an image scaled by any factor, or shifted by any offset, gives the same
normalised image up to float rounding, from 1e-30 to 1e30 and beyond (float64 holds the
squares of every float32 value, and `normalize` first divides by the largest magnitude,
so that float64 images of any finite size are safe too). There is no floor on the
standard deviation (tf.image.per_image_standardization divided by at least
1 / sqrt(number of values), which flattened faint images towards zero, so that they came
out all one class): it is 0 only for an exactly constant image, which normalises to all
zeros. The predict stage says so in a notice (`notice_constant`), since the mask of such
an image is only the model's answer to a blank input; the served model returns it silently.

A multi-channel image is normalised with one mean and one standard deviation over all
its pixels and channels, not per channel: the channels keep their ratios (the hue of an
H&E stain), and a nearly empty channel of a fluorescence composite stays dark instead of
having its noise stretched to unit variance. The 8-bit scaling of training files
(`pipeline.data.image_files`) is one linear map per image for the same reason, so that
a model trained on them sees the same normalised values as when it predicts the file.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import tensorflow as tf

_IMAGE_AXES = [-3, -2, -1]  # rows, columns and channels of one image


def normalize(images: tf.Tensor) -> tf.Tensor:
    """Zero mean, unit variance per whole image over all its channels ([H, W, C] or [N, H, W, C]),
    any dtype -> float32; a constant image -> zeros (the module's rule)."""
    # Imported here: training on Keras' JAX and PyTorch backends, where TensorFlow is not
    # installed, normalises its tiles with `normalize_array`.
    import tensorflow as tf

    values = tf.cast(images, tf.float64)
    low = tf.reduce_min(values, axis=_IMAGE_AXES, keepdims=True)
    high = tf.reduce_max(values, axis=_IMAGE_AXES, keepdims=True)
    # Dividing by the largest magnitude first keeps the squares of float64 images finite;
    # for the rest it is a no-op up to rounding (the rule is scale invariant).
    values = tf.math.divide_no_nan(values, tf.maximum(tf.abs(low), tf.abs(high)))
    centred = values - tf.reduce_mean(values, axis=_IMAGE_AXES, keepdims=True)
    # Constant means every pixel equal, tested on the pixels rather than left to the
    # rounding of the mean: a tiny deviation left by it would turn zeros into +-1. Asked
    # as "not high <= low" so that an image with NaN stays NaN, for the checks after it.
    deviation = tf.where(~(high <= low), tf.sqrt(tf.reduce_mean(tf.square(centred), axis=_IMAGE_AXES, keepdims=True)),
                         tf.zeros_like(high))
    return tf.cast(tf.math.divide_no_nan(centred, deviation), tf.float32)


def normalize_array(images: np.ndarray) -> np.ndarray:
    """`normalize` in numpy, step for step (the same float64 arithmetic): for the training tiles
    of Keras' JAX and PyTorch backends (`pipeline.training.numpy_tiles`), which have no TensorFlow."""
    values = np.asarray(images, np.float64)
    axes = tuple(_IMAGE_AXES)
    low, high = values.min(axis=axes, keepdims=True), values.max(axis=axes, keepdims=True)
    scale = np.maximum(np.abs(low), np.abs(high))
    with np.errstate(invalid="ignore", divide="ignore"):
        values = np.where(scale == 0, 0.0, values / scale)  # divide_no_nan
        centred = values - values.mean(axis=axes, keepdims=True)
        deviation = np.where(~(high <= low), np.sqrt(np.mean(np.square(centred), axis=axes, keepdims=True)), 0.0)
        return np.where(deviation == 0, 0.0, centred / deviation).astype(np.float32)


def standardize(values: np.ndarray, mean: float, deviation: float) -> np.ndarray:
    """float32 (values - mean) / deviation in float64, as `normalize` does with an image's own
    mean and standard deviation; zeros where `deviation` is 0 (a constant image)."""
    if deviation == 0:
        return np.zeros(values.shape, np.float32)
    return ((values.astype(np.float64) - mean) / deviation).astype(np.float32)


def notice_constant(images: np.ndarray, source: object) -> None:
    """Prints `constant_notice` for each constant image of an [N, H, W, C] stack read from `source`."""
    for index, image in enumerate(images):
        value = image.flat[0]
        if (image == value).all():
            print(constant_notice(source if len(images) == 1 else f"{source} slice {index}", value), file=sys.stderr)


def constant_notice(source: object, value: float) -> str:
    """The notice for an image whose every pixel is `value`, which `normalize` makes all zeros."""
    return (f"notice: {source}: constant image (every pixel {value:g}): normalised to zeros, so its mask is "
            "only the model's answer to a blank image")
