"""Synthetic serial-section EM images of neural tissue: the embedded default data set.

Each image is a wobbly Voronoi tessellation of cells of mixed sizes, separated by dark
membranes 2-7 px thick, with textured grey interiors that hold dark organelle-like blobs.
The blobs are as dark as membrane, so a network has to learn shape and context rather
than a grey-level threshold. Everything is a pure function of the seed.
"""

from __future__ import annotations

import cv2
import numpy as np

_MIN_CELL_PX = 20  # fragments smaller than this become membrane
_SHIFTS = ((0, 1), (1, 0), (1, 1), (1, -1))  # the four 8-neighbour directions, each once


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Zero-mean, roughly unit-variance noise varying over about `scale` pixels."""
    h, w = shape
    coarse = rng.standard_normal((int(h / scale) + 2, int(w / scale) + 2)).astype(np.float32)
    fine = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    return fine / (fine.std() + 1e-6)


def _pair_slices(h: int, w: int) -> list[tuple[tuple[slice, slice], tuple[slice, slice]]]:
    """Index pairs (sa, sb) such that x[sa], x[sb] list every pair of 8-adjacent pixels."""
    return [
        (
            (slice(0, h - dy), slice(max(-dx, 0), w - max(dx, 0))),
            (slice(dy, h), slice(max(dx, 0), w - max(-dx, 0))),
        )
        for dy, dx in _SHIFTS
    ]


def _wobbly_voronoi(rng: np.random.Generator, h: int, w: int, cell_size: float) -> np.ndarray:
    """Label map (int32) of a jittered, thinned Voronoi tessellation warped by smooth noise."""
    pad = int(cell_size) + 8  # seeds beyond the border so edge cells are not truncated Voronoi
    ph, pw = h + 2 * pad, w + 2 * pad
    gy, gx = np.mgrid[0:ph:cell_size, 0:pw:cell_size].reshape(2, -1)
    pts = np.stack([gy, gx], 1) + rng.uniform(-0.45, 0.45, (gy.size, 2)) * cell_size
    # Dropping seeds merges neighbours into large cells; extra seeds add small ones.
    pts = pts[rng.random(len(pts)) < 0.8]
    pts = np.concatenate([pts, rng.uniform(0, (ph, pw), (len(pts) // 4, 2))])
    seeds = np.full((ph, pw), 255, np.uint8)
    iy, ix = np.clip(pts, 0, (ph - 1, pw - 1)).astype(int).T
    seeds[iy, ix] = 0
    _, lab = cv2.distanceTransformWithLabels(seeds, cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_PIXEL)
    # Two octaves of displacement: gentle bends at cell scale, wiggles at a third of it.
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + pad
    for axis in (yy, xx):
        axis += 0.12 * cell_size * _smooth_noise(rng, (h, w), cell_size)
        axis += 0.04 * cell_size * _smooth_noise(rng, (h, w), cell_size / 3)
    return cv2.remap(lab.astype(np.float32), xx, yy, cv2.INTER_NEAREST).astype(np.int32)


def _membrane(rng: np.random.Generator, lab: np.ndarray, cell_size: float) -> np.ndarray:
    """Boolean membrane mask along all borders of `lab`, 2-7 px thick at cell_size 40.

    Thickness varies per border and slowly along it, and scales with cell_size (at least
    2 px) so that membrane stays a similar fraction of the image at any cell size.
    """
    lo, hi = max(2, round(2 * cell_size / 40)), max(3, round(7 * cell_size / 40))
    table = rng.integers(lo, hi + 1, 4099)  # thickness per (hashed) pair of cells
    along = np.round(0.7 * _smooth_noise(rng, lab.shape, cell_size / 2)).astype(int)
    border = np.zeros(lab.shape, np.int64)
    for sa, sb in _pair_slices(*lab.shape):
        a, b = lab[sa], lab[sb]
        key = (np.minimum(a, b).astype(np.int64) * 1_000_003 + np.maximum(a, b)) % len(table)
        # Marking one side of every 8-adjacent pair already separates cells in 8-connectivity.
        np.maximum(border[sa], np.where(a != b, table[key], 0), out=border[sa])
    border = np.where(border > 0, np.clip(border + along, lo, hi), 0)
    mem = np.zeros(lab.shape, np.uint8)
    for t in range(lo, hi + 1):
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (t, t))
        mem |= cv2.dilate((border == t).astype(np.uint8), kernel)
    return mem > 0


def _instances(cells: np.ndarray) -> np.ndarray:
    """Number the 4-connected pieces of `cells`, cutting pixels until no two pieces 8-touch."""
    cells = cv2.morphologyEx(cells.astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    while True:
        n, comp = cv2.connectedComponents(cells, connectivity=4, ltype=cv2.CV_32S)
        sizes = np.bincount(comp.ravel(), minlength=n)
        keep = sizes >= _MIN_CELL_PX
        keep[0] = False
        relabel = np.where(keep, np.cumsum(keep), 0).astype(np.int32)
        comp = relabel[comp]
        # Pieces of one Voronoi cell can meet at a corner; cut both pixels and re-check.
        clash = np.zeros(comp.shape, bool)
        for sa, sb in _pair_slices(*comp.shape):
            a, b = comp[sa], comp[sb]
            bad = (a > 0) & (b > 0) & (a != b)
            clash[sa] |= bad
            clash[sb] |= bad
        if not clash.any():
            return comp
        cells = ((comp > 0) & ~clash).astype(np.uint8)


def _render(rng: np.random.Generator, inst: np.ndarray, cell_size: float) -> np.ndarray:
    """Grey-level EM-like image (uint8) for the instance map `inst`."""
    shape = inst.shape
    grey = rng.uniform(135, 195, inst.max() + 1).astype(np.float32)[inst]
    img = grey + 12 * _smooth_noise(rng, shape, cell_size) + 5 * _smooth_noise(rng, shape, 4)
    mem_grey = rng.uniform(50, 80) + 10 * _smooth_noise(rng, shape, cell_size / 2)
    img = np.where(inst == 0, mem_grey, img)
    # Organelles: dark compact ellipses kept a few pixels clear of the membrane.
    blobs = np.zeros(shape, np.uint8)
    blob_grey = np.zeros(shape, np.float32)
    s = cell_size / 40
    for _ in range(rng.poisson(2.5 * inst.size / cell_size**2)):
        centre = (int(rng.uniform(0, shape[1])), int(rng.uniform(0, shape[0])))
        axes = (int(rng.uniform(2, 7) * s) + 1, int(rng.uniform(2, 5) * s) + 1)
        angle = float(rng.uniform(0, 180))
        cv2.ellipse(blobs, centre, axes, angle, 0, 360, 1, -1)
        cv2.ellipse(blob_grey, centre, axes, angle, 0, 360, float(rng.uniform(30, 90)), -1)
    inside = cv2.erode((inst > 0).astype(np.uint8), np.ones((5, 5), np.uint8))
    img = np.where((blobs & inside) > 0, blob_grey, img)
    img = cv2.GaussianBlur(img.astype(np.float32), (0, 0), 1.2)
    img += rng.normal(0, 10, shape).astype(np.float32)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def synthetic_em_image(
    size: int | tuple[int, int], seed: int, cell_size: float = 40.0
) -> tuple[np.ndarray, np.ndarray]:
    """Generate one synthetic EM image and its cell instances.

    Args:
        size: side length of a square image, or (height, width).
        seed: the image is a pure function of (size, seed, cell_size).
        cell_size: typical cell diameter in pixels (cells range about half to 1.5 times it).

    Returns:
        (image, instances): image uint8 [H, W]; instances int32 [H, W] with 0 = membrane
        and 1..N = cells. Each cell is one 4-connected component, and no pixel of a cell
        is 8-adjacent to a pixel of another cell.
    """
    h, w = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    lab = _wobbly_voronoi(rng, h, w, cell_size)
    inst = _instances(~_membrane(rng, lab, cell_size))
    return _render(rng, inst, cell_size), inst


def synthetic_em_stack(
    num_images: int, size: int | tuple[int, int], seed: int, cell_size: float = 40.0
) -> tuple[np.ndarray, np.ndarray]:
    """Generate `num_images` independent synthetic EM images.

    Image i is `synthetic_em_image(size, s_i, cell_size)` with s_i spawned from `seed`
    by `np.random.SeedSequence`, so different seeds give unrelated data sets (e.g. for
    train/val/test) and the same seed always gives the same one.

    Returns:
        (images uint8 [N, H, W], instances int32 [N, H, W]).
    """
    h, w = (size, size) if isinstance(size, int) else size
    images = np.zeros((num_images, h, w), np.uint8)
    instances = np.zeros((num_images, h, w), np.int32)
    for i, child in enumerate(np.random.SeedSequence(seed).spawn(num_images)):
        child_seed = int(child.generate_state(1, np.uint64)[0])
        images[i], instances[i] = synthetic_em_image(size, child_seed, cell_size)
    return images, instances
