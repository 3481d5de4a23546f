"""Mirror padding, the one border rule of the U-Net paper (Ronneberger et al. 2015, fig. 2).

Images are extended past their borders by reflection without repeating the edge pixel:
[a b c d] padded by 2 reads [c b | a b c d | c b]. This is numpy's 'reflect', TF's
'REFLECT' and OpenCV's BORDER_REFLECT_101. Pads larger than the image reflect repeatedly,
as numpy does, and an axis of one pixel repeats that pixel.

This module is the rule's one owner, in these forms:

- `mirror_pad`: tensors. Overlap-tile prediction (`tiling`, `large_image`) pads whole
  images by the network's context, the bicubic warp (`elastic_warp`) a batch by the 2 px
  its taps reach.
- `mirror_pad_array`: numpy arrays. The data sets pad smaller images to a split's size
  (`data.base`), training pads images and labels by the context and joins splits
  (`training.input_pipeline`).
- `mirror_indices`: integer positions in Keras operations, on any backend, which the zoo
  package's network gathers to pad inside a model file that loads without this project
  (`files.bioimageio`).
- `mirror_positions`: float positions, which the elastic warp's samplers mirror once per
  pixel instead of padding; `mirror_positions_array` the same in numpy, for the warp of
  the training tiles on Keras' JAX and PyTorch backends (`training.numpy_tiles`).

The compiled warp kernel (`warp_kernel.cc`) has its own C++ padding of the same rule.
TensorFlow is imported inside the functions that use it: the data sets pad with numpy,
and `config.resolve` imports them to check a configuration without loading TensorFlow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    import tensorflow as tf


def mirror_pad_array(array: np.ndarray, pads: Sequence[tuple[int, int]]) -> np.ndarray:
    """Pads the first `len(pads)` axes of `array` by mirror reflection, (before, after) each;
    the other axes (channels) not at all. Any pad size, as `mirror_pad`."""
    return np.pad(array, [*pads] + [(0, 0)] * (array.ndim - len(pads)), mode="reflect")


def _reflect_indices(size: tf.Tensor, before: tf.Tensor, after: tf.Tensor) -> tf.Tensor:
    """Source index of every position of an axis of length `size` padded by reflection."""
    import tensorflow as tf

    # Reflection without repeating the edge is periodic with period 2 * (size - 1), so
    # folding one period reproduces numpy's repeated reflection for pads of any size.
    # A size-1 axis has no period; numpy repeats its one pixel, as index 0 everywhere does.
    period = tf.maximum(2 * (size - 1), 1)
    folded = tf.math.floormod(tf.range(-before, size + after), period)
    return tf.minimum(folded, period - folded)


def mirror_indices(positions, size, lowest: int):
    """Source index of integer `positions` (Keras tensors, none below `lowest` <= 0) on an
    axis of `size` pixels (a scalar int32 tensor), in Keras operations: `_reflect_indices`'
    fold for models that must not hold TensorFlow code.
    """
    import keras

    period = keras.ops.maximum(2 * (size - 1), 1)
    # Shifted by whole periods to stay positive: tf2onnx's integer Mod takes the dividend's
    # sign, TensorFlow's floormod the divisor's; they agree on positive numbers.
    folded = keras.ops.mod(positions - lowest * period, period)
    return keras.ops.minimum(folded, period - folded)


def _within(size: int | None, before, after) -> bool:
    """Whether Python int pads on both sides of a static axis are below its size, as tf.pad's REFLECT needs."""
    return isinstance(before, int) and isinstance(after, int) and size is not None and max(before, after) < size


def mirror_pad(images: tf.Tensor, top, bottom, left, right) -> tf.Tensor:
    """Pads [..., H, W, C] to [..., H + top + bottom, W + left + right, C] by mirror reflection.

    Works for [H, W, C] and batches [B, H, W, C] alike, for any pad size, unlike
    `tf.pad(mode='REFLECT')`. Pads may be Python ints or scalar int32 tensors; H and W
    may be dynamic.
    """
    import tensorflow as tf

    images = tf.convert_to_tensor(images)
    height, width = (None, None) if images.shape.rank is None else images.shape[-3:-1]
    if _within(height, top, bottom) and _within(width, left, right):
        # Slices and reversals, which XLA vectorises better than the gathers below, which
        # tiny images and tensor pads need.
        paddings = [[0, 0]] * (images.shape.rank - 3) + [[top, bottom], [left, right], [0, 0]]
        return tf.pad(images, paddings, mode="REFLECT")
    top, bottom, left, right = (tf.cast(pad, tf.int32) for pad in (top, bottom, left, right))
    shape = tf.shape(images)
    rows = tf.gather(images, _reflect_indices(shape[-3], top, bottom), axis=-3)
    return tf.gather(rows, _reflect_indices(shape[-2], left, right), axis=-2)


def mirror_positions(position: tf.Tensor, size) -> tf.Tensor:
    """Mirrors float positions on an axis of `size` pixels into [0, size - 1], the edge pixel
    not repeated: a whole position lands on the pixel `mirror_pad` repeats there.

    Exact (no rounding) up to about three image sizes beyond either edge; farther out 0,
    and size - 1 for NaN: never a position outside the image.
    """
    import tensorflow as tf

    last = tf.cast(size - 1, tf.float32)
    # Each pass mirrors once about 0 and once about `last`; two passes cover
    # |p| <= 4 * last, about 3 image sizes beyond either edge. No rounding either: |p| is
    # exact, and so is 2 * last - p wherever the minimum takes it (Sterbenz's lemma:
    # last <= p <= 4 * last), so the fractions of mirrored positions are those of the
    # unmirrored ones.
    for _ in range(2):
        position = tf.abs(position)
        position = tf.minimum(position, 2 * last - position)
    # Farther out, the passes leave a negative position: 0. A NaN fails `<=`: the last pixel.
    return tf.where(position <= last, tf.maximum(position, 0.0), last)


def mirror_positions_array(position: np.ndarray, size: int) -> np.ndarray:
    """`mirror_positions` in numpy, step for step (float32 in, float32 out)."""
    position = np.asarray(position, np.float32)
    last = np.float32(size - 1)
    for _ in range(2):
        position = np.abs(position)
        position = np.minimum(position, 2 * last - position)
    with np.errstate(invalid="ignore"):
        return np.where(position <= last, np.maximum(position, np.float32(0)), last)
