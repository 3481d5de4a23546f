"""Stage `prepare`: load the data set, compute the weight maps, cache everything."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np

from pipeline import data, io, rundir
from pipeline.config import Config
from pipeline.weight_map import weight_map


def run(config: Config, run_dir: Path) -> None:
    """Writes prepared/{train,val,test}.npz and a manifest into the run directory."""
    splits = data.load(config.data)
    labelled = sum(len(s.images) for s in splits.values() if s.instances is not None)
    progress = keras.utils.Progbar(labelled, unit_name="weight map")
    counts = {}
    for name, split in splits.items():
        arrays = {"images": split.images}
        if split.instances is not None:
            arrays["instances"] = split.instances
            arrays["weights"] = np.stack([_weight_map(inst, config, progress) for inst in split.instances])
        io.save_arrays(rundir.prepared_file(run_dir, name), **arrays)
        counts[name] = len(split.images)
    manifest = {"settings": rundir.data_settings(config), "counts": counts}
    io.atomic_write_text(rundir.prepared_manifest(run_dir), json.dumps(manifest, indent=2))
    shape = "x".join(str(n) for n in splits["train"].images.shape[1:3])
    print(
        f"prepared {config.data.dataset}: "
        + ", ".join(f"{n} {k}" for k, n in counts.items())
        + f" images of {shape} px -> {rundir.prepared_file(run_dir, 'train').parent}"
    )


def _weight_map(instances: np.ndarray, config: Config, progress: keras.utils.Progbar) -> np.ndarray:
    weights = weight_map(
        instances,
        w0=config.weight_map.w0,
        sigma=config.weight_map.sigma,
        balance_classes=config.weight_map.class_balance,
    )
    progress.add(1)
    return weights
