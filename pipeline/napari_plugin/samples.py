"""The plugin's sample data (File > Open Sample): images to try a model on without files of one's own.

- The embedded synthetic EM image: the first test image of the default data set
  (`--dataset synthetic`, `data.seed` 0), with its true cells.
- The ISBI 2012 test slices, from the folder the user chooses (remembered): the labelled
  slices that `--dataset isbi2012` holds out for its score, with their cells.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qtpy.QtCore import QSettings
from qtpy.QtWidgets import QFileDialog

from pipeline.config.schema import DataConfig
from pipeline.data import Split, isbi2012
from pipeline.data import synthetic_em as embedded

# napari's LayerDataTuple: (data, layer settings, layer type).
Layers = list[tuple[Any, dict, str]]
ISBI_FOLDER = "isbi2012_folder"  # the settings key of the last ISBI 2012 folder


def settings() -> QSettings:
    """Where the plugin remembers the user's choices (the last model, the ISBI 2012 folder)."""
    return QSettings(QSettings.IniFormat, QSettings.UserScope, "unet-pipeline", "napari-plugin")


def _layers(split: Split, name: str) -> Layers:
    """A split's grey images and true cells as an image and a labels layer; one image as 2-D layers."""
    images, cells = split.images[..., 0], split.instances
    if len(images) == 1:
        images, cells = images[0], cells[0]
    return [(images, {"name": name}, "image"), (cells, {"name": f"{name} true cells"}, "labels")]


def synthetic_em() -> Layers:
    """The embedded default's first test image (data.seed 0) and its true cells."""
    test = embedded.read(DataConfig(num_train=1, num_val=1, num_test=1))["test"]
    return _layers(test, "synthetic EM")


def isbi2012_layers(folder: Path) -> Layers:
    """The ISBI 2012 test slices of `folder` (isbi2012.FILES) and their cells, as `--dataset isbi2012` reads them."""
    test = isbi2012.read(DataConfig(dataset="isbi2012", data_dir=str(folder)))["test"]
    return _layers(test, "ISBI 2012 test slices")


def isbi2012_slices() -> Layers:
    """Asks for the folder of the ISBI 2012 files (the last one offered first), then `isbi2012_layers`;
    nothing if the user cancels."""
    remembered = settings()
    folder = QFileDialog.getExistingDirectory(
        None, f"Folder with {', '.join(isbi2012.FILES.values())}", remembered.value(ISBI_FOLDER, ""))
    if not folder:
        return []
    layers = isbi2012_layers(Path(folder))
    remembered.setValue(ISBI_FOLDER, folder)
    return layers
