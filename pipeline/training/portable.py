"""The train stage on Keras' JAX and PyTorch backends, for machines without TensorFlow.

    KERAS_BACKEND=jax python run_pipeline.py --stage train --run-dir RUN

The same model, loss, optimizer, schedule, weight maps and callbacks as `stages.train`
(`training.model`, `training.callbacks`, `training.run_files`), from the same prepared
run, writing the same `train/` files: `best.keras` and `last.keras` load under
TensorFlow, which then evaluates, exports and predicts with them. What differs:

- the tiles come from `training.numpy_tiles` in worker processes instead of tf.data and
  the compiled warp kernel (the same tiles in distribution, not the same numbers);
- one device, Keras' own compiled step (XLA on JAX); no TensorFlow strategy, so
  `train.strategy=multi_worker` is refused, and `train.jit_compile` (TensorFlow's
  switch) changes nothing;
- no TensorBoard logs (their writers are TensorFlow's); `history.csv` has the same rows;
- `train.init_from` is refused: reading a zoo package needs TensorFlow.

This module imports no TensorFlow, and neither does anything it imports.
"""

from __future__ import annotations

import sys

import keras

from pipeline.config.schema import Config
from pipeline.errors import PipelineError
from pipeline.files import io, model_file
from pipeline.files.rundir import RunDir
from pipeline.training import allocator, numpy_tiles, run_files
from pipeline.training.callbacks import run_callbacks
from pipeline.training.model import compiled_model


def run(config: Config, run: RunDir, overwrite: bool = False, workers: int | None = None,
        ) -> keras.callbacks.History:
    """Trains on the prepared data on Keras' current backend; writes what `stages.train.run` writes
    but the TensorBoard logs. `workers`: the tile processes (default `numpy_tiles.default_workers`)."""
    train = config.train
    _refuse_unsupported(config)
    train_split, val_split = run_files.splits(config, run)
    initial_epoch = run_files.initial_epoch(run, None, overwrite)
    keras.utils.set_random_seed(train.seed)
    if train.keep_freed_memory:
        allocator.keep_freed_memory()
    depth, padding = config.model.depth, config.model.padding
    source = numpy_tiles.TileSource(train_split["images"], train_split["instances"] > 0, train_split["weights"],
                                    depth, train, config.augment, padding)
    val_tiles = numpy_tiles.validation_tiles(val_split["images"], val_split["instances"] > 0, val_split["weights"],
                                             depth, train, padding)
    model = compiled_model(config)
    run_files.check_channels(run, train_split, config)
    # Every check has passed: from here on the run directory changes.
    run_files.start(config, run, None, initial_epoch, val_split)
    callback_list = run_callbacks(config, run, None, tuple(part[0] for part in val_tiles), val_split)
    workers = numpy_tiles.default_workers() if workers is None else workers
    _announce(model, config, initial_epoch, workers)
    stream = numpy_tiles.batches(source, initial_epoch * train.steps_per_epoch, workers)
    try:
        history = model.fit(
            stream,
            epochs=train.epochs,
            initial_epoch=initial_epoch,
            steps_per_epoch=train.steps_per_epoch,
            validation_data=val_tiles,
            validation_batch_size=train.batch_size,
            callbacks=callback_list,
            verbose=1 if sys.stdout.isatty() else 2,  # one line per epoch in logs
        )
    finally:
        stream.close()  # stops the worker processes
    with io.atomic_path(run.last_model(None), overwrite=True) as temporary:
        model_file.save(model, temporary, config)
    run_files.summary(run, train)
    return history


def _refuse_unsupported(config: Config) -> None:
    """What this path cannot do, refused before anything changes."""
    backend = keras.backend.backend()
    if config.train.strategy == "multi_worker":
        raise PipelineError(f"train.strategy=multi_worker is TensorFlow's; Keras' {backend} backend trains on "
                            "one device here (unset KERAS_BACKEND for TensorFlow)")
    if config.train.init_from:
        raise PipelineError(f"train.init_from: reading the initial weights needs TensorFlow, which Keras' {backend} "
                            "backend trains without; start from random weights or train with TensorFlow")


def _announce(model: keras.Model, config: Config, initial_epoch: int, workers: int) -> None:
    """One line saying what is trained, on what and how long."""
    train = config.train
    resuming = f", resuming after epoch {initial_epoch}" if initial_epoch else ""
    print(
        f"training a depth-{config.model.depth} U-Net ({model.count_params():,} parameters) on Keras' "
        f"{keras.backend.backend()} backend ({train.precision}; tiles from {workers} worker process(es)): "
        f"{train.epochs} epochs x {train.steps_per_epoch} steps of {train.batch_size} tiles of "
        f"{train.tile_size} px{resuming}",
        flush=True,
    )
