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
from pipeline.errors import PipelineError
from pipeline.mirror import mirror_pad_array
from pipeline.normalization import normalize
from pipeline.training.augmentation import augment


def _mirror_padded(arrays: np.ndarray, margin: int) -> tf.Tensor:
    """Pads [N, H, W, ...] on both sides of H and W by `margin` (the context), by reflection,
    as prediction pads."""
    return tf.constant(mirror_pad_array(arrays, [(0, 0), (margin, margin), (margin, margin)]))


def _padded_images(images: np.ndarray, margin: int) -> tf.Tensor:
    return _mirror_padded(normalize(images).numpy(), margin)


def _tile_sizes(images: np.ndarray, tile_size: int, depth: int, padding: str) -> tuple[int, int]:
    out = sizes.output_size(tile_size, depth, padding)
    height, width = images.shape[1:3]
    if min(height, width) < out:
        raise PipelineError(
            f"training images of {height}x{width} px are smaller than the output window "
            f"({out} px) of train.tile_size={tile_size}; choose a smaller tile size"
        )
    return tile_size, out


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
    size, out = _tile_sizes(images, train.tile_size, depth, padding)
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
    size, out = _tile_sizes(images, train.tile_size, depth, padding)
    padded = _padded_images(images, sizes.context(depth, padding)).numpy()
    height, width = labels.shape[1:]
    per_axis = int(np.ceil(np.sqrt(train.val_tiles_per_image)))
    ys = np.linspace(0, height - out, per_axis).astype(int)
    xs = np.linspace(0, width - out, per_axis).astype(int)
    corners = [(y, x) for y in ys for x in xs][: train.val_tiles_per_image]
    tiles, label_tiles, weight_tiles = [], [], []
    for n in range(len(images)):
        for y, x in corners:
            tiles.append(padded[n, y : y + size, x : x + size])
            label_tiles.append(labels[n, y : y + out, x : x + out])
            weight_tiles.append(weights[n, y : y + out, x : x + out])
    return np.stack(tiles), np.stack(label_tiles).astype(np.int32), np.stack(weight_tiles)


def validation_dataset(tiles: tuple[np.ndarray, np.ndarray, np.ndarray], batch_size: int) -> tf.data.Dataset:
    """Batches the fixed validation tiles."""
    return tf.data.Dataset.from_tensor_slices(tiles).batch(batch_size).prefetch(tf.data.AUTOTUNE)


def joined(first: dict[str, np.ndarray], second: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The images, instances and weight maps of two prepared splits as one, for training.

    Splits of different image sizes are padded to the larger as `prepare` pads within a
    split: images by mirroring, instances and weights with 0, so the padding is never learnt.
    """
    height = max(first["images"].shape[1], second["images"].shape[1])
    width = max(first["images"].shape[2], second["images"].shape[2])

    def pads(array: np.ndarray) -> list[tuple[int, int]]:
        return [(0, 0), (0, height - array.shape[1]), (0, width - array.shape[2])]

    images = [mirror_pad_array(split["images"], pads(split["images"])) for split in (first, second)]
    labels = {key: [np.pad(split[key], pads(split[key])) for split in (first, second)]  # [N, H, W]
              for key in ("instances", "weights")}
    return {"images": np.concatenate(images), **{key: np.concatenate(arrays) for key, arrays in labels.items()}}
