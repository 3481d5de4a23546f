"""image_folder: a folder of the user's images and masks as a TFDS builder.

Build it with `tfds build datasets/image_folder --manual_dir DIR`; the builder is
`image_folder_dataset_builder.Builder`. This folder is deliberately not part of a
top-level `datasets` package (see datasets/README.md).
"""

import pipeline_checkout  # noqa: F401  (under `tfds build`: the checkout's pipeline, if not installed)
