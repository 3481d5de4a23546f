"""Stage `train`: the U-Net with the weighted loss, on one machine or several, resumable.

- One machine or several: `pipeline.training.distribution`.
- Survives being killed: `BackupAndRestore` keeps the weights and optimizer state of the
  last finished epoch; the same command resumes there, with the tile stream at the same
  position, and ends after the same number of steps as an uninterrupted run.
- Fine-tuning (`train.init_from`): `pipeline.training.finetune`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from pipeline.config.schema import Config, TrainConfig
from pipeline.files import io, model_file
from pipeline.files.rundir import RunDir
from pipeline.training import input_pipeline, run_files
from pipeline.training.callbacks import run_callbacks
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
    train_split, val_split = run_files.splits(config, run)
    distribution = strategy(train)
    task_id = task_id_of(distribution)
    initial_epoch = run_files.initial_epoch(run, task_id, overwrite)
    source, initial = _initial_model(train, initial_epoch)
    configure_process(train)  # after the initial weights are loaded: see `_initial_model`
    train_data, val_tiles, val_data = _datasets(config, train_split, val_split, initial_epoch)
    model = _model(config, distribution, initial, source)
    del initial  # copied: its memory is the training's now
    run_files.check_channels(run, train_split, config)
    # Every check has passed: from here on the run directory changes.
    run_files.start(config, run, task_id, initial_epoch, val_split)
    callback_list = run_callbacks(config, run, task_id, tuple(part[0] for part in val_tiles), val_split)
    _announce(model, config, distribution, source, initial_epoch)
    history = _fit(model, distribution, train_data, val_data, train, callback_list, initial_epoch)
    with io.atomic_path(run.last_model(task_id), overwrite=True) as temporary:
        model_file.save(model, temporary, config)
    if task_id is None:
        run_files.summary(run, train)
    return history


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

