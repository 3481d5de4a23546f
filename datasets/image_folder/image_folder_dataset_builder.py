"""TFDS builder for the user's own data: `images/NAME.{png,tif}` with `masks/NAME.{png,tif}`.

The pairs are read and checked by `pipeline.data.image_folder.read_pairs`, the same
code the pipeline's `--dataset image_folder` runs, so a missing partner, a size
mismatch, bad label values or a corrupt file are reported as a one-line
`pipeline.errors.PipelineError` naming the file. All pairs form the `train` split
(hold out what you need with TFDS's split slicing, e.g. `train[:80%]`).

Images keep the channels their files declare (grey: 1, RGB: 3, RGBA: 4), example by
example: TFDS declares a builder's features before it sees the manual directory, so the
`image` feature leaves its channel count open rather than fixing it by a builder config
(which `tfds build` would then build for every channel count).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from pipeline import data as pipeline_data
from pipeline.config.schema import WeightMapConfig
from pipeline.data.weight_map import separate_instances

# Width of the background borders between touching objects in `label` (the pipeline's default).
SEPARATION = WeightMapConfig().separation


class Builder(tfds.core.GeneratorBasedBuilder):
    """Grey or colour images with binary or instance masks, paired by file name."""

    # Explicit, so the name does not depend on how the module was imported (by path in tests).
    name = "image_folder"
    # README.md (description) lives next to this file.
    pkg_dir_path = epath.Path(__file__).resolve().parent
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Point the manual directory (`--manual_dir DIR`) at a folder holding
      images/NAME.png or images/NAME.tif   grey or colour images (8-bit, or scaled from 16-bit/float)
      masks/NAME.png or masks/NAME.tif     same size; 0 = background, and either one other
                                           value (binary: objects are its 4-connected
                                           components) or k > 0 = object k (instances)
    """

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=pipeline_data.tfds_features(
                {
                    "image": "image with its file's channels (not 8-bit: scaled, percentiles 1-99.8 of all channels)",
                    "label": f"255 = object, 0 = background, with {SEPARATION} px borders between touching objects",
                    "instances": "0 = background, k > 0 = object k (binary masks: 4-connected components)",
                    "id": "NAME, the file name without its suffix",
                },
                channels=None,
            ),
            supervised_keys=("image", "label"),
            disable_shuffling=True,  # in name order
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        return {"train": self._generate_examples(Path(dl_manager.manual_dir))}

    def _generate_examples(self, folder: Path):
        for example in pipeline_data.image_folder.read_pairs(folder, channels=None):
            separated = separate_instances(example.instances, SEPARATION)
            yield example.id, {
                "image": example.image,
                "label": np.where(separated > 0, 255, 0).astype(np.uint8)[..., None],
                "instances": example.instances,
                "id": example.id,
            }
