"""Elastic deformation as a TensorFlow graph op (Ronneberger et al. 2015, sec. 3.1).

The paper draws random displacement vectors on a coarse 3x3 grid from a Gaussian with
10 px standard deviation and interpolates them bicubically to a per-pixel displacement
field. Warping samples the image at (y + dy, x + dx).

Everything is plain TensorFlow (no numpy, no `py_function`), so the op runs inside
`Dataset.map(num_parallel_calls=...)`, under `tf.function(jit_compile=True)` and on a GPU.
Random numbers are stateless (Philox): the same seed gives the same field, eagerly, in
`tf.data` and in a `tf.function` on CPU or GPU; under XLA the same seed gives another,
but again always the same, field.

- Field: the grid nodes span the tile corner to corner, so the corner pixels move by
  exactly the corner nodes' vectors. Interpolation is separable, `Wy @ G @ Wx^T`, with
  Keys' cubic convolution kernel (a = -0.5) over 4 nodes; taps that fall outside the grid
  take the value of the border node (edge replication, as `tf.image.resize` and OpenCV
  do). Every row of `Wy` and `Wx` sums to one, so a constant grid gives a constant field.
- Sampling: 'bicubic' (Keys a = -0.5, 4x4 taps, as OpenCV's INTER_CUBIC), 'bilinear' or
  'nearest'. Taps outside the image are mirrored without repeating the edge pixel (numpy's
  'reflect', OpenCV's BORDER_REFLECT_101), like the tiles' mirror padding; never a constant.
- Fields add: `rotation_field(...) + displacement_field(...)` rotates and deforms with a
  single resampling, hence a single interpolation blur.
"""

from __future__ import annotations

import tensorflow as tf

from pipeline.tiling import reflect_indices

INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
_KEYS_A = -0.5  # OpenCV's and Keys' choice: reproduces quadratics exactly


def _keys_weights(t: tf.Tensor) -> tf.Tensor:
    """Cubic convolution weights of the taps at -1, 0, 1, 2 from floor(position); t in [0, 1)."""
    a = _KEYS_A

    def near(d):  # |d| <= 1
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def far(d):  # 1 < |d| < 2
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    return tf.stack([far(1 + t), near(t), near(1 - t), far(2 - t)], axis=-1)


def _grid_weights(size: tf.Tensor, grid_size: int) -> tf.Tensor:
    """[size, grid_size] cubic weights that interpolate grid nodes, spaced corner to corner, to pixels."""
    position = tf.range(size, dtype=tf.float32) * (grid_size - 1) / tf.cast(tf.maximum(size - 1, 1), tf.float32)
    base = tf.floor(position)
    nodes = tf.clip_by_value(tf.cast(base, tf.int32)[:, None] + tf.range(-1, 3), 0, grid_size - 1)
    return tf.reduce_sum(tf.one_hot(nodes, grid_size) * _keys_weights(position - base)[..., None], axis=1)


def displacement_field(shape, seed: tf.Tensor, grid_size: int = 3, sigma: float = 10.0) -> tf.Tensor:
    """Random smooth displacements [..., H, W, 2] (dy, dx) in pixels for `shape` [..., H, W].

    Every leading (batch) index gets its own grid of `grid_size` x `grid_size` vectors
    drawn from N(0, sigma^2) with the stateless `seed` ([2] integers).
    """
    shape = tf.cast(shape, tf.int32)
    height, width = shape[-2], shape[-1]
    # Philox on every device rather than a per-device default. XLA compiles its own
    # generator, which draws other (equally distributed) numbers from the same seed.
    nodes = tf.random.stateless_normal(
        tf.concat([shape[:-2], [2, grid_size, grid_size]], 0), seed, stddev=sigma, alg="philox"
    )
    rows, cols = _grid_weights(height, grid_size), _grid_weights(width, grid_size)
    return tf.einsum("yi,...cij,xj->...yxc", rows, nodes, cols)


def rotation_field(shape, angle: tf.Tensor) -> tf.Tensor:
    """Displacements [H, W, 2] that rotate an [H, W] image about its centre by `angle` radians.

    Positive angles turn the image counter-clockwise as displayed (row 0 at the top), as
    `np.rot90` does.
    """
    shape = tf.cast(shape, tf.int32)
    y = tf.range(shape[-2], dtype=tf.float32) - tf.cast(shape[-2] - 1, tf.float32) / 2
    x = tf.range(shape[-1], dtype=tf.float32) - tf.cast(shape[-1] - 1, tf.float32) / 2
    y, x = tf.meshgrid(y, x, indexing="ij")
    cos, sin = tf.cos(tf.cast(angle, tf.float32)), tf.sin(tf.cast(angle, tf.float32))
    return tf.stack([cos * y + sin * x - y, cos * x - sin * y - x], axis=-1)


def _mirror(index: tf.Tensor, size: tf.Tensor) -> tf.Tensor:
    """Reflects integer positions into [0, size), the edge pixel not repeated."""
    # A table reaching two sides beyond each edge covers any rotation plus elastic
    # displacement of a tile; anything farther is clamped onto the table's ends.
    reach = 2 * size
    table = reflect_indices(size, reach, reach)
    return tf.gather(table, tf.clip_by_value(index + reach, 0, size + 2 * reach - 1))


def _taps(position: tf.Tensor, size: tf.Tensor, interpolation: str) -> tuple[tf.Tensor, tf.Tensor]:
    """Source indices [..., n] along one axis and their weights [..., n] for sample positions."""
    if interpolation == "nearest":
        index = tf.cast(tf.floor(position + 0.5), tf.int32)[..., None]
        return _mirror(index, size), tf.ones_like(position)[..., None]
    base = tf.floor(position)
    t = position - base
    if interpolation == "bilinear":
        offsets, weights = tf.range(0, 2), tf.stack([1 - t, t], axis=-1)
    else:
        offsets, weights = tf.range(-1, 3), _keys_weights(t)
    return _mirror(tf.cast(base, tf.int32)[..., None] + offsets, size), weights


def warp(image: tf.Tensor, field: tf.Tensor, interpolation: str = "bicubic") -> tf.Tensor:
    """Samples `image` at (y + dy, x + dx) with mirror extrapolation at the borders.

    Args:
        image: [H, W, C] or a batch [B, H, W, C]; float or integer.
        field: displacements [H, W, 2] (shared by the batch) or [B, H, W, 2], (dy, dx) px.
        interpolation: 'bicubic', 'bilinear' or 'nearest'.

    Returns:
        The warped image, same shape and dtype; integer results are rounded and clipped
        to the dtype's range. 'nearest' copies values, so labels stay exact.
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    image = tf.convert_to_tensor(image)
    single = image.shape.rank == 3
    images = image[None] if single else image
    shape = tf.shape(images)
    batch, height, width, channels = shape[0], shape[1], shape[2], shape[3]
    field = tf.broadcast_to(tf.cast(field, tf.float32), [batch, height, width, 2])
    rows, row_weights = _taps(tf.range(height, dtype=tf.float32)[:, None] + field[..., 0], height, interpolation)
    cols, col_weights = _taps(tf.range(width, dtype=tf.float32) + field[..., 1], width, interpolation)
    # One gather of all taps from the flattened batch: [B, H, W, n, n, C].
    first_pixel = tf.reshape(tf.range(batch) * height * width, [-1, 1, 1, 1, 1])
    index = first_pixel + rows[..., :, None] * width + cols[..., None, :]
    values = tf.gather(tf.reshape(images, [-1, channels]), index)
    if interpolation == "nearest":
        warped = values[..., 0, 0, :]
    else:
        # Columns first, then rows: separable weights, never the n x n weight products.
        along_rows = tf.reduce_sum(tf.cast(values, tf.float32) * col_weights[..., None, :, None], axis=-2)
        warped = _cast_back(tf.reduce_sum(along_rows * row_weights[..., None], axis=-2), image.dtype)
    return warped[0] if single else warped


def _cast_back(values: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
    if dtype.is_integer:
        values = tf.clip_by_value(tf.round(values), dtype.min, dtype.max)
    return tf.cast(values, dtype)


def warp_example(
    image: tf.Tensor, label: tf.Tensor, weight: tf.Tensor, field: tf.Tensor, interpolation: str = "bicubic"
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Warps an image [..., H, W, C], its label [..., H, W] and weight map [..., H, W] by one field.

    The image is sampled with `interpolation` ('bicubic' or 'bilinear'), the label with
    'nearest' (exact label values) and the weights with 'bilinear'.
    """
    return (
        warp(image, field, interpolation),
        warp(label[..., None], field, "nearest")[..., 0],
        warp(weight[..., None], field, "bilinear")[..., 0],
    )


def elastic_warp(
    image: tf.Tensor,
    label: tf.Tensor,
    weight: tf.Tensor,
    seed: tf.Tensor,
    grid_size: int = 3,
    sigma: float = 10.0,
    interpolation: str = "bicubic",
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """The paper's elastic deformation of an (image, label, weight) example or batch.

    One random field per example (`displacement_field` from `seed`), applied to all three
    as `warp_example` does. Same seed, same result.
    """
    field = displacement_field(tf.shape(label), seed, grid_size, sigma)
    return warp_example(image, label, weight, field, interpolation)
