"""Stage `export`: a versioned SavedModel that TF Serving loads.

    saved_models/<name>/<version>/   (integer versions, the layout the model server watches)

Signatures:
- `serving_default`: one whole image [H, W, C] (float32, any size) -> `probabilities`
  [H, W, K] and `mask` [H, W] (uint8, 255 = cell), with normalisation and overlap-tile
  prediction with mirror extrapolation inside the graph.
- `tile`: a batch of fixed-size, already normalised input tiles -> the raw network output.

A version is written to a hidden temporary folder and renamed into place, so a server
never sees it half-written, and an existing version is never replaced unless asked.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import keras
import tensorflow as tf

from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.input_pipeline import normalize
from pipeline.predict import load_model
from pipeline.tiling import overlap_tile_predict


def next_version(model_root: Path) -> int:
    """1 + the highest integer version under `model_root` (1 when there is none)."""
    versions = [int(p.name) for p in Path(model_root).glob("*") if p.is_dir() and p.name.isdigit()]
    return max(versions, default=0) + 1


def export_model(model: keras.Model, config: Config, overwrite: bool = False) -> Path:
    """Writes the SavedModel and returns its version folder."""
    model_root = Path(config.export.root) / config.export.name
    version = config.export.version or next_version(model_root)
    target = model_root / str(version)
    if target.exists() and not overwrite:
        raise PipelineError(f"{target}: export version {version} already exists (pass --overwrite to replace it)")
    channels, depth, tiles = config.model.input_channels, config.model.depth, config.predict

    archive = keras.export.ExportArchive()
    archive.track(model)

    def whole_image(image: tf.Tensor) -> dict[str, tf.Tensor]:
        probabilities = overlap_tile_predict(model, normalize(image), depth, tiles.tile_size, tiles.tiles_per_batch)
        cells = probabilities[..., 1] > config.predict.threshold
        return {"probabilities": probabilities, "mask": tf.cast(cells, tf.uint8) * 255}

    archive.add_endpoint(
        "serving_default", whole_image, input_signature=[tf.TensorSpec([None, None, channels], tf.float32, "image")]
    )
    archive.add_endpoint(
        "tile",
        lambda tiles_in: {"probabilities": model(tiles_in, training=False)},
        input_signature=[tf.TensorSpec([None, tiles.tile_size, tiles.tile_size, channels], tf.float32, "tiles")],
    )
    model_root.mkdir(parents=True, exist_ok=True)
    temporary = model_root / f".tmp-{version}-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    archive.write_out(str(temporary), verbose=False)
    if target.exists():  # overwrite asked: swap, then drop the old version
        retired = model_root / f".old-{version}-{os.getpid()}"
        os.rename(target, retired)
        os.rename(temporary, target)
        shutil.rmtree(retired)
    else:
        os.rename(temporary, target)
    return target


def run(config: Config, run_dir: Path, overwrite: bool = False) -> Path:
    """Exports the run's best model."""
    target = export_model(load_model(run_dir), config, overwrite)
    print(f"exported SavedModel -> {target} (signatures: serving_default = whole image, tile)")
    return target
