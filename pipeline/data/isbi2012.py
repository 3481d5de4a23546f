"""The ISBI 2012 EM segmentation challenge (`--dataset isbi2012 --data-dir DIR`).

DIR holds the challenge's three TIFF stacks (`FILES`): the labelled training sections
(255 = cell, 0 = membrane) and the test sections, whose labels are secret. The first
`data.test_slices` labelled sections are the test split, which evaluate scores and which
model selection never sees; the last `data.val_slices` choose the model (validation).
With `data.test_slices=0` the test split is the challenge's unlabelled test volume, and
evaluate can only score the validation slices, which chose the model: a flattering score.
With `data.folds=k` the labelled sections are cut into k folds of consecutive sections
instead (`fold_parts`): fold `data.fold` is the test split, the next one validates, the
others train; `--stage crossval` runs every fold. Every section is named by its place in
its stack (`train_007`, `test_012`), which evaluate's folds and reports keep.
Its TFDS builder is `datasets/isbi2012/`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.config.schema import DataConfig, Range
from pipeline.data.base import Dataset, Reference, Split
from pipeline.data.weight_map import instances_from_binary
from pipeline.errors import PipelineError
from pipeline.files import io

FILES = {"train": "train-volume.tif", "labels": "train-labels.tif", "test": "test-volume.tif"}


def read(config: DataConfig) -> dict[str, Split]:
    """Test: the first `test_slices` labelled sections (or, with none, the unlabelled test
    stack); val: the last `val_slices`; train: those between. With `folds`, `fold_parts`."""
    folder = Path(config.data_dir)
    if not folder.is_dir():
        raise PipelineError(f"{folder}: data folder does not exist")
    if not any(folder.iterdir()):
        raise PipelineError(f"{folder}: data folder is empty (expected {', '.join(FILES.values())})")
    paths = {key: folder / name for key, name in FILES.items()}
    for path in paths.values():
        if not path.is_file():
            raise PipelineError(f"{path}: missing ISBI 2012 file")
    volume = _read_stack(paths["train"])
    labels = _read_stack(paths["labels"])
    test = _read_stack(paths["test"])
    if labels.shape != volume.shape:
        raise PipelineError(
            f"{paths['labels']}: {labels.shape[0]} labels of {labels.shape[1:]} px do not match "
            f"{paths['train'].name} ({volume.shape[0]} images of {volume.shape[1:]} px)"
        )
    values = np.unique(labels)
    if not np.isin(values, (0, 255)).all():
        shown = ", ".join(str(v) for v in values[:6]) + (", ..." if len(values) > 6 else "")
        raise PipelineError(f"{paths['labels']}: labels must be binary (0 = membrane, 255 = cell), found {shown}")
    parts = fold_parts(len(volume), config.folds, config.fold) if config.folds else _end_parts(len(volume), config)
    instances = np.stack([instances_from_binary(label) for label in labels])
    splits = {name: _labelled(volume, instances, indices) for name, indices in parts.items()}
    if "test" not in splits:
        splits["test"] = Split(test[..., None], ids=[f"test_{i:03d}" for i in range(len(test))])
    return splits


def _end_parts(count: int, config: DataConfig) -> dict[str, np.ndarray]:
    """The sections of each split without folds: test the first `test_slices` (none: the
    unlabelled stack is the test split), val the last `val_slices`, train those between."""
    first, cut = config.test_slices, count - config.val_slices
    if not first < cut:
        raise PipelineError(f"data.val_slices={config.val_slices} and data.test_slices={config.test_slices} must "
                            f"leave training slices among {count}")
    # Consecutive sections are nearly alike: a random hold-out, flanked by training
    # sections, would score optimistically, so the held-out parts are the two ends of the
    # stack, as far from each other as they can be.
    parts = {"train": np.arange(first, cut), "val": np.arange(cut, count)}
    return parts | ({"test": np.arange(first)} if first else {})


def fold_parts(count: int, folds: int, fold: int) -> dict[str, np.ndarray]:
    """The sections (indices among `count`) of each split of fold `fold` of `folds`.

    The sections are cut into `folds` runs of consecutive ones, for the reason
    `_end_parts` keeps the held-out parts at the stack's ends: test is run `fold`, val
    the next one (after the last, the first), train the others in stack order. `fold` is
    checked by `pipeline.config.resolve.validate`; whether the sections divide, here.
    """
    if count % folds:
        raise PipelineError(f"data.folds={folds}: the {count} labelled slices of {FILES['train']} do not split into "
                            f"{folds} folds of equal size; choose a divisor of {count}")
    runs = np.arange(count).reshape(folds, -1)
    val = (fold + 1) % folds
    return {"train": np.concatenate([runs[i] for i in range(folds) if i not in (fold, val)]),
            "val": runs[val], "test": runs[fold]}


def _labelled(volume: np.ndarray, instances: np.ndarray, indices: np.ndarray) -> Split:
    """The labelled sections at `indices`, named by their place in the stack."""
    return Split(volume[indices, ..., None], instances[indices], ids=[f"train_{i:03d}" for i in indices])


def _read_stack(path: Path) -> np.ndarray:
    # Slices, whatever axis the file calls them: Fiji and `tifffile.imwrite(imagej=True)` save a
    # stack's sections as ImageJ channels (CYX), which `io.read_stack` would take for colour.
    stack = io.read_slices(path, "ISBI 2012 stack")
    if stack.dtype != np.uint8:
        raise PipelineError(f"{path}: expected 8-bit grey images, got {stack.dtype}")
    return stack


DATASET = Dataset(
    name="isbi2012",
    read=read,
    labels="binary",
    data_dir=f"the folder with {', '.join(FILES.values())}",
    needs_data_dir=True,
    settings={"val_slices": Range(1), "test_slices": Range(0), "folds": Range(0), "fold": Range(0)},
    held_out_test=lambda config: config.test_slices > 0 or config.folds > 0,
    reference=Reference(
        values={"warping_error": 0.000353, "rand_error": 0.0382, "pixel_error": 0.0611},
        note="the paper's numbers are on the ISBI 2012 test set (30 slices, hidden labels); "
             "ours are on the {split} slices, a different test set",
    ),
    recipes={
        # About 50 minutes on 2 cores (Zen 4; docs/results.md, "ISBI 2012"). ISBI's membranes need
        # the paper's five levels (92 px context) more than its 64 channels: the cpu preset's
        # depth 4 sees 44 px. 10,000 steps of 2 tiles of 380 px (196 px output), the learning
        # rate decayed to 0 and the last epoch kept: on 4 validation slices the Rand error
        # wobbles more from epoch to epoch than choosing by it gains, and 10,000 steps brought
        # the held-out Rand error from 0.068 (5,000) to 0.054 (3 seeds each).
        "cpu": {
            "model": {"depth": 5, "base_filters": 16},
            "train": {"tile_size": 380, "batch_size": 2, "epochs": 40, "steps_per_epoch": 250, "learning_rate": 1e-3,
                      "lr_schedule": "polynomial", "select_by": "last"},
            "predict": {"tile_size": 572, "tiles_per_batch": 2, "test_time_augmentation": True},
        },
        # The paper averaged the network's outputs over rotated versions of the ISBI slices.
        "paper": {"predict": {"test_time_augmentation": True}},
    },
)
