"""The U-Net of Ronneberger, Fischer and Brox (2015) as a functional Keras model.

Valid (unpadded) 3x3 convolutions make the output smaller than the input, and every
2x2 max-pooling must see an even size, so only some input sizes are valid. The helpers
at the top of this file do that arithmetic; `unet` builds the network.

`padding="same"` builds what most Keras U-Nets are instead (zero-padded convolutions,
output as large as the input, no context): it exists for the ablation that compares the
two, not as a recommendation.
"""

from __future__ import annotations

import math

import keras

from pipeline.config import ModelConfig
from pipeline.errors import PipelineError


PADDINGS = ("valid", "same")


def _pair_loss(padding: str) -> int:
    """How much a pair of 3x3 convolutions shrinks a side: 4 px if valid (1 px per edge each), else 0."""
    return 4 if padding == "valid" else 0


def _shrink_through(size: int, depth: int, padding: str = "valid") -> int | None:
    """Output side for an input side, or None if some pooling sees an odd size."""
    loss = _pair_loss(padding)
    for _ in range(depth - 1):
        size -= loss
        if size <= 0 or size % 2:
            return None
        size //= 2
    size -= loss
    if size <= 0:
        return None
    for _ in range(depth - 1):
        size = 2 * size - loss
    return size if size > 0 else None


def is_valid_input_size(size: int, depth: int, padding: str = "valid") -> bool:
    """Whether a tile side of `size` pixels passes through a U-Net of `depth` levels."""
    return _shrink_through(size, depth, padding) is not None


def output_size(input_size: int, depth: int, padding: str = "valid") -> int:
    """The side of the output map for an input tile side (572 -> 388 for the paper's net)."""
    check_input_size(input_size, depth, padding)
    return _shrink_through(input_size, depth, padding)


def context(depth: int, padding: str = "valid") -> int:
    """Pixels of input context the network needs on each side of its output (92 for depth 5)."""
    # Output = input - 2 * context for every valid input; take the smallest valid one.
    smallest = valid_input_sizes(depth, 1, 4 * 2**depth * 4, padding)[0]
    return (smallest - _shrink_through(smallest, depth, padding)) // 2


def alignment(depth: int) -> int:
    """Tile offsets must be multiples of this (2^(depth-1)) for pooling grids to agree."""
    return 2 ** (depth - 1)


def valid_input_sizes(depth: int, low: int, high: int, padding: str = "valid") -> list[int]:
    """All valid input sides in [low, high]."""
    return [s for s in range(max(low, 1), high + 1) if is_valid_input_size(s, depth, padding)]


def check_input_size(size: int, depth: int, padding: str = "valid") -> None:
    """Raises a one-line error naming the nearest valid sizes if `size` is not valid."""
    if is_valid_input_size(size, depth, padding):
        return
    step = alignment(depth)
    smaller = valid_input_sizes(depth, size - step, size - 1, padding)
    larger = valid_input_sizes(depth, size + 1, max(size, 1) + 16 * step, padding)
    if not smaller and larger[0] - size > step:
        reason = f"the smallest valid size is {larger[0]}"
    else:
        nearest = " and ".join(str(s) for s in smaller[-1:] + larger[:1])
        reason = f"every pooling needs an even size; nearest valid sizes: {nearest}"
    raise PipelineError(f"input size {size} is not valid for a U-Net of depth {depth} ({reason})")


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


def skip_crops(depth: int, padding: str = "valid") -> list[int]:
    """Pixels cropped from each side of each level's skip connection, top level first.

    The difference between a skip connection and the up-sampled map it joins does not
    depend on the input size, so fixed crops work with spatial dimensions of None.
    """
    size = valid_input_sizes(depth, 1, 4 * 2**depth * 4, padding)[0]
    loss = _pair_loss(padding)
    skips = []
    for _ in range(depth - 1):
        skips.append(size - loss)
        size = (size - loss) // 2
    size -= loss
    crops = []
    for skip in reversed(skips):
        size = 2 * size
        crops.append((skip - size) // 2)
        size -= loss
    return crops[::-1]


def unet(config: ModelConfig) -> keras.Model:
    """Builds the U-Net; any valid input size is accepted (spatial dimensions are None).

    Drop-out acts on the two deepest levels, the end of the contracting path, as in the
    authors' Caffe model. The output is the per-pixel softmax over `num_classes`.
    """
    if config.depth < 2:
        raise PipelineError(f"model.depth must be at least 2, got {config.depth}")
    if config.padding not in PADDINGS:
        raise PipelineError(f"model.padding must be one of {', '.join(PADDINGS)}, got {config.padding!r}")
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
