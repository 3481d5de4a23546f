"""The paper's data augmentation of training tiles (Ronneberger et al. 2015, sec. 3.1).

Shifts come from the random tile positions; this module adds flips, rotations by
multiples of 90 degrees, rotation by any angle, elastic deformation and gray-value
variations, each switchable in `AugmentConfig`. Rotation and elastic deformation are one
displacement field, so the tile is resampled once. All draws are stateless from one seed,
so a tile is re-augmented identically from its seed.

The tile, label and weights are transformed at the same (input) size about the same
centre, so their centres stay aligned and the caller can crop the output window after.
A tile of several channels (RGB) moves as one image, and its gray values change by one
curve for all channels, as it was normalised as one (`pipeline.normalization`): each
channel is augmented exactly as a grey tile with the same seed would be.
"""

from __future__ import annotations

import math

import tensorflow as tf

from pipeline.config.schema import AugmentConfig
from pipeline.training import custom_op
from pipeline.training.elastic_warp import displacement_field, rotation_field, warp_example

# Where the compiled kernel cannot be built, the graph resampling fused by XLA, much
# faster on a CPU than op by op (BENCHMARKS.md), also inside `Dataset.map`. The random field is drawn outside it,
# by TensorFlow's own kernels, so the seeds give the same fields as the un-compiled op
# (XLA's generator draws other numbers).
_compiled_warp_example = tf.function(warp_example, jit_compile=True)


def _warp_example(tile, label, weight, field, interpolation: str):
    """Resamples the example with the compiled kernel (the fastest on a CPU), else XLA."""
    if custom_op.load() is None:
        return _compiled_warp_example(tile, label, weight, field, interpolation)
    return warp_example(tile, label, weight, field, interpolation, implementation="kernel")


def _flip_and_rotate90(tile, label, weight, seed, config: AugmentConfig):
    """Exact transformations (no resampling): a left-right flip and k * 90 degrees."""
    targets = tf.stack([tf.cast(label, tf.float32), weight], axis=-1)
    draws = tf.random.stateless_uniform([2], seed, maxval=4, dtype=tf.int32)
    if config.flip:
        flip = draws[0] % 2 == 1
        tile = tf.where(flip, tf.reverse(tile, [1]), tile)
        targets = tf.where(flip, tf.reverse(targets, [1]), targets)
    if config.rotate90:
        tile = tf.image.rot90(tile, draws[1])
        targets = tf.image.rot90(targets, draws[1])
    return tile, tf.cast(targets[..., 0], label.dtype), targets[..., 1]


def _geometric_field(shape: tf.Tensor, seed: tf.Tensor, config: AugmentConfig) -> tf.Tensor | None:
    """Rotation by a uniform angle plus elastic displacements, or None when both are off."""
    angle_seed, elastic_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
    field = None
    if config.rotate:
        field = rotation_field(shape, tf.random.stateless_uniform([], angle_seed, maxval=2 * math.pi))
    if config.elastic:
        elastic = displacement_field(shape, elastic_seed, config.elastic_grid, config.elastic_sigma)
        field = elastic if field is None else field + elastic
    return field


def _gamma(tile: tf.Tensor, gamma: tf.Tensor) -> tf.Tensor:
    """x -> logit(sigmoid(x) ** gamma): a monotone curve for values of any sign."""
    # Normalised tiles have no [0, 1] range for a plain gamma; the logistic maps them
    # into one and back. Computed in log space to stay finite for large |x|.
    log_power = gamma * tf.math.log_sigmoid(tile)
    return log_power - tf.math.log(-tf.math.expm1(log_power))


def _gray_values(tile: tf.Tensor, seed: tf.Tensor, config: AugmentConfig) -> tf.Tensor:
    """Random gamma curve, contrast gain and brightness offset on a normalised tile, the same for every channel."""
    draws = tf.random.stateless_uniform([3], seed, minval=-1.0, maxval=1.0)
    if config.gamma:
        tile = _gamma(tile, tf.exp(config.gamma * draws[0]))
    if config.contrast:
        tile = tile * (1 + config.contrast * draws[1])
    if config.brightness:
        tile = tile + config.brightness * draws[2]
    return tile


def augment(
    tile: tf.Tensor, label: tf.Tensor, weight: tf.Tensor, seed: tf.Tensor, config: AugmentConfig
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Augments a tile [H, W, C] (float32, normalised), its label [H, W] and weights [H, W].

    The same geometric transformation moves all three; the label is sampled by nearest
    neighbour (exact label values), the weights bilinearly, the tile with
    `config.interpolation`. `seed` is a stateless seed ([2] integers).
    """
    # Flips and 90-degree turns draw from `seed` itself, as before the other augmentations
    # existed, so that runs with only those switched on keep their tile stream.
    field_seed, gray_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
    tile, label, weight = _flip_and_rotate90(tile, label, weight, seed, config)
    field = _geometric_field(tf.shape(label), field_seed, config)
    if field is not None:
        tile, label, weight = _warp_example(tile, label, weight, field, config.interpolation)
    return _gray_values(tile, gray_seed, config), label, weight
