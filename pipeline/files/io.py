"""Reading images and writing outputs so that nothing is ever half-written or lost.

Every writer goes through `atomic_paths`: the data goes to hidden temporary files next to
the targets, which are renamed into place only when all of them are complete; an existing
target is refused unless the caller asks to overwrite it, and a file-system error becomes
one line naming the target. Temporaries name their writer (`scratch_name`), so that the
next write into their folder removes those of a killed process (`remove_abandoned`). `check_output_folder`, `check_output_file` and
`check_free_space` let a command refuse an unusable output before any work starts.

Images are read with the axes their file declares, never guessed from the shape (see
`read_stack`, and `read_slices` for files of one value per pixel); a colour image meets a
1-channel model through one rule, `COLOUR_AS_GREY`, tested by `grey_pixels`, which the
serving signature also applies. Which paths are images, and the NAME their outputs are named after, is decided
here too (`image_files`, `image_name`), so that every reader and both runners of the
predict stage agree.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import os
import re
import secrets
import shutil
import socket
import stat
import sys
from io import BytesIO
from pathlib import Path
from typing import Iterator, Sequence

import cv2
import numpy as np
import tifffile

from pipeline.errors import PipelineError

IMAGE_SUFFIXES = (".tif", ".tiff", ".png")
ZARR_SUFFIXES = (".ome.zarr", ".zarr")  # an OME-Zarr image: a folder, read by `lazy_image` only
COLOUR_AS_GREY = (
    "a 1-channel model reads a colour image (3 channels, or 4 with alpha) as grey only when its R, G and B "
    "channels are identical in every pixel and its alpha channel, if any, is constant in each image"
)


@dataclasses.dataclass(frozen=True)
class Calibration:
    """The physical size of an input's pixels, as its file declares it, for its outputs."""

    x: float  # pixel width, in `unit`
    y: float  # pixel height
    unit: str  # as the file names it: "um", "micron", "nm", ...
    z: float | None = None  # slice spacing of a stack (ImageJ's "spacing")


# Length units by the short name outputs give them, with the spellings files use for them
# (ImageJ, TIFF, OME-NGFF's UDUNITS names); matched exactly, never guessed from the case.
LENGTH_UNITS = {
    "nm": ("nm", "nanometer", "nanometre"),
    "um": ("um", "µm", "μm", "\\u00B5m", "micron", "microns", "micrometer", "micrometre"),
    "mm": ("mm", "millimeter", "millimetre"),
    "cm": ("cm", "centimeter", "centimetre"),
    "m": ("m", "meter", "metre"),
}
# Units per centimetre, TIFF's own resolution unit.
_CENTIMETRES = {"cm": 1.0, "mm": 10.0, "um": 1e4, "nm": 1e7, "m": 0.01}
_TIFF_UNITS = {2: ("um", 25400.0), 3: ("um", 1e4)}  # ResolutionUnit inch, centimetre -> um per unit


@contextlib.contextmanager
def atomic_paths(targets: Sequence[Path], overwrite: bool = False) -> Iterator[list[Path]]:
    """Yields one temporary path per target; renames them all into place when the block succeeds.

    Each temporary is a hidden file beside its target, created as `open(target, "w")`
    would create the target: mode 0o666 less the umask, or the mode of the file it
    replaces. If creating, writing or renaming fails, every temporary, every folder the
    group created and every target it added are removed, so that none of the group
    appears; an OSError becomes a one-line PipelineError naming the target and the
    system's reason. Existing targets are refused unless `overwrite`.
    """
    targets = [Path(target) for target in targets]
    refuse_existing(targets, overwrite)
    folders: list[Path] = []  # created by this group
    temporaries: dict[Path, Path] = {}  # temporary -> its target
    added: list[Path] = []  # targets in place that did not exist before
    current: Path | None = None  # the target being created or renamed; None while the block runs
    try:
        try:
            for current in targets:
                if current.is_dir():  # found now, not after other targets were renamed
                    raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
                for folder in missing_folders(current.parent):
                    os.mkdir(folder)
                    folders.append(folder)
                _remove_abandoned_once(current.parent)
                temporary = _create_temporary(current)
                temporaries[temporary] = current
                if current.exists():
                    os.chmod(temporary, stat.S_IMODE(current.stat().st_mode))
            current = None
            yield list(temporaries)
            for temporary, current in temporaries.items():
                existed = current.exists()
                if overwrite:
                    os.replace(temporary, current)
                else:
                    _rename_new(temporary, current)
                if not existed:
                    added.append(current)
        except OSError as error:
            named = current or _written_target(error, temporaries, targets)
            raise PipelineError(f"{named}: cannot write ({error.strerror or error})") from None
    except BaseException:
        _remove([*added, *temporaries], folders)
        raise


def _rename_new(temporary: Path, target: Path) -> None:
    """Renames `temporary` to `target`, failing with FileExistsError if `target` exists by now.

    The check before the work cannot see a file that another command writes meanwhile (two
    predictions into one folder): a hard link is created only where no file is, so of two
    such writers one gets an error instead of both a silent replace. Where the file system
    has no hard links, the rename follows a last check.
    """
    try:
        os.link(temporary, target)
    except FileExistsError:
        if target.is_dir():  # the more telling reason
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(target)) from None
        raise
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.EXDEV):
            raise
        if target.exists():
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target)) from None
        os.replace(temporary, target)
        return
    os.unlink(temporary)


def _written_target(error: OSError, temporaries: dict[Path, Path], targets: list[Path]) -> str:
    """The target whose temporary a writer's error names; the whole group if it names none."""
    if isinstance(error.filename, str) and Path(error.filename) in temporaries:
        return str(temporaries[Path(error.filename)])
    if len(targets) == 1:
        return str(targets[0])
    return f"{targets[0]} or one of the {len(targets) - 1} files written with it"


def _remove(files: list[Path], folders: list[Path]) -> None:
    """Removes what a failed group made, innermost folder first, as far as it can."""
    for path in files:
        with contextlib.suppress(OSError):  # the error that got us here matters more
            path.unlink(missing_ok=True)
    for folder in reversed(folders):
        with contextlib.suppress(OSError):  # e.g. another process wrote into it meanwhile
            folder.rmdir()


@contextlib.contextmanager
def atomic_path(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary path in the target's folder; renames it to `target` on success (see `atomic_paths`)."""
    with atomic_paths([target], overwrite) as (temporary,):
        yield temporary


def _create_temporary(target: Path) -> Path:
    """Creates an empty hidden file beside `target` with the mode `open` would give it.

    The name keeps the target's suffix, which some writers (Keras, OpenCV) go by.
    """
    temporary = target.parent / scratch_name(target.stem, target.suffix)
    os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    return temporary


def scratch_name(label: str, suffix: str = "") -> str:
    """A hidden name for a temporary file or folder, `.LABEL.tmp-HOST-PID-TOKEN[SUFFIX]`.

    Host and process name the writer, so that `remove_abandoned` can tell what a killed
    process left from what another process is writing right now, also on a shared disk.
    """
    return f".{label}.tmp-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(6)}{suffix}"


def remove_abandoned(folder: Path) -> None:
    """Removes the temporary files and folders (`scratch_name`) in `folder` whose writer,
    a process of this host, no longer runs; those of other hosts cannot be asked about."""
    written_here = re.compile(rf"\..*\.tmp-{re.escape(socket.gethostname())}-(\d+)-[0-9a-f]{{12}}(\.[^.]*)?")
    try:
        entries = list(os.scandir(folder))
    except OSError:  # not there (yet), or not ours to list: nothing of ours to remove
        return
    for entry in entries:
        writer = written_here.fullmatch(entry.name)
        if writer is None or _running(int(writer[1])):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):  # another process removed it first
                os.unlink(entry.path)


_SWEPT: set[str] = set()  # folders this process has cleared; a folder of many outputs is written to many times


def _remove_abandoned_once(folder: Path) -> None:
    """`remove_abandoned` at this process's first write into `folder`."""
    key = os.path.abspath(folder)
    if key not in _SWEPT:
        remove_abandoned(folder)
        _SWEPT.add(key)


def _running(pid: int) -> bool:
    """Whether process `pid` of this host runs (a reused number counts: nothing is removed then)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _nearest_existing(path: Path) -> Path:
    """`path` if it exists, else its nearest existing ancestor."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def missing_folders(folder: Path) -> list[Path]:
    """The folders to create, outermost first, so that `folder` exists; raises if a file is in the way."""
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"{existing} is not a folder")
    missing = []
    while folder != existing:
        missing.append(folder)
        folder = folder.parent
    return missing[::-1]


def check_output_folder(path: Path) -> None:
    """Refuses, with one line, a folder where output files cannot be created; creates nothing.

    A folder that does not exist yet is judged by its nearest existing ancestor. Tried by
    creating and removing a hidden file, since `os.access` says yes to root and on
    read-only mounts.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise PipelineError(f"{path}: is a file, not a folder")
    _check_writable(path, path)


def check_output_file(path: Path) -> None:
    """Refuses, with one line, an output file path that is a folder or whose folder takes no files."""
    path = Path(path)
    if path.is_dir():
        raise PipelineError(f"{path}: is a folder, not a file")
    _check_writable(path, path.parent)


def _check_writable(named: Path, folder: Path) -> None:
    """Creates and removes a hidden file in `folder` or its nearest existing ancestor."""
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise PipelineError(f"{named}: {existing} is not a folder")
    try:
        os.remove(_create_temporary(existing / "write-check"))
    except OSError as error:
        raise PipelineError(f"{named}: cannot create files in {existing} ({error.strerror or error})") from None


def check_free_space(folder: Path, needed_bytes: int) -> None:
    """Refuses, with one line, a folder (or its nearest existing ancestor) with less free space than needed."""
    free = shutil.disk_usage(_nearest_existing(Path(folder))).free
    if free < needed_bytes:
        raise PipelineError(f"{folder}: needs {_size(needed_bytes)} but only {_size(free)} are free")


def _size(count: float) -> str:
    """A byte count for people, in powers of 1000 as `df -H` shows them."""
    for unit in ("B", "kB", "MB", "GB"):
        if count < 1000:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


def sha256(path: Path) -> str:
    """The hex SHA-256 of a file's bytes: what names a model in a report or an export."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def refuse_existing(targets: list[Path], overwrite: bool = False) -> None:
    """Raises a one-line error for the first target that exists, unless `overwrite`."""
    for target in targets:
        if Path(target).exists() and not overwrite:
            raise PipelineError(f"{target}: already exists (pass --overwrite to replace it)")


def atomic_write_text(target: Path, text: str, overwrite: bool = True) -> None:
    """Writes a text file atomically (configuration and reports are replaced by design)."""
    with atomic_path(target, overwrite) as temporary:
        temporary.write_text(text)


def write_tiff(target: Path, array: np.ndarray, overwrite: bool = False) -> None:
    """Writes an image or a stack (leading axis = slices) as a TIFF file, atomically."""
    with atomic_path(target, overwrite) as temporary:
        encode_tiff(temporary, array)


def write_png(target: Path, array: np.ndarray, overwrite: bool = False) -> None:
    """Writes an 8-bit grey or BGR image as PNG, atomically."""
    with atomic_path(target, overwrite) as temporary:
        encode_png(temporary, array)


def encode_tiff(path: Path, array: np.ndarray, calibration: Calibration | None = None,
                display: dict | None = None) -> None:
    """Writes an image or stack as a grey TIFF straight into `path` (a temporary of `atomic_paths`).

    With a `calibration` (the input's, from `read_calibration`), the file carries the same
    pixel size: as ImageJ metadata (unit, slice spacing) where ImageJ's format takes the
    pixel type (8/16-bit, float32), else as TIFF resolution tags in pixels per centimetre.
    `display` is ImageJ metadata on how Fiji shows the image (e.g. `LUTs`, `min`, `max`),
    written where ImageJ's format takes the pixel type and left out elsewhere.
    """
    # Encoded in memory: tifffile's own file writes report a full disk without errno.
    buffer = BytesIO()
    tifffile.imwrite(buffer, array, photometric="minisblack", **_tiff_tags(array, calibration, display or {}))
    _write_bytes(path, buffer.getbuffer())


def _tiff_tags(array: np.ndarray, calibration: Calibration | None, display: dict) -> dict:
    """tifffile.imwrite's keywords that record `calibration` and ImageJ's `display` metadata for `array`."""
    if array.dtype not in (np.uint8, np.uint16, np.float32) or (calibration is None and not display):
        return resolution_tags(calibration)
    metadata = {} if calibration is None else {"unit": calibration.unit}
    metadata["axes"] = "ZYX" if array.ndim == 3 else "YX"
    if calibration is not None and calibration.z is not None:
        metadata["spacing"] = calibration.z
    tags = {"imagej": True, "metadata": {**metadata, **display}}
    if calibration is not None:
        tags["resolution"] = (1 / calibration.x, 1 / calibration.y)
    return tags


def resolution_tags(calibration: Calibration | None) -> dict:
    """tifffile.imwrite's keywords for the pixel size as TIFF resolution tags, in pixels per centimetre.

    What a TIFF carries where ImageJ's own metadata does not go: other pixel types, and
    tiled BigTIFFs (which ImageJ reads through Bio-Formats, from these tags).
    """
    if calibration is None:
        return {}
    per_cm = _CENTIMETRES.get(length_unit(calibration.unit))
    if per_cm is None:  # a unit TIFF's tags cannot name: the numbers without it
        return {"resolution": (1 / calibration.x, 1 / calibration.y)}
    return {"resolution": (per_cm / calibration.x, per_cm / calibration.y), "resolutionunit": "CENTIMETER"}


def length_unit(unit: str) -> str | None:
    """The short name ("nm", "um", "mm", "cm", "m") of a length unit as a file spells it; None
    for anything else (no unit, "pixel", "inch", a spelling not listed in `LENGTH_UNITS`)."""
    return next((short for short, spellings in LENGTH_UNITS.items() if unit in spellings), None)


def encode_png(path: Path, array: np.ndarray) -> None:
    """Writes an 8-bit grey or BGR image as PNG straight into `path` (a temporary of `atomic_paths`)."""
    # Encoded in memory: cv2.imwrite reports a full disk as a missing file, or not at all.
    encoded, data = cv2.imencode(".png", array)
    if not encoded:  # only the pipeline's own pictures are written: a bug, not a user's input
        raise ValueError(f"OpenCV could not encode a {array.dtype} array of shape {array.shape} as PNG")
    _write_bytes(path, data.data)


def _write_bytes(path: Path, data: memoryview) -> None:
    """Writes `data` into `path`; an OSError names `path`."""
    try:
        with open(path, "wb") as handle:
            handle.write(data)
    except OSError as error:
        # A failed write does not name its file; `atomic_paths` needs it to name the target.
        error.filename = error.filename or str(path)
        raise


def encode_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Writes named arrays into `path`, e.g. a temporary of `atomic_paths`, as one .npz file."""
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)


def read_calibration(path: Path) -> Calibration | None:
    """The pixel size a TIFF declares (ImageJ unit and spacing, or resolution in inch/cm).

    None for a PNG and for a TIFF without one: TIFF's default resolution (72 per inch,
    or 1 with no unit) says nothing about the sample. ImageJ's unit wins over the TIFF's
    resolution unit, as in Fiji. Another resolution with no unit (ResolutionUnit NONE and
    no ImageJ unit) is a size in an unknown unit, and ImageJ's pixel height in another
    unit than its width (`yunit`) is no one pixel size: None too, with a one-line notice,
    never guessed.
    """
    if Path(path).suffix.lower() not in (".tif", ".tiff"):
        return None
    with tifffile.TiffFile(path) as tiff:
        page = tiff.pages.first
        x_per_unit, y_per_unit = page.resolution
        if x_per_unit <= 0 or y_per_unit <= 0:
            return None
        imagej = tiff.imagej_metadata or {}
        if imagej.get("unit") and imagej.get("yunit", imagej["unit"]) != imagej["unit"]:
            print(f"notice: {path}: ImageJ's pixel width is in {imagej['unit']!r} but its height in "
                  f"{imagej['yunit']!r}; its outputs carry no pixel size and measure in pixels", file=sys.stderr)
            return None
        if imagej.get("unit"):
            return Calibration(1 / x_per_unit, 1 / y_per_unit, imagej["unit"], imagej.get("spacing"))
        if int(page.resolutionunit) not in _TIFF_UNITS:
            if (x_per_unit, y_per_unit) != (1.0, 1.0):
                print(f"notice: {path}: a resolution of {x_per_unit:g} x {y_per_unit:g} pixels per unit without "
                      "a unit (TIFF ResolutionUnit NONE); its outputs carry no pixel size and measure in pixels",
                      file=sys.stderr)
            return None
        if (x_per_unit, y_per_unit) == (72.0, 72.0):
            return None
        unit, size = _TIFF_UNITS[int(page.resolutionunit)]
        return Calibration(size / x_per_unit, size / y_per_unit, unit)


def _read_file(path: Path) -> tuple[np.ndarray, str]:
    """The pixels of a TIFF or PNG file with their axes as tifffile names them (see `_as_nhwc`).

    Raises a one-line PipelineError for a missing, corrupt, empty or unsupported file.
    """
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix in (".tif", ".tiff"):
        try:
            with tifffile.TiffFile(path) as tiff:
                series = tiff.series[0] if tiff.series else None
                array, axes = (series.asarray(), series.axes) if series else (np.empty(0), "")
        except Exception as error:  # tifffile raises many types for damaged files
            raise PipelineError(f"{path}: corrupt or unreadable TIFF ({error})") from None
        if array.size == 0:  # a damaged header can leave no pages at all
            raise PipelineError(f"{path}: corrupt or unreadable TIFF (no image data)")
    elif suffix == ".png":
        array = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if array is None:
            raise PipelineError(f"{path}: corrupt or unreadable PNG")
        if array.ndim == 3:  # OpenCV gives BGR or BGRA, grey-with-alpha PNGs included
            array = cv2.cvtColor(array, cv2.COLOR_BGRA2RGBA if array.shape[2] == 4 else cv2.COLOR_BGR2RGB)
        axes = "YX" if array.ndim == 2 else "YXS"
    else:
        raise PipelineError(
            f"{path}: unsupported file type {suffix or '(none)'}; use {', '.join(IMAGE_SUFFIXES)}"
        )
    if array.size == 0:
        raise PipelineError(f"{path}: the image or stack is empty")
    if array.dtype.kind not in "uif" or array.dtype == np.float16:
        raise PipelineError(f"{path}: unsupported pixel type {array.dtype}")
    return array, axes


def _as_nhwc(array: np.ndarray, axes: str, path: Path, channel_axes: str = "CS") -> np.ndarray:
    """[N, H, W, C] from the file's axes.

    Y and X are the image's rows and columns; the letters of `channel_axes`, by default S
    (the samples of a colour pixel) and C (ImageJ/OME channels), the channels; any other
    letter (Q, I, Z, T, ...) the slices. Axes of length 1 are dropped; more than one slice
    or channel axis is refused.
    """
    kept = [(letter, size) for letter, size in zip(axes, array.shape) if letter in "YX" or size > 1]
    letters = "".join(letter for letter, _ in kept)
    slices = [i for i, letter in enumerate(letters) if letter not in "YX" + channel_axes]
    channels = [i for i, letter in enumerate(letters) if letter in channel_axes]
    if letters.count("Y") != 1 or letters.count("X") != 1 or len(slices) > 1 or len(channels) > 1:
        slice_letters = "Z, T, ..." if "C" in channel_axes else "Z, C, T, ..."
        raise PipelineError(
            f"{path}: axes {axes} of shape {array.shape} are not one image or stack: expected Y and X, "
            f"at most one slice axis ({slice_letters}) and one channel axis ({' or '.join(channel_axes)})"
        )
    order = slices + [letters.index("Y"), letters.index("X")] + channels
    stack = np.transpose(array.reshape([size for _, size in kept]), order)
    stack = stack if slices else stack[None]
    return stack if channels else stack[..., None]


def as_model_channels(stack: np.ndarray, channels: int, path: Path) -> np.ndarray:
    """`stack` [N, H, W, C] with the model's `channels`, by `COLOUR_AS_GREY`, else a one-line error.

    Used as is when C equals `channels`. A grey image stored as colour is read as grey
    (its first channel) with a one-line notice on stderr.
    """
    have = stack.shape[-1]
    if have == channels:
        return stack
    if channels == 1 and have in (3, 4) and _grey_as_colour(stack):
        return _as_grey(stack, path)
    raise channel_mismatch(path, have, channels)


def channel_mismatch(path: Path, have: int, channels: int) -> PipelineError:
    """The one-line error for an image of `have` channels and a model of `channels`
    (for a colour image and a 1-channel model: one that is not grey by `COLOUR_AS_GREY`)."""
    if channels == 1 and have in (3, 4):
        return PipelineError(f"{path}: colour image ({have} channels) but the model takes 1 channel; "
                             f"convert it to grey or train with model.input_channels={have}")
    described = "grey image (1 channel)" if have == 1 else f"image of {have} channels"
    return PipelineError(f"{path}: {described} but the model takes {channels} channel{'s' if channels > 1 else ''}")


def grey_pixels(pixels: np.ndarray, first: np.ndarray) -> np.ndarray:
    """`COLOUR_AS_GREY` per pixel: whether each pixel of colour `pixels` [..., 3|4] has identical
    R, G and B and, with alpha, the alpha of its image's first pixel `first` [..., 3|4]
    (broadcast against `pixels`). The rule's one numpy test; `large_image` applies it block
    by block, and the serving signature (`inference.segmenter`) mirrors it in graph ops."""
    return (pixels[..., 1:3] == pixels[..., :1]).all(axis=-1) & (pixels[..., 3:] == first[..., 3:]).all(axis=-1)


def _grey_as_colour(stack: np.ndarray) -> bool:
    """Whether an [N, H, W, 3|4] stack is grey stored as colour by `COLOUR_AS_GREY`."""
    return bool(grey_pixels(stack, stack[:, :1, :1]).all())


def grey_notice(path: Path) -> None:
    """The one-line notice on stderr that `path`, grey stored as colour, is read as grey."""
    print(f"notice: {path}: colour image with identical R, G and B channels read as grey", file=sys.stderr)


def _as_grey(stack: np.ndarray, path: Path) -> np.ndarray:
    """The grey channel [N, H, W, 1] of grey stored as colour, with `grey_notice`."""
    grey_notice(path)
    return stack[..., :1]


def read_stack(path: Path, channels: int | None = 1) -> np.ndarray:
    """Reads an image or stack as [N, H, W, C] with C = `channels`, by the axes its file declares.

    TIFF axes come from tifffile (see `_as_nhwc`); a PNG is one image, grey or colour.
    The channels follow `as_model_channels`; with `channels=None`, C is the file's own
    (where no model is involved, e.g. a TFDS data set of the files as they are). Pixels the
    network cannot read (`unreadable_pixels`) are refused.
    """
    array, axes = _read_file(path)
    stack = _finite(_as_nhwc(array, axes, path), path)
    return stack if channels is None else as_model_channels(stack, channels, path)


def read_slices(path: Path, role: str) -> np.ndarray:
    """A grey image or stack of 2-D slices as [N, H, W]; `role` names the file in errors
    ("prediction", "ground truth").

    For files that hold one value per pixel by definition, such as evaluation's: every axis
    but Y, X and S (the samples of a colour pixel) is the slice axis, whatever the file
    calls it, C included (`tifffile.imwrite(path, stack, imagej=True)` declares a stack's
    slices as ImageJ channels). Samples follow `COLOUR_AS_GREY`'s test: grey stored as
    colour is read as grey, with a notice; real colour is refused. Pixels the network cannot
    read (`unreadable_pixels`) are refused.
    """
    array, axes = _read_file(path)
    stack = _finite(_as_nhwc(array, axes, path, channel_axes="S"), path)
    have = stack.shape[-1]
    if have in (3, 4) and _grey_as_colour(stack):
        stack = _as_grey(stack, path)
    elif have != 1:
        raise PipelineError(
            f"{path}: the {role} file has {have} values per pixel (colour); expected one (a grey image or stack), "
            "or colour with identical R, G and B channels and a constant alpha"
        )
    return stack[..., 0]


def _finite(stack: np.ndarray, path: Path) -> np.ndarray:
    """`stack`, or a one-line error counting the pixels the network cannot read."""
    if count := unreadable_pixels(stack):
        raise unreadable_pixels_error(path, count)
    return stack


def unreadable_pixels(values: np.ndarray) -> int:
    """How many of `values` the network cannot read: NaN, infinite, or beyond float32's range.

    The network computes in float32, where a float64 value beyond about 3.4e38 would become
    infinite: such pixels are counted here rather than turned into infinities in the graph.
    """
    if values.dtype.kind != "f":
        return 0
    largest = np.finfo(np.float32).max
    return int(np.count_nonzero(~((values >= -largest) & (values <= largest))))  # NaN fails both


def unreadable_pixels_error(where: Path, count: int) -> PipelineError:
    """The one-line refusal of an image with `count` pixels that `unreadable_pixels` counts."""
    return PipelineError(f"{where}: {count} pixel values are NaN, infinite or beyond float32's range (3.4e38)")


def is_ome_zarr(path: Path) -> bool:
    """Whether `path` names an OME-Zarr image (NAME.zarr or NAME.ome.zarr)."""
    return Path(path).name.lower().endswith(ZARR_SUFFIXES)


def is_image(path: Path) -> bool:
    """A TIFF or PNG file, or an OME-Zarr image (a folder)."""
    path = Path(path)
    return is_ome_zarr(path) or path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def image_name(path: Path) -> str:
    """NAME of NAME.tif, NAME.png, NAME.zarr or NAME.ome.zarr: what its outputs are named after."""
    name = Path(path).name
    for suffix in ZARR_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def image_files(path: Path) -> list[Path]:
    """The images a path names: the file or OME-Zarr image itself, or a folder's images, sorted:
    its TIFF and PNG files and its OME-Zarr images (NAME.zarr, NAME.ome.zarr; not their contents).

    Two images of a folder with one name are refused (`refuse_same_names`).
    """
    path = Path(path)
    if path.is_dir() and not is_ome_zarr(path):
        files = sorted(p for p in path.iterdir() if is_image(p))
        if not files:
            raise PipelineError(f"{path}: folder contains no {'/'.join(IMAGE_SUFFIXES)} images or OME-Zarr images")
        refuse_same_names(files)
        return files
    if not path.exists():
        raise PipelineError(f"{path}: no such file or folder")
    return [path]


def refuse_same_names(files: Sequence[Path]) -> None:
    """Refuses two images with one name (`image_name`: x.tif and x.png, x.tif and X.TIFF, x.tif
    and x.ome.zarr): their outputs, named after the image, would overwrite each other."""
    seen: dict[str, Path] = {}
    for file in files:
        name = image_name(file)
        # Case-blind, as the output folder may be on a case-insensitive file system.
        first = seen.setdefault(name.casefold(), file)
        if first != file:
            # Two of one folder by their names, others by their paths.
            shown = (first.name, file.name) if first.parent == file.parent else (first, file)
            raise PipelineError(f"{file}: two images named {name} ({shown[0]} and {shown[1]}); "
                                "their outputs would overwrite each other, so rename one")
