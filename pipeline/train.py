"""Stage `train`: `model.fit` under MirroredStrategy, watched in TensorBoard."""

from __future__ import annotations

import sys
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from pipeline import input_pipeline, io, rundir
from pipeline.config import Config, TrainConfig
from pipeline.errors import PipelineError
from pipeline.loss import weighted_cross_entropy
from pipeline.metrics import training_metrics
from pipeline.model import unet


class ValidationImages(keras.callbacks.Callback):
    """Writes a fixed validation tile to TensorBoard after every epoch.

    Input, ground truth, weight map, predicted probability of cell and mask, so that a
    user sees what the network learns, not only how the loss falls.
    """

    def __init__(self, log_dir: Path, tile: np.ndarray, label: np.ndarray, weight: np.ndarray):
        super().__init__()
        self.writer = tf.summary.create_file_writer(str(Path(log_dir) / "images"))
        self.tile = tile[None]
        out = label.shape[0]
        margin = (tile.shape[0] - out) // 2
        centre = tile[margin : margin + out, margin : margin + out, :1]
        self.fixed = {
            "input": _unit_range(centre),
            "ground_truth": label[..., None].astype(np.float32),
            "weight_map": _unit_range(weight[..., None]),
        }

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        probability = self.model(self.tile, training=False)[0, ..., 1:2].numpy()
        images = dict(self.fixed, probability=probability, mask=(probability > 0.5).astype(np.float32))
        with self.writer.as_default(step=epoch):
            for name, image in images.items():
                tf.summary.image(f"validation/{name}", image[None])
        self.writer.flush()


def _unit_range(image: np.ndarray) -> np.ndarray:
    low, high = float(image.min()), float(image.max())
    return ((image - low) / (high - low if high > low else 1.0)).astype(np.float32)


def optimizer(train: TrainConfig) -> keras.optimizers.Optimizer:
    """SGD with the paper's high momentum, or Adam for fast convergence on a CPU."""
    if train.optimizer == "sgd":
        return keras.optimizers.SGD(train.learning_rate, momentum=train.momentum)
    if train.optimizer == "adam":
        return keras.optimizers.Adam(train.learning_rate)
    raise PipelineError(f"train.optimizer must be sgd or adam, got {train.optimizer!r}")


def compiled_model(config: Config) -> keras.Model:
    """The U-Net compiled with the weighted loss; call inside a strategy scope."""
    model = unet(config.model)
    model.compile(
        optimizer=optimizer(config.train),
        loss=weighted_cross_entropy(),
        metrics=training_metrics(config.model.num_classes),
        jit_compile=config.train.jit_compile,
    )
    return model


def run(config: Config, run_dir: Path, overwrite: bool = False) -> keras.callbacks.History:
    """Trains on the prepared data; writes train/best.keras, train/last.keras and logs/.

    A run's trained model is refused to be replaced unless `overwrite`.
    """
    io.refuse_existing([rundir.best_model(run_dir)], overwrite)
    train_split = rundir.load_split(run_dir, "train", config)
    val_split = rundir.load_split(run_dir, "val", config)
    depth, train = config.model.depth, config.train

    keras.utils.set_random_seed(train.seed)
    tf.config.experimental.enable_op_determinism()
    train_data = input_pipeline.training_dataset(
        train_split["images"], train_split["instances"] > 0, train_split["weights"], depth, train, config.augment
    )
    val_tiles = input_pipeline.validation_tiles(
        val_split["images"], val_split["instances"] > 0, val_split["weights"], depth, train
    )
    strategy = tf.distribute.MirroredStrategy()
    with strategy.scope():
        model = compiled_model(config)

    out_dir = Path(run_dir) / "train"
    out_dir.mkdir(parents=True, exist_ok=True)
    log_dir = Path(run_dir) / "logs"
    callbacks = [
        keras.callbacks.TerminateOnNaN(),
        keras.callbacks.ModelCheckpoint(rundir.best_model(run_dir), monitor="val_loss", save_best_only=True),
        keras.callbacks.CSVLogger(str(out_dir / "history.csv")),
        keras.callbacks.TensorBoard(log_dir=str(log_dir)),
        ValidationImages(log_dir, *(part[0] for part in val_tiles)),
    ]
    if train.early_stopping_patience:
        callbacks.append(
            keras.callbacks.EarlyStopping(patience=train.early_stopping_patience, restore_best_weights=True)
        )
    print(
        f"training a depth-{depth} U-Net ({model.count_params():,} parameters) on "
        f"{strategy.num_replicas_in_sync} replica(s): {train.epochs} epochs x "
        f"{train.steps_per_epoch} steps of {train.batch_size} tiles of {train.tile_size} px"
    )
    history = model.fit(
        train_data,
        epochs=train.epochs,
        steps_per_epoch=train.steps_per_epoch,
        validation_data=input_pipeline.validation_dataset(val_tiles, train.batch_size),
        callbacks=callbacks,
        shuffle=False,  # the tile stream is already random
        verbose=2 if _quiet() else 1,
    )
    if np.isnan(history.history["loss"][-1]):
        raise PipelineError(f"training diverged (NaN loss in epoch {len(history.history['loss'])}); "
                            "lower train.learning_rate")
    model.save(out_dir / "last.keras")
    best = int(np.argmin(history.history["val_loss"]))
    print(
        f"best val_loss {history.history['val_loss'][best]:.4f} (epoch {best + 1}, "
        f"cell IoU {history.history['val_cell_iou'][best]:.3f}) -> {rundir.best_model(run_dir)}; "
        f"TensorBoard: tensorboard --logdir {log_dir}"
    )
    return history


def _quiet() -> bool:
    # One line per epoch instead of a live bar when output is not a terminal (CI, logs).
    return not sys.stdout.isatty()
