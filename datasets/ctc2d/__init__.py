"""ctc2d: 2-D Cell Tracking Challenge training sets as a TFDS builder.

Build it with `tfds build datasets/ctc2d --config PhC-C2DH-U373`; the builder is
`ctc2d_dataset_builder.Builder`. This folder is deliberately not part of a top-level
`datasets` package (see datasets/README.md).
"""

import pipeline_checkout  # noqa: F401  (under `tfds build`: the checkout's pipeline, if not installed)
