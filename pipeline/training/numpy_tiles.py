"""The training tiles in numpy: the input pipeline of Keras' JAX and PyTorch backends.

The GPU machines lent to this project have JAX and PyTorch but no TensorFlow, so training
there cannot use `input_pipeline`'s tf.data stream or the compiled warp kernel. This
module cuts and augments the same tiles with numpy alone, in worker processes:

- the same tiles: images normalised whole (`normalization.normalize_array`, the rule of
  `normalize`), mirror-padded by the network's context, a random image and position per
  tile, labels and weights padded and cut alike, augmented at the input size, and only
  then cropped to the output window (`input_pipeline`'s docstring says why);
- the same augmentation (`augmentation`'s order and `AugmentConfig`'s parameters): a
  left-right flip and k x 90 degrees, one displacement field of a uniform rotation plus
  the elastic grid (N(0, sigma^2) vectors on `elastic_grid` x `elastic_grid` nodes,
  interpolated with Keys' cubic weights as `elastic_warp.displacement_field` does), one
  resampling (the image bicubic or bilinear, the label nearest, the weights bilinear,
  mirrored at the borders as `elastic_warp.warp`), then the gray-value curve;
- other random numbers: numpy's generator, keyed by the run's seed and the tile's index
  (so a resumed run sees the tiles an uninterrupted one would), draws from the same
  distributions as TensorFlow's Philox, not the same numbers. Given the same draws (the
  same field, flip, turn and gray values) the tiles are the same up to float rounding:
  tests/test_jax_tiles.py holds the two pipelines to that, the warp against the compiled
  kernel and the graph op.

It imports neither TensorFlow nor Keras, so that its worker processes start in a second.
"""

from __future__ import annotations

import concurrent.futures
import math
import multiprocessing
import os
from collections import deque
from typing import Iterator

import numpy as np

from pipeline import sizes
from pipeline.config.schema import AugmentConfig, TrainConfig
from pipeline.errors import PipelineError
from pipeline.mirror import mirror_pad_array, mirror_positions_array
from pipeline.normalization import normalize_array

_KEYS_A = -0.5  # elastic_warp's: Keys' cubic convolution, as OpenCV's INTER_CUBIC
Example = tuple[np.ndarray, np.ndarray, np.ndarray]  # tile [i, i, C], label [o, o], weights [o, o]


def tile_sizes(images: np.ndarray, tile_size: int, depth: int, padding: str) -> tuple[int, int]:
    """(input side, output side) of the training tiles; refuses images smaller than the output window."""
    out = sizes.output_size(tile_size, depth, padding)
    height, width = images.shape[1:3]
    if min(height, width) < out:
        raise PipelineError(
            f"training images of {height}x{width} px are smaller than the output window "
            f"({out} px) of train.tile_size={tile_size}; choose a smaller tile size"
        )
    return tile_size, out


def mirror_padded(arrays: np.ndarray, margin: int) -> np.ndarray:
    """Pads [N, H, W, ...] on both sides of H and W by `margin` (the context), by reflection,
    as prediction pads."""
    return mirror_pad_array(arrays, [(0, 0), (margin, margin), (margin, margin)])


def cut_validation_tiles(padded: np.ndarray, labels: np.ndarray, weights: np.ndarray, size: int, out: int,
                         per_image: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fixed tiles spread evenly over each validation image, from its normalised, padded image."""
    height, width = labels.shape[1:]
    per_axis = int(np.ceil(np.sqrt(per_image)))
    ys = np.linspace(0, height - out, per_axis).astype(int)
    xs = np.linspace(0, width - out, per_axis).astype(int)
    corners = [(y, x) for y in ys for x in xs][:per_image]
    tiles, label_tiles, weight_tiles = [], [], []
    for n in range(len(padded)):
        for y, x in corners:
            tiles.append(padded[n, y : y + size, x : x + size])
            label_tiles.append(labels[n, y : y + out, x : x + out])
            weight_tiles.append(weights[n, y : y + out, x : x + out])
    return np.stack(tiles), np.stack(label_tiles).astype(np.int32), np.stack(weight_tiles)


def validation_tiles(images: np.ndarray, labels: np.ndarray, weights: np.ndarray, depth: int, train: TrainConfig,
                     padding: str = "valid") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`input_pipeline.validation_tiles` without TensorFlow: the same tiles, normalised in numpy."""
    size, out = tile_sizes(images, train.tile_size, depth, padding)
    padded = mirror_padded(normalize_array(images), sizes.context(depth, padding))
    return cut_validation_tiles(padded, labels, weights, size, out, train.val_tiles_per_image)


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


# --- the augmentation: elastic_warp's and augmentation's maths in numpy -------------------------------------------


def keys_weights(t: np.ndarray) -> list[np.ndarray]:
    """Cubic convolution weights of the taps at -1, 0, 1, 2 from floor(position); t in [0, 1)."""
    a = np.float32(_KEYS_A)

    def near(d):  # |d| <= 1
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def far(d):  # 1 < |d| < 2
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    return [far(1 + t), near(t), near(1 - t), far(2 - t)]


def grid_weights(size: int, grid_size: int) -> np.ndarray:
    """[size, grid_size] cubic weights that interpolate grid nodes, spaced corner to corner, to pixels."""
    position = np.arange(size, dtype=np.float32) * np.float32(grid_size - 1) / np.float32(max(size - 1, 1))
    base = np.floor(position)
    nodes = np.clip(base.astype(np.int64)[:, None] + np.arange(-1, 3), 0, grid_size - 1)
    weights = np.stack(keys_weights(position - base), axis=-1)
    matrix = np.zeros((size, grid_size), np.float32)
    np.add.at(matrix, (np.arange(size)[:, None], nodes), weights)  # taps past the border add to its node
    return matrix


def _interpolated(rows: np.ndarray, nodes: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """rows @ nodes @ cols^T for [H, g], [g, g], [W, g] as sums of broadcast products: no BLAS,
    whose threads cost a loaded worker process more than these few products (17 ms, not 0.2)."""
    along_x = (nodes[:, :, None] * cols.T[None]).sum(axis=1)  # [g, W]
    return sum(rows[:, i, None] * along_x[i] for i in range(len(nodes)))


def displacement_field(shape: tuple[int, int], nodes: np.ndarray) -> np.ndarray:
    """Displacements [H, W, 2] (dy, dx) interpolated from grid vectors `nodes` [2, g, g], as
    `elastic_warp.displacement_field` interpolates the vectors it draws."""
    grid = nodes.shape[-1]
    rows, cols = grid_weights(shape[0], grid), grid_weights(shape[1], grid)
    return np.stack([_interpolated(rows, component, cols) for component in nodes.astype(np.float32)], axis=-1)


def rotation_field(shape: tuple[int, int], angle: float) -> np.ndarray:
    """Displacements [H, W, 2] that rotate an [H, W] image about its centre by `angle` radians
    (counter-clockwise as displayed, as `elastic_warp.rotation_field`)."""
    y = np.arange(shape[0], dtype=np.float32) - np.float32(shape[0] - 1) / 2
    x = np.arange(shape[1], dtype=np.float32) - np.float32(shape[1] - 1) / 2
    y, x = np.meshgrid(y, x, indexing="ij")
    cos, sin = np.float32(np.cos(np.float32(angle))), np.float32(np.sin(np.float32(angle)))
    return np.stack([cos * y + sin * x - y, cos * x - sin * y - x], axis=-1)


def _cast_back(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        values = np.clip(np.round(values), info.min, info.max)
    return values.astype(dtype)


def _sample_plane(plane: np.ndarray, y: np.ndarray, x: np.ndarray, interpolation: str) -> np.ndarray:
    """One channel [H, W] sampled at the mirrored float positions (y, x), as float32."""
    height, width = plane.shape
    top, left = np.floor(y), np.floor(x)
    ty, tx = y - top, x - left
    top, left = top.astype(np.intp), left.astype(np.intp)
    # Flat 1-D takes: several times faster than fancy indexing of a 2-D array.
    if interpolation == "bilinear":
        pixels = plane.astype(np.float32, copy=False).ravel()
        bottom, right = np.minimum(top + 1, height - 1), np.minimum(left + 1, width - 1)
        upper, lower = top * width, bottom * width
        upper = (1 - tx) * np.take(pixels, upper + left) + tx * np.take(pixels, upper + right)
        lower = (1 - tx) * np.take(pixels, lower + left) + tx * np.take(pixels, lower + right)
        return (1 - ty) * upper + ty * lower
    # Bicubic: the 16 taps are fixed offsets from one index into a 2 px mirror-padded copy.
    pixels = mirror_pad_array(plane, [(2, 2), (2, 2)]).astype(np.float32, copy=False).ravel()
    padded_width = width + 4
    first_tap = (top + 1) * padded_width + left + 1
    row_weights, col_weights = keys_weights(ty), keys_weights(tx)
    total = None
    for i, row_weight in enumerate(row_weights):
        row = None
        for j, col_weight in enumerate(col_weights):
            term = col_weight * np.take(pixels, first_tap + (i * padded_width + j))
            row = term if row is None else row + term
        total = row_weight * row if total is None else total + row_weight * row
    return total


def warp(image: np.ndarray, field: np.ndarray, interpolation: str = "bicubic") -> np.ndarray:
    """Samples `image` [H, W, C] at (y + dy, x + dx) with mirror extrapolation at the borders,
    as `elastic_warp.warp` does: 'bicubic' (Keys), 'bilinear' or 'nearest' (values copied);
    integer results rounded and clipped to the dtype's range."""
    height, width = image.shape[:2]
    y = np.arange(height, dtype=np.float32)[:, None] + field[..., 0]
    x = np.arange(width, dtype=np.float32) + field[..., 1]
    if interpolation == "nearest":
        # Round, then mirror the whole-pixel position, as the graph op and the kernel do.
        rows = mirror_positions_array(np.floor(y + np.float32(0.5)), height).astype(np.intp)
        cols = mirror_positions_array(np.floor(x + np.float32(0.5)), width).astype(np.intp)
        return image[rows, cols]
    y, x = mirror_positions_array(y, height), mirror_positions_array(x, width)
    planes = [_sample_plane(image[..., k], y, x, interpolation) for k in range(image.shape[-1])]
    return _cast_back(np.stack(planes, axis=-1), image.dtype)


def warp_example(tile: np.ndarray, label: np.ndarray, weight: np.ndarray, field: np.ndarray,
                 interpolation: str = "bicubic") -> Example:
    """Warps a tile [H, W, C], its label [H, W] and weights [H, W] by one field, as
    `elastic_warp.warp_example`: the label nearest, the weights bilinearly."""
    return (warp(tile, field, interpolation), warp(label[..., None], field, "nearest")[..., 0],
            warp(weight[..., None], field, "bilinear")[..., 0])


def gamma_curve(tile: np.ndarray, gamma: float) -> np.ndarray:
    """x -> logit(sigmoid(x) ** gamma) in log space, as `augmentation._gamma`."""
    log_power = np.float32(gamma) * -np.logaddexp(np.float32(0), -tile)  # gamma * log_sigmoid(tile)
    return log_power - np.log(-np.expm1(log_power))


def gray_values(tile: np.ndarray, draws: np.ndarray, config: AugmentConfig) -> np.ndarray:
    """The gamma curve, contrast gain and brightness offset of `augmentation._gray_values` for
    draws [3] uniform in [-1, 1], the same for every channel."""
    if config.gamma:
        tile = gamma_curve(tile, math.exp(config.gamma * draws[0]))
    if config.contrast:
        tile = tile * np.float32(1 + config.contrast * draws[1])
    if config.brightness:
        tile = tile + np.float32(config.brightness * draws[2])
    return tile.astype(np.float32, copy=False)


def flip_and_rotate90(tile: np.ndarray, label: np.ndarray, weight: np.ndarray, flip: bool, turns: int,
                      config: AugmentConfig) -> Example:
    """A left-right flip, then `turns` x 90 degrees counter-clockwise (`tf.image.rot90`'s sense)."""
    if config.flip and flip:
        tile, label, weight = tile[:, ::-1], label[:, ::-1], weight[:, ::-1]
    if config.rotate90:
        tile, label, weight = (np.rot90(array, turns) for array in (tile, label, weight))
    return tile, label, weight


def geometric_field(shape: tuple[int, int], rng: np.random.Generator, config: AugmentConfig) -> np.ndarray | None:
    """A uniform rotation plus elastic displacements, or None when both are off."""
    field = None
    if config.rotate:
        field = rotation_field(shape, rng.uniform(0, 2 * math.pi))
    if config.elastic:
        nodes = rng.normal(0.0, config.elastic_sigma, (2, config.elastic_grid, config.elastic_grid))
        elastic = displacement_field(shape, nodes)
        field = elastic if field is None else field + elastic
    return field


def augment(tile: np.ndarray, label: np.ndarray, weight: np.ndarray, rng: np.random.Generator,
            config: AugmentConfig) -> Example:
    """`augmentation.augment` with numpy's draws: flip and turns, one field, one resampling, gray values."""
    flip, turns = rng.integers(0, 4, 2)
    tile, label, weight = flip_and_rotate90(tile, label, weight, flip % 2 == 1, int(turns), config)
    field = geometric_field(label.shape, rng, config)
    if field is not None:
        tile, label, weight = warp_example(tile, label, weight, field, config.interpolation)
    return gray_values(np.ascontiguousarray(tile, np.float32), rng.uniform(-1, 1, 3), config), label, weight


# --- the stream of batches -------------------------------------------------------------------------------------------


class TileSource:
    """The normalised, padded training arrays and everything needed to make tile `index`:
    picklable, so that each worker process gets one copy at its start."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, weights: np.ndarray, depth: int, train: TrainConfig,
                 augmentation: AugmentConfig, padding: str = "valid"):
        self.size, self.out = tile_sizes(images, train.tile_size, depth, padding)
        self.margin = sizes.context(depth, padding)
        self.images = mirror_padded(normalize_array(images), self.margin)
        self.labels = mirror_padded(np.asarray(labels, np.int32), self.margin)
        self.weights = mirror_padded(np.asarray(weights, np.float32), self.margin)
        self.count, self.height, self.width = labels.shape
        self.seed, self.batch_size, self.augmentation = train.seed, train.batch_size, augmentation

    def example(self, index: int) -> Example:
        """Tile `index` of the run's stream: a pure function of the seed and the index."""
        rng = np.random.default_rng([self.seed, index])
        draws = rng.random(3)
        n = int(draws[0] * self.count)
        y, x = int(draws[1] * (self.height - self.out + 1)), int(draws[2] * (self.width - self.out + 1))
        box = (n, slice(y, y + self.size), slice(x, x + self.size))
        tile, label, weight = augment(self.images[box], self.labels[box], self.weights[box], rng, self.augmentation)
        window = slice(self.margin, self.margin + self.out)
        return tile, label[window, window], weight[window, window]

    def batch(self, number: int) -> Example:
        """Batch `number` of the stream: tiles number * batch_size onwards, stacked."""
        first = number * self.batch_size
        tiles, labels, weights = zip(*(self.example(first + k) for k in range(self.batch_size)))
        return np.stack(tiles), np.stack(labels), np.stack(weights)


_SOURCE: TileSource | None = None  # a worker process's copy


def _start_worker(source: TileSource) -> None:
    global _SOURCE
    _SOURCE = source


def _worker_batch(number: int) -> Example:
    return _SOURCE.batch(number)


def default_workers() -> int:
    """Worker processes for the stream: every CPU core this process may use but one (for the
    training loop), none on a one-core machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cores - 1 if cores > 1 else 0


def batches(source: TileSource, first_batch: int = 0, workers: int | None = None) -> Iterator[Example]:
    """The endless stream of batches from `first_batch` on, in order, made by `workers` processes
    (default `default_workers`; 0: in this process).

    Worker processes are spawned, not forked: a fork of a process that runs JAX's or
    PyTorch's threads can deadlock. Each gets the source once; a few batches per worker are
    made ahead. The workers stop when the generator is closed (or collected).
    """
    workers = default_workers() if workers is None else workers
    number = first_batch
    if not workers:
        while True:
            yield source.batch(number)
            number += 1
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                                                initargs=(source,)) as pool:
        ahead: deque[concurrent.futures.Future] = deque()
        try:
            while True:
                while len(ahead) < 2 * workers:
                    ahead.append(pool.submit(_worker_batch, number))
                    number += 1
                yield ahead.popleft().result()
        finally:
            for future in ahead:
                future.cancel()
