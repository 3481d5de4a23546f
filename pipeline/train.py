"""Stage `train`: the U-Net with the weighted loss, on one machine or several, resumable.

- One machine (`train.strategy = mirrored`): `model.fit` under `MirroredStrategy` over all
  visible GPUs, or the CPU. The global batch is split across replicas and Keras scales
  the loss so that the gradients do not depend on the number of replicas.
- Several machines (`multi_worker`, cluster from `TF_CONFIG`): Keras 3's `model.fit` fails
  under `MultiWorkerMirroredStrategy` (keras-team/keras#20585: it reduces per-replica
  scalars along an axis they do not have), so `fit_distributed` runs the same model,
  loss, optimizer, metrics (Keras' own `train_step`/`test_step`) and callbacks in a loop
  of its own. The chief writes checkpoints and logs.
- Survives being killed: `BackupAndRestore` keeps the weights and optimizer state of the
  last finished epoch; the same command resumes there, with the tile stream at the same
  position, and ends after the same number of steps as an uninterrupted run.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from pipeline import input_pipeline, io, rundir
from pipeline.callbacks import BestModelCheckpoint, StopOnNaN, ValidationImages
from pipeline.config import Config, TrainConfig
from pipeline.errors import PipelineError
from pipeline.loss import weighted_cross_entropy
from pipeline.metrics import training_metrics
from pipeline.model import unet

PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")


def optimizer(train: TrainConfig) -> keras.optimizers.Optimizer:
    """SGD with the paper's high momentum, or Adam for fast convergence on a CPU."""
    if train.optimizer == "sgd":
        return keras.optimizers.SGD(train.learning_rate, momentum=train.momentum)
    if train.optimizer == "adam":
        return keras.optimizers.Adam(train.learning_rate)
    raise PipelineError(f"train.optimizer must be sgd or adam, got {train.optimizer!r}")


def strategy(train: TrainConfig) -> tf.distribute.Strategy:
    """MirroredStrategy over this machine's devices, or MultiWorkerMirroredStrategy."""
    if train.strategy == "mirrored":
        return tf.distribute.MirroredStrategy()
    if train.strategy == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise PipelineError(f"train.strategy must be mirrored or multi_worker, got {train.strategy!r}")


def compiled_model(config: Config) -> keras.Model:
    """The U-Net compiled with the weighted loss; call inside a strategy scope.

    Mixed precision computes in float16/bfloat16 but keeps the variables, the softmax and
    the loss in float32 (and, for float16, scales the loss against underflow).
    """
    if config.train.precision not in PRECISIONS:
        raise PipelineError(f"train.precision must be one of {', '.join(PRECISIONS)}, got {config.train.precision!r}")
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(config.train.precision)
    try:
        model = unet(config.model)
    finally:
        keras.config.set_dtype_policy(previous)
    model.compile(
        optimizer=optimizer(config.train),
        loss=weighted_cross_entropy(),
        metrics=training_metrics(config.model.num_classes),
        jit_compile=config.train.jit_compile,
    )
    return model


def _worker_dir(run_dir: Path, distribution: tf.distribute.Strategy) -> Path:
    """train/ for the chief; train/worker-N/ for the backup and last model of other workers.

    Every worker keeps its own backup (they all hold the same weights at each epoch end)
    so that workers sharing a file system never write the same file.
    """
    train_dir = Path(run_dir) / "train"
    return train_dir if rundir.is_writer() else train_dir / f"worker-{distribution.cluster_resolver.task_id}"


def resumed_epoch(backup_dir: Path) -> int:
    """Epochs finished by an interrupted run, from BackupAndRestore's own record (0 if none)."""
    record = Path(backup_dir) / "training_metadata.json"
    return json.loads(record.read_text())["epoch"] if record.exists() else 0


def callbacks(
    config: Config, run_dir: Path, backup_dir: Path, chief: bool, val_tile: tuple[np.ndarray, ...]
) -> list[keras.callbacks.Callback]:
    """Backup and NaN guard on every worker; checkpoints and logs on the chief only."""
    chosen = [StopOnNaN(), keras.callbacks.BackupAndRestore(str(backup_dir), double_checkpoint=True)]
    if chief:
        log_dir = Path(run_dir) / "logs"
        chosen += [
            BestModelCheckpoint(rundir.best_model(run_dir)),
            keras.callbacks.CSVLogger(str(Path(run_dir) / "train" / "history.csv"), append=True),
            keras.callbacks.TensorBoard(log_dir=str(log_dir)),
            ValidationImages(log_dir, *val_tile),
        ]
    if config.train.early_stopping_patience:
        chosen.append(
            keras.callbacks.EarlyStopping(patience=config.train.early_stopping_patience, restore_best_weights=True)
        )
    return chosen


def fit_distributed(
    model: keras.Model,
    distribution: tf.distribute.Strategy,
    train_data: tf.data.Dataset,
    val_data: tf.data.Dataset,
    train: TrainConfig,
    callback_list: list[keras.callbacks.Callback],
    initial_epoch: int,
) -> keras.callbacks.History:
    """`model.fit` for strategies it cannot handle: Keras' own steps in a loop of our own."""
    history = keras.callbacks.History()
    hooks = keras.callbacks.CallbackList(
        callback_list + [history], model=model, epochs=train.epochs, steps=train.steps_per_epoch, verbose=0
    )

    def run(step, batch):
        logs = distribution.run(step, args=(batch,))
        return {name: distribution.reduce("MEAN", value, axis=None) for name, value in logs.items()}

    train_step = tf.function(lambda batch: run(model.train_step, batch))
    test_step = tf.function(lambda batch: run(model.test_step, batch))
    # Workers share out the training tiles, but every worker sees every validation batch:
    # collective ops hang if one worker runs out of batches before another.
    batches = iter(distribution.experimental_distribute_dataset(_sharded(train_data, "DATA")))
    val_data = _sharded(val_data, "OFF")
    with distribution.scope():
        model.optimizer.build(model.trainable_variables)  # so that a backup restores its state too
    logs: dict[str, float] = {}
    hooks.on_train_begin()
    for epoch in range(initial_epoch, train.epochs):
        model.reset_metrics()
        hooks.on_epoch_begin(epoch)
        for step in range(train.steps_per_epoch):
            hooks.on_train_batch_begin(step)
            logs = {name: float(value) for name, value in train_step(next(batches)).items()}
            hooks.on_train_batch_end(step, logs)
        model.reset_metrics()
        for batch in distribution.experimental_distribute_dataset(val_data):
            val_logs = test_step(batch)
        logs.update({f"val_{name}": float(value) for name, value in val_logs.items()})
        hooks.on_epoch_end(epoch, logs)
        if model.stop_training:
            break
    hooks.on_train_end(logs)
    return history


def _sharded(data: tf.data.Dataset, policy: str) -> tf.data.Dataset:
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = getattr(tf.data.experimental.AutoShardPolicy, policy)
    return data.with_options(options)


def run(config: Config, run_dir: Path, overwrite: bool = False) -> keras.callbacks.History:
    """Trains on the prepared data; writes train/best.keras, train/last.keras and logs/.

    An interrupted run resumes from its last finished epoch. A finished run's model is
    not replaced unless `overwrite`, which also discards an interrupted run's backup.
    """
    train_split = rundir.load_split(run_dir, "train", config)
    val_split = rundir.load_split(run_dir, "val", config)
    depth, train = config.model.depth, config.train
    distribution = strategy(train)
    worker_dir = _worker_dir(run_dir, distribution)
    backup_dir = worker_dir / "backup"
    if overwrite:
        shutil.rmtree(backup_dir, ignore_errors=True)
    initial_epoch = resumed_epoch(backup_dir)
    if not initial_epoch:
        io.refuse_existing([rundir.best_model(run_dir)], overwrite)
        for stale in (rundir.best_model(run_dir).with_suffix(".json"), Path(run_dir) / "train" / "history.csv"):
            stale.unlink(missing_ok=True)

    keras.utils.set_random_seed(train.seed)
    tf.config.experimental.enable_op_determinism()
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
    worker_dir.mkdir(parents=True, exist_ok=True)
    chief = rundir.is_writer()
    callback_list = callbacks(config, run_dir, backup_dir, chief, tuple(part[0] for part in val_tiles))

    resuming = f", resuming after epoch {initial_epoch}" if initial_epoch else ""
    print(
        f"training a depth-{depth} U-Net ({model.count_params():,} parameters) on "
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
    with io.atomic_path(worker_dir / "last.keras", overwrite=True) as temporary:
        model.save(temporary)
    if chief:
        _summary(run_dir)
    return history


def _summary(run_dir: Path) -> None:
    record = json.loads(rundir.best_model(run_dir).with_suffix(".json").read_text())
    print(
        f"best val_loss {record['val_loss']:.4f} (epoch {record['epoch']}) -> {rundir.best_model(run_dir)}; "
        f"TensorBoard: tensorboard --logdir {Path(run_dir) / 'logs'}"
    )
