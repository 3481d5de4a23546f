"""Stage `export`: a versioned SavedModel that TF Serving loads and runs on whole images.

    saved_models/models.config              model server configuration listing every model
    saved_models/<name>/<version>/          integer versions, the layout the server watches
        saved_model.pb, variables/
        assets.extra/tf_serving_warmup_requests

Signatures (input `image`, outputs `mask` and `probabilities`):
- `serving_default` (float32), `segment_uint8`, `segment_uint16`: a whole image of any
  size, [H, W], [H, W, C] or a batch [B, H, W, C] (for a 1-channel model also [B, H, W],
  which is what TF Serving's REST "instances" format makes of a list of 2-D images).
  Normalisation, overlap-tile prediction with mirror extrapolation and, if configured,
  test-time augmentation all run inside the graph. `mask` is uint8 (255 = cell) with the
  input's layout minus the channel axis; `probabilities` adds the class axis.
- `tile`: a batch of fixed-size, already normalised input tiles -> the raw network output.

A version is written to a hidden temporary folder and renamed into place, so a server never
sees it half-written, and an existing version is never replaced unless asked.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from google.protobuf import text_format
from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2
from tensorflow_serving.config import model_server_config_pb2

from pipeline import io
from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.predict import load_model, segmentation_function

WARMUP_FILE = Path("assets.extra") / "tf_serving_warmup_requests"


def versions(model_root: Path) -> list[int]:
    """The integer versions exported under `model_root`."""
    return sorted(int(p.name) for p in Path(model_root).glob("*") if p.is_dir() and p.name.isdigit())


def next_version(model_root: Path) -> int:
    """1 + the highest version under `model_root` (1 when there is none)."""
    return max(versions(model_root), default=0) + 1


def warmup_images(config: Config) -> list[np.ndarray]:
    """Images the model server runs once at load time: small, one tile, several tiles."""
    rng = np.random.default_rng(0)
    sides = (64, config.predict.tile_size, 2 * config.predict.tile_size + 1)
    return [rng.uniform(0, 255, size=(side, side)).astype(np.float32) for side in sides]


def write_warmup_requests(path: Path, name: str, config: Config) -> None:
    """TF Serving's warm-up file: a TFRecord of PredictionLog records, one per image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for image in warmup_images(config):
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(name=name, signature_name="serving_default")
            )
            request.inputs["image"].CopyFrom(tf.make_tensor_proto(image))
            log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())


def write_models_config(root: Path) -> Path:
    """`models.config` for `tensorflow_model_server --model_config_file`, every model under root.

    Paths assume the root is mounted at /models, as in the official container.
    """
    config = model_server_config_pb2.ModelServerConfig()
    for model_dir in sorted(p for p in Path(root).iterdir() if p.is_dir() and versions(p)):
        entry = config.model_config_list.config.add()
        entry.name, entry.base_path, entry.model_platform = model_dir.name, f"/models/{model_dir.name}", "tensorflow"
    path = Path(root) / "models.config"
    io.atomic_write_text(path, text_format.MessageToString(config))
    return path


def export_model(model: keras.Model, config: Config, overwrite: bool = False) -> Path:
    """Writes the SavedModel (with its warm-up requests) and returns its version folder."""
    model_root = Path(config.export.root) / config.export.name
    version = config.export.version or next_version(model_root)
    target = model_root / str(version)
    if target.exists() and not overwrite:
        raise PipelineError(f"{target}: export version {version} already exists (pass --overwrite to replace it)")
    channels, tile = config.model.input_channels, config.predict.tile_size

    archive = keras.export.ExportArchive()
    archive.track(model)
    segment = segmentation_function(model, config)
    for name, dtype in (("serving_default", tf.float32), ("segment_uint8", tf.uint8), ("segment_uint16", tf.uint16)):
        archive.add_endpoint(name, segment, input_signature=[tf.TensorSpec(None, dtype, "image")])
    archive.add_endpoint(
        "tile",
        lambda tiles: {"probabilities": model(tiles, training=False)},
        input_signature=[tf.TensorSpec([None, tile, tile, channels], tf.float32, "tiles")],
    )
    model_root.mkdir(parents=True, exist_ok=True)
    temporary = model_root / f".tmp-{version}-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    archive.write_out(str(temporary), verbose=False)
    write_warmup_requests(temporary / WARMUP_FILE, config.export.name, config)
    if target.exists():  # overwrite asked: swap, then drop the old version
        retired = model_root / f".old-{version}-{os.getpid()}"
        os.rename(target, retired)
        os.rename(temporary, target)
        shutil.rmtree(retired)
    else:
        os.rename(temporary, target)
    write_models_config(model_root.parent)
    return target


def run(config: Config, run_dir: Path, overwrite: bool = False) -> Path:
    """Exports the run's best model."""
    target = export_model(load_model(run_dir), config, overwrite)
    print(
        f"exported SavedModel -> {target} (signatures: serving_default, segment_uint8, "
        f"segment_uint16 = whole image; tile); model server config -> {target.parent.parent / 'models.config'}"
    )
    return target
