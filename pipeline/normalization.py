"""Input normalisation, the one convention shared by training and inference.

A network's outputs mean something only for inputs scaled as in its training, so the
training tiles (`input_pipeline`) and every whole-image prediction (`inference`: the
predict and evaluate stages and the exported SavedModel) normalise with `normalize`.
Each image is normalised whole, before mirror padding and tiling, so that a pixel gets
the same value in every tile that contains it. An image larger than memory is never held
whole: `large_image.statistics` computes the same mean and scale (this function's rule)
in one streaming pass, and each chunk is normalised with them.

A multi-channel image is normalised with one mean and one standard deviation over all
its pixels and channels, not per channel: the channels keep their ratios (the hue of an
H&E stain), and a nearly empty channel of a fluorescence composite stays dark instead of
having its noise stretched to unit variance. The 8-bit scaling of training files
(`pipeline.data.image_files`) is one linear map per image for the same reason, so that
a model trained on them sees the same normalised values as when it predicts the file.
"""

from __future__ import annotations

import tensorflow as tf


def normalize(images: tf.Tensor) -> tf.Tensor:
    """Zero mean, unit variance per whole image over all its channels ([H, W, C] or [N, H, W, C]), any dtype."""
    return tf.image.per_image_standardization(tf.cast(images, tf.float32))
