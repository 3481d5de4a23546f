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
  'reflect', OpenCV's BORDER_REFLECT_101: `pipeline.mirror`'s rule); never a constant.
  Positions are mirrored once per pixel, not per tap (`mirror_positions`): interpolation
  of the mirror-extended image is mirror-symmetric about both edges (the kernels are
  symmetric), so sampling at the mirrored position equals mirroring every tap, and all
  taps then lie within 2 px of the image. Each sample is one fused elementwise
  expression (16 loads for bicubic), which XLA compiles to a vectorised loop.
- Fields add: `rotation_field(...) + displacement_field(...)` rotates and deforms with a
  single resampling, hence a single interpolation blur.
- Two implementations of the sampling, chosen by `implementation=`: 'graph' (the default),
  the TensorFlow ops above, which also run under XLA and on a GPU; and 'kernel', the
  compiled CPU op of `warp_kernel.cc` (built on first use by `pipeline.training.custom_op`), which
  computes the same samples faster than XLA can on a CPU (BENCHMARKS.md), where XLA
  turns every tap into scalar loads. 'auto' takes the kernel where it is built and supports the
  dtype, else the graph. The kernel cannot run inside `jit_compile=True`.
"""

from __future__ import annotations

import tensorflow as tf

from pipeline.mirror import mirror_pad, mirror_positions
from pipeline.training import custom_op

INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
IMPLEMENTATIONS = ("graph", "kernel", "auto")
# The dtypes `UnetWarp` is registered for (warp_kernel.cc).
KERNEL_DTYPES = (tf.float32, tf.float64, tf.uint8, tf.uint16, tf.int8, tf.int16, tf.int32, tf.int64)
_KEYS_A = -0.5  # OpenCV's and Keys' choice: reproduces quadratics exactly


def _keys_weights(t: tf.Tensor) -> list[tf.Tensor]:
    """Cubic convolution weights of the taps at -1, 0, 1, 2 from floor(position); t in [0, 1)."""
    a = _KEYS_A

    def near(d):  # |d| <= 1
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def far(d):  # 1 < |d| < 2
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    return [far(1 + t), near(t), near(1 - t), far(2 - t)]


def _grid_weights(size: tf.Tensor, grid_size: int) -> tf.Tensor:
    """[size, grid_size] cubic weights that interpolate grid nodes, spaced corner to corner, to pixels."""
    position = tf.range(size, dtype=tf.float32) * (grid_size - 1) / tf.cast(tf.maximum(size - 1, 1), tf.float32)
    base = tf.floor(position)
    nodes = tf.clip_by_value(tf.cast(base, tf.int32)[:, None] + tf.range(-1, 3), 0, grid_size - 1)
    weights = tf.stack(_keys_weights(position - base), axis=-1)
    return tf.reduce_sum(tf.one_hot(nodes, grid_size) * weights[..., None], axis=1)


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
    # Interpolated along x first (a small [..., grid, W, 2]), then one matmul along y
    # writes the field straight into its [..., H, W, 2] layout: no transpose of a big tensor.
    along_x = tf.einsum("...cij,xj->...ixc", nodes, cols)
    along_x = tf.reshape(along_x, tf.concat([shape[:-2], [grid_size, width * 2]], 0))
    return tf.reshape(tf.matmul(rows, along_x), tf.concat([shape, [2]], 0))


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


def _pixels(images: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Images [B, H, W, C] as rows of C values, and the row of each image's first pixel [B, 1, 1]."""
    shape = tf.shape(images)
    first_pixel = tf.reshape(tf.range(shape[0]) * shape[1] * shape[2], [-1, 1, 1])
    return tf.reshape(images, [-1, shape[3]]), first_pixel


def _tap(pixels: tf.Tensor, index: tf.Tensor) -> tf.Tensor:
    """Rows `index` [B, H, W] of `pixels` as float32 [B, H, W, C]."""
    # A flat gather of whole pixels: under XLA a plain load inside the fused sampling loop.
    return tf.cast(tf.gather(pixels, index), tf.float32)


def _nearest(images: tf.Tensor, y: tf.Tensor, x: tf.Tensor) -> tf.Tensor:
    """The pixel nearest to each (y, x), mirrored at the borders; values copied exactly."""
    height, width = tf.shape(images)[1], tf.shape(images)[2]
    # Round, then mirror the whole-pixel position (exact in float): mirroring first
    # could tip a tie (y = -k - 0.5) the other way.
    rows = tf.cast(mirror_positions(tf.floor(y + 0.5), height), tf.int32)
    cols = tf.cast(mirror_positions(tf.floor(x + 0.5), width), tf.int32)
    pixels, first_pixel = _pixels(images)
    return tf.gather(pixels, first_pixel + rows * width + cols)


def _bilinear(images: tf.Tensor, y: tf.Tensor, x: tf.Tensor) -> tf.Tensor:
    """Bilinear samples [B, H, W, C] (float32) at (y, x), mirrored at the borders."""
    height, width = tf.shape(images)[1], tf.shape(images)[2]
    y, x = mirror_positions(y, height), mirror_positions(x, width)
    top, left = tf.floor(y), tf.floor(x)
    ty, tx = (y - top)[..., None], (x - left)[..., None]
    top, left = tf.cast(top, tf.int32), tf.cast(left, tf.int32)
    # The second tap passes the edge only at y = height - 1 exactly, where its weight is 0.
    bottom, right = tf.minimum(top + 1, height - 1), tf.minimum(left + 1, width - 1)
    pixels, first_pixel = _pixels(images)
    upper, lower = first_pixel + top * width, first_pixel + bottom * width
    upper = (1 - tx) * _tap(pixels, upper + left) + tx * _tap(pixels, upper + right)
    lower = (1 - tx) * _tap(pixels, lower + left) + tx * _tap(pixels, lower + right)
    return (1 - ty) * upper + ty * lower


def _bicubic(images: tf.Tensor, y: tf.Tensor, x: tf.Tensor) -> tf.Tensor:
    """Bicubic (Keys) samples [B, H, W, C] (float32) at (y, x), mirrored at the borders."""
    height, width = tf.shape(images)[1], tf.shape(images)[2]
    y, x = mirror_positions(y, height), mirror_positions(x, width)
    top, left = tf.floor(y), tf.floor(x)
    # 1-D weights, 4 per axis: the 4 x 4 kernel is their outer product, never formed.
    row_weights, col_weights = _keys_weights((y - top)[..., None]), _keys_weights((x - left)[..., None])
    # Taps reach 1 px before and 2 px after a mirrored position: a 2 px mirror pad holds
    # them all, so the 16 taps are fixed offsets from one index, with no per-tap mirroring.
    pixels, first_pixel = _pixels(mirror_pad(images, 2, 2, 2, 2))
    padded_width = width + 4
    first_tap = first_pixel + (tf.cast(top, tf.int32) + 1) * padded_width + tf.cast(left, tf.int32) + 1
    # Separable: the 4 taps of each row weighted by the column weights, then the 4 rows.
    total = None
    for i, row_weight in enumerate(row_weights):
        row = None
        for j, col_weight in enumerate(col_weights):
            term = col_weight * _tap(pixels, first_tap + (i * padded_width + j))
            row = term if row is None else row + term
        total = row_weight * row if total is None else total + row_weight * row
    return total


def warp(image: tf.Tensor, field: tf.Tensor, interpolation: str = "bicubic", implementation: str = "graph") -> tf.Tensor:
    """Samples `image` at (y + dy, x + dx) with mirror extrapolation at the borders.

    Args:
        image: [H, W, C] or a batch [B, H, W, C]; float or integer.
        field: displacements [H, W, 2] (shared by the batch) or [B, H, W, 2], (dy, dx) px.
        interpolation: 'bicubic', 'bilinear' or 'nearest'.
        implementation: 'graph' (TensorFlow ops: XLA, GPU), 'kernel' (the compiled CPU
            op; RuntimeError where it cannot be built) or 'auto' (the kernel where it
            can run, else the graph).

    Returns:
        The warped image, same shape and dtype; integer results are rounded and clipped
        to the dtype's range. 'nearest' copies values, so labels stay exact.
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    image = tf.convert_to_tensor(image)
    kernel = _kernel(image.dtype, required=implementation == "kernel") if implementation != "graph" else None
    if kernel is not None:
        # The op takes either rank and a shared field as they are: no copies.
        return kernel.unet_warp(image, tf.cast(field, tf.float32), interpolation=interpolation)
    single = image.shape.rank == 3
    images = image[None] if single else image
    shape = tf.shape(images)
    batch, height, width = shape[0], shape[1], shape[2]
    field = tf.broadcast_to(tf.cast(field, tf.float32), [batch, height, width, 2])
    y = tf.range(height, dtype=tf.float32)[:, None] + field[..., 0]
    x = tf.range(width, dtype=tf.float32) + field[..., 1]
    # Each sampler is one elementwise expression per output pixel (no [..., taps] axes to
    # stack and reduce), which XLA compiles into a single vectorised loop.
    if interpolation == "nearest":
        warped = _nearest(images, y, x)
    else:
        sample = _bilinear if interpolation == "bilinear" else _bicubic
        warped = _cast_back(sample(images, y, x), image.dtype)
    return warped[0] if single else warped


def _kernel(dtype: tf.DType, required: bool):
    """The compiled op module for `dtype`, or None (or, if `required`, an error) where it cannot run."""
    if dtype not in KERNEL_DTYPES:
        if required:
            raise ValueError(f"the compiled warp kernel takes {[d.name for d in KERNEL_DTYPES]}, not {dtype.name}")
        return None
    module = custom_op.load()
    if module is None and required:
        raise RuntimeError("the compiled warp kernel could not be built (see the warning above)")
    return module


def _cast_back(values: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
    if dtype.is_integer:
        values = tf.clip_by_value(tf.round(values), dtype.min, dtype.max)
    return tf.cast(values, dtype)


def warp_example(
    image: tf.Tensor,
    label: tf.Tensor,
    weight: tf.Tensor,
    field: tf.Tensor,
    interpolation: str = "bicubic",
    implementation: str = "graph",
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Warps an image [..., H, W, C], its label [..., H, W] and weight map [..., H, W] by one field.

    The image is sampled with `interpolation` ('bicubic' or 'bilinear'), the label with
    'nearest' (exact label values) and the weights with 'bilinear', all by `implementation`.
    """
    # expand_dims and squeeze, unlike slicing, never copy the (large) tensors.
    return (
        warp(image, field, interpolation, implementation),
        tf.squeeze(warp(tf.expand_dims(label, -1), field, "nearest", implementation), -1),
        tf.squeeze(warp(tf.expand_dims(weight, -1), field, "bilinear", implementation), -1),
    )


def elastic_warp(
    image: tf.Tensor,
    label: tf.Tensor,
    weight: tf.Tensor,
    seed: tf.Tensor,
    grid_size: int = 3,
    sigma: float = 10.0,
    interpolation: str = "bicubic",
    implementation: str = "graph",
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """The paper's elastic deformation of an (image, label, weight) example or batch.

    One random field per example (`displacement_field` from `seed`), applied to all three
    as `warp_example` does. Same seed, same result.
    """
    field = displacement_field(tf.shape(label), seed, grid_size, sigma)
    return warp_example(image, label, weight, field, interpolation, implementation)
