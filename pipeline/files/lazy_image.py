"""Opening an image larger than memory lazily: a tiled or striped TIFF, or an OME-Zarr image.

`open_lazy` gives a `LazyImage`, an [H, W, C] array whose boxes are read on demand
(`image[rows, cols]`): from a TIFF through tifffile's zarr store over its tiles or strips
(an uncompressed contiguous one is memory-mapped), from an OME-Zarr image (OME-NGFF 0.4
or 0.5) at its first multiscale level. The axes come from the file (tifffile's series
axes, the NGFF axes), never from the shape, and one 2-D image is taken: axes of length 1
are read at index 0, one channel axis (C or S) gives the channels, and anything else (a
stack) is refused. Channels follow `io`'s rules for a model's channel count. Every
refusal is one line naming the file. `pixel_size_and_format` reads the pixel size that
the outputs keep.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import tifffile
import zarr

from pipeline.errors import PipelineError
from pipeline.files import io

TIFF_SUFFIXES = (".tif", ".tiff")
# The most values of one compressed strip or tile of an input that may be decoded at once
# (a 64 MB strip of 8-bit pixels): larger ones are refused instead of filling the memory.
_LARGEST_STRIP = 2**26


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


def open_lazy(path: Path, channels: int | None, notice: bool = True) -> LazyImage:
    """A tiled or striped TIFF, or an OME-Zarr image, as a lazily read [H, W, channels] array.

    The channels follow `io.read_stack`'s rules: a grey image stored as colour is read as
    its first channel for a 1-channel model (with `io`'s notice unless `notice` is False;
    `large_image.statistics`, which reads every pixel, refuses it if it is not grey after
    all), any other mismatch is refused; `channels=None` reads the file's own channels.
    One 2-D image only; stacks, unreadable files and unsupported pixel types are refused
    with one line naming the file. Close it (or use `with`) to release the file.
    """
    image, have = _open(path, channels)
    if notice and channels is not None and have != channels:
        io.grey_notice(path)  # the only mismatch `_open` lets through
    return image


def _open(path: Path, channels: int | None) -> tuple[LazyImage, int]:
    """(the image with `channels` channels, or the file's own with None; the file's channel count), quietly."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{path}: file not found")
    if io.is_ome_zarr(path):
        source, letters, closing = _open_ome_zarr(path)
    elif path.suffix.lower() in TIFF_SUFFIXES:
        source, letters, closing = _open_tiff(path)
    else:
        raise PipelineError(f"{path}: unsupported file type for an image larger than memory; "
                            f"use {', '.join(TIFF_SUFFIXES + io.ZARR_SUFFIXES)}")
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
        return slice(0, 1)  # io.COLOUR_AS_GREY; `large_image.statistics` checks every pixel
    raise io.channel_mismatch(path, have, channels)


def pixel_size_and_format(path: Path) -> tuple[io.Calibration | None, int | None]:
    """(the input's pixel size, the zarr format of its OME-Zarr outputs or None for TIFFs)."""
    if not io.is_ome_zarr(path):
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
