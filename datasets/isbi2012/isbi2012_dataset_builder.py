"""TFDS builder for the ISBI 2012 EM segmentation challenge data (manual download).

The three TIFF stacks are read and checked by `pipeline.data.load`, the same code the
pipeline's `--dataset isbi2012` runs, so the splits, the consecutive validation hold-out
and the instance labels are identical, and a missing or malformed file is reported as a
one-line `pipeline.errors.PipelineError` naming the file.

The test volume has no public labels. TFDS gives every split of a builder the same
features, so test examples do carry `label` and `instances`, as placeholders marked by
`labelled = False`: `label` all 0 and `instances` all -1. -1 is never a valid instance
id (as in TFDS's ImageNet, whose unlabelled test examples have label -1), and the
pipeline's weight map rejects negative instances, so a placeholder cannot silently pass
for ground truth.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from pipeline import data as pipeline_data
from pipeline.config.schema import DataConfig

# The last VAL_SLICES labelled sections form the validation split (as in the pipeline);
# the test split is the challenge's test volume, so no labelled section is held out for it.
VAL_SLICES = DataConfig().val_slices
# `instances` value of every pixel of an unlabelled (test) example.
UNLABELLED_INSTANCE = -1


class Builder(tfds.core.GeneratorBasedBuilder):
    """ISBI 2012 EM segmentation challenge: serial sections of the Drosophila VNC."""

    # Explicit, so the name does not depend on how the module was imported (by path in tests).
    name = "isbi2012"
    # README.md and CITATIONS.bib (description, citation) live next to this file.
    pkg_dir_path = epath.Path(__file__).resolve().parent
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {
        "1.0.0": (
            f"Initial release: train = labelled slices minus the last {VAL_SLICES}, "
            f"validation = the last {VAL_SLICES}, test = the unlabelled test volume."
        ),
    }
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
    The ISBI 2012 challenge site no longer serves its downloads reliably, so place the
    three files of the challenge data in the manual directory (`--manual_dir DIR`, default
    `<data_dir>/downloads/manual/`):

      {pipeline_data.isbi2012.FILES["train"]}   30 training sections, multi-page TIFF, 512x512 uint8
      {pipeline_data.isbi2012.FILES["labels"]}   their labels, multi-page TIFF, 512x512 uint8,
                         255 = cell, 0 = membrane
      {pipeline_data.isbi2012.FILES["test"]}    30 test sections (no public labels), as the training volume

    They come from the ISBI 2012 EM segmentation challenge,
    https://imagej.net/events/isbi-2012-segmentation-challenge, and from mirrors such as
    the original U-Net authors' data pages
    (https://lmb.informatik.uni-freiburg.de/people/ronneber/u-net/).
    """

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=pipeline_data.tfds_features(
                {
                    "image": "EM section (512x512)",
                    "label": "255 = cell, 0 = membrane; all 0 where `labelled` is False",
                    "instances": (
                        "4-connected components of the cell class: 0 = membrane, "
                        f"1..N = cells; all {UNLABELLED_INSTANCE} where `labelled` is False"
                    ),
                    "id": 'stable example id, e.g. "train_000"',
                },
                labelled=tfds.features.Scalar(
                    dtype=np.bool_, doc="False for the test split: label/instances are placeholders"
                ),
                slice=tfds.features.Scalar(
                    dtype=np.int32, doc="index of the section in its TIFF stack (train-volume.tif or test-volume.tif)"
                ),
            ),
            supervised_keys=("image", "label"),
            homepage="https://imagej.net/events/isbi-2012-segmentation-challenge",
            # Serial sections: keep them in slice order (split order = id order = slice order).
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        # pipeline.data checks the files and raises a one-line PipelineError naming the bad one.
        splits = pipeline_data.load(
            DataConfig(
                dataset="isbi2012", data_dir=os.fspath(dl_manager.manual_dir), val_slices=VAL_SLICES,
                test_slices=0,
            )
        )
        num_train = len(splits["train"].images)
        return {
            "train": self._generate_examples(splits["train"], "train", first_slice=0),
            "validation": self._generate_examples(splits["val"], "validation", first_slice=num_train),
            "test": self._generate_examples(splits["test"], "test", first_slice=0),
        }

    def _generate_examples(self, split: pipeline_data.Split, prefix: str, first_slice: int):
        labels = split.labels  # 1 = cell, 0 = membrane; None for the test volume
        for index, image in enumerate(split.images):
            key = f"{prefix}_{index:03d}"
            if labels is None:
                label = np.zeros_like(image)
                instances = np.full(image.shape[:2], UNLABELLED_INSTANCE, np.int32)
            else:
                label = (labels[index] * 255).astype(np.uint8)[..., None]
                instances = split.instances[index]
            yield key, {
                "image": image,
                "label": label,
                "instances": instances,
                "labelled": labels is not None,
                "slice": first_slice + index,
                "id": key,
            }
