"""A .keras model file that carries the configuration it was trained with.

StarDist keeps a model's settings beside its weights so that the two never part; here they
go inside the file, under the key `unet_pipeline` of the archive's `metadata.json`, which
Keras writes (its version, the date) and never reads back. So the settings travel with the
weights through copies, renames and `--init-from`; a model and the settings it was
trained with are written in one rename, and no configuration saved later can describe it
wrongly. (Not a member of its own: Keras extracts an archive of more than three members to
a temporary folder on every load.) Files saved before models carried their settings, or
by other programs, have no such key.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

from pipeline.config import resolve as configuration
from pipeline.config.schema import Config
from pipeline.errors import PipelineError

METADATA = "metadata.json"
KEY = "unet_pipeline"


def save(model: Any, path: Path, config: Config) -> None:
    """Saves a Keras `model` to `path` (a temporary of `io.atomic_path`) with `config` inside.

    A zip member cannot be changed in place, so the archive is written again with the
    settings added to its metadata; it is held in memory meanwhile (the model's size).
    """
    model.save(path)
    with zipfile.ZipFile(path) as archive:
        members = [(info, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w") as archive:
        for info, data in members:
            if info.filename == METADATA:
                data = json.dumps(json.loads(data) | {KEY: config.to_dict()})
            archive.writestr(info, data)


def trained_config(path: Path) -> Config | None:
    """The configuration saved inside the .keras file `path`, or None if it holds none."""
    try:
        with zipfile.ZipFile(path) as archive:
            metadata = json.loads(archive.read(METADATA)) if METADATA in archive.namelist() else {}
    except (OSError, zipfile.BadZipFile, ValueError) as error:
        raise PipelineError(f"{path}: cannot read the configuration the model was trained with ({error})") from None
    content = metadata.get(KEY) if isinstance(metadata, dict) else None
    return None if content is None else configuration.from_dict(content, f"{path} ({METADATA})")
