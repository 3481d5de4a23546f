"""Reading images and writing outputs so that nothing is ever half-written or lost.

Every writer goes through `atomic_path`: the data goes to a temporary file next to the
target, which is renamed into place only when complete, and an existing target is
refused unless the caller asks to overwrite it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
import tifffile

from pipeline.errors import PipelineError

IMAGE_SUFFIXES = (".tif", ".tiff", ".png")


@contextlib.contextmanager
def atomic_path(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary path in the target's folder; renames it to `target` on success."""
    target = Path(target)
    refuse_existing([target], overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(
        dir=target.parent, prefix=f".{target.stem}.", suffix=f".tmp{target.suffix}"
    )
    os.close(handle)
    try:
        yield Path(temporary)
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


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
    """Writes an image or a stack (leading axis = slices) as a TIFF file."""
    with atomic_path(target, overwrite) as temporary:
        tifffile.imwrite(temporary, array, photometric="minisblack")


def write_png(target: Path, array: np.ndarray, overwrite: bool = False) -> None:
    """Writes an 8-bit grey or BGR image as PNG."""
    with atomic_path(target, overwrite) as temporary:
        if not cv2.imwrite(str(temporary), array):
            raise PipelineError(f"{target}: OpenCV could not encode the image as PNG")


def save_arrays(target: Path, overwrite: bool = True, **arrays: np.ndarray) -> None:
    """Writes named arrays to one .npz file atomically."""
    with atomic_path(target, overwrite) as temporary:
        with open(temporary, "wb") as handle:
            np.savez(handle, **arrays)


def read_image(path: Path) -> np.ndarray:
    """Reads a TIFF (single image or stack) or PNG file.

    Returns [H, W], [H, W, C] for a multi-channel image, or [N, H, W] for a TIFF stack.
    Raises a one-line PipelineError for a missing, corrupt, empty or unsupported file.
    """
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix in (".tif", ".tiff"):
        try:
            array = tifffile.imread(path)
        except Exception as error:  # tifffile raises many types for damaged files
            raise PipelineError(f"{path}: corrupt or unreadable TIFF ({error})") from None
        if array.size == 0:  # a damaged header can leave no pages at all
            raise PipelineError(f"{path}: corrupt or unreadable TIFF (no image data)")
    elif suffix == ".png":
        array = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if array is None:
            raise PipelineError(f"{path}: corrupt or unreadable PNG")
        if array.ndim == 3:
            array = cv2.cvtColor(array, cv2.COLOR_BGRA2RGBA if array.shape[2] == 4 else cv2.COLOR_BGR2RGB)
    else:
        raise PipelineError(
            f"{path}: unsupported file type {suffix or '(none)'}; use {', '.join(IMAGE_SUFFIXES)}"
        )
    if array.size == 0:
        raise PipelineError(f"{path}: the image or stack is empty")
    if array.dtype.kind not in "uif" or array.dtype == np.float16:
        raise PipelineError(f"{path}: unsupported pixel type {array.dtype}")
    if array.ndim not in (2, 3):
        raise PipelineError(f"{path}: expected a 2-D image or a stack of them, got shape {array.shape}")
    return array


def read_stack(path: Path, channels: int = 1) -> np.ndarray:
    """Reads an image or stack as [N, H, W, C] with C = `channels`."""
    array = read_image(path)
    if channels == 1:
        if array.ndim == 3 and array.shape[-1] in (3, 4) and Path(path).suffix.lower() == ".png":
            raise PipelineError(f"{path}: colour image, but the model takes 1 channel")
        stack = array[None] if array.ndim == 2 else array
        return stack[..., None]
    if array.ndim == 2 or array.shape[-1] != channels:
        raise PipelineError(f"{path}: expected {channels} channels as the last axis, got shape {array.shape}")
    return array[None]


def image_files(path: Path) -> list[Path]:
    """The image files a path names: the file itself, or a folder's images (sorted)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise PipelineError(f"{path}: folder contains no {'/'.join(IMAGE_SUFFIXES)} images")
        return files
    if not path.exists():
        raise PipelineError(f"{path}: no such file or folder")
    return [path]
