"""U-Net (Ronneberger, Fischer and Brox, 2015) as a Keras/TensorFlow pipeline."""

import os

from pipeline import quiet

__version__ = "0.1.0"

# Every module runs TensorFlow ops on Keras tensors, so Keras must use its TensorFlow
# backend whatever KERAS_BACKEND says. Set before bioimageio.core is imported, it also
# keeps that package from setting "torch" for this process and its subprocesses.
os.environ["KERAS_BACKEND"] = "tensorflow"
# Before anything imports TensorFlow: every entry point imports this package first.
quiet.configure()
