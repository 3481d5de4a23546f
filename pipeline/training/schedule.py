"""The learning-rate schedule and the optimizer of the training.

`LearningRate` is registered with Keras under the package name "unet_pipeline"
(`register_keras_serializable`), not under this module's path: a .keras file saved with
it loads wherever the class lives.
"""

from __future__ import annotations

import keras
import numpy as np

from pipeline.config.schema import TrainConfig


@keras.saving.register_keras_serializable(package="unet_pipeline")
class LearningRate(keras.optimizers.schedules.LearningRateSchedule):
    """A linear warm-up from 0 to `peak` over `warmup_steps`, then `peak` held or decayed
    to 0 at `total_steps` (`config.LR_SCHEDULES`).

    Keras' CosineDecay has a warm-up but PolynomialDecay has none, and nnU-Net's "poly"
    schedule is the polynomial one: one schedule here gives each shape the same warm-up.
    """

    def __init__(self, peak: float, total_steps: int, shape: str = "constant", warmup_steps: int = 0):
        self.peak, self.total_steps, self.shape, self.warmup_steps = peak, total_steps, shape, warmup_steps

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        warming = self.peak * (step + 1) / max(self.warmup_steps, 1)
        progress = keras.ops.clip((step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1), 0, 1)
        if self.shape == "cosine":
            decayed = self.peak * 0.5 * (1 + keras.ops.cos(np.pi * progress))
        elif self.shape == "polynomial":
            decayed = self.peak * (1 - progress) ** 0.9
        else:
            decayed = self.peak * keras.ops.ones_like(progress)
        return keras.ops.where(step < self.warmup_steps, warming, decayed)

    def get_config(self) -> dict:
        return {"peak": self.peak, "total_steps": self.total_steps, "shape": self.shape,
                "warmup_steps": self.warmup_steps}


def optimizer(train: TrainConfig) -> keras.optimizers.Optimizer:
    """SGD with the paper's high momentum, or Adam for fast convergence on a CPU, on `LearningRate`,
    clipping the gradients' global norm at `train.clipnorm` where it is set, and keeping an
    exponential moving average of the weights where `train.ema_momentum` is set.

    The average lives in the optimizer's variables, so a backup keeps it; it never replaces
    the weights the optimizer steps from (no `ema_overwrite_frequency`): `callbacks.AveragedWeights`
    puts it into the model for each epoch's validation and saving, and `model.fit` leaves it
    there at the end (`finalize_variable_values`).

    Call it inside the strategy's scope. Keras clips each replica's gradients before they
    are summed, and each replica's are its share of the global batch's (the loss is divided
    by the number of replicas), so the norm is divided the same way: replicas whose
    gradients agree are clipped as one device would clip their sum.
    """
    rate = train.learning_rate
    if train.lr_schedule != "constant" or train.warmup_steps:
        rate = LearningRate(rate, train.epochs * train.steps_per_epoch, train.lr_schedule, train.warmup_steps)
    replicas = _replicas()
    options = {"global_clipnorm": train.clipnorm / replicas} if train.clipnorm else {}
    if train.ema_momentum:
        options.update(use_ema=True, ema_momentum=train.ema_momentum)
    if train.optimizer == "sgd":
        return keras.optimizers.SGD(rate, momentum=train.momentum, **options)
    return keras.optimizers.Adam(rate, **options)


def _replicas() -> int:
    """The replicas of the TensorFlow strategy in scope; 1 on the other Keras backends, which
    train on one device (`training.portable`) and have no TensorFlow to ask."""
    if keras.backend.backend() != "tensorflow":
        return 1
    import tensorflow as tf

    return tf.distribute.get_strategy().num_replicas_in_sync
