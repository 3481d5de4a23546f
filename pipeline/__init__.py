"""U-Net (Ronneberger, Fischer and Brox, 2015) as a Keras/TensorFlow pipeline."""

import os

from pipeline import quiet

__version__ = "0.1.0"

# Keras' backends that `--stage train` (and `prepare`) also runs on, without TensorFlow
# (pipeline.training.portable): chosen by the user's KERAS_BACKEND, for machines that
# have JAX or PyTorch but no TensorFlow. The CLI refuses the other stages under them.
PORTABLE_BACKENDS = ("jax", "torch")
# Every other module runs TensorFlow ops on Keras tensors, so Keras must use its TensorFlow
# backend whatever else KERAS_BACKEND says. Set before bioimageio.core is imported, it also
# keeps that package from setting "torch" for this process and its subprocesses.
if os.environ.get("KERAS_BACKEND") not in PORTABLE_BACKENDS:
    os.environ["KERAS_BACKEND"] = "tensorflow"
# Before anything imports TensorFlow: every entry point imports this package first.
quiet.configure()
