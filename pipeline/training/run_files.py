"""What a training reads from and writes to its run directory around its steps, whatever
Keras' backend: the prepared splits, the epoch a backup resumes after, the checks and
files before the first step, the summary after the last. `stages.train` (TensorFlow) and
`training.portable` (Keras' JAX and PyTorch backends) share them."""

from __future__ import annotations

import json

import numpy as np

from pipeline.config.schema import Config, TrainConfig
from pipeline.errors import PipelineError
from pipeline.files import io, rundir
from pipeline.files.rundir import RunDir
from pipeline.training.callbacks import keeps_last_epoch, recorded_score, resumed_epoch
from pipeline.training.numpy_tiles import joined


def splits(config: Config, run: RunDir) -> tuple[dict, dict]:
    """The prepared (training, validation) splits; the training one with the validation
    images too when `train.include_validation`."""
    train_split = rundir.load_split(run, "train", config)
    val_split = rundir.load_split(run, "val", config)
    if config.train.include_validation:
        train_split = joined(train_split, val_split)
    return train_split, val_split


def initial_epoch(run: RunDir, task_id: int | None, overwrite: bool) -> int:
    """The epoch a backup resumes after (0: a new training, which refuses a finished model unless `overwrite`)."""
    epoch = 0 if overwrite else resumed_epoch(run.backup(task_id))
    if not epoch:
        io.refuse_existing([run.best_model], overwrite)
    return epoch


def check_channels(run: RunDir, train_split: dict, config: Config) -> None:
    """Refuses data prepared for another number of channels than the model's."""
    prepared_channels = train_split["images"].shape[-1]  # prepare reads images with the model's channels
    if prepared_channels != config.model.input_channels:
        raise PipelineError(f"{run.prepared('train')}: images of {prepared_channels} channel(s) were prepared, but "
                            f"model.input_channels={config.model.input_channels}; run --stage prepare again")


def start(config: Config, run: RunDir, task_id: int | None, initial: int, val_split: dict) -> None:
    """What the run directory gets before the first step: the configuration, a new training's
    clean slate, this worker's folder, and (by the chief) the model's example input."""
    run.save_config(config)
    if not initial:
        run.discard_training(task_id)
    run.worker(task_id).mkdir(parents=True, exist_ok=True)
    if task_id is None:
        run.save_example(example(val_split))


def example(split: dict) -> np.ndarray:
    """The split's first image [H, W, C], cropped to its own size: the model's example input,
    which the export's zoo package cuts its test tile from."""
    height, width = split["sizes"][0]
    return split["images"][0, :height, :width]


def summary(run: RunDir, train: TrainConfig) -> None:
    """The last line of a training: the kept epoch's score, the model file, the logs."""
    record, score = json.loads(run.best_record.read_text()), recorded_score(train)
    # With the last epoch kept, its value chose nothing.
    kept = "last epoch" if keeps_last_epoch(train) else "best"
    logs = f"; TensorBoard: tensorboard --logdir {run.logs}" if run.logs.is_dir() else ""
    print(f"{kept} {score} {record[score]:.6g} (epoch {record['epoch']}) -> {run.best_model}{logs}")
