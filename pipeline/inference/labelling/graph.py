"""Cell instances inside a TensorFlow graph: what the export's PNG signature labels with.

The same rule as `instances.cell_instances` with `predict.instances=components`
(4-connected components, numbered in raster order of their first pixel, objects under
`predict.min_size` dropped), written in TensorFlow ops so that it traces into a SavedModel.
"""

from __future__ import annotations

import tensorflow as tf


def connected_components(cells: tf.Tensor) -> tf.Tensor:
    """[H, W] bool -> int32 labels: 0 off the cells, 1..N their 4-connected components.

    Numbered in raster order of each component's first pixel, as OpenCV's
    `connectedComponents` numbers them, so the served label images equal `predict`'s.
    TensorFlow has no such op: this is the parallel union-find of Shiloach and Vishkin.
    Every pixel starts as its own tree; each round hooks the larger root of every edge
    between two neighbouring cell pixels under the smaller one, then compresses every
    path by pointer jumping, until no edge joins two trees. Rounds and jumps grow with
    the logarithm of the image's size, not with the cells' diameters.
    """
    cells = tf.ensure_shape(cells, [None, None])
    height, width = tf.shape(cells)[0], tf.shape(cells)[1]
    index = tf.range(height * width)
    grid = tf.reshape(index, [height, width])
    across, down = cells[:, :-1] & cells[:, 1:], cells[:-1] & cells[1:]
    first = tf.concat([tf.boolean_mask(grid[:, :-1], across), tf.boolean_mask(grid[:-1], down)], 0)
    second = tf.concat([tf.boolean_mask(grid[:, 1:], across), tf.boolean_mask(grid[1:], down)], 0)

    def compressed(parent: tf.Tensor) -> tf.Tensor:
        def jump(parent, _):
            grandparent = tf.gather(parent, parent)
            return grandparent, tf.reduce_any(tf.not_equal(grandparent, parent))

        return tf.while_loop(lambda _, changed: changed, jump, (parent, tf.constant(True)))[0]

    def hook(parent, _):
        ends = tf.gather(parent, first), tf.gather(parent, second)
        parent = compressed(tf.tensor_scatter_nd_min(parent, tf.maximum(*ends)[:, None], tf.minimum(*ends)))
        return parent, tf.reduce_any(tf.not_equal(tf.gather(parent, first), tf.gather(parent, second)))

    parent = tf.while_loop(lambda _, joined: joined, hook, (index, tf.constant(True)))[0]
    on_cells = tf.reshape(cells, [-1])
    numbers = tf.cumsum(tf.cast(on_cells & tf.equal(parent, index), tf.int32))  # a root's rank in raster order
    return tf.reshape(tf.where(on_cells, tf.gather(numbers, parent), 0), [height, width])


def without_small(labels: tf.Tensor, min_size: int) -> tf.Tensor:
    """Labels with the objects of fewer than `min_size` pixels dropped and the rest renumbered
    1..N in their order (`instances.cell_instances`'s rule)."""
    sizes = tf.math.bincount(labels)
    kept = tf.concat([[False], sizes[1:] >= min_size], 0)
    numbers = tf.cumsum(tf.cast(kept, tf.int32))
    return tf.where(tf.gather(kept, labels), tf.gather(numbers, labels), 0)
