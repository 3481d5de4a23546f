"""Chunked prediction of an image read lazily: images larger than memory.

An image of more than `predict.max_whole_pixels` pixels is never held whole. It is read
box by box from a tiled (or striped) TIFF through tifffile's zarr store, or from an
OME-Zarr image (NGFF 0.4 or 0.5, its first multiscale level), and predicted in chunks:
output boxes of `chunk_side` pixels, a whole number of prediction tile steps, aligned to
the tile grid of the whole image. A chunk reads exactly the mirror-padded pixels that the
whole-image pass (`tiling`) would give its tiles (real neighbours inside the image,
mirror extrapolation only at its borders), so chunked outputs equal whole-image ones up
to the float rounding of the normalisation constants, which `statistics` computes in
one streaming pass. Test-time augmentation is exact too: each of its eight views
predicts the chunk on that view's own tile grid.

The work is split so that a Beam pipeline can hand chunks to workers: `plan` makes the
hidden scratch folder with zarr arrays chunked like the chunks, `predict_chunk` and
`write_chunk` do one chunk (a retried chunk rewrites the same bytes), and `finish` labels
the cells chunk by chunk (4-connected components joined across chunk borders by a
union-find, numbered as `instances.cell_instances` numbers them on the whole image),
writes their measurements and the final files, and renames them into place.
`segment_large` is the same in one process. Everything passed between these functions
is a plain dataclass of paths and numbers.

Outputs, named as the predict stage names them: for a TIFF input NAME_prob.tif,
NAME_mask.tif, NAME_labels.tif (tiled BigTIFFs streamed tile by tile, with the input's
pixel size as resolution tags) and NAME_instances.csv; for an OME-Zarr input
NAME_prob.ome.zarr, NAME_mask.ome.zarr, NAME_labels.ome.zarr (single-scale OME-NGFF
images of the input's version, axes y and x, with its pixel size) and the CSV. No
overlay picture. Memory depends on the chunk side, the tile size and the number of
cells, never on the image's size.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import math
import os
import secrets
import shutil
import stat
import sys
from pathlib import Path
from typing import Iterator

import cv2
import keras
import numpy as np
import tensorflow as tf
import tifffile
import zarr

from pipeline import instances, io
from pipeline.config import Config
from pipeline.console import progress_bar
from pipeline.errors import PipelineError
from pipeline.mirror import mirror_pad
from pipeline.tiling import padding, predict_padded, tile_geometry

TIFF_SUFFIXES = (".tif", ".tiff")
ZARR_SUFFIXES = (".ome.zarr", ".zarr")
TIFF_TILE = 256  # side of the output TIFFs' tiles: what viewers of tiled TIFFs read well
# The most values of one compressed strip or tile of an input that may be decoded at once
# (a 64 MB strip of 8-bit pixels): larger ones are refused instead of filling the memory.
_LARGEST_STRIP = 2**26
# Output TIFF compression (measured on an untrained network's speckled 1664 px masks):
# zlib at level 1 shrinks masks 6x and labels 9x at 230 and 135 Mpx/s, almost as much as
# its default level 6 at a fifth of the speed; float probabilities shrink by 10% at a
# tenth of the speed of writing them as they are, so they are not compressed.
_COMPRESSION = {"prob": {}, "mask": {"compression": "zlib", "compressionargs": {"level": 1}},
                "labels": {"compression": "zlib", "compressionargs": {"level": 1}}}
_KINDS = ("prob", "mask", "labels")

# The eight views of test-time augmentation, in `tiling.overlap_tile_predict`'s order
# (quarter turns 0..3, each unflipped then flipped left-right), each written as
# (transpose, reverse rows, reverse columns) of the image: view[i, j] = image'[i', j'].
_VIEWS = ((False, False, False), (False, False, True), (True, True, False), (True, True, True),
          (False, True, True), (False, True, False), (True, False, True), (True, False, False))


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One output box, aligned to the tile grid of the whole image, clipped to the image (pixels)."""

    row: int
    col: int
    height: int
    width: int


@dataclasses.dataclass(frozen=True)
class LargeOutputs:
    """A large image's outputs in the making: paths and numbers only, so it pickles for Beam workers."""

    source: Path  # the input image
    targets: tuple[Path, ...]  # the final probability, mask, labels and measurements
    scratch: Path  # hidden folder in the output folder where they are made
    height: int
    width: int
    side: int  # the chunk side (`chunk_side`)
    zarr_format: int | None  # OME-Zarr outputs of this zarr format (2: NGFF 0.4, 3: NGFF 0.5); None: TIFFs
    calibration: io.Calibration | None  # the input's pixel size, which the outputs keep
    overwrite: bool
    created: tuple[Path, ...] = ()  # output folders that `plan` created, removed again by `discard`


# --- reading ------------------------------------------------------------------------------


class LazyImage:
    """One 2-D image file as an [H, W, C] array whose boxes are read on demand: `image[rows, cols]`.

    Like a zarr array, indexing with slices reads only the file's tiles or strips that the
    box touches. Holds the file open until `close`.
    """

    def __init__(self, path: Path, source: zarr.Array | np.memmap, layout: str, channels: slice, closing: list):
        self.path = path
        self._source = source
        self._layout = layout  # per source axis: Y, X, C (the channels) or 1 (length 1, read at 0)
        self._channels = channels
        self._closing = closing
        have = source.shape[layout.index("C")] if "C" in layout else 1
        self.shape = (source.shape[layout.index("Y")], source.shape[layout.index("X")],
                      len(range(*channels.indices(have))))
        self.dtype = source.dtype
        self.ndim = 3

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        rows, cols, *channels = key
        index = tuple({"Y": rows, "X": cols, "C": self._channels}.get(axis, 0) for axis in self._layout)
        try:
            block = np.array(self._source[index])  # a copy, also of a memory-mapped file's pixels
        except Exception as error:  # tifffile, codecs and zarr raise many types for damaged data
            raise PipelineError(f"{self.path}: corrupt or unreadable image data ({error})") from None
        kept = [axis for axis in self._layout if axis in "YXC"]
        block = np.transpose(block, [kept.index(axis) for axis in "YXC" if axis in kept])
        block = block if "C" in kept else block[..., None]
        return block[..., channels[0]] if channels else block

    def close(self) -> None:
        for resource in self._closing:
            resource.close()

    def __enter__(self) -> LazyImage:
        return self

    def __exit__(self, *_) -> None:
        self.close()


def is_ome_zarr(path: Path) -> bool:
    """Whether `path` names an OME-Zarr image (NAME.zarr or NAME.ome.zarr)."""
    return Path(path).name.lower().endswith(ZARR_SUFFIXES)


def image_name(path: Path) -> str:
    """NAME of NAME.tif, NAME.zarr or NAME.ome.zarr: what its outputs are named after."""
    name = Path(path).name
    for suffix in ZARR_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def output_paths(path: Path, output_dir: Path, name: str) -> list[Path]:
    """[probability, mask, labels, measurements CSV] of a large image: OME-Zarr for an OME-Zarr input, else TIFF."""
    suffix = ".ome.zarr" if is_ome_zarr(path) else ".tif"
    return [Path(output_dir) / f"{name}_{kind}{suffix}" for kind in _KINDS] + [
        Path(output_dir) / f"{name}_instances.csv"]


def is_large(path: Path, config: Config) -> bool:
    """Whether a file is predicted chunk by chunk: a TIFF whose images have more than
    `predict.max_whole_pixels` pixels (from its header only), or any OME-Zarr image,
    which only this module reads.

    A stack of such images is large too, so that `open_lazy` refuses it in one line
    instead of reading it whole. A PNG cannot be read in parts, and a file that cannot
    be read is not large: the whole-image reader reports it.
    """
    path = Path(path)
    if is_ome_zarr(path):
        return True
    if path.suffix.lower() not in TIFF_SUFFIXES or not path.is_file():
        return False
    try:
        with tifffile.TiffFile(path) as tiff:
            series = tiff.series[0]
            sizes = dict(zip(series.axes, series.shape))
    except Exception:  # tifffile raises many types for damaged files; `io.read_stack` names the problem
        return False
    return sizes.get("Y", 1) * sizes.get("X", 1) > config.predict.max_whole_pixels


def open_lazy(path: Path, channels: int) -> LazyImage:
    """A tiled or striped TIFF, or an OME-Zarr image, as a lazily read [H, W, channels] array.

    The channels follow `io.read_stack`'s rules: a grey image stored as colour is read as
    its first channel for a 1-channel model (with `io`'s notice; `statistics`, which reads
    every pixel, refuses it if it is not grey after all), any other mismatch is refused.
    One 2-D image only; stacks, unreadable files and unsupported pixel types are refused
    with one line naming the file. Close it (or use `with`) to release the file.
    """
    image, have = _open(path, channels)
    if have != channels:
        io.as_model_channels(np.zeros((1, 1, 1, have), np.uint8), channels, path)  # io's notice
    return image


def _open(path: Path, channels: int | None) -> tuple[LazyImage, int]:
    """(the image with `channels` channels, or the file's own with None; the file's channel count), quietly."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{path}: file not found")
    if is_ome_zarr(path):
        source, letters, closing = _open_ome_zarr(path)
    elif path.suffix.lower() in TIFF_SUFFIXES:
        source, letters, closing = _open_tiff(path)
    else:
        raise PipelineError(f"{path}: unsupported file type for an image larger than memory; "
                            f"use {', '.join(TIFF_SUFFIXES + ZARR_SUFFIXES)}")
    try:
        layout = _layout(letters, source.shape, path)
        if source.dtype.kind not in "uif" or source.dtype == np.float16:
            raise PipelineError(f"{path}: unsupported pixel type {source.dtype}")
        have = source.shape[layout.index("C")] if "C" in layout else 1
        return LazyImage(path, source, layout, _selected_channels(have, channels, path), closing), have
    except BaseException:
        for resource in closing:
            resource.close()
        raise


def _open_tiff(path: Path) -> tuple[zarr.Array | np.memmap, str, list]:
    """The first image series of a TIFF, read lazily; its axes; what to close.

    Uncompressed contiguous data (tifffile's and ImageJ's default: one strip for the whole
    image) is memory-mapped, so a box reads only the pages it touches; anything else is a
    zarr array over the file's tiles or strips, which are read whole.
    """
    tiff = None
    try:
        tiff = tifffile.TiffFile(path)
        if not tiff.series:
            raise ValueError("no image data")
        series = tiff.series[0]
        if series.dataoffset is not None:
            tiff.close()
            return tifffile.memmap(path, series=0, mode="r"), series.axes, []
        source = zarr.open_array(series.aszarr(level=0), mode="r")
    except Exception as error:  # tifffile raises many types for damaged files
        if tiff is not None:
            tiff.close()
        raise PipelineError(f"{path}: corrupt or unreadable TIFF ({error})") from None
    if math.prod(source.chunks) > _LARGEST_STRIP:
        tiff.close()
        raise PipelineError(f"{path}: compressed in strips or tiles of {' x '.join(map(str, source.chunks))} values, "
                            "which can only be read whole; write it as a tiled TIFF, e.g. with tifffile.imwrite(..., "
                            "tile=(256, 256))")
    return source, series.axes, [tiff]


def _open_ome_zarr(path: Path) -> tuple[zarr.Array, str, list]:
    """The first multiscale level of an OME-Zarr image, its axes as letters, nothing to close."""
    try:
        group = zarr.open_group(path, mode="r")
        multiscale = _multiscale(group)
        source = group[multiscale["datasets"][0]["path"]]
        axes = [_axis_letter(axis) for axis in multiscale["axes"]]
    except (KeyError, IndexError, TypeError):
        raise PipelineError(f"{path}: not an OME-Zarr image (no multiscales with axes and datasets)") from None
    except Exception as error:  # zarr raises many types for what is not a zarr group
        raise PipelineError(f"{path}: unreadable OME-Zarr ({error})") from None
    if not isinstance(source, zarr.Array) or len(axes) != source.ndim:
        raise PipelineError(f"{path}: not an OME-Zarr image (its first level is not an array of its axes)")
    return source, "".join(axes), []


def _multiscale(group: zarr.Group) -> dict:
    """The first `multiscales` entry: under "ome" in NGFF 0.5, at the top in 0.4."""
    attributes = group.attrs.asdict()
    return attributes.get("ome", attributes)["multiscales"][0]


def _axis_letter(axis: dict | str) -> str:
    """An NGFF axis as tifffile names axes: Y, X, C (channel), or another letter for the rest."""
    name = (axis["name"] if isinstance(axis, dict) else axis).lower()
    kind = axis.get("type") if isinstance(axis, dict) else None
    if kind == "channel" or name == "c":
        return "C"
    return {"y": "Y", "x": "X", "z": "Z"}.get(name, "T")


def _layout(letters: str, shape: tuple[int, ...], path: Path) -> str:
    """Each source axis as Y, X, C (the channels) or 1 (length 1, read at index 0); refuses stacks."""
    if 0 in shape:
        raise PipelineError(f"{path}: the image is empty (shape {shape})")
    layout = "".join(letter if letter in "YX" else "1" if size == 1 else "C" if letter in "SC" else "Z"
                     for letter, size in zip(letters, shape))
    if layout.count("Y") != 1 or layout.count("X") != 1 or layout.count("C") > 1:
        raise PipelineError(f"{path}: axes {letters} of shape {shape} are not one image: expected Y and X "
                            "and at most one channel axis (C or S)")
    if "Z" in layout:
        slices = math.prod(size for axis, size in zip(layout, shape) if axis == "Z")
        raise PipelineError(f"{path}: a stack of {slices} images (axes {letters}, shape {shape}); an image "
                            "larger than memory must be one 2-D image per file")
    return layout


def _selected_channels(have: int, channels: int | None, path: Path) -> slice:
    """The file's channels that the model reads: all, or the first of a grey image stored as colour."""
    if channels is None or have == channels:
        return slice(None)
    if channels == 1 and have in (3, 4):
        return slice(0, 1)  # io.COLOUR_AS_GREY; `statistics` checks every pixel
    io.as_model_channels(np.zeros((1, 1, 1, have), np.uint8), channels, path)  # raises io's one line
    raise AssertionError("io.as_model_channels accepted a channel mismatch")


def _pixel_size(path: Path) -> tuple[io.Calibration | None, int | None]:
    """(the input's pixel size, the zarr format of its OME-Zarr outputs or None for TIFFs)."""
    if not is_ome_zarr(path):
        return io.read_calibration(path), None
    group = zarr.open_group(path, mode="r")
    multiscale = _multiscale(group)
    letters = [_axis_letter(axis) for axis in multiscale["axes"]]
    scale = next((transform["scale"] for transform in multiscale["datasets"][0].get("coordinateTransformations", [])
                  if transform.get("type") == "scale"), None)
    if scale is None:
        return None, group.metadata.zarr_format
    unit = next((axis.get("unit", "") for axis in multiscale["axes"] if isinstance(axis, dict)
                 and _axis_letter(axis) == "X"), "")
    return io.Calibration(scale[letters.index("X")], scale[letters.index("Y")], unit), group.metadata.zarr_format


# --- the chunk grid and the normalisation ---------------------------------------------------


def chunk_side(config: Config) -> int:
    """The side of a chunk: `predict.chunk_size` rounded down to whole tile steps, at least one step."""
    step = _geometry(config)[2]
    return max(step, config.predict.chunk_size // step * step)


def chunks(height: int, width: int, config: Config) -> list[Chunk]:
    """The chunks of an image of `height` x `width` pixels, in raster order."""
    return _grid(height, width, chunk_side(config))


def _grid(height: int, width: int, side: int) -> list[Chunk]:
    """The chunks of `side` pixels of an image, in raster order."""
    return [Chunk(row, col, min(side, height - row), min(side, width - col))
            for row in range(0, height, side) for col in range(0, width, side)]


def statistics(path: Path, config: Config) -> tuple[float, float]:
    """(mean, scale) that `normalization.normalize` would give the whole image, in one streaming pass.

    tf.image.per_image_standardization's rule over all pixels and channels the model reads:
    scale = max(standard deviation, 1 / sqrt(number of values)). Chunk by chunk in float64
    (Chan et al.'s pairwise update of mean and sum of squared deviations). Refuses NaN or
    infinite pixels, and a colour image that `open_lazy` took for grey but is not.
    """
    channels = config.model.input_channels
    count, mean, squares, invalid = 0, 0.0, 0.0, 0
    with contextlib.closing(_open(path, None)[0]) as image:
        as_grey = channels == 1 and image.shape[2] in (3, 4)
        first = image[0:1, 0:1][0, 0]
        for chunk in chunks(*image.shape[:2], config):
            block = image[chunk.row:chunk.row + chunk.height, chunk.col:chunk.col + chunk.width]
            if as_grey:
                _check_grey(block, first, path)
                block = block[..., :1]
            values = block.astype(np.float64)
            if block.dtype.kind == "f":
                invalid += np.count_nonzero(~np.isfinite(values))
            count, mean, squares = _merged(count, mean, squares, values)
    if invalid:
        raise PipelineError(f"{path}: {invalid} NaN/infinite pixel values")
    return mean, max(math.sqrt(squares / count), 1 / math.sqrt(count))


def _merged(count: int, mean: float, squares: float, values: np.ndarray) -> tuple[int, float, float]:
    """(count, mean, sum of squared deviations) of the values seen so far and `values`."""
    block_count, block_mean = values.size, float(values.mean())
    block_squares = float(np.square(values - block_mean).sum())
    total = count + block_count
    delta = block_mean - mean
    return total, mean + delta * block_count / total, squares + block_squares + delta**2 * count * block_count / total


def _check_grey(block: np.ndarray, first: np.ndarray, path: Path) -> None:
    """Refuses, with io's line, a colour block that is not grey by `io.COLOUR_AS_GREY` (alpha as the first pixel's)."""
    grey = (block[..., 1:3] == block[..., :1]).all(axis=-1) & (block[..., 3:] == first[3:]).all(axis=-1)
    if not grey.all():
        offending = block[~grey][0]
        # The first pixel and an offending one: the same check, on two pixels, raises io's message.
        io.as_model_channels(np.stack([first, offending])[None, None], 1, path)


# --- prediction ---------------------------------------------------------------------------


def predict_chunk(model: keras.Model, path: Path, chunk: Chunk, stats: tuple[float, float],
                  config: Config) -> np.ndarray:
    """[chunk.height, chunk.width] float32 probability of cell: the whole-image prediction's box.

    Reads only the chunk's box, its margins and the rest of its last tiles' windows (at
    the image's far borders, the pixels their mirror images come from), normalises them
    with `stats` (from `statistics`) and runs the tiles `predict.tiles_per_batch` at a time.
    With test-time augmentation, each of the eight views is predicted on its own tile grid.
    """
    with contextlib.closing(_open(path, config.model.input_channels)[0]) as image:
        if not config.predict.test_time_augmentation:
            return _predict_view(model, image, chunk, _VIEWS[0], stats, config)
        total = np.zeros((chunk.height, chunk.width), np.float32)
        for view in _VIEWS:  # summed as they come, not held eight at a time
            total += _predict_view(model, image, chunk, view, stats, config)
        return total / np.float32(len(_VIEWS))


def _geometry(config: Config) -> tuple[int, int, int]:
    """(output side, margin, step) of the prediction tiles."""
    return tile_geometry(config.predict.tile_size, config.model.depth, config.model.padding)


def _predict_view(model: keras.Model, image: LazyImage, chunk: Chunk, view: tuple[bool, bool, bool],
                  stats: tuple[float, float], config: Config) -> np.ndarray:
    """The chunk's probability of cell as predicted on one view of the image, in the image's orientation."""
    transpose, reverse_rows, reverse_cols = view
    height, width = image.shape[:2]
    # The chunk along the view's rows and columns: (start, count, axis length) in the image.
    along_rows = (chunk.col, chunk.width, width) if transpose else (chunk.row, chunk.height, height)
    along_cols = (chunk.row, chunk.height, height) if transpose else (chunk.col, chunk.width, width)
    row_sources, row_skip = _window(*along_rows, reverse_rows, config)
    col_sources, col_skip = _window(*along_cols, reverse_cols, config)
    if transpose:
        region = np.swapaxes(_gather(image, col_sources, row_sources), 0, 1)
    else:
        region = _gather(image, row_sources, col_sources)
    mean, scale = stats
    # As tf.image.per_image_standardization computes it: in float32, subtract, then divide.
    normalised = (region.astype(np.float32) - np.float32(mean)) / np.float32(scale)
    tile, step = config.predict.tile_size, _geometry(config)[2]
    output = _predict(model, tf.constant(normalised), tile, step, config.predict.tiles_per_batch)
    output = output[row_skip:row_skip + along_rows[1], col_skip:col_skip + along_cols[1], 1].numpy()
    output = output[::-1] if reverse_rows else output
    output = output[:, ::-1] if reverse_cols else output
    return np.ascontiguousarray(output.T if transpose else output)


def _window(start: int, count: int, size: int, reverse: bool, config: Config) -> tuple[np.ndarray, int]:
    """(image index of every input row the tiles read, where the box starts in their output) along one axis.

    The box [start, start + count) of an axis of `size` pixels, in a view that reverses
    the axis or not; the tiles are those of the view's whole-image grid that cover it.
    """
    out, margin, step = _geometry(config)
    first = size - start - count if reverse else start  # the box in the view
    origin = first // step * step
    tiles = -(-(first + count - origin) // step)
    window = _padded_axis(size, out, margin, step)[origin:origin + config.predict.tile_size + (tiles - 1) * step]
    return (size - 1 - window if reverse else window), first - origin


def _padded_axis(size: int, out: int, margin: int, step: int) -> np.ndarray:
    """The image index of every position of an axis as the whole-image pass pads it (`tiling.padding`).

    Padding the indices themselves with `mirror_pad` applies the one mirror rule.
    """
    indices = tf.reshape(tf.range(size), [size, 1, 1])
    return mirror_pad(indices, *padding(size, out, margin, step), 0, 0)[:, 0, 0].numpy()


def _gather(image: LazyImage, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """image[rows][:, cols] for index arrays, reading only the box that contains them."""
    top, left = int(rows.min()), int(cols.min())
    box = image[top:int(rows.max()) + 1, left:int(cols.max()) + 1]
    return box[np.ix_(rows - top, cols - left)]


@tf.function(reduce_retracing=True)
def _predict(model: keras.Model, padded: tf.Tensor, tile_size: int, step: int, tiles_per_batch: int) -> tf.Tensor:
    """`tiling.predict_padded` as one graph: a graph's while loop beats eager tile batches, and
    generalised shapes keep the chunks of other sizes at the borders from tracing it again."""
    return predict_padded(model, padded, tile_size, step, tiles_per_batch)


# --- outputs: plan, write, finish ---------------------------------------------------------


def plan(path: Path, output_dir: Path, name: str, config: Config, overwrite: bool = False) -> LargeOutputs:
    """Checks everything that can be checked before predicting, and makes the scratch arrays.

    Refuses (one line each) what chunked prediction cannot do, an unreadable input, an
    output folder that takes no files, existing outputs unless `overwrite` and too little
    free space. The probability (float32) and mask (uint8) arrays are made in a hidden
    scratch folder in `output_dir`, chunked like the chunks, so that every chunk writes
    whole files of its own.
    """
    path, output_dir = Path(path), Path(output_dir)
    _refuse_unsupported(path, config)
    io.check_output_folder(output_dir)
    with open_lazy(path, config.model.input_channels) as image:
        height, width = image.shape[:2]
    targets = output_paths(path, output_dir, name)
    _refuse_existing(targets, overwrite)
    # float32 probability, uint8 mask, at most uint32 labels: as scratch, and again as TIFFs.
    io.check_free_space(output_dir, height * width * 9 * (1 if is_ome_zarr(path) else 2))
    calibration, zarr_format = _pixel_size(path)
    print(f"notice: {path}: predicted chunk by chunk (more than predict.max_whole_pixels="
          f"{config.predict.max_whole_pixels} pixels); no overlay picture", file=sys.stderr)
    created = tuple(_missing_folders(output_dir))
    outputs = LargeOutputs(path, tuple(targets), output_dir / f".{name}.large.{secrets.token_hex(6)}.tmp",
                           height, width, chunk_side(config), zarr_format, calibration, overwrite, created)
    try:
        with _writing(output_dir):
            for folder in created:
                os.mkdir(folder)
            os.mkdir(outputs.scratch)
            _create_array(outputs, "prob", np.float32)
            _create_array(outputs, "mask", np.uint8)
    except BaseException:
        discard(outputs)
        raise
    return outputs


def _refuse_unsupported(path: Path, config: Config) -> None:
    """Refuses settings that chunked prediction cannot follow exactly."""
    if config.predict.instances != "components":
        raise PipelineError(f"{path}: predict.instances={config.predict.instances} cannot label an image of more "
                            "than predict.max_whole_pixels pixels, which is labelled chunk by chunk; use "
                            "predict.instances=components")


def _refuse_existing(targets: list[Path], overwrite: bool) -> None:
    """Existing outputs unless `overwrite`, and a file where a folder must go or the reverse."""
    io.refuse_existing(targets, overwrite)
    for target in targets:
        folder = target.name.endswith(".zarr")
        if target.exists() and target.is_dir() != folder:
            found, wanted = ("file", "folder") if folder else ("folder", "file")
            raise PipelineError(f"{target}: is a {found}, not a {wanted}")


def _missing_folders(folder: Path) -> list[Path]:
    """The folders to create, outermost first, so that `folder` exists."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    return missing[::-1]


def _array_path(outputs: LargeOutputs, kind: str) -> Path:
    """The scratch zarr array of `kind`: bare for TIFF outputs, level 0 of the OME-Zarr output itself."""
    if outputs.zarr_format is None:
        return outputs.scratch / f"{kind}.zarr"
    return outputs.scratch / outputs.targets[_KINDS.index(kind)].name / "0"


def _create_array(outputs: LargeOutputs, kind: str, dtype: type) -> None:
    """Makes the scratch array of `kind`, with whole chunks per `Chunk`."""
    shape, side = (outputs.height, outputs.width), outputs.side
    if outputs.zarr_format is None:
        # One shard per chunk, written whole; rows of it read alone, so that the TIFF
        # writer's bands of tiles decode only the rows they need.
        compressors = None if dtype == np.float32 else "auto"
        zarr.create_array(_array_path(outputs, kind), shape=shape, dtype=dtype, shards=(side, side),
                          chunks=(_band(side), side), fill_value=0, compressors=compressors)
        return
    group = zarr.open_group(_array_path(outputs, kind).parent, mode="w", zarr_format=outputs.zarr_format)
    group.attrs.update(_ngff_attributes(outputs))
    if outputs.zarr_format == 2:  # NGFF 0.4 asks for "/" between chunk indices
        group.create_array("0", shape=shape, dtype=dtype, chunks=(side, side), fill_value=0,
                           chunk_key_encoding={"name": "v2", "separator": "/"})
    else:
        group.create_array("0", shape=shape, dtype=dtype, chunks=(side, side), fill_value=0,
                           dimension_names=["y", "x"])


def _band(side: int) -> int:
    """Rows of the scratch arrays' inner chunks: a divisor of the side near the TIFF tile's height."""
    return next(rows for rows in range(min(TIFF_TILE, side), 0, -1) if side % rows == 0)


def _ngff_attributes(outputs: LargeOutputs) -> dict:
    """The attributes of a single-scale OME-NGFF image with axes y, x and the input's pixel size."""
    unit = {"unit": outputs.calibration.unit} if outputs.calibration and outputs.calibration.unit else {}
    scale = [outputs.calibration.y, outputs.calibration.x] if outputs.calibration else [1.0, 1.0]
    multiscale = {"axes": [{"name": "y", "type": "space", **unit}, {"name": "x", "type": "space", **unit}],
                  "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": scale}]}]}
    if outputs.zarr_format == 2:
        return {"multiscales": [{"version": "0.4", **multiscale}]}
    return {"ome": {"version": "0.5", "multiscales": [multiscale]}}


@contextlib.contextmanager
def _writing(target: Path) -> Iterator[None]:
    """Turns a file-system error into one line naming the output it was for."""
    try:
        yield
    except OSError as error:
        raise PipelineError(f"{target}: cannot write ({error.strerror or error})") from None


def write_chunk(outputs: LargeOutputs, chunk: Chunk, probability: np.ndarray, config: Config) -> None:
    """Writes one chunk's probability and mask (255 = cell, by `instances.cell_mask`).

    The chunk covers whole files of the scratch arrays, so a retried or repeated chunk
    rewrites the same bytes and chunks written at once by several workers never meet.
    """
    if probability.shape != (chunk.height, chunk.width):
        raise ValueError(f"probability of shape {probability.shape} for a chunk of {chunk.height} x {chunk.width}")
    box = (slice(chunk.row, chunk.row + chunk.height), slice(chunk.col, chunk.col + chunk.width))
    mask = instances.cell_mask(probability, config.predict.threshold).astype(np.uint8) * 255
    for kind, values in (("prob", probability.astype(np.float32)), ("mask", mask)):
        with _writing(outputs.targets[_KINDS.index(kind)]):
            zarr.open_array(_array_path(outputs, kind), mode="r+")[box] = values


def finish(outputs: LargeOutputs, config: Config) -> list[Path]:
    """Labels the cells, writes their measurements and the final files, and renames them into place.

    Labels as `instances.cell_instances(probability, threshold, "components", min_size)`
    would on the whole image, in two passes over the chunks: 4-connected components per
    chunk, joined across chunk borders and measured, then relabelled. The outputs appear
    together or not at all; the scratch folder is removed when they are in place, and
    kept if this fails (`discard` removes it).
    """
    _refuse_unsupported(outputs.source, config)
    grid = _grid(outputs.height, outputs.width, outputs.side)  # the scratch arrays' chunks
    fragments = _fragments(outputs, grid, config.predict.threshold, config.predict.min_size)
    cells = _cells(fragments, config.predict.min_size)
    dtype = instances.label_image(np.array([len(cells.area)])).dtype  # its type for labels up to N
    labels_target, csv_target = outputs.targets[2], outputs.targets[3]
    with _writing(labels_target):
        _create_array(outputs, "labels", dtype)
        _write_labels(outputs, grid, fragments.offsets, cells.lookup.astype(dtype), config.predict.min_size)
    made = [_array_path(outputs, kind).parent for kind in _KINDS]
    if outputs.zarr_format is None:
        made = [outputs.scratch / target.name for target in outputs.targets[:3]]
        for kind, tiff in zip(_KINDS, made):
            with _writing(outputs.targets[_KINDS.index(kind)]):
                _write_tiff(tiff, zarr.open_array(_array_path(outputs, kind), mode="r"), _COMPRESSION[kind],
                            outputs.calibration)
    made.append(outputs.scratch / csv_target.name)
    with _writing(csv_target):
        _write_measurements(made[-1], cells)
    _publish(made, outputs)
    shutil.rmtree(outputs.scratch, ignore_errors=True)
    return list(outputs.targets)


def discard(outputs: LargeOutputs) -> None:
    """Removes the scratch folder of a failed run, and the output folders its `plan` created if still empty."""
    shutil.rmtree(outputs.scratch, ignore_errors=True)
    for folder in reversed(outputs.created):
        with contextlib.suppress(OSError):  # not empty: another process wrote into it meanwhile
            folder.rmdir()


def segment_large(model: keras.Model, path: Path, output_dir: Path, name: str, config: Config,
                  overwrite: bool = False) -> list[Path]:
    """Segments one image larger than memory in this process: plan, statistics, every chunk, finish.

    Returns the output paths; on any failure nothing of them appears and the scratch
    folder is removed.
    """
    outputs = plan(path, output_dir, name, config, overwrite)
    try:
        stats = statistics(path, config)
        grid = chunks(outputs.height, outputs.width, config)
        progress = progress_bar(len(grid), "chunk")
        for chunk in grid:
            write_chunk(outputs, chunk, predict_chunk(model, path, chunk, stats, config), config)
            progress.add(1)
        return finish(outputs, config)
    except BaseException:
        discard(outputs)
        raise


# --- labels of a large image ----------------------------------------------------------------


@dataclasses.dataclass
class _Fragments:
    """The kept 4-connected components of every chunk (fragments of cells), numbered chunk after chunk."""

    offsets: list[int]  # per chunk, the number of its first fragment
    first: np.ndarray  # raster index (row * width + col) of each fragment's first pixel
    area: np.ndarray
    top: np.ndarray  # bounding box, last row and column included
    left: np.ndarray
    bottom: np.ndarray
    right: np.ndarray
    row_sum: np.ndarray  # sums of the pixels' rows and columns (exact integers) and probabilities
    col_sum: np.ndarray
    probability_sum: np.ndarray
    touching: np.ndarray  # [E, 2] fragments of one cell: 4-neighbours across a chunk border


@dataclasses.dataclass
class _Cells:
    """The cells kept, numbered 1..N, and the label of every fragment (0: dropped)."""

    lookup: np.ndarray
    area: np.ndarray
    row_sum: np.ndarray
    col_sum: np.ndarray
    top: np.ndarray
    left: np.ndarray
    bottom: np.ndarray
    right: np.ndarray
    probability_sum: np.ndarray


def _fragments(outputs: LargeOutputs, grid: list[Chunk], threshold: float, min_size: int) -> _Fragments:
    """First pass: every chunk's components, measured, and which of them touch across chunk borders.

    Holds one chunk, the fragments' measurements and the border lines of one row of
    chunks (the bottom rows of the chunks above): memory of a chunk, the perimeters and
    the cells. Specks under `min_size` that lie whole in their chunk are dropped at once.
    """
    probability = zarr.open_array(_array_path(outputs, "prob"), mode="r")
    parts: list[dict[str, np.ndarray]] = []
    touching: list[np.ndarray] = []
    offsets: list[int] = []
    above: dict[int, np.ndarray] = {}  # chunk column -> fragments along the bottom row of the chunk above
    right_edge = np.empty(0, np.int64)  # fragments along the right column of the chunk to the left
    total = 0
    for chunk in grid:
        block = probability[chunk.row:chunk.row + chunk.height, chunk.col:chunk.col + chunk.width]
        count, local, stats, centroids = _components(instances.cell_mask(block, threshold))
        kept = _kept(chunk, stats, min_size, outputs.height, outputs.width)
        numbers = _fragment_numbers(kept, total)
        if chunk.col > 0:
            touching.append(_touching(right_edge, numbers[local[:, 0]]))
        if chunk.row > 0:
            touching.append(_touching(above[chunk.col], numbers[local[0]]))
        above[chunk.col], right_edge = numbers[local[-1]], numbers[local[:, -1]]
        measured = _measured(chunk, local, count, stats, centroids, block, outputs.width)
        parts.append({key: values[kept] for key, values in measured.items()})
        offsets.append(total)
        total += np.count_nonzero(kept)
    joined = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    pairs = np.concatenate(touching) if touching else np.empty((0, 2), np.int64)
    return _Fragments(offsets=offsets, touching=pairs, **joined)


def _components(cells: np.ndarray) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """The 4-connected components of a boolean chunk: (count with the background, labels, stats, centroids)."""
    return cv2.connectedComponentsWithStats(cells.astype(np.uint8), connectivity=4, ltype=cv2.CV_32S)


def _kept(chunk: Chunk, stats: np.ndarray, min_size: int, height: int, width: int) -> np.ndarray:
    """Which components 1..count-1 of a chunk are fragments to keep: those of `min_size` pixels or
    more, and those on a border shared with another chunk, where they may continue."""
    top, left = stats[1:, cv2.CC_STAT_TOP], stats[1:, cv2.CC_STAT_LEFT]
    bottom, right = top + stats[1:, cv2.CC_STAT_HEIGHT], left + stats[1:, cv2.CC_STAT_WIDTH]
    shared = (((top == 0) & (chunk.row > 0)) | ((left == 0) & (chunk.col > 0))
              | ((bottom == chunk.height) & (chunk.row + chunk.height < height))
              | ((right == chunk.width) & (chunk.col + chunk.width < width)))
    return shared | (stats[1:, cv2.CC_STAT_AREA] >= min_size)


def _fragment_numbers(kept: np.ndarray, first: int) -> np.ndarray:
    """The fragment number of each component 0..count-1 of a chunk (the kept ones from `first` on), else -1."""
    numbers = np.full(len(kept) + 1, -1, np.int64)
    numbers[1:][kept] = first + np.arange(np.count_nonzero(kept))
    return numbers


def _touching(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """[E, 2] distinct pairs of fragments facing each other along two border lines (-1: no cell)."""
    both = (before >= 0) & (after >= 0)
    return np.unique(np.stack([before[both], after[both]], axis=1), axis=0)


def _measured(chunk: Chunk, local: np.ndarray, count: int, stats: np.ndarray, centroids: np.ndarray,
              block: np.ndarray, width: int) -> dict[str, np.ndarray]:
    """The measurements of one chunk's components 1..count-1, in image coordinates."""
    area = stats[1:, cv2.CC_STAT_AREA].astype(np.int64)
    top = stats[1:, cv2.CC_STAT_TOP].astype(np.int64) + chunk.row
    left = stats[1:, cv2.CC_STAT_LEFT].astype(np.int64) + chunk.col
    first = _first_pixels(local, count)
    return {
        "first": (chunk.row + first // chunk.width) * width + chunk.col + first % chunk.width,
        "area": area, "top": top, "left": left,
        "bottom": top + stats[1:, cv2.CC_STAT_HEIGHT] - 1, "right": left + stats[1:, cv2.CC_STAT_WIDTH] - 1,
        # OpenCV's centroids are exact integer sums over the area in double precision: rounded
        # back to those sums, chunks add up without rounding, as instances.measure's sums are exact.
        "row_sum": np.rint(centroids[1:, 1] * area).astype(np.int64) + chunk.row * area,
        "col_sum": np.rint(centroids[1:, 0] * area).astype(np.int64) + chunk.col * area,
        "probability_sum": np.bincount(local.ravel(), block.ravel(), count)[1:],
    }


def _first_pixels(local: np.ndarray, count: int) -> np.ndarray:
    """Position in the flattened chunk of the first pixel of each component 1..count-1."""
    flat = local.ravel()
    # OpenCV numbers components in raster order of their first pixels, so each first pixel
    # raises the running maximum of the labels; checked, with a sort if it ever does not.
    first = np.flatnonzero(np.diff(np.maximum.accumulate(flat), prepend=0) > 0)
    if len(first) == count - 1:
        return first
    labels, positions = np.unique(flat, return_index=True)
    return positions[labels > 0]


def _cells(fragments: _Fragments, min_size: int) -> _Cells:
    """Joins touching fragments into cells, drops those under `min_size` pixels, numbers the rest
    1..N in raster order of their first pixels, and sums their measurements."""
    count = len(fragments.area)
    roots = _roots(count, fragments.touching)
    area = np.bincount(roots, fragments.area, count).astype(np.int64)  # float64 sums of integers: exact
    first = _reduced(np.minimum, roots, fragments.first, count)
    kept = np.flatnonzero((roots == np.arange(count)) & (area >= min_size))
    kept = kept[np.argsort(first[kept], kind="stable")]
    number = np.zeros(count, np.int64)
    number[kept] = np.arange(1, len(kept) + 1)
    return _Cells(
        lookup=number[roots], area=area[kept],
        # Sums of integers below 2**53 in float64 are exact.
        row_sum=np.bincount(roots, fragments.row_sum, count)[kept].astype(np.int64),
        col_sum=np.bincount(roots, fragments.col_sum, count)[kept].astype(np.int64),
        top=_reduced(np.minimum, roots, fragments.top, count)[kept],
        left=_reduced(np.minimum, roots, fragments.left, count)[kept],
        bottom=_reduced(np.maximum, roots, fragments.bottom, count)[kept],
        right=_reduced(np.maximum, roots, fragments.right, count)[kept],
        probability_sum=np.bincount(roots, fragments.probability_sum, count)[kept])


def _reduced(ufunc: np.ufunc, roots: np.ndarray, values: np.ndarray, count: int) -> np.ndarray:
    """`ufunc` (np.minimum or np.maximum) of `values` over the fragments of each root."""
    result = values.copy()  # each root is its own fragment, so it starts from its own value
    ufunc.at(result, roots, values)
    return result


def _roots(count: int, pairs: np.ndarray) -> np.ndarray:
    """The root (smallest member) of every fragment's cell: union-find over the touching pairs.

    Vectorised as in `inference.connected_components`: each round hooks the larger root of
    every pair under the smaller one and compresses every path by pointer jumping, until
    no pair joins two trees. Parents only ever decrease, so no cycle can form.
    """
    parent = np.arange(count)
    while True:
        ends = parent[pairs[:, 0]], parent[pairs[:, 1]]
        if np.array_equal(*ends):
            return parent
        np.minimum.at(parent, np.maximum(*ends), np.minimum(*ends))
        while not np.array_equal(parent[parent], parent):
            parent = parent[parent]


def _write_labels(outputs: LargeOutputs, grid: list[Chunk], offsets: list[int], lookup: np.ndarray,
                  min_size: int) -> None:
    """Second pass: each chunk's components again (the same, from the same mask), relabelled as cells."""
    mask = zarr.open_array(_array_path(outputs, "mask"), mode="r")
    labels = zarr.open_array(_array_path(outputs, "labels"), mode="r+")
    ends = [*offsets[1:], len(lookup)]
    for chunk, offset, end in zip(grid, offsets, ends):
        box = (slice(chunk.row, chunk.row + chunk.height), slice(chunk.col, chunk.col + chunk.width))
        _, local, stats, _ = _components(mask[box] > 0)
        kept = _kept(chunk, stats, min_size, outputs.height, outputs.width)
        if np.count_nonzero(kept) != end - offset:  # the first pass saw another mask: a bug, not the user's
            raise RuntimeError(f"{chunk}: {np.count_nonzero(kept)} fragments, {end - offset} in the first pass")
        numbers = _fragment_numbers(kept, offset)
        table = np.zeros(len(numbers), lookup.dtype)  # background and dropped specks: 0
        table[numbers >= 0] = lookup[numbers[numbers >= 0]]
        labels[box] = table[local]


def _write_measurements(path: Path, cells: _Cells) -> None:
    """Each cell's `instances.COLUMNS` as CSV, formatted as the predict stage formats a single image's."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(instances.COLUMNS)
        columns = (cells.area, cells.row_sum / cells.area, cells.col_sum / cells.area, cells.top, cells.left,
                   cells.bottom, cells.right, cells.probability_sum / cells.area)
        for label, (area, y, x, top, left, bottom, right, mean) in enumerate(zip(*columns), start=1):
            writer.writerow([label, int(area), f"{y:.3f}", f"{x:.3f}", int(top), int(left), int(bottom), int(right),
                             f"{mean:.6f}"])


# --- final files ----------------------------------------------------------------------------


def _write_tiff(path: Path, array: zarr.Array, compression: dict, calibration: io.Calibration | None) -> None:
    """Writes a 2-D zarr array as a tiled BigTIFF, streamed tile by tile (`compression`: tifffile's keywords)."""
    tifffile.imwrite(path, _tiles(array), shape=array.shape, dtype=array.dtype, tile=(TIFF_TILE, TIFF_TILE),
                     bigtiff=True, photometric="minisblack", **compression, **_resolution_tags(calibration))


def _tiles(array: zarr.Array) -> Iterator[np.ndarray]:
    """The array's TIFF tiles in the file's order, read a band of tiles about one chunk wide at a time."""
    height, width = array.shape
    across = max(TIFF_TILE, array.shards[1] // TIFF_TILE * TIFF_TILE if array.shards else array.chunks[1])
    for row in range(0, height, TIFF_TILE):
        for start in range(0, width, across):
            band = array[row:row + TIFF_TILE, start:start + across]
            for col in range(0, band.shape[1], TIFF_TILE):
                yield band[:, col:col + TIFF_TILE]


def _resolution_tags(calibration: io.Calibration | None) -> dict:
    """tifffile.imwrite's keywords for the pixel size: TIFF resolution tags in pixels per centimetre.

    ImageJ's own metadata (what `io.encode_tiff` writes for small images) does not go with
    tiled BigTIFFs, which ImageJ reads through Bio-Formats, from these tags.
    """
    if calibration is None:
        return {}
    per_cm = io._CENTIMETRES.get(calibration.unit)  # io's table of units; see io._calibration_tags
    if per_cm is None:  # a unit TIFF's tags cannot name: the numbers without it
        return {"resolution": (1 / calibration.x, 1 / calibration.y)}
    return {"resolution": (per_cm / calibration.x, per_cm / calibration.y), "resolutionunit": "CENTIMETER"}


def _publish(made: list[Path], outputs: LargeOutputs) -> None:
    """Renames the made files and folders to their targets, all or none.

    A target that exists (with `overwrite`) is first moved into the scratch folder and
    moved back if a later rename fails; a replaced file's mode passes to its successor,
    as `io.atomic_paths` does.
    """
    replaced: list[tuple[Path, Path]] = []  # (where the old target waits, the target)
    placed: list[Path] = []
    target = outputs.targets[0]
    try:
        try:
            for index, (source, target) in enumerate(zip(made, outputs.targets)):
                if os.path.lexists(target):
                    io.refuse_existing([target], outputs.overwrite)
                    old = outputs.scratch / f"replaced-{index}"
                    os.replace(target, old)
                    replaced.append((old, target))
                    if source.is_file() and old.is_file():
                        os.chmod(source, stat.S_IMODE(old.stat().st_mode))
                os.replace(source, target)
                placed.append(target)
        except OSError as error:
            raise PipelineError(f"{target}: cannot write ({error.strerror or error})") from None
    except BaseException:
        for path in placed:
            with contextlib.suppress(OSError):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        for old, path in replaced:
            with contextlib.suppress(OSError):
                os.replace(old, path)
        raise
