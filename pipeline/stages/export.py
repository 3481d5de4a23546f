"""Stage `export`: a versioned SavedModel that TF Serving loads and runs on whole images.

    saved_models/models.config              model server configuration listing every model
    saved_models/.export.lock               held while a version is published (`publication_lock`)
    saved_models/<name>/<version>/          integer versions, the layout the server watches
        saved_model.pb, variables/
        assets.extra/tf_serving_warmup_requests
        assets.extra/provenance.json        where the version came from (plain JSON)
        assets.extra/bioimageio.zip         the BioImage Model Zoo package (`pipeline.files.bioimageio`)

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

Publication. A version is written to a hidden temporary folder and renamed into place, so
a server never sees it half-written, and an existing version is never replaced unless
asked (`--overwrite`). Choosing the version number, writing what records it (provenance,
zoo package), the rename and rewriting `models.config` happen under one lock on the
export root (`.export.lock`, `publication_lock`), so that exports running at once, from
one run or several, get versions of their own (1 and 2, never both 1), an explicit
`export.version` that another export published meanwhile is refused, and `models.config`
lists every model. The SavedModel itself, the long part, is written before the lock is
taken. Every folder and file of a version gets the mode the umask gives. A failed export
removes its temporary folder; those that a killed export left behind are removed by the
next export on that machine.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import importlib.metadata
import json
import os
import shutil
import socket
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import cv2
import keras
import numpy as np
import tensorflow as tf
from google.protobuf import text_format
from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2
from tensorflow_serving.config import model_server_config_pb2

from pipeline.config.schema import Config
from pipeline.errors import PipelineError
from pipeline.files import bioimageio, io, model_source
from pipeline.files.rundir import RunDir
from pipeline.inference.segmenter import load_model, png_segmentation_function, segmentation_function, tile_function
from pipeline.metrics import crossval

WARMUP_FILE = Path("assets.extra") / "tf_serving_warmup_requests"
PROVENANCE_FILE = Path("assets.extra") / "provenance.json"
PACKAGE_FILE = model_source.EXPORT_PACKAGE  # where `--model VERSION` looks for it too
LOCK_FILE = ".export.lock"  # in the export root: see `publication_lock`
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
    synthetic EM image). What does not depend on the version, the SavedModel and the zoo
    package's weights, is made first; the version is then chosen, its own files written
    (provenance, the package's description), the folder renamed into
    place and `models.config` rewritten under the root's lock (`publication_lock`), so
    that exports running at once get versions of their own and none is lost.
    """
    root = Path(root or config.export.root)
    model_root = root / config.export.name
    if config.export.version:  # refused before the long write; decided again under the lock
        _refuse_existing(model_root / str(config.export.version), overwrite)
    model_root.mkdir(parents=True, exist_ok=True)
    io.remove_abandoned(model_root)
    temporary = model_root / io.scratch_name("new")
    try:
        _write_saved_model(temporary, model, config)
        contents = bioimageio.package_contents(model, config, example)
        with publication_lock(root):
            version = config.export.version or next_version(model_root)
            target = model_root / str(version)
            _refuse_existing(target, overwrite)
            _write_version_files(temporary, contents, config, version, provenance)
            _publish(temporary, target)
            write_models_config(root)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)  # the error that got us here matters more
        raise
    return target


def _refuse_existing(target: Path, overwrite: bool) -> None:
    if target.exists() and not overwrite:
        raise PipelineError(f"{target}: export version {target.name} already exists (pass --overwrite to replace it)")


@contextlib.contextmanager
def publication_lock(root: Path) -> Iterator[None]:
    """Holds an exclusive lock on the export root (its file `.export.lock`) for the block.

    A lock rather than an exclusive create or rename of the version folder: the version
    must be known before its files are written (provenance and the zoo package record it),
    and a reserved but empty version folder would be a broken version to a model server
    watching the root; a rename is not exclusive either (a folder replaces an empty one).
    `flock` belongs to the open file, so the lock of a killed export frees itself and
    never needs clearing; Linux's NFS client maps it onto NFS byte-range locks. One lock
    for the whole root, because `models.config` lists every model under it. Another
    export into the root waits; it is told so on stderr.
    """
    descriptor = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another export into {root} to finish", file=sys.stderr, flush=True)
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def _archive(model: keras.Model, config: Config) -> keras.export.ExportArchive:
    """The SavedModel's signatures: the whole-image ones, PNG and tile."""
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
    return archive


def _write_saved_model(folder: Path, model: keras.Model, config: Config) -> None:
    """The SavedModel and its warm-up requests into a new `folder`: what does not depend on the version."""
    os.mkdir(folder)  # with the umask's mode, which TensorFlow's writer does not give its folders
    _archive(model, config).write_out(str(folder), verbose=False)
    write_warmup_requests(folder / WARMUP_FILE, config.export.name, config)


def _write_version_files(
    folder: Path, contents: dict[str, bytes], config: Config, version: int, provenance: dict | None,
) -> None:
    """What records the version (provenance, zoo package) into `folder`; then every folder gets the umask's mode."""
    if provenance is not None:
        provenance = provenance | {"version": version}
        io.atomic_write_text(folder / PROVENANCE_FILE, json.dumps(provenance, indent=2))
    bioimageio.write_package(folder / PACKAGE_FILE, contents, config, version, provenance)
    _give_folders_the_mode_of(folder)


def _give_folders_the_mode_of(folder: Path) -> None:
    """Sets every folder under `folder` to its mode.

    TensorFlow creates the SavedModel's folders (variables/, assets/) as 0755 whatever the
    umask; `folder` itself was made by `os.mkdir`, so its mode is what the umask (and a
    default ACL) gives a new folder, without reading the process-wide umask.
    """
    mode = stat.S_IMODE(folder.stat().st_mode)
    for path in folder.rglob("*"):
        if path.is_dir() and not path.is_symlink():
            os.chmod(path, mode)


def _publish(temporary: Path, target: Path) -> None:
    """Renames the written version into place; an existing one (overwrite asked) is swapped out, then dropped."""
    if not target.exists():
        os.rename(temporary, target)
        return
    retired = target.parent / io.scratch_name(f"old-{target.name}")
    os.rename(target, retired)
    os.rename(temporary, target)
    shutil.rmtree(retired)


def provenance(config: Config, run: RunDir) -> dict:
    """What a version records about where it came from: run, model, configuration, scores, time.

    The scores are those of the run's evaluation of this very model (`RunDir.model_report`),
    or None with a note saying why there are none; with `export.crossval`, also the accuracy
    that cross-validation estimates for the model's recipe (`metrics.crossval.estimate`).
    """
    model = run.best_model
    digest = io.sha256(model)
    record = {
        "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "run_dir": str(run.root.resolve()),
        "model": str(model.resolve()),
        "model_sha256": digest,
        "configuration": config.to_dict(),
        "software": {"unet-pipeline": _version("unet-pipeline"), "tensorflow": tf.__version__,
                     "keras": keras.__version__},
    }
    if config.export.crossval:
        record["crossval_estimate"] = crossval.export_estimate(config)
    report, note = run.model_report(digest)
    if report is None:
        return record | {"evaluation": None, "evaluation_note": note}
    values = report["mean_per_image"] if report.get("overall") is None else report["overall"]
    evaluation = {key: report.get(key) for key in ("split", "dataset", "threshold", "segmentation", "model_selection",
                                                   "warnings")}
    return record | {"evaluation": evaluation | {key: values[key] for key in HEADLINE if key in values}}


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def run(config: Config, run: RunDir, root: Path, overwrite: bool = False) -> Path:
    """Exports the run's best model as the next version (or `export.version`) under `root`,
    described by the settings it was trained with (`RunDir.model_settings`).

    Needs only the model: the zoo package's test tile comes from the example input that
    training recorded beside it (`RunDir.example`), or for a model without one from a
    synthetic image; the provenance records the model's evaluation if the run has one.
    """
    config = run.model_settings(config)
    model = load_model(run.trained_model())
    target = export_model(model, config, root, provenance(config, run), overwrite, run.example())
    run.save_config(config)
    print(
        f"exported SavedModel -> {target} (signatures: serving_default, segment_uint8, "
        f"segment_uint16 = whole image; segment_png; tile); model server config -> {target.parent.parent / 'models.config'}; "
        f"BioImage Model Zoo package -> {target / PACKAGE_FILE}"
    )
    return target
