"""U-Net (Ronneberger, Fischer and Brox, 2015) as a Keras/TensorFlow pipeline."""

__version__ = "0.1.0"
