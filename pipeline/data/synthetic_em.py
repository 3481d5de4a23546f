"""The embedded default (`--dataset synthetic`): EM-like images made by `pipeline.data.synthetic`.

No files: `data.num_train`, `num_val` and `num_test` images of `data.image_size` px are
generated from `data.seed`, with instance labels. Its TFDS builder is
`datasets/synthetic_em/`.
"""

from __future__ import annotations

import numpy as np

from pipeline.config.schema import DataConfig, Range
from pipeline.data.base import SPLITS, Dataset, Split
from pipeline.data.synthetic import synthetic_em_stack


def read(config: DataConfig) -> dict[str, Split]:
    """The generated splits, each a pure function of `config.seed`."""
    # Independent seeds per split, so the test images are never seen in training.
    seeds = np.random.SeedSequence(config.seed).generate_state(len(SPLITS))
    counts = {"train": config.num_train, "val": config.num_val, "test": config.num_test}
    splits = {}
    for name, seed in zip(SPLITS, seeds):
        images, instances = synthetic_em_stack(counts[name], config.image_size, int(seed))
        splits[name] = Split(images[..., None], instances)
    return splits


DATASET = Dataset(
    name="synthetic",
    read=read,
    labels="instances",
    settings={
        "seed": Range(0),  # numpy's seeds are non-negative
        "image_size": Range(1),
        "num_train": Range(1),
        "num_val": Range(1),
        "num_test": Range(1),
    },
    held_out_test=lambda config: True,  # its own images, from their own seeds
    image_size_setting="image_size",
    recipes={
        # 512 px, the size of the ISBI 2012 sections that the paper trained on.
        "paper": {"data": {"image_size": 512, "num_train": 20, "num_val": 4}},
        # Small and few, so that the smoke preset's runs take seconds.
        "smoke": {"data": {"image_size": 128, "num_train": 4, "num_val": 1, "num_test": 2}},
    },
)
