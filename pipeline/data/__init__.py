"""Data sets: a registry of their descriptions, and loading the configured one as splits.

`DATASETS` maps every name that `data.dataset` and `--dataset` accept to its `Dataset`:
how to read it, what its labels are, what `--data-dir` holds, its own `data.*`
settings, how its examples group into sequences, a published reference result and its
recipes per preset. The stages ask the description and never branch on a name.

One module per data set, named as its TFDS builder's folder in `datasets/`:
`synthetic_em` (the embedded default, `synthetic`), `isbi2012`, `ctc2d` (a description
per Cell Tracking Challenge set), `image_folder`. What they share: `base` (the
description, splits and examples) and `image_files` (reading an image or label file).
To add a data set, see docs/datasets.md.
"""

from __future__ import annotations

from pipeline.config.schema import DataConfig
from pipeline.data import ctc2d, image_folder, isbi2012, synthetic_em
from pipeline.data.base import LABELS, SPLITS, Dataset, Example, Reference, Split, stack_examples, tfds_features
from pipeline.errors import PipelineError

__all__ = ["DATASETS", "LABELS", "SPLITS", "Dataset", "Example", "Reference", "Split", "load", "register",
           "stack_examples", "tfds_features"]

DATASETS: dict[str, Dataset] = {}


def register(dataset: Dataset) -> Dataset:
    """Adds `dataset` to `DATASETS` under its name, which must be new; returns it."""
    if dataset.name in DATASETS:
        raise PipelineError(f"data set {dataset.name!r} is registered already")
    DATASETS[dataset.name] = dataset
    return dataset


def load(config: DataConfig, channels: int = 1) -> dict[str, Split]:
    """Loads the configured data set as train, val and test splits of `channels`-channel images."""
    dataset = DATASETS.get(config.dataset)
    if dataset is None:
        raise PipelineError(f"unknown data set {config.dataset!r}; choose one of {', '.join(DATASETS)}")
    if dataset.needs_data_dir and not config.data_dir:
        raise PipelineError(f"the {dataset.name} data set needs --data-dir ({dataset.data_dir})")
    if dataset.multichannel:
        return dataset.read(config, channels)
    if channels != 1:
        colour = ", ".join(name for name, other in DATASETS.items() if other.multichannel)
        raise PipelineError(f"the {dataset.name} data set has grey images: it needs model.input_channels=1, "
                            f"not {channels} (data sets of colour images: {colour})")
    return dataset.read(config)


for _dataset in (synthetic_em.DATASET, isbi2012.DATASET, *ctc2d.DATASETS, image_folder.DATASET):
    register(_dataset)
