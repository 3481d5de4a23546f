"""The U-Net of Ronneberger, Fischer and Brox (2015) as a functional Keras model.

Valid (unpadded) 3x3 convolutions make the output smaller than the input, and every
2x2 max-pooling must see an even size, so only some input sizes are valid;
`pipeline.sizes` does that arithmetic, `unet` builds the network.

`padding="same"` builds what most Keras U-Nets are instead (zero-padded convolutions,
output as large as the input, no context): it exists for the ablation that compares the
two, not as a recommendation.
"""

from __future__ import annotations

import math

import keras

from pipeline.config.schema import Config, ModelConfig
from pipeline.errors import PipelineError
from pipeline.metrics.training import training_metrics
from pipeline.sizes import skip_crops
from pipeline.training.loss import training_loss
from pipeline.training.schedule import optimizer


def _he_normal(fan_in: int) -> keras.initializers.Initializer:
    # The paper: Gaussian with std sqrt(2/N), N = incoming connections of one neuron.
    # Keras' HeNormal truncates, and gets N wrong for the stride-2 up-convolution.
    return keras.initializers.RandomNormal(stddev=math.sqrt(2.0 / fan_in))


def _conv3x3(x: keras.KerasTensor, filters: int, name: str, padding: str) -> keras.KerasTensor:
    return keras.layers.Conv2D(
        filters,
        3,
        padding=padding,
        activation="relu",
        kernel_initializer=_he_normal(9 * x.shape[-1]),
        name=name,
    )(x)


def conv_pair(x: keras.KerasTensor, filters: int, name: str, padding: str = "valid") -> keras.KerasTensor:
    """Two 3x3 convolutions with ReLU (valid in the paper): the unit of every level."""
    x = _conv3x3(x, filters, f"{name}_conv1", padding)
    return _conv3x3(x, filters, f"{name}_conv2", padding)


def contracting_block(
    x: keras.KerasTensor, filters: int, dropout: float, name: str, padding: str = "valid"
) -> tuple[keras.KerasTensor, keras.KerasTensor]:
    """Returns (features for the skip connection, 2x2 max-pooled features)."""
    features = conv_pair(x, filters, name, padding)
    if dropout:
        features = keras.layers.Dropout(dropout, name=f"{name}_dropout")(features)
    return features, keras.layers.MaxPooling2D(2, name=f"{name}_pool")(features)


def expanding_block(
    x: keras.KerasTensor, skip: keras.KerasTensor, crop: int, filters: int, name: str, padding: str = "valid"
) -> keras.KerasTensor:
    """2x2 up-convolution, concatenation with the center-cropped skip, two convolutions."""
    x = keras.layers.Conv2DTranspose(
        filters,
        2,
        strides=2,
        activation="relu",
        # Stride 2 with a 2x2 kernel: each output pixel sees one input pixel's channels.
        kernel_initializer=_he_normal(x.shape[-1]),
        name=f"{name}_upconv",
    )(x)
    skip = keras.layers.Cropping2D(crop, name=f"{name}_crop")(skip)
    x = keras.layers.Concatenate(name=f"{name}_concat")([skip, x])
    return conv_pair(x, filters, name, padding)


def unet(config: ModelConfig) -> keras.Model:
    """Builds the U-Net; any valid input size is accepted (spatial dimensions are None).

    Drop-out acts on the two deepest levels, the end of the contracting path, as in the
    authors' Caffe model. The output is the per-pixel softmax over `num_classes`.
    `config` is trusted: `pipeline.config.resolve.validate` checked it when the command was resolved.
    """
    padding = config.padding
    inputs = keras.Input((None, None, config.input_channels), name="image")
    x = inputs
    skips = []
    for level in range(config.depth - 1):
        last = level == config.depth - 2
        skip, x = contracting_block(
            x, config.base_filters * 2**level, config.dropout if last else 0.0, f"down{level}", padding
        )
        skips.append(skip)
    x = conv_pair(x, config.base_filters * 2 ** (config.depth - 1), "bottom", padding)
    if config.dropout:
        x = keras.layers.Dropout(config.dropout, name="bottom_dropout")(x)
    crops = skip_crops(config.depth, padding)
    for level in reversed(range(config.depth - 1)):
        x = expanding_block(x, skips[level], crops[level], config.base_filters * 2**level, f"up{level}", padding)
    logits = keras.layers.Conv2D(
        config.num_classes, 1, kernel_initializer=_he_normal(x.shape[-1]), name="classifier"
    )(x)
    # float32 softmax keeps the loss stable under mixed precision.
    probabilities = keras.layers.Softmax(dtype="float32", name="probabilities")(logits)
    return keras.Model(inputs, probabilities, name="unet")


def unet_in_precision(config: ModelConfig, precision: str) -> keras.Model:
    """The U-Net whose layers compute under the Keras dtype policy `precision`.

    `float32`, `mixed_float16` or `mixed_bfloat16`: mixed policies compute in 16 bits but
    keep the variables (and the softmax, see `unet`) in float32. The global policy is set
    only while the layers are made, so models built afterwards are not affected.
    """
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(precision)
    try:
        return unet(config)
    finally:
        keras.config.set_dtype_policy(previous)


def compiled_model(config: Config) -> keras.Model:
    """The U-Net compiled with the weighted loss (and the clDice term where
    `train.cldice_weight` sets it); call inside a strategy scope.

    Mixed precision computes in float16/bfloat16 but keeps the variables, the softmax and
    the loss in float32 (and, for float16, scales the loss against underflow).
    """
    model = unet_in_precision(config.model, config.train.precision)
    tensorflow = keras.backend.backend() == "tensorflow"
    model.compile(
        optimizer=optimizer(config.train),
        loss=training_loss(config.train.cldice_weight, config.train.cldice_iterations),
        metrics=training_metrics(config.model.num_classes),
        # `train.jit_compile` is TensorFlow's XLA switch; the other backends compile as Keras
        # does by default ("auto": XLA on JAX; eager on PyTorch).
        jit_compile=config.train.jit_compile if tensorflow else "auto",
    )
    if tensorflow and config.train.jit_compile and not model.jit_compile:  # Keras falls back without XLA, warning
        raise PipelineError("train.jit_compile=true: Keras cannot compile this model with XLA here (is TensorFlow's "
                            "op determinism on?)")
    return model
