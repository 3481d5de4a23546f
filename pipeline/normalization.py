"""Input normalisation, the one convention shared by training and inference.

A network's outputs mean something only for inputs scaled as in its training, so the
training tiles (`input_pipeline`) and every whole-image prediction (`inference`: the
predict and evaluate stages and the exported SavedModel) normalise with `normalize`.
Each image is normalised whole, before mirror padding and tiling, so that a pixel gets
the same value in every tile that contains it.
"""

from __future__ import annotations

import tensorflow as tf


def normalize(images: tf.Tensor) -> tf.Tensor:
    """Zero mean, unit variance per whole image ([H, W, C] or [N, H, W, C]), any dtype."""
    return tf.image.per_image_standardization(tf.cast(images, tf.float32))
