"""Small fake data sets laid out exactly like the real archives, for the tests."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import cv2
import numpy as np
import tifffile

# The real ISBI 2012 files, where this checkout has them beside it; tests using them skip otherwise.
ISBI_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "isbi2012"
CTC_NAME = "PhC-C2DH-U373"
CTC_SIZE = (64, 80)
CTC_FRAMES = 4
# Annotated frames per sequence, as in the real sets only some of them.
CTC_ANNOTATED = {"01": (0, 2, 3), "02": (1, 3)}


def write_isbi(folder: Path, slices: int = 7, test: int = 3, size: int = 32) -> dict[str, np.ndarray]:
    """The three ISBI 2012 TIFF stacks, small, in `folder`; returns the arrays by file key."""
    from pipeline.data.isbi2012 import FILES

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {
        "train": rng.integers(0, 256, (slices, size, size), np.uint8),
        "labels": np.where(rng.random((slices, size, size)) < 0.7, 255, 0).astype(np.uint8),
        "test": rng.integers(0, 256, (test, size, size), np.uint8),
    }
    for key, array in arrays.items():
        imwrite(folder / FILES[key], array)
    return arrays


def imwrite(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, array, photometric="minisblack")


def touching_cells(shape: tuple[int, int], seed: int) -> np.ndarray:
    """uint16 instance labels: cells 1 and 2 share an edge, cell 3 stands apart."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint16)
    top = int(rng.integers(4, 12))
    labels[top : top + 20, 6:26] = 1
    labels[top : top + 20, 26:46] = 2  # column 25 (cell 1) touches column 26 (cell 2)
    labels[top + 30 : top + 40, 50:70] = 3
    return labels


def ctc_frame(shape: tuple[int, int], seed: int) -> np.ndarray:
    """A 16-bit frame with a narrow grey range and one hot pixel, as microscopes give."""
    rng = np.random.default_rng(1000 + seed)
    frame = rng.normal(3000, 100, shape).clip(0, 65535).astype(np.uint16)
    frame[0, 0] = 65535
    return frame


def write_ctc(root: Path, name: str = CTC_NAME, as_zip: bool = False) -> Path:
    """`root/<name>/{01,02}/tNNN.tif`, `..._GT/SEG/man_segNNN.tif`, `..._GT/TRA/`; or `root/<name>.zip`."""
    base = root / name
    for sequence, annotated in CTC_ANNOTATED.items():
        for t in range(CTC_FRAMES):
            imwrite(base / sequence / f"t{t:03d}.tif", ctc_frame(CTC_SIZE, 10 * int(sequence) + t))
        for t in annotated:
            labels = touching_cells(CTC_SIZE, 10 * int(sequence) + t)
            imwrite(base / f"{sequence}_GT" / "SEG" / f"man_seg{t:03d}.tif", labels)
            imwrite(base / f"{sequence}_GT" / "TRA" / f"man_track{t:03d}.tif", labels)
        (base / f"{sequence}_GT" / "TRA" / "man_track.txt").write_text("1 0 3 0\n2 0 3 0\n3 0 3 0\n")
    if not as_zip:
        return base
    archive = root / f"{name}.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for path in sorted(base.rglob("*")):
            handle.write(path, path.relative_to(root).as_posix())
    shutil.rmtree(base)
    return archive


def write_image_folder(root: Path) -> Path:
    """images/ and masks/ with a binary PNG pair, an instance TIFF pair and a smaller 16-bit pair."""
    rng = np.random.default_rng(7)
    binary = np.zeros((72, 72), np.uint8)
    binary[10:30, 10:30] = 255
    binary[40:60, 35:65] = 255
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    cv2.imwrite(str(root / "images" / "a.png"), rng.integers(0, 255, (72, 72), dtype=np.uint8))
    cv2.imwrite(str(root / "masks" / "a.png"), binary)
    imwrite(root / "images" / "b.tif", rng.integers(0, 255, (72, 72), dtype=np.uint8))
    imwrite(root / "masks" / "b.tif", touching_cells((72, 72), 0))
    imwrite(root / "images" / "c.tif", ctc_frame((64, 70), 0))
    imwrite(root / "masks" / "c.tif", touching_cells((64, 70), 1))
    return root


def red_cells_on_green(labels: np.ndarray, seed: int) -> np.ndarray:
    """RGB uint8 [H, W, 3]: cells (labels > 0) red, background green, both equally bright.

    R + G is the same everywhere, so a grey version (any channel sum) shows no cells:
    only the colour tells cells from background.
    """
    rng = np.random.default_rng(seed)
    cells = labels > 0
    rgb = np.stack([np.where(cells, 170, 70), np.where(cells, 70, 170), np.full(labels.shape, 40)], axis=-1)
    return np.clip(rgb + rng.normal(0, 6, rgb.shape), 0, 255).astype(np.uint8)


def write_rgb(path: Path, rgb: np.ndarray) -> None:
    """An RGB image as PNG (OpenCV writes BGR) or as a TIFF whose metadata says RGB (axes YXS)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".png":
        cv2.imwrite(str(path), rgb[..., ::-1])
    else:
        tifffile.imwrite(path, rgb, photometric="rgb")


def write_colour_folder(root: Path) -> dict[str, np.ndarray]:
    """images/ and masks/ of red cells on green: an RGB PNG, an RGB TIFF and a smaller 16-bit RGB TIFF.

    Masks are instance TIFFs (`touching_cells`). Returns the images by file name.
    """
    images = {}
    for seed, (name, shape) in enumerate({"a.png": (72, 72), "b.tif": (72, 72), "c.tif": (64, 70)}.items()):
        labels = touching_cells(shape, seed)
        rgb = red_cells_on_green(labels, seed)
        # c: 16-bit, in a narrow range as a camera gives it.
        images[name] = rgb.astype(np.uint16) * 8 + 2000 if name == "c.tif" else rgb
        write_rgb(root / "images" / name, images[name])
        imwrite(root / "masks" / f"{Path(name).stem}.tif", labels)
    return images
