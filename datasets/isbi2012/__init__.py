"""isbi2012: the ISBI 2012 EM segmentation challenge data as a TFDS builder (manual download).

Build it with `tfds build datasets/isbi2012 --manual_dir DIR`; the builder is
`isbi2012_dataset_builder.Builder`. This folder is deliberately not part of a top-level
`datasets` package (see datasets/README.md).
"""

import pipeline_checkout  # noqa: F401  (under `tfds build`: the checkout's pipeline, if not installed)
