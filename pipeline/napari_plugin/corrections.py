"""Human-in-the-loop fine-tuning, without Qt: corrected images become an `image_folder` data set,
and a new run trains on it from the model that segmented them (`train.init_from`).

The data set (docs/datasets.md, "Your own images"): `images/NAME.png`, the image as the model
read it in 8 bits (`data.image_files.to_uint8`, what `image_folder` itself does to other
pixel types), and `masks/NAME.png`, the corrected cells as 16-bit instance labels. The
last image validates (`data.val_images=1`) and is trained on too
(`train.include_validation`: with so few images none can be spared, and the last step's
model is kept); a single image is written twice, as it and its validation copy.

The run keeps the model's settings but for its data and the length of its training: the
model's own epoch length (`train.steps_per_epoch`; at least MIN_EPOCH_STEPS, at most the
steps asked for), so that the training history (`RunDir.history`, a row per epoch) shows
the loss as it falls. It is
prepared and trained by the stages' own `run`, under the run lock, as the command line does.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import cv2
import numpy as np

from pipeline.config import resolve as configuration
from pipeline.config.schema import Config
from pipeline.data.image_files import to_uint8
from pipeline.errors import PipelineError
from pipeline.files import io
from pipeline.files.rundir import RunDir

# The copy a single corrected image validates as (`data.val_images` needs a training image besides).
VALIDATION_COPY = "~validation"
# Colour PNGs hold 3 or 4 channels, grey ones 1.
PNG_CHANNELS = (1, 3, 4)
# The shortest epoch of a fine-tuning: every epoch ends in a validation, which made the steps of a
# model trained with 2 steps an epoch 3x slower (0.44 s against 0.14 s, docs/napari.md).
MIN_EPOCH_STEPS = 20


@dataclasses.dataclass(frozen=True)
class Correction:
    """One corrected image: its name, its pixels [H, W, C] as the model reads them, its cells [H, W]."""

    name: str
    image: np.ndarray
    labels: np.ndarray


def length(source: Config, steps: int) -> tuple[int, int]:
    """(epochs, steps per epoch) of a fine-tuning of at least `steps` steps: whole epochs of the model's
    own length (`source.train.steps_per_epoch`, at least MIN_EPOCH_STEPS), shorter if fewer steps are asked for."""
    per_epoch = min(steps, max(source.train.steps_per_epoch, MIN_EPOCH_STEPS))
    return math.ceil(steps / per_epoch), per_epoch


def settings(source: Config, init_from: Path, data_dir: Path, steps: int) -> Config:
    """The fine-tuning run's configuration: `source`'s, on the corrections in `data_dir`, from the
    weights `init_from`, for at least `steps` steps (whole epochs of the model's own length)."""
    epochs, per_epoch = length(source, steps)
    overrides = {
        "data": {"dataset": "image_folder", "data_dir": str(data_dir), "val_images": 1},
        "train": {"init_from": str(init_from), "epochs": epochs, "steps_per_epoch": per_epoch,
                  "include_validation": True, "select_by": "val_loss", "early_stopping_patience": 0,
                  "warmup_steps": min(source.train.warmup_steps, epochs * per_epoch - 1)},
    }
    config = configuration.apply_overrides(source, overrides, "napari fine-tuning")
    configuration.validate(config)
    return config


def write_dataset(folder: Path, corrections: list[Correction]) -> None:
    """`folder/images/NAME.png` and `folder/masks/NAME.png` of each correction, all written
    together or none (`io.atomic_paths`); refuses an existing folder, a model whose channels a
    PNG cannot hold, and more cells than a 16-bit mask holds, in one line."""
    if not corrections:
        raise PipelineError("no corrected images: segment an image layer and correct its labels first")
    if folder.exists():
        raise PipelineError(f"{folder}: already exists")
    channels = corrections[0].image.shape[-1]
    if channels not in PNG_CHANNELS:
        raise PipelineError(f"fine-tuning writes PNG images, of 1, 3 or 4 channels; the model takes {channels}")
    named = corrections + [dataclasses.replace(corrections[0], name=corrections[0].name + VALIDATION_COPY)
                           ] * (len(corrections) == 1)
    targets = [folder / kind / f"{one.name}.png" for one in named for kind in ("images", "masks")]
    with io.atomic_paths(targets) as temporaries:
        for one, image_path, mask_path in zip(named, temporaries[::2], temporaries[1::2]):
            io.encode_png(image_path, _png_pixels(to_uint8(one.image)))
            io.encode_png(mask_path, _mask(one))


def _png_pixels(image: np.ndarray) -> np.ndarray:
    """[H, W, C] RGB(A) or grey -> what OpenCV writes: grey [H, W], BGR or BGRA."""
    if image.shape[-1] == 1:
        return image[..., 0]
    return cv2.cvtColor(image, cv2.COLOR_RGBA2BGRA if image.shape[-1] == 4 else cv2.COLOR_RGB2BGR)


def _mask(correction: Correction) -> np.ndarray:
    """The cells as a 16-bit label image; more than 65,535 or negative labels refused."""
    labels = np.asarray(correction.labels)
    if labels.min(initial=0) < 0 or labels.max(initial=0) > np.iinfo(np.uint16).max:
        raise PipelineError(f"{correction.name}: labels must lie in 0..65535 for a 16-bit mask, "
                            f"got {labels.min()}..{labels.max()}")
    return labels.astype(np.uint16)


def new_run(root: Path) -> tuple[RunDir, Path]:
    """A new run directory under `root`, named by the time, and the folder its corrections go to beside it."""
    name = f"{time.strftime('%Y%m%d-%H%M%S')}-napari"
    run, data = RunDir(Path(root) / name), Path(root) / f"{name}-corrections"
    io.refuse_existing([run.root, data])
    return run, data


def abandon(run: RunDir) -> None:
    """What a cancelled fine-tuning leaves of `run`: its configuration, prepared data and corrections,
    without a model (`RunDir.discard_training`, under the run lock), so that no model half trained
    is taken for it; `--stage train --run-dir` trains it anew. Called once the model process is dead."""
    if run.root.is_dir():
        with run.lock(exclusive=True):
            run.discard_training()
