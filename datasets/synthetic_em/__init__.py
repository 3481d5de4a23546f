"""synthetic_em: the project's embedded synthetic EM data set as a TFDS builder.

Build it with `tfds build datasets/synthetic_em`; the builder is
`synthetic_em_dataset_builder.Builder`. This folder is deliberately not part of a
top-level `datasets` package (see datasets/README.md).
"""

import pipeline_checkout  # noqa: F401  (under `tfds build`: the checkout's pipeline, if not installed)
