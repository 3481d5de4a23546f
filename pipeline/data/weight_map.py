"""The pixel weight map of Ronneberger et al. (2015), eq. 2.

    w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2))

* w_c balances the class frequencies. Convention: each class c present in the label
  image, with pixel fraction f_c, gets w_c = 1 / (K * f_c), K being the number of
  classes present. The mean of w_c over the image is therefore exactly 1, and an image
  with a single class gets w_c = 1 everywhere.
* d1 and d2 are the Euclidean distances to the nearest and the second-nearest cell
  (instance). The border term is applied to background (membrane, label 0) pixels only:
  it is there to make the network learn the thin gaps between touching cells. Inside a
  cell d1 = 0, so the term would only paint the cell's own rim. Where fewer than two
  cells exist the term is 0.
* Touching instances are first pulled apart (`separate_instances`): the paper inserts
  background separation borders between touching cells with morphological operations, so
  that the network sees (and is weighted towards) a background gap between every pair.
* The border term is truncated: distances beyond
  R = sigma * sqrt(2 ln(w0 / 1e-6)) (about 28 px for w0 = 10, sigma = 5) count as
  infinite, which changes w by less than 1e-6 and lets every instance's distance
  transform run on its bounding box grown by R instead of on the whole image.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

# Largest change of w that the truncation of the border term may cause.
_TRUNCATION_ERROR = 1e-6


def _check_label_image(array: np.ndarray, name: str, allow_bool: bool = False) -> np.ndarray:
    array = np.asarray(array)
    kinds = "iub" if allow_bool else "iu"
    if array.ndim != 2 or array.dtype.kind not in kinds:
        raise ValueError(
            f"{name} must be a 2-D integer array, got a {array.ndim}-D {array.dtype} array"
        )
    if array.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {array.shape}")
    return array


def _check_instances(instances: np.ndarray) -> np.ndarray:
    instances = _check_label_image(instances, "instances")
    if instances.dtype.kind == "i" and instances.min() < 0:
        raise ValueError("instances must be >= 0 (0 = background, k > 0 = cell k)")
    return instances


def instances_from_binary(labels: np.ndarray) -> np.ndarray:
    """Split a binary label image (cell = nonzero, membrane = 0) into cell instances.

    Instances are the 4-connected components of the cell class: in ISBI 2012 the
    membrane between two cells can be a single diagonal step, which 8-connectivity
    would bridge.

    Args:
        labels: 2-D integer (or bool) array; any nonzero value is cell, e.g. 0/255.

    Returns:
        int32 array of the same shape: 0 = background, 1..N = the N cells.
    """
    labels = _check_label_image(labels, "labels", allow_bool=True)
    _, instances = cv2.connectedComponents(
        (labels != 0).astype(np.uint8), connectivity=4, ltype=cv2.CV_32S
    )
    return instances.astype(np.int32, copy=False)


def separate_instances(instances: np.ndarray, width: int = 1) -> np.ndarray:
    """Inserts background separation borders `width` px wide between touching instances.

    A pixel of instance k becomes background (0) when a pixel of a higher-numbered
    instance lies within city-block distance `width` of it: a grey dilation of the labels
    with the 4-neighbourhood cross, `width` times, compared with the pixel's own label.
    Only the lower-numbered side of each contact yields, so touching instances end up
    exactly `width` px apart. 4-neighbourhoods, because the project's instances are
    4-connected (`instances_from_binary`): a binary label image's components, which only
    ever touch diagonally, come out unchanged, and so does the background. A very thin
    instance can lose all its pixels.

    Args:
        instances: 2-D integer array, 0 = background, k > 0 = instance k.
        width: border width in pixels, >= 1.

    Returns:
        int32 array of the same shape.
    """
    instances = _check_instances(instances)
    if not (isinstance(width, (int, np.integer)) and not isinstance(width, bool) and width >= 1):
        raise ValueError(f"width must be an integer >= 1, got {width!r}")
    instances = instances.astype(np.int32, copy=False)
    if instances.max() >= 2**24:
        # The dilation runs on float32, which is exact for integers below 2^24.
        raise ValueError(f"instance ids must be < 2^24, got {instances.max()}")
    cross = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
    highest_nearby = cv2.dilate(
        instances.astype(np.float32), cross, iterations=width, borderType=cv2.BORDER_REPLICATE
    )
    separated = instances.copy()
    separated[(instances > 0) & (highest_nearby > instances)] = 0
    return separated


def class_balance(semantic: np.ndarray) -> np.ndarray:
    """The class-balancing weights w_c = 1 / (K * f_c) of an integer class image.

    f_c is the fraction of pixels of class c and K the number of classes present, so the
    map's mean is 1 and a single-class image gets 1 everywhere.

    Args:
        semantic: 2-D integer array of class indices (any integer values).

    Returns:
        float32 array of the same shape.
    """
    semantic = _check_label_image(semantic, "semantic", allow_bool=True)
    _, inverse, counts = np.unique(semantic.ravel(), return_inverse=True, return_counts=True)
    per_class = semantic.size / (len(counts) * counts.astype(np.float64))
    return per_class[inverse].reshape(semantic.shape).astype(np.float32)


def _bounding_boxes(instances: np.ndarray) -> tuple[np.ndarray, ...]:
    """Label and inclusive (row_min, row_max, col_min, col_max) of every instance."""
    flat = np.flatnonzero(instances)
    ids = instances.ravel()[flat]
    # One sort of the foreground groups each instance's pixels, whatever its label values;
    # a stable sort is the faster one on labels that come in runs, as they do row by row.
    order = np.argsort(ids, kind="stable")
    flat, ids = flat[order], ids[order]
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    rows, cols = np.divmod(flat, instances.shape[1])
    return (
        ids[starts],
        np.minimum.reduceat(rows, starts),
        np.maximum.reduceat(rows, starts),
        np.minimum.reduceat(cols, starts),
        np.maximum.reduceat(cols, starts),
    )


def border_distances(instances: np.ndarray, max_distance: float) -> tuple[np.ndarray, np.ndarray]:
    """Distances (d1, d2) of every pixel to its nearest and second-nearest instance.

    Distances are Euclidean, to the nearest pixel of an instance (a pixel of instance k
    is at distance 0 from k; a background pixel next to it at 1). Distances greater than
    `max_distance` are reported as inf, so d2 is inf wherever fewer than two instances lie
    within `max_distance`.

    Args:
        instances: 2-D integer array, 0 = background, k > 0 = instance k (an instance
            need not be connected).
        max_distance: the truncation radius, >= 0 (inf computes everything exactly).

    Returns:
        (d1, d2), float32 arrays of the same shape as `instances`.
    """
    instances = _check_instances(instances)
    if not max_distance >= 0:
        raise ValueError(f"max_distance must be >= 0, got {max_distance}")
    height, width = instances.shape
    d1 = np.full(instances.shape, np.inf, np.float32)
    d2 = np.full(instances.shape, np.inf, np.float32)
    if not instances.any():
        return d1, d2
    # A pixel outside the bbox grown by `pad` is more than max_distance away from the
    # instance; one inside has all of the instance in its window, so its distance is exact.
    pad = math.ceil(max_distance) if math.isfinite(max_distance) else max(height, width)
    for label, r0, r1, c0, c1 in zip(*_bounding_boxes(instances)):
        rows = slice(max(r0 - pad, 0), min(r1 + pad + 1, height))
        cols = slice(max(c0 - pad, 0), min(c1 + pad + 1, width))
        outside = (instances[rows, cols] != label).astype(np.uint8)
        d = cv2.distanceTransform(outside, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        d[d > max_distance] = np.inf
        d1_window, d2_window = d1[rows, cols], d2[rows, cols]  # views: updated in place
        np.minimum(d2_window, np.maximum(d1_window, d), out=d2_window)
        np.minimum(d1_window, d, out=d1_window)
    return d1, d2


def weight_map(
    instances: np.ndarray,
    w0: float = 10.0,
    sigma: float = 5.0,
    balance_classes: bool = True,
) -> np.ndarray:
    """The paper's weight map w = w_c + w0 * exp(-(d1 + d2)^2 / (2 sigma^2)).

    The semantic classes are background (instances == 0) and cell (instances > 0). The
    border term is added to background pixels only, and is truncated where it is below
    1e-6 (see the module docstring).

    Args:
        instances: 2-D integer array, 0 = background/membrane, k > 0 = cell k; for a
            binary label image use `instances_from_binary` first.
        w0: weight of the border term, >= 0.
        sigma: width of the border term in pixels, > 0.
        balance_classes: w_c = 1 / (K * f_c) if True (see `class_balance`), else 1.

    Returns:
        float32 array of the same shape as `instances`.
    """
    instances = _check_instances(instances)
    if not (w0 >= 0 and math.isfinite(w0)):
        raise ValueError(f"w0 must be a finite number >= 0, got {w0}")
    if not (sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma}")
    background = instances == 0
    if balance_classes:
        weights = class_balance(background)
    else:
        weights = np.ones(instances.shape, np.float32)
    # For w0 <= 1e-6 the whole border term is within the truncation error.
    if w0 > _TRUNCATION_ERROR:
        radius = sigma * math.sqrt(2.0 * math.log(w0 / _TRUNCATION_ERROR))
        d1, d2 = border_distances(instances, radius)
        border = w0 * np.exp(-np.square(d1 + d2) / np.float32(2.0 * sigma**2))
        weights += np.where(background, border, np.float32(0.0))
    return weights
