"""Stage `train`: the U-Net with the weighted loss, on one machine or several, resumable.

- One machine or several: `pipeline.training.distribution`.
- Survives being killed: `BackupAndRestore` keeps the weights and optimizer state of the
  last finished epoch; the same command resumes there, with the tile stream at the same
  position, and ends after the same number of steps as an uninterrupted run.
- Fine-tuning (`train.init_from`): `pipeline.training.finetune`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from pipeline.config.schema import Config, TrainConfig
from pipeline.errors import PipelineError
from pipeline.files import io, model_file, rundir
from pipeline.files.rundir import RunDir
from pipeline.training import input_pipeline
from pipeline.training.numpy_tiles import joined
from pipeline.training.callbacks import keeps_last_epoch, recorded_score, resumed_epoch, run_callbacks
from pipeline.training.distribution import fit_distributed, strategy, task_id_of
from pipeline.training.finetune import copy_weights, initial_weights_file, load_initial_model
from pipeline.training.model import compiled_model
from pipeline.training.process import configure_process


def run(config: Config, run: RunDir, overwrite: bool = False) -> keras.callbacks.History:
    """Trains on the prepared data; writes train/best.keras, train/last.keras, train/example.npy and logs/.

    An interrupted run resumes from its last finished epoch. A finished run's model is
    not replaced unless `overwrite`, which also discards an interrupted run's backup.
    """
    train = config.train
    train_split, val_split = _splits(config, run)
    distribution = strategy(train)
    task_id = task_id_of(distribution)
    initial_epoch = _initial_epoch(run, task_id, overwrite)
    source, initial = _initial_model(train, initial_epoch)
    configure_process(train)  # after the initial weights are loaded: see `_initial_model`
    train_data, val_tiles, val_data = _datasets(config, train_split, val_split, initial_epoch)
    model = _model(config, distribution, initial, source)
    del initial  # copied: its memory is the training's now
    _check_channels(run, train_split, config)
    # Every check has passed: from here on the run directory changes.
    _start(config, run, task_id, initial_epoch, val_split)
    callback_list = run_callbacks(config, run, task_id, tuple(part[0] for part in val_tiles), val_split)
    _announce(model, config, distribution, source, initial_epoch)
    history = _fit(model, distribution, train_data, val_data, train, callback_list, initial_epoch)
    with io.atomic_path(run.last_model(task_id), overwrite=True) as temporary:
        model_file.save(model, temporary, config)
    if task_id is None:
        _summary(run, train)
    return history


def _splits(config: Config, run: RunDir) -> tuple[dict, dict]:
    """The prepared (training, validation) splits; the training one with the validation
    images too when `train.include_validation`."""
    train_split = rundir.load_split(run, "train", config)
    val_split = rundir.load_split(run, "val", config)
    if config.train.include_validation:
        train_split = joined(train_split, val_split)
    return train_split, val_split


def _initial_epoch(run: RunDir, task_id: int | None, overwrite: bool) -> int:
    """The epoch a backup resumes after (0: a new training, which refuses a finished model unless `overwrite`)."""
    initial_epoch = 0 if overwrite else resumed_epoch(run.backup(task_id))
    if not initial_epoch:
        io.refuse_existing([run.best_model], overwrite)
    return initial_epoch


def _initial_model(train: TrainConfig, initial_epoch: int) -> tuple[Path | None, keras.Model | None]:
    """(file, model) of the weights a new training starts from (`train.init_from`), or (None, None).

    A resumed run restores its weights from the backup, so it neither needs nor reads
    init_from. Loaded before the seed is set (`configure_process`): loading draws initial
    values (which the saved ones replace), and the run's random stream must not depend on that.
    """
    source = initial_weights_file(train.init_from) if train.init_from and not initial_epoch else None
    return source, (load_initial_model(source) if source else None)


def _datasets(config: Config, train_split: dict, val_split: dict, initial_epoch: int,
              ) -> tuple[tf.data.Dataset, tuple[np.ndarray, ...], tf.data.Dataset]:
    """(training tiles from the batch `initial_epoch` resumes at, the validation tiles, their dataset)."""
    depth, train, padding = config.model.depth, config.train, config.model.padding
    train_data = input_pipeline.training_dataset(
        train_split["images"], train_split["instances"] > 0, train_split["weights"], depth, train, config.augment,
        first_batch=initial_epoch * train.steps_per_epoch, padding=padding,
    )
    val_tiles = input_pipeline.validation_tiles(
        val_split["images"], val_split["instances"] > 0, val_split["weights"], depth, train, padding
    )
    return train_data, val_tiles, input_pipeline.validation_dataset(val_tiles, train.batch_size)


def _model(config: Config, distribution: tf.distribute.Strategy, initial: keras.Model | None,
           source: Path | None) -> keras.Model:
    """The compiled U-Net in the strategy's scope, with the initial weights copied in if any."""
    with distribution.scope():
        model = compiled_model(config)
        if initial is not None:
            copy_weights(initial, model, source)
    return model


def _check_channels(run: RunDir, train_split: dict, config: Config) -> None:
    """Refuses data prepared for another number of channels than the model's."""
    prepared_channels = train_split["images"].shape[-1]  # prepare reads images with the model's channels
    if prepared_channels != config.model.input_channels:
        raise PipelineError(f"{run.prepared('train')}: images of {prepared_channels} channel(s) were prepared, but "
                            f"model.input_channels={config.model.input_channels}; run --stage prepare again")


def _start(config: Config, run: RunDir, task_id: int | None, initial_epoch: int, val_split: dict) -> None:
    """What the run directory gets before the first step: the configuration, a new training's
    clean slate, this worker's folder, and (by the chief) the model's example input."""
    run.save_config(config)
    if not initial_epoch:
        run.discard_training(task_id)
    run.worker(task_id).mkdir(parents=True, exist_ok=True)
    if task_id is None:
        run.save_example(_example(val_split))


def _example(split: dict) -> np.ndarray:
    """The split's first image [H, W, C], cropped to its own size: the model's example input,
    which the export's zoo package cuts its test tile from."""
    height, width = split["sizes"][0]
    return split["images"][0, :height, :width]


def _announce(model: keras.Model, config: Config, distribution: tf.distribute.Strategy, source: Path | None,
              initial_epoch: int) -> None:
    """One line saying what is trained, from what, where and how long."""
    train = config.train
    resuming = f", resuming after epoch {initial_epoch}" if initial_epoch else ""
    starting = f" from the weights of {source or train.init_from}" if train.init_from else ""
    print(
        f"training a depth-{config.model.depth} U-Net ({model.count_params():,} parameters){starting} on "
        f"{distribution.num_replicas_in_sync} replica(s) ({train.strategy}, {train.precision}): "
        f"{train.epochs} epochs x {train.steps_per_epoch} steps of {train.batch_size} tiles of "
        f"{train.tile_size} px{resuming}",
        flush=True,
    )


def _fit(model: keras.Model, distribution: tf.distribute.Strategy, train_data: tf.data.Dataset,
         val_data: tf.data.Dataset, train: TrainConfig, callback_list: list, initial_epoch: int,
         ) -> keras.callbacks.History:
    """`model.fit`, or Keras' own steps under the multi-worker strategy (`fit_distributed`)."""
    if train.strategy == "multi_worker":
        return fit_distributed(model, distribution, train_data, val_data, train, callback_list, initial_epoch)
    return model.fit(
        train_data,
        epochs=train.epochs,
        initial_epoch=initial_epoch,
        steps_per_epoch=train.steps_per_epoch,
        validation_data=val_data,
        callbacks=callback_list,
        shuffle=False,  # the tile stream is already random
        verbose=1 if sys.stdout.isatty() else 2,  # one line per epoch in logs
    )


def _summary(run: RunDir, train: TrainConfig) -> None:
    record, score = json.loads(run.best_record.read_text()), recorded_score(train)
    # With the last epoch kept, its value chose nothing.
    kept = "last epoch" if keeps_last_epoch(train) else "best"
    print(
        f"{kept} {score} {record[score]:.6g} (epoch {record['epoch']}) -> {run.best_model}; "
        f"TensorBoard: tensorboard --logdir {run.logs}"
    )
