"""Cell instances of a probability map: the 4-connected components of the pixels above the
threshold, without the objects smaller than `predict.min_size`, numbered in raster order.

One rule, three implementations, for three places it must run:

- `instances`: on whole numpy images (OpenCV), for predict's label images, evaluation and
  the challenges' submissions; also the seeded watershed of `predict.instances`.
- `graph`: inside a TensorFlow graph, for the export's PNG signature.
- `chunked`: over the chunks of an image larger than memory, joining fragments across
  chunk borders (union-find).

`tests/test_labelling.py` holds the three to this one rule: on the same masks (random
blobs, cells touching at corners, a winding one-pixel cell, cells crossing chunk borders,
empty, full) and the same `min_size`, they give identical labels. A change to one of them
changes all three, or that test fails.
"""
