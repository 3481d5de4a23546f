"""Mirror padding, the one border rule of the U-Net paper (Ronneberger et al. 2015, fig. 2).

Images are extended past their borders by reflection without repeating the edge pixel:
[a b c d] padded by 2 reads [c b | a b c d | c b]. This is numpy's 'reflect' (so the
`np.pad(..., mode="reflect")` calls on numpy arrays elsewhere pad the same way), TF's
'REFLECT' and OpenCV's BORDER_REFLECT_101. Pads larger than the image reflect repeatedly,
as numpy does, and an axis of one pixel repeats that pixel.

Overlap-tile prediction (`tiling`) pads whole images by the network's context, and the
bicubic warp (`elastic_warp`) pads a batch by the 2 px its taps reach; both call
`mirror_pad`. The compiled warp kernel (`warp_kernel.cc`) has its own C++ padding of
the same rule.
"""

from __future__ import annotations

import tensorflow as tf


def _reflect_indices(size: tf.Tensor, before: tf.Tensor, after: tf.Tensor) -> tf.Tensor:
    """Source index of every position of an axis of length `size` padded by reflection."""
    # Reflection without repeating the edge is periodic with period 2 * (size - 1), so
    # folding one period reproduces numpy's repeated reflection for pads of any size.
    # A size-1 axis has no period; numpy repeats its one pixel, as index 0 everywhere does.
    period = tf.maximum(2 * (size - 1), 1)
    folded = tf.math.floormod(tf.range(-before, size + after), period)
    return tf.minimum(folded, period - folded)


def _within(size: int | None, before, after) -> bool:
    """Whether Python int pads on both sides of a static axis are below its size, as tf.pad's REFLECT needs."""
    return isinstance(before, int) and isinstance(after, int) and size is not None and max(before, after) < size


def mirror_pad(images: tf.Tensor, top, bottom, left, right) -> tf.Tensor:
    """Pads [..., H, W, C] to [..., H + top + bottom, W + left + right, C] by mirror reflection.

    Works for [H, W, C] and batches [B, H, W, C] alike, for any pad size, unlike
    `tf.pad(mode='REFLECT')`. Pads may be Python ints or scalar int32 tensors; H and W
    may be dynamic.
    """
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
