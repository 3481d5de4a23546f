"""Stage `export`: a versioned SavedModel that TF Serving loads and runs on whole images.

    saved_models/models.config              model server configuration listing every model
    saved_models/<name>/<version>/          integer versions, the layout the server watches
        saved_model.pb, variables/
        assets.extra/tf_serving_warmup_requests
        assets.extra/provenance.json        where the version came from (plain JSON)
        assets.extra/bioimageio.zip         the BioImage Model Zoo package (`pipeline.bioimageio`)

`--stage export` publishes into `export.root` (saved_models/); `--stage all` exports into
the run directory instead, so that a throwaway run never becomes a served version.

Signatures (input `image`, outputs `mask` and `probabilities`):
- `serving_default` (float32), `segment_uint8`, `segment_uint16`: a whole image of any
  size, [H, W], [H, W, C] or a batch [B, H, W, C] (for a 1-channel model also [B, H, W],
  which is what TF Serving's REST "instances" format makes of a list of 2-D images).
  Normalisation, overlap-tile prediction with mirror extrapolation and, if configured,
  test-time augmentation all run inside the graph. `mask` is uint8 (255 = cell) with the
  input's layout minus the channel axis; `probabilities` adds the class axis.
- `segment_png`: PNG files in, the mask and the cells' labels as PNG out.
- `tile` (input `tiles`): a batch [N, T, T, C] of already normalised float32 tiles, T =
  `predict.tile_size` -> the raw network output. Its input is declared of any shape, as
  the others are, and checked in the graph before the network runs (rank, channels, tile
  size, an empty batch, NaN or infinite values): a bad request gets an InvalidArgumentError
  naming the expected shape, never the kernels' errors, a wrong answer or an abort that
  would take a model server down.

The zoo package lives in assets.extra/, which TF Serving does not read, so that it is
written with its version, appears and is replaced together with it, and a server watching
<name>/ never takes it for a version.

A version is written to a hidden temporary folder and renamed into place, so a server never
sees it half-written, and an existing version is never replaced unless asked. A failed
export removes its temporary folder; those that a killed export left behind are removed by
the next export on that machine.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import os
import shutil
import socket
from pathlib import Path

import cv2
import keras
import numpy as np
import tensorflow as tf
from google.protobuf import text_format
from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2
from tensorflow_serving.config import model_server_config_pb2

from pipeline import bioimageio, io, rundir
from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.inference import load_model, png_segmentation_function, segmentation_function, tile_function
from pipeline.rundir import RunDir

WARMUP_FILE = Path("assets.extra") / "tf_serving_warmup_requests"
PROVENANCE_FILE = Path("assets.extra") / "provenance.json"
PACKAGE_FILE = Path("assets.extra") / "bioimageio.zip"
# The evaluation values a version records (those the report has).
HEADLINE = ("warping_error", "rand_error", "pixel_error", "foreground_iou", "seg")


def versions(model_root: Path) -> list[int]:
    """The integer versions exported under `model_root`."""
    return sorted(int(p.name) for p in Path(model_root).glob("*") if p.is_dir() and p.name.isdigit())


def next_version(model_root: Path) -> int:
    """1 + the highest version under `model_root` (1 when there is none)."""
    return max(versions(model_root), default=0) + 1


def warmup_requests(config: Config) -> list[tuple[str, str, np.ndarray]]:
    """(signature, input, value) of what the model server runs once at load time: every
    signature, and the whole-image one on a small image, one tile and several tiles."""
    rng = np.random.default_rng(0)
    channels, tile = config.model.input_channels, config.predict.tile_size

    def image(side: int, dtype: type, high: float) -> np.ndarray:
        shape = (side, side) if channels == 1 else (side, side, channels)
        return rng.uniform(0, high, size=shape).astype(dtype)

    png = np.array(cv2.imencode(".png", image(64, np.uint8, 255))[1].tobytes(), dtype=object)
    return [("serving_default", "image", image(side, np.float32, 255)) for side in (64, tile, 2 * tile + 1)] + [
        ("segment_uint8", "image", image(64, np.uint8, 255)),
        ("segment_uint16", "image", image(64, np.uint16, 65535)),
        ("segment_png", "image_bytes", png),
        ("tile", "tiles", np.zeros((1, tile, tile, channels), np.float32)),
    ]


def write_warmup_requests(path: Path, name: str, config: Config) -> None:
    """TF Serving's warm-up file: a TFRecord of PredictionLog records, one per request."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for signature, key, value in warmup_requests(config):
            request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(name=name, signature_name=signature))
            request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
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


def export_model(
    model: keras.Model, config: Config, root: Path | None = None, provenance: dict | None = None,
    overwrite: bool = False, example: np.ndarray | None = None,
) -> Path:
    """Writes the SavedModel (with its warm-up requests, provenance and zoo package) under
    `root` (default `export.root`) and returns its version folder.

    `example` [H, W, C] is the image the zoo package's test tile is cut from (default: a
    synthetic EM image).
    """
    model_root = Path(root or config.export.root) / config.export.name
    version = config.export.version or next_version(model_root)
    target = model_root / str(version)
    if target.exists() and not overwrite:
        raise PipelineError(f"{target}: export version {version} already exists (pass --overwrite to replace it)")
    archive = keras.export.ExportArchive()
    archive.track(model)
    segment = segmentation_function(model, config)
    for name, dtype in (("serving_default", tf.float32), ("segment_uint8", tf.uint8), ("segment_uint16", tf.uint16)):
        archive.add_endpoint(name, segment, input_signature=[tf.TensorSpec(None, dtype, "image")])
    archive.add_endpoint("segment_png", png_segmentation_function(model, config),
                         input_signature=[tf.TensorSpec(None, tf.string, "image_bytes")])
    # Of any shape, like the others: a fixed [None, tile, tile, C] placeholder lets the graph
    # assume that shape, and a request of another rank then reaches the kernels unchecked.
    archive.add_endpoint("tile", tile_function(model, config),
                         input_signature=[tf.TensorSpec(None, tf.float32, "tiles")])
    model_root.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(model_root)
    temporary = model_root / _scratch_name("tmp", version)
    try:
        archive.write_out(str(temporary), verbose=False)
        write_warmup_requests(temporary / WARMUP_FILE, config.export.name, config)
        if provenance is not None:
            provenance = provenance | {"version": version}
            (temporary / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2))
        bioimageio.write_package(temporary / PACKAGE_FILE, model, config, version, example, provenance)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)  # the error that got us here matters more
        raise
    if target.exists():  # overwrite asked: swap, then drop the old version
        retired = model_root / _scratch_name("old", version)
        os.rename(target, retired)
        os.rename(temporary, target)
        shutil.rmtree(retired)
    else:
        os.rename(temporary, target)
    write_models_config(model_root.parent)
    return target


def _scratch_name(kind: str, version: int) -> str:
    # Host and process name the writer, so that a later export can tell an abandoned
    # folder from one that another export is writing right now (also on a shared disk).
    return f".{kind}-{version}-{socket.gethostname()}-{os.getpid()}"


def _remove_abandoned(model_root: Path) -> None:
    """Removes scratch folders of exports on this machine whose process no longer runs."""
    host = socket.gethostname()
    for folder in model_root.glob(".*-*"):
        kind, _, rest = folder.name[1:].partition("-")
        writer_host, _, pid = rest.partition("-")[2].rpartition("-")
        if kind in ("tmp", "old") and writer_host == host and pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def provenance(config: Config, run: RunDir) -> dict:
    """What a version records about where it came from: run, model, configuration, scores, time.

    The evaluation's values are included only when the report is newer than the model
    (else it scored another model), and the note says why they are missing.
    """
    model = run.best_model
    record = {
        "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "run_dir": str(run.root.resolve()),
        "model": str(model.resolve()),
        "model_sha256": hashlib.sha256(model.read_bytes()).hexdigest(),
        "configuration": config.to_dict(),
        "software": {"unet-pipeline": _version("unet-pipeline"), "tensorflow": tf.__version__,
                     "keras": keras.__version__},
    }
    if not run.report.exists():
        return record | {"evaluation": None, "evaluation_note": f"{run.report} did not exist at export time"}
    if run.report.stat().st_mtime < model.stat().st_mtime:
        return record | {"evaluation": None, "evaluation_note": f"{run.report} is older than the model"}
    report = json.loads(run.report.read_text())
    values = report["mean_per_image"] if report.get("overall") is None else report["overall"]
    evaluation = {key: report.get(key) for key in ("split", "dataset", "threshold", "warnings")}
    return record | {"evaluation": evaluation | {key: values[key] for key in HEADLINE if key in values}}


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def example_image(config: Config, run: RunDir) -> np.ndarray | None:
    """The run's first test image [H, W, C] (cropped to its own size), or None without prepared data."""
    if not run.prepared("test").exists():
        return None
    test = rundir.load_split(run, "test", config)
    height, width = test["sizes"][0]
    return test["images"][0, :height, :width]


def run(config: Config, run: RunDir, root: Path, overwrite: bool = False) -> Path:
    """Exports the run's best model as the next version (or `export.version`) under `root`."""
    target = export_model(load_model(run), config, root, provenance(config, run), overwrite, example_image(config, run))
    run.save_config(config)
    print(
        f"exported SavedModel -> {target} (signatures: serving_default, segment_uint8, "
        f"segment_uint16 = whole image; tile); model server config -> {target.parent.parent / 'models.config'}; "
        f"BioImage Model Zoo package -> {target / PACKAGE_FILE}"
    )
    return target
