"""A .keras model file that carries the configuration it was trained with.

StarDist keeps a model's settings beside its weights so that the two never part; here they
go inside the file. Keras' .keras format is a zip archive whose loader reads only the
members Keras wrote, so one more member, `unet_pipeline/config.json`, travels with the
weights through copies, renames and `--init-from`: a model and the settings it was trained
with are written in one rename, and no configuration saved later can describe it wrongly.
Files saved before models carried their settings (or by other programs) have no such member.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

from pipeline import config as configuration
from pipeline.config import Config
from pipeline.errors import PipelineError

CONFIG_MEMBER = "unet_pipeline/config.json"


def save(model: Any, path: Path, config: Config) -> None:
    """Saves a Keras `model` to `path` (a temporary of `io.atomic_path`) with `config` inside."""
    model.save(path)
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr(CONFIG_MEMBER, json.dumps(config.to_dict(), indent=1))


def trained_config(path: Path) -> Config | None:
    """The configuration saved inside the .keras file `path`, or None if it holds none."""
    try:
        with zipfile.ZipFile(path) as archive:
            if CONFIG_MEMBER not in archive.namelist():
                return None
            content = json.loads(archive.read(CONFIG_MEMBER))
    except (OSError, zipfile.BadZipFile, ValueError) as error:
        raise PipelineError(f"{path}: cannot read the configuration the model was trained with ({error})") from None
    return configuration.from_dict(content, f"{path} ({CONFIG_MEMBER})")
