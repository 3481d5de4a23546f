"""Metrics that Keras computes per epoch during training (and TensorBoard plots)."""

from __future__ import annotations

import keras

from pipeline.metrics.common import isbi_thresholds


# Saved `.keras` files name the class by its registered name, "unet>PixelError", not by
# its module: keep package and class name so that they keep loading.
@keras.saving.register_keras_serializable(package="unet")
class PixelError(keras.metrics.Metric):
    """The ISBI 2012 pixel error as a streaming Keras metric (see `pipeline.metrics.isbi.pixel_error_sweep`).

    Counts TP, FP and FN of the cell class at every threshold of the reference grid over
    all pixels seen, so the epoch value is the pixel error of the epoch's pixels together.
    Takes sparse labels and the softmax output (channel 1 = cell).
    """

    def __init__(self, name: str = "pixel_error", **kwargs):
        super().__init__(name=name, **kwargs)
        # Double precision: the reference compares in double, and counts pass 2^24.
        self.thresholds = keras.ops.convert_to_tensor(isbi_thresholds(), "float64")
        self.counts = [
            self.add_variable(shape=(len(isbi_thresholds()),), initializer="zeros", dtype="float64", name=name)
            for name in ("true_positives", "false_positives", "false_negatives")
        ]

    def update_state(self, y_true, y_pred, sample_weight=None) -> None:
        cell = keras.ops.reshape(keras.ops.cast(y_true, "bool"), (-1, 1))
        predicted = keras.ops.reshape(keras.ops.cast(y_pred[..., 1], "float64"), (-1, 1)) > self.thresholds
        for count, hits in zip(self.counts, (predicted & cell, predicted & ~cell, ~predicted & cell)):
            count.assign_add(keras.ops.sum(keras.ops.cast(hits, "float64"), axis=0))

    def result(self):
        tp, fp, fn = self.counts
        precision = keras.ops.where(fp > 0, tp / keras.ops.maximum(tp + fp, 1), 1.0)
        recall = keras.ops.where(fn > 0, tp / keras.ops.maximum(tp + fn, 1), 1.0)
        f_score = keras.ops.where(
            precision + recall > 0, 2 * precision * recall / keras.ops.maximum(precision + recall, 1e-300), 0.0
        )
        return keras.ops.cast(1.0 - keras.ops.max(f_score), "float32")

    def reset_state(self) -> None:
        for count in self.counts:
            # zeros of the variable's shape and dtype, not zeros_like: JAX's cannot read a float64
            # variable's dtype where it holds float32 (JAX without x64 keeps the counts in float32).
            count.assign(keras.ops.zeros(count.shape, count.dtype))


def training_metrics(num_classes: int) -> list[keras.metrics.Metric]:
    """Unweighted metrics that Keras reports per epoch (and TensorBoard plots)."""
    return [
        keras.metrics.SparseCategoricalAccuracy(name="pixel_accuracy"),
        keras.metrics.IoU(
            num_classes=num_classes,
            target_class_ids=[1],
            sparse_y_true=True,
            sparse_y_pred=False,
            name="cell_iou",
        ),
        PixelError(),
    ]
