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

import keras

from pipeline.config.schema import Config, TrainConfig
from pipeline.errors import PipelineError
from pipeline.files import io, model_file, rundir
from pipeline.files.rundir import RunDir
from pipeline.training import allocator, input_pipeline
from pipeline.training.callbacks import keeps_last_epoch, recorded_score, resumed_epoch, run_callbacks
from pipeline.training.distribution import fit_distributed, strategy, task_id_of
from pipeline.training.finetune import copy_weights, initial_weights_file, load_initial_model
from pipeline.training.model import compiled_model
from pipeline.training.process import precision_notice, set_determinism


def run(config: Config, run: RunDir, overwrite: bool = False) -> keras.callbacks.History:
    """Trains on the prepared data; writes train/best.keras, train/last.keras and logs/.

    An interrupted run resumes from its last finished epoch. A finished run's model is
    not replaced unless `overwrite`, which also discards an interrupted run's backup.
    """
    train_split = rundir.load_split(run, "train", config)
    val_split = rundir.load_split(run, "val", config)
    if config.train.include_validation:
        train_split = input_pipeline.joined(train_split, val_split)
    depth, train = config.model.depth, config.train
    distribution = strategy(train)
    task_id = task_id_of(distribution)
    initial_epoch = 0 if overwrite else resumed_epoch(run.backup(task_id))
    if not initial_epoch:
        io.refuse_existing([run.best_model], overwrite)
    # A resumed run restores its weights from the backup, so it neither needs nor reads
    # init_from. Loaded before the seed is set: loading draws initial values (which the
    # saved ones replace), and the run's random stream must not depend on that.
    source = initial_weights_file(train.init_from) if train.init_from and not initial_epoch else None
    initial = load_initial_model(source) if source else None

    keras.utils.set_random_seed(train.seed)
    set_determinism(train)
    precision_notice(train)
    if train.keep_freed_memory and not allocator.keep_freed_memory():
        print("notice: train.keep_freed_memory needs glibc's malloc, which this system does not have; "
              "training frees memory as usual", flush=True)
    train_data = input_pipeline.training_dataset(
        train_split["images"], train_split["instances"] > 0, train_split["weights"], depth, train, config.augment,
        first_batch=initial_epoch * train.steps_per_epoch, padding=config.model.padding,
    )
    val_tiles = input_pipeline.validation_tiles(
        val_split["images"], val_split["instances"] > 0, val_split["weights"], depth, train, config.model.padding
    )
    val_data = input_pipeline.validation_dataset(val_tiles, train.batch_size)
    with distribution.scope():
        model = compiled_model(config)
        if initial is not None:
            copy_weights(initial, model, source)
            del initial  # copied: its memory is the training's now
    prepared_channels = train_split["images"].shape[-1]  # prepare reads images with the model's channels
    if prepared_channels != config.model.input_channels:
        raise PipelineError(f"{run.prepared('train')}: images of {prepared_channels} channel(s) were prepared, but "
                            f"model.input_channels={config.model.input_channels}; run --stage prepare again")
    # Every check has passed: from here on the run directory changes.
    run.save_config(config)
    if not initial_epoch:
        run.discard_training(task_id)
    run.worker(task_id).mkdir(parents=True, exist_ok=True)
    callback_list = run_callbacks(config, run, task_id, tuple(part[0] for part in val_tiles), val_split)

    resuming = f", resuming after epoch {initial_epoch}" if initial_epoch else ""
    starting = f" from the weights of {source or train.init_from}" if train.init_from else ""
    print(
        f"training a depth-{depth} U-Net ({model.count_params():,} parameters){starting} on "
        f"{distribution.num_replicas_in_sync} replica(s) ({train.strategy}, {train.precision}): "
        f"{train.epochs} epochs x {train.steps_per_epoch} steps of {train.batch_size} tiles of "
        f"{train.tile_size} px{resuming}",
        flush=True,
    )
    if train.strategy == "multi_worker":
        history = fit_distributed(model, distribution, train_data, val_data, train, callback_list, initial_epoch)
    else:
        history = model.fit(
            train_data,
            epochs=train.epochs,
            initial_epoch=initial_epoch,
            steps_per_epoch=train.steps_per_epoch,
            validation_data=val_data,
            callbacks=callback_list,
            shuffle=False,  # the tile stream is already random
            verbose=1 if sys.stdout.isatty() else 2,  # one line per epoch in logs
        )
    with io.atomic_path(run.last_model(task_id), overwrite=True) as temporary:
        model_file.save(model, temporary, config)
    if task_id is None:
        _summary(run, train)
    return history


def _summary(run: RunDir, train: TrainConfig) -> None:
    record, score = json.loads(run.best_record.read_text()), recorded_score(train)
    # With the last epoch kept, its value chose nothing.
    kept = "last epoch" if keeps_last_epoch(train) else "best"
    print(
        f"{kept} {score} {record[score]:.6g} (epoch {record['epoch']}) -> {run.best_model}; "
        f"TensorBoard: tensorboard --logdir {run.logs}"
    )
