"""The paper's loss: pixel-wise softmax cross-entropy weighted by the weight map.

    E = sum_x w(x) * -log p_l(x)(x)  /  number of pixels

The network ends in a softmax, and the weight map w reaches the loss as Keras'
per-pixel `sample_weight` (the third element of every training batch), so `model.fit`
and `model.evaluate` apply it with Keras' own reduction: the weighted terms are summed
and divided by the number of output pixels in the batch.
"""

from __future__ import annotations

import keras


def weighted_cross_entropy() -> keras.losses.Loss:
    """The loss to compile the U-Net with; pass the weight map as sample_weight."""
    return keras.losses.SparseCategoricalCrossentropy(
        from_logits=False, reduction="sum_over_batch_size", name="weighted_cross_entropy"
    )
