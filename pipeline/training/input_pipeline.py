"""tf.data pipelines that cut training and validation tiles.

Each element is (input tile [i, i, C], label tile [o, o], weight tile [o, o]): the label
and weight tiles cover the network's output window, the centre of the input tile. Images
are normalised whole, then mirror-padded by the network's context so that output windows
reach the image borders, as at prediction time.

Training tiles are augmented before the output window is cut: labels and weights are
mirror-padded exactly like the images, cut at the input size, moved by the same
flips, rotations and elastic field as the image tile, and only then centre-cropped to
the output window. The warp therefore sees real neighbouring labels (not a mirrored
or constant border of the output window), and image and label stay aligned because
all three are transformed about the same centre.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from pipeline import sizes
from pipeline.config.schema import AugmentConfig, TrainConfig
from pipeline.normalization import normalize
from pipeline.training.augmentation import augment
from pipeline.training.numpy_tiles import cut_validation_tiles, mirror_padded, tile_sizes


def _mirror_padded(arrays: np.ndarray, margin: int) -> tf.Tensor:
    return tf.constant(mirror_padded(arrays, margin))


def _padded_images(images: np.ndarray, margin: int) -> tf.Tensor:
    return _mirror_padded(normalize(images).numpy(), margin)


def training_dataset(
    images: np.ndarray,
    labels: np.ndarray,
    weights: np.ndarray,
    depth: int,
    train: TrainConfig,
    augmentation: AugmentConfig,
    first_batch: int = 0,
    padding: str = "valid",
) -> tf.data.Dataset:
    """An endless, seeded stream of augmented random tiles, batched and prefetched.

    `first_batch` skips that many batches without computing them: a resumed run sees the
    tiles that an uninterrupted run would have seen. `padding` is the network's.
    """
    size, out = tile_sizes(images, train.tile_size, depth, padding)
    count, height, width = labels.shape
    margin = sizes.context(depth, padding)
    padded = _padded_images(images, margin)
    labels = _mirror_padded(np.asarray(labels, np.int32), margin)
    weights = _mirror_padded(np.asarray(weights, np.float32), margin)
    channels = padded.shape[-1]
    window = slice(margin, margin + out)  # the output window

    def random_tile(index: tf.Tensor):
        # Stateless draws keyed by the element index: the same stream whatever the
        # parallelism, and any element can be regenerated on its own.
        seeds = tf.random.experimental.stateless_split(tf.stack([tf.cast(train.seed, tf.int64), index]), num=2)
        tile_seed, augment_seed = seeds[0], seeds[1]
        draws = tf.random.stateless_uniform([3], tile_seed)
        n = tf.cast(draws[0] * count, tf.int32)
        y = tf.cast(draws[1] * (height - out + 1), tf.int32)
        x = tf.cast(draws[2] * (width - out + 1), tf.int32)
        tile = tf.slice(padded, [n, y, x, 0], [1, size, size, channels])[0]
        label = tf.slice(labels, [n, y, x], [1, size, size])[0]
        weight = tf.slice(weights, [n, y, x], [1, size, size])[0]
        tile, label, weight = augment(tile, label, weight, augment_seed, augmentation)
        return tile, label[window, window], weight[window, window]

    return (
        tf.data.Dataset.counter(start=first_batch * train.batch_size)
        .map(random_tile, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .batch(train.batch_size, drop_remainder=True)
        .prefetch(tf.data.AUTOTUNE)
    )


def validation_tiles(
    images: np.ndarray, labels: np.ndarray, weights: np.ndarray, depth: int, train: TrainConfig,
    padding: str = "valid",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fixed tiles spread evenly over each validation image, the same in every epoch."""
    size, out = tile_sizes(images, train.tile_size, depth, padding)
    padded = _padded_images(images, sizes.context(depth, padding)).numpy()
    return cut_validation_tiles(padded, labels, weights, size, out, train.val_tiles_per_image)


def validation_dataset(tiles: tuple[np.ndarray, np.ndarray, np.ndarray], batch_size: int) -> tf.data.Dataset:
    """Batches the fixed validation tiles."""
    return tf.data.Dataset.from_tensor_slices(tiles).batch(batch_size).prefetch(tf.data.AUTOTUNE)
