"""The three labellers of `pipeline.inference.labelling` agree: OpenCV on whole images
(`instances`), TensorFlow as the export's PNG signature traces it (`graph`) and union-find
over the chunks of a large image (`chunked`) give the same labels on the same masks,
`min_size` included."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import tensorflow as tf

from pipeline.inference.chunk_grid import grid
from pipeline.inference.labelling import chunked, graph, instances

SIDE = 9  # chunks much smaller than the masks, and not dividing them: clipped chunks at the edges


def random_blobs(seed: int, fill: float) -> np.ndarray:
    return np.random.default_rng(seed).random((43, 37)) < fill


def touching_cells() -> np.ndarray:
    """Squares meeting only at corners (4 cells each, not one), and two bars side by side (one cell)."""
    cells = np.zeros((30, 30), bool)
    cells[2:6, 2:6] = cells[6:10, 6:10] = cells[2:6, 10:14] = cells[10:14, 2:6] = True
    cells[15:25, 15:17] = cells[15:25, 17:19] = True
    cells[26:, :] = np.indices((4, 30)).sum(0) % 2 == 0  # a checkerboard: every pixel its own cell
    return cells


def winding_cell() -> np.ndarray:
    """A one-pixel-wide serpentine: its far end is hundreds of steps from its first pixel."""
    cells = np.zeros((40, 41), bool)
    cells[::2] = True
    cells[1::4, -1] = cells[3::4, 0] = True
    return cells


def across_chunks() -> np.ndarray:
    """A U joined only in the chunks below its arms', a ring around a chunk corner, a bar over
    every chunk of a row, and specks split by chunk borders, some under every tested min_size."""
    cells = np.zeros((36, 40), bool)
    cells[1:12, 1:3] = cells[1:12, 12:14] = cells[12:14, 1:14] = True  # the U: arms in chunks (0,0), (0,1)
    cells[6:12, 16:20] = True
    cells[6:12, 16:20][1:-1, 1:-1] = False  # a ring over the corner of chunks (0, 1), (0, 2), (1, 1), (1, 2)
    cells[22, :] = True  # a bar over every chunk of the third row
    cells[26:28, 8:10] = True  # 4 px over the corner of four chunks
    cells[30, 17:19] = True  # 2 px split by a column border
    cells[34, 26] = True  # a single pixel
    return cells


MASKS = {
    **{f"random {seed} {fill}": random_blobs(seed, fill) for seed, fill in [(0, 0.3), (1, 0.5), (2, 0.6), (3, 0.8)]},
    "touching cells": touching_cells(),
    "winding cell": winding_cell(),
    "across chunks": across_chunks(),
    "empty": np.zeros((20, 23), bool),
    "full": np.ones((20, 23), bool),
}


@functools.cache
def graph_labeller(min_size: int):
    """`graph`'s labelling traced for any [H, W] mask, as the export's PNG signature traces it."""

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.bool)])
    def label(cells):
        return graph.without_small(graph.connected_components(cells), min_size)

    return label


def chunked_labels(probability: np.ndarray, min_size: int) -> np.ndarray:
    """`chunked`'s two passes over chunks of `SIDE` pixels: find the cells, then write their labels."""
    chunks = grid(*probability.shape, SIDE)
    cells = chunked.find_cells(probability, chunks, 0.5, min_size)
    labels = np.zeros(probability.shape, np.int32)
    chunked.write_labels(instances.cell_mask(probability, 0.5), labels, chunks, cells, min_size)
    return labels


@pytest.mark.parametrize("min_size", [1, 2, 4, 5, 30])
@pytest.mark.parametrize("name", MASKS)
def test_the_three_labellers_give_the_same_labels(name, min_size):
    cells = MASKS[name]
    probability = np.where(cells, np.float32(0.9), np.float32(0.1))
    expected = instances.cell_instances(probability, 0.5, "components", min_size)
    np.testing.assert_array_equal(graph_labeller(min_size)(tf.constant(cells)).numpy(), expected)
    np.testing.assert_array_equal(chunked_labels(probability, min_size), expected)


def test_the_masks_hold_what_they_are_meant_to():
    # Guards the cases above against a mask that lost its point (all one cell, no specks).
    labels = instances.cell_instances(MASKS["across chunks"].astype(np.float32), 0.5)
    assert labels[1, 1] == labels[1, 12] != labels[6, 16]  # the U is one cell, apart from the ring
    assert len(np.unique(labels)) - 1 == 6
    assert instances.cell_instances(MASKS["touching cells"].astype(np.float32), 0.5).max() == 4 + 1 + 60
    assert instances.cell_instances(MASKS["winding cell"].astype(np.float32), 0.5).max() == 1
    assert len(grid(*MASKS["across chunks"].shape, SIDE)) == 4 * 5
