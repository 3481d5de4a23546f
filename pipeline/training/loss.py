"""The paper's loss: pixel-wise softmax cross-entropy weighted by the weight map.

    E = sum_x w(x) * -log p_l(x)(x)  /  number of pixels

The network ends in a softmax, and the weight map w reaches the loss as Keras'
per-pixel `sample_weight` (the third element of every training batch), so `model.fit`
and `model.evaluate` apply it with Keras' own reduction: the weighted terms are summed
and divided by the number of output pixels in the batch.

Outside the U-Net paper, `train.cldice_weight` adds a term that rewards thin, unbroken
membranes (`CrossEntropyWithClDice`): on ISBI 2012 most errors are mergers, two cells
joined through a gap in the membrane between them, which costs the cross-entropy a few
pixels but the Rand error a whole cell.
"""

from __future__ import annotations

import keras
from keras import ops

MEMBRANE = 0  # the class whose topology clDice keeps: membranes in EM, the background between cells


def weighted_cross_entropy() -> keras.losses.Loss:
    """The loss to compile the U-Net with; pass the weight map as sample_weight."""
    return keras.losses.SparseCategoricalCrossentropy(
        from_logits=False, reduction="sum_over_batch_size", name="weighted_cross_entropy"
    )


def _min_pool_cross(x):
    # Erosion by the 4-neighbourhood (a plus), as Shit et al.'s code erodes: the minimum of a
    # vertical and a horizontal 3-pixel window. Padding never wins a pooling ("same").
    vertical = -ops.max_pool(-x, (3, 1), strides=1, padding="same")
    horizontal = -ops.max_pool(-x, (1, 3), strides=1, padding="same")
    return ops.minimum(vertical, horizontal)


def _soft_open(x):
    return ops.max_pool(_min_pool_cross(x), (3, 3), strides=1, padding="same")


def soft_skeleton(x, iterations: int):
    """The soft skeleton of maps `x` [B, H, W, 1] in [0, 1] (Shit et al. 2021, Algorithm 1).

    Each of `iterations` erosions adds what an opening of the eroded map removes: on a
    binary map, the pixels where a structure is thinnest; a 1-px-wide line is its own
    skeleton. Structures up to about 2 x `iterations` px thick reduce to their centre lines.
    """
    skeleton = ops.relu(x - _soft_open(x))
    for _ in range(iterations):
        x = _min_pool_cross(x)
        delta = ops.relu(x - _soft_open(x))
        skeleton = skeleton + ops.relu(delta - skeleton * delta)
    return skeleton


def soft_cldice(label, probability, iterations: int, smooth: float = 1.0):
    """Soft clDice of a predicted map against a binary one, per image: [B, H, W] -> [B].

    Topology precision: the share of the prediction's skeleton inside the labelled
    structure; sensitivity: the share of the label's skeleton that the prediction covers. A
    gap cut into a labelled line leaves part of its skeleton uncovered, however few pixels
    it costs. clDice is their harmonic mean, 1 for a perfect prediction; `smooth` keeps it
    defined for images without any structure (Shit et al.'s reference code adds 1).
    """
    label, probability = label[..., None], probability[..., None]
    skeleton_predicted, skeleton_labelled = soft_skeleton(probability, iterations), soft_skeleton(label, iterations)
    precision = (ops.sum(skeleton_predicted * label, (1, 2, 3)) + smooth) / (
        ops.sum(skeleton_predicted, (1, 2, 3)) + smooth)
    sensitivity = (ops.sum(skeleton_labelled * probability, (1, 2, 3)) + smooth) / (
        ops.sum(skeleton_labelled, (1, 2, 3)) + smooth)
    return 2 * precision * sensitivity / (precision + sensitivity)


@keras.saving.register_keras_serializable(package="unet_pipeline")
class CrossEntropyWithClDice(keras.losses.Loss):
    """The paper's weighted cross-entropy + `weight` x (1 - soft clDice) of the membrane class.

    Not in the U-Net paper: clDice is from S. Shit, J. C. Paetzold et al., "clDice - a Novel
    Topology-Preserving Loss Function for Tubular Structure Segmentation", CVPR 2021. It
    compares skeletons (`soft_cldice`) of the predicted membrane probability and of the
    labelled membranes, so a gap that merges two cells costs as much as the membrane it cuts
    is long. Pixels of weight 0 (the padding of smaller images) are left out of both maps.
    The clDice term is the mean over the batch's images; with weight 0 use
    `weighted_cross_entropy` itself.
    """

    def __init__(self, weight: float, iterations: int, name: str = "cross_entropy_cldice", **kwargs):
        kwargs.pop("reduction", None)  # from get_config: always Keras' mean over the pixels, as the paper's
        super().__init__(name=name, reduction="sum_over_batch_size", **kwargs)
        self.weight, self.iterations = weight, iterations
        self.cross_entropy = weighted_cross_entropy()

    def __call__(self, y_true, y_pred, sample_weight=None):
        """The loss of a batch: labels [B, H, W], probabilities [B, H, W, C], weight map [B, H, W]."""
        cross_entropy = self.cross_entropy(y_true, y_pred, sample_weight=sample_weight)
        labels = ops.reshape(y_true, ops.shape(y_pred)[:-1])
        valid = ops.ones_like(labels, "float32") if sample_weight is None else ops.cast(sample_weight > 0, "float32")
        membrane = ops.cast(labels == MEMBRANE, "float32") * valid
        predicted = ops.cast(y_pred[..., MEMBRANE], "float32") * valid
        cldice = soft_cldice(membrane, predicted, self.iterations)
        return cross_entropy + self.weight * (1.0 - ops.mean(cldice))

    def get_config(self) -> dict:
        return {**super().get_config(), "weight": self.weight, "iterations": self.iterations}


def training_loss(cldice_weight: float, cldice_iterations: int) -> keras.losses.Loss:
    """The loss a run trains with: the paper's, plus the clDice term where its weight is set."""
    if cldice_weight:
        return CrossEntropyWithClDice(cldice_weight, cldice_iterations)
    return weighted_cross_entropy()
