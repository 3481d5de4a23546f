"""The layout of a run directory, shared by all stages.

    runs/<name>/config.yaml        resolved configuration (previous ones kept as config.N.yaml)
    runs/<name>/prepared/*.npz     images, instance labels and weight maps per split
    runs/<name>/train/best.keras   best model by validation loss (plus last.keras, history.csv)
    runs/<name>/logs/              TensorBoard event files
    runs/<name>/evaluation/        report.json
    runs/<name>/predictions/       probability maps, masks and overlays
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from pipeline.config import Config
from pipeline.errors import PipelineError


def is_writer() -> bool:
    """Whether this process writes the run's shared files (configuration, checkpoints, logs).

    True unless `TF_CONFIG` makes it a worker other than the chief: the task `chief`, or
    worker 0 when the cluster has no chief.
    """
    tf_config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    task, cluster = tf_config.get("task", {}), tf_config.get("cluster", {})
    if task.get("type") in (None, "chief"):
        return True
    return task.get("type") == "worker" and task.get("index", 0) == 0 and "chief" not in cluster


def prepared_file(run_dir: Path, split: str) -> Path:
    return Path(run_dir) / "prepared" / f"{split}.npz"


def prepared_manifest(run_dir: Path) -> Path:
    return Path(run_dir) / "prepared" / "manifest.json"


def best_model(run_dir: Path) -> Path:
    return Path(run_dir) / "train" / "best.keras"


def require(path: Path, stage: str) -> Path:
    """Returns `path`, or says which stage to run first when it is missing."""
    if not Path(path).exists():
        raise PipelineError(f"{path}: not found; run --stage {stage} first for this run directory")
    return Path(path)


def data_settings(config: Config) -> dict:
    """The configuration fields that the prepared data depends on."""
    return {"data": dataclasses.asdict(config.data), "weight_map": dataclasses.asdict(config.weight_map)}


def load_split(run_dir: Path, split: str, config: Config) -> dict[str, np.ndarray]:
    """Loads a prepared split, refusing data prepared with other data settings."""
    manifest = json.loads(require(prepared_manifest(run_dir), "prepare").read_text())
    if manifest["settings"] != data_settings(config):
        raise PipelineError(
            f"{prepared_manifest(run_dir)}: data was prepared with other data/weight-map "
            "settings than the current configuration; run --stage prepare again"
        )
    with np.load(require(prepared_file(run_dir, split), "prepare")) as arrays:
        return dict(arrays)
