"""Chunked prediction of an image read lazily: images larger than memory.

An image of more than `predict.max_whole_pixels` pixels is never held whole. It is read
box by box (`lazy_image`: a tiled or striped TIFF, or an OME-Zarr image) and predicted
in the chunks of `chunk_grid`: output boxes of `chunk_side` pixels, a whole number of
prediction tile steps, aligned to the tile grid of the whole image. A chunk reads exactly
the mirror-padded pixels that the whole-image pass (`tiling`) would give its tiles (real
neighbours inside the image, mirror extrapolation only at its borders), so chunked
outputs equal whole-image ones up to the float rounding of the normalisation constants,
which `statistics` computes in one streaming pass. Test-time augmentation is exact too:
each of its eight views predicts the chunk on that view's own tile grid.

The work is split so that a Beam pipeline can hand chunks to workers: `check` refuses
what cannot be done before anything is written, `plan` checks and makes the hidden
scratch folder with zarr arrays chunked like the chunks, `predict_chunk` and
`write_chunk` do one chunk (a retried chunk rewrites the same bytes), and `finish` labels
the cells chunk by chunk (`chunked_labels`), writes their measurements and the final
files, and renames them into place. `segment_large` is the same in one process.
Everything passed between these functions is a plain dataclass of paths and numbers.

Outputs, named by `outputs.large_paths`: for a TIFF input NAME_prob.tif,
NAME_mask.tif, NAME_labels.tif (tiled BigTIFFs streamed tile by tile, with the input's
pixel size as resolution tags) and NAME_instances.csv; for an OME-Zarr input
NAME_prob.ome.zarr, NAME_mask.ome.zarr, NAME_labels.ome.zarr (single-scale OME-NGFF
images of the input's version, axes y and x, with its pixel size) and the CSV. No
overlay picture. Memory depends on the chunk side, the tile size and the number of
cells, never on the image's size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import stat
import sys
from pathlib import Path
from typing import Iterator, Sequence

import keras
import numpy as np
import tensorflow as tf
import tifffile
import zarr

from pipeline.config.schema import Config
from pipeline.console import progress_bar
from pipeline.errors import PipelineError
from pipeline.files import io
from pipeline.files.lazy_image import TIFF_SUFFIXES, LazyImage, open_lazy, pixel_size_and_format
from pipeline.inference import outputs as output_files
from pipeline.inference.chunk_grid import Chunk, chunk_side, chunks, geometry, grid
from pipeline.inference.labelling import chunked as chunked_labels, instances
from pipeline.inference.tiling import keras_network, padding, predict_padded
from pipeline.mirror import mirror_pad
from pipeline.normalization import constant_notice, standardize

TIFF_TILE = 256  # side of the output TIFFs' tiles: what viewers of tiled TIFFs read well
# Output TIFF compression (measured on an untrained network's speckled 1664 px masks):
# zlib at level 1 shrinks masks 6x and labels 9x at 230 and 135 Mpx/s, almost as much as
# its default level 6 at a fifth of the speed; float probabilities shrink by 10% at a
# tenth of the speed of writing them as they are, so they are not compressed.
_COMPRESSION = {"prob": {}, "mask": {"compression": "zlib", "compressionargs": {"level": 1}},
                "labels": {"compression": "zlib", "compressionargs": {"level": 1}}}
_KINDS = output_files.IMAGE_KINDS  # the order of LargeOutputs.targets

# The eight views of test-time augmentation, in `tiling.overlap_tile_predict`'s order
# (quarter turns 0..3, each unflipped then flipped left-right), each written as
# (transpose, reverse rows, reverse columns) of the image: view[i, j] = image'[i', j'].
_VIEWS = ((False, False, False), (False, False, True), (True, True, False), (True, True, True),
          (False, True, True), (False, True, False), (True, False, True), (True, False, False))


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


def sources(files: Sequence[Path], config: Config) -> list[output_files.Source]:
    """Each input file and whether it is large (`is_large`): decided here once per input, for
    every step of the predict stage that needs to know (its checks, its runners)."""
    return [output_files.Source(Path(file), is_large(file, config)) for file in files]


def is_large(path: Path, config: Config) -> bool:
    """Whether a file is predicted chunk by chunk: a TIFF whose images have more than
    `predict.max_whole_pixels` pixels (from its header only), or any OME-Zarr image,
    which only this module reads.

    A stack of such images is large too, so that `lazy_image.open_lazy` refuses it in one line
    instead of reading it whole. A PNG cannot be read in parts, and a file that cannot
    be read is not large: the whole-image reader reports it.
    """
    path = Path(path)
    if io.is_ome_zarr(path):
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


# --- the normalisation ----------------------------------------------------------------------


def statistics(path: Path, config: Config) -> tuple[float, float]:
    """(mean, standard deviation) that `normalization.normalize` gives the whole image, in one streaming pass.

    `normalization`'s rule over all pixels and channels the model reads: chunk by chunk in
    float64 (Chan et al.'s pairwise update of mean and sum of squared deviations), which
    holds the squares of any float32 image; no floor on the deviation, which is 0 only for
    a constant image (its lowest pixel equals its highest), with a notice. Refuses pixels
    the network cannot read (`io.unreadable_pixels`), and a colour image that `open_lazy`
    took for grey but is not.
    """
    channels = config.model.input_channels
    count, mean, squares, invalid = 0, 0.0, 0.0, 0
    low, high = math.inf, -math.inf
    with contextlib.closing(open_lazy(path, None)) as image:
        as_grey = channels == 1 and image.shape[2] in (3, 4)
        first = image[0:1, 0:1][0, 0]
        for chunk in chunks(*image.shape[:2], config):
            block = image[chunk.box]
            if as_grey:
                _check_grey(block, first, path)
                block = block[..., :1]
            values = block.astype(np.float64)
            invalid += io.unreadable_pixels(block)
            count, mean, squares = _merged(count, mean, squares, values)
            low, high = min(low, values.min()), max(high, values.max())
    if invalid:
        raise io.unreadable_pixels_error(path, invalid)
    if low == high:
        print(constant_notice(path, low), file=sys.stderr)
        return float(low), 0.0
    return mean, math.sqrt(squares / count)


def _merged(count: int, mean: float, squares: float, values: np.ndarray) -> tuple[int, float, float]:
    """(count, mean, sum of squared deviations) of the values seen so far and `values`."""
    block_count, block_mean = values.size, float(values.mean())
    block_squares = float(np.square(values - block_mean).sum())
    total = count + block_count
    delta = block_mean - mean
    return total, mean + delta * block_count / total, squares + block_squares + delta**2 * count * block_count / total


def _check_grey(block: np.ndarray, first: np.ndarray, path: Path) -> None:
    """Refuses, with io's line, a colour block that is not grey by `io.COLOUR_AS_GREY` (alpha as the first pixel's)."""
    if not io.grey_pixels(block, first).all():
        raise io.channel_mismatch(path, block.shape[-1], 1)


# --- prediction ---------------------------------------------------------------------------


def predict_chunk(model: keras.Model, path: Path, chunk: Chunk, stats: tuple[float, float],
                  config: Config) -> np.ndarray:
    """[chunk.height, chunk.width] float32 probability of cell: the whole-image prediction's box.

    Reads only the chunk's box, its margins and the rest of its last tiles' windows (at
    the image's far borders, the pixels their mirror images come from), normalises them
    with `stats` (from `statistics`) and runs the tiles `predict.tiles_per_batch` at a time.
    With test-time augmentation, each of the eight views is predicted on its own tile grid.
    """
    with contextlib.closing(open_lazy(path, config.model.input_channels, notice=False)) as image:
        if not config.predict.test_time_augmentation:
            return _predict_view(model, image, chunk, _VIEWS[0], stats, config)
        total = np.zeros((chunk.height, chunk.width), np.float32)
        for view in _VIEWS:  # summed as they come, not held eight at a time
            total += _predict_view(model, image, chunk, view, stats, config)
        return total / np.float32(len(_VIEWS))


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
    normalised = standardize(region, *stats)
    tile, step = config.predict.tile_size, geometry(config)[2]
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
    out, margin, step = geometry(config)
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
    return predict_padded(keras_network(model), padded, tile_size, step, tiles_per_batch)


# --- outputs: check, plan, write, finish ---------------------------------------------------


def check(path: Path, output_dir: Path, name: str, config: Config, overwrite: bool = False) -> tuple[int, int]:
    """Checks everything that can be checked before predicting; writes nothing. Returns the
    image's (height, width).

    Refuses (one line each) what chunked prediction cannot do, an unreadable input, an
    output folder that takes no files, existing outputs unless `overwrite` and too little
    free space (`space_needed`). The predict stage calls it for every large input before
    it writes anything; `plan` calls it again.
    """
    path, output_dir = Path(path), Path(output_dir)
    _refuse_unsupported(path, config)
    io.check_output_folder(output_dir)
    with open_lazy(path, config.model.input_channels) as image:
        height, width = image.shape[:2]
    _refuse_existing(output_files.large_paths(output_dir, name, io.is_ome_zarr(path)), overwrite)
    io.check_free_space(output_dir, space_needed(path, height, width))
    return height, width


def space_needed(path: Path, height: int, width: int) -> int:
    """Bytes a large input of `height` x `width` pixels needs in its output folder at the most."""
    # float32 probability, uint8 mask, at most uint32 labels: as scratch, and again as TIFFs.
    return height * width * 9 * (1 if io.is_ome_zarr(path) else 2)


def plan(path: Path, output_dir: Path, name: str, config: Config, overwrite: bool = False) -> LargeOutputs:
    """Checks everything that can be checked before predicting (`check`), and makes the scratch arrays.

    The probability (float32) and mask (uint8) arrays are made in a hidden scratch folder
    in `output_dir`, chunked like the chunks, so that every chunk writes whole files of
    its own. The folder names its writer (`io.scratch_name`): the scratch folders that
    killed writers of this host left in `output_dir` are removed first.
    """
    path, output_dir = Path(path), Path(output_dir)
    height, width = check(path, output_dir, name, config, overwrite)
    targets = output_files.large_paths(output_dir, name, io.is_ome_zarr(path))
    calibration, zarr_format = pixel_size_and_format(path)
    print(f"notice: {path}: predicted chunk by chunk (more than predict.max_whole_pixels="
          f"{config.predict.max_whole_pixels} pixels); no overlay picture", file=sys.stderr)
    created = tuple(io.missing_folders(output_dir))
    outputs = LargeOutputs(path, tuple(targets), output_dir / io.scratch_name(f"{name}.large"),
                           height, width, chunk_side(config), zarr_format, calibration, overwrite, created)
    io.remove_abandoned(output_dir)
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
    mask = instances.cell_mask(probability, config.predict.threshold).astype(np.uint8) * 255
    for kind, values in (("prob", probability.astype(np.float32)), ("mask", mask)):
        with _writing(outputs.targets[_KINDS.index(kind)]):
            zarr.open_array(_array_path(outputs, kind), mode="r+")[chunk.box] = values


def finish(outputs: LargeOutputs, config: Config) -> list[Path]:
    """Labels the cells, writes their measurements and the final files, and renames them into place.

    Labels as `instances.cell_instances(probability, threshold, "components", min_size)`
    would on the whole image, in two passes over the chunks (`chunked_labels`): 4-connected
    components per chunk, joined across chunk borders and measured, then relabelled. The
    outputs appear together or not at all; the scratch folder is removed when they are in
    place, and kept if this fails (`discard` removes it).
    """
    _refuse_unsupported(outputs.source, config)
    min_size = config.predict.min_size
    scratch_grid = grid(outputs.height, outputs.width, outputs.side)  # the scratch arrays' chunks
    probability = zarr.open_array(_array_path(outputs, "prob"), mode="r")
    cells = chunked_labels.find_cells(probability, scratch_grid, config.predict.threshold, min_size)
    dtype = instances.label_image(np.array([len(cells.area)])).dtype  # its type for labels up to N
    labels_target, csv_target = outputs.targets[2], outputs.targets[3]
    with _writing(labels_target):
        _create_array(outputs, "labels", dtype)
        chunked_labels.write_labels(zarr.open_array(_array_path(outputs, "mask"), mode="r"),
                                    zarr.open_array(_array_path(outputs, "labels"), mode="r+"), scratch_grid, cells,
                                    min_size)
    made = [_array_path(outputs, kind).parent for kind in _KINDS]
    if outputs.zarr_format is None:
        made = [outputs.scratch / target.name for target in outputs.targets[:3]]
        for kind, tiff in zip(_KINDS, made):
            with _writing(outputs.targets[_KINDS.index(kind)]):
                _write_tiff(tiff, zarr.open_array(_array_path(outputs, kind), mode="r"), _COMPRESSION[kind],
                            outputs.calibration)
    made.append(outputs.scratch / csv_target.name)
    with _writing(csv_target):
        chunked_labels.write_measurements(made[-1], cells, output_files.physical_size(outputs.calibration, csv_target))
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


# --- final files ----------------------------------------------------------------------------


def _write_tiff(path: Path, array: zarr.Array, compression: dict, calibration: io.Calibration | None) -> None:
    """Writes a 2-D zarr array as a tiled BigTIFF, streamed tile by tile (`compression`: tifffile's keywords)."""
    # The pixel size as resolution tags: ImageJ's own metadata (what `io.encode_tiff` writes
    # for small images, the labels' LUT included) does not go with tiled BigTIFFs, which
    # ImageJ reads through Bio-Formats.
    tifffile.imwrite(path, _tiles(array), shape=array.shape, dtype=array.dtype, tile=(TIFF_TILE, TIFF_TILE),
                     bigtiff=True, photometric="minisblack", **compression, **io.resolution_tags(calibration))


def _tiles(array: zarr.Array) -> Iterator[np.ndarray]:
    """The array's TIFF tiles in the file's order, read a band of tiles about one chunk wide at a time."""
    height, width = array.shape
    across = max(TIFF_TILE, array.shards[1] // TIFF_TILE * TIFF_TILE if array.shards else array.chunks[1])
    for row in range(0, height, TIFF_TILE):
        for start in range(0, width, across):
            band = array[row:row + TIFF_TILE, start:start + across]
            for col in range(0, band.shape[1], TIFF_TILE):
                yield band[:, col:col + TIFF_TILE]


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
