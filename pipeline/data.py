"""Data sets as in-memory splits: the embedded synthetic default and ISBI 2012.

Every split holds images [N, H, W, C] and, where labelled, semantic labels [N, H, W]
(1 = cell, 0 = membrane) and instance labels [N, H, W] (0 = membrane, 1.. = cells).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from pipeline import io
from pipeline.config import DataConfig
from pipeline.errors import PipelineError
from pipeline.synthetic import synthetic_em_stack
from pipeline.weight_map import instances_from_binary

SPLITS = ("train", "val", "test")
ISBI_FILES = {"train": "train-volume.tif", "labels": "train-labels.tif", "test": "test-volume.tif"}


@dataclasses.dataclass
class Split:
    """Images of one split, with labels when the split is annotated."""

    images: np.ndarray
    instances: np.ndarray | None = None

    @property
    def labels(self) -> np.ndarray | None:
        return None if self.instances is None else (self.instances > 0).astype(np.uint8)


def load(config: DataConfig) -> dict[str, Split]:
    """Loads the configured data set as train, val and test splits."""
    if config.dataset == "synthetic":
        return _synthetic(config)
    if config.dataset == "isbi2012":
        return _isbi2012(config)
    raise PipelineError(f"unknown data set {config.dataset!r}; choose synthetic or isbi2012")


def _synthetic(config: DataConfig) -> dict[str, Split]:
    # Independent seeds per split, so the test images are never seen in training.
    seeds = np.random.SeedSequence(config.seed).generate_state(len(SPLITS))
    counts = {"train": config.num_train, "val": config.num_val, "test": config.num_test}
    splits = {}
    for name, seed in zip(SPLITS, seeds):
        images, instances = synthetic_em_stack(counts[name], config.image_size, int(seed))
        splits[name] = Split(images[..., None], instances)
    return splits


def _isbi2012(config: DataConfig) -> dict[str, Split]:
    if not config.data_dir:
        raise PipelineError("the isbi2012 data set needs --data-dir (the folder with train-volume.tif)")
    folder = Path(config.data_dir)
    if not folder.is_dir():
        raise PipelineError(f"{folder}: data folder does not exist")
    if not any(folder.iterdir()):
        raise PipelineError(f"{folder}: data folder is empty (expected {', '.join(ISBI_FILES.values())})")
    paths = {key: folder / name for key, name in ISBI_FILES.items()}
    for path in paths.values():
        if not path.is_file():
            raise PipelineError(f"{path}: missing ISBI 2012 file")
    volume = _read_isbi_stack(paths["train"])
    labels = _read_isbi_stack(paths["labels"])
    test = _read_isbi_stack(paths["test"])
    if labels.shape != volume.shape:
        raise PipelineError(
            f"{paths['labels']}: {labels.shape[0]} labels of {labels.shape[1:]} px do not match "
            f"{paths['train'].name} ({volume.shape[0]} images of {volume.shape[1:]} px)"
        )
    values = np.unique(labels)
    if not np.isin(values, (0, 255)).all():
        shown = ", ".join(str(v) for v in values[:6]) + (", ..." if len(values) > 6 else "")
        raise PipelineError(f"{paths['labels']}: labels must be binary (0 = membrane, 255 = cell), found {shown}")
    if not 0 < config.val_slices < len(volume):
        raise PipelineError(
            f"data.val_slices={config.val_slices} must leave training slices among {len(volume)}"
        )
    instances = np.stack([instances_from_binary(label) for label in labels])
    cut = len(volume) - config.val_slices  # consecutive sections: hold out the last ones
    return {
        "train": Split(volume[:cut, ..., None], instances[:cut]),
        "val": Split(volume[cut:, ..., None], instances[cut:]),
        "test": Split(test[..., None]),
    }


def _read_isbi_stack(path: Path) -> np.ndarray:
    stack = io.read_image(path)
    if stack.ndim == 2:
        stack = stack[None]
    if stack.dtype != np.uint8:
        raise PipelineError(f"{path}: expected 8-bit grey images, got {stack.dtype}")
    return stack
