"""TFDS builder for the project's embedded default: synthetic EM-like images.

The images come from `pipeline.data.load`, which makes them with
`pipeline.data.synthetic.synthetic_em_stack` from one seed per split, so that this data set
and the pipeline's `--dataset synthetic` see exactly the same images and labels.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from pipeline import data as pipeline_data
from pipeline.config.schema import DataConfig

_DEFAULTS = DataConfig()
# TFDS split name -> pipeline.data split name.
_SPLITS = {"train": "train", "validation": "val", "test": "test"}


@dataclasses.dataclass(eq=False)
class SyntheticEmConfig(tfds.core.BuilderConfig):
    """Size and number of the generated images (the `data` settings of the pipeline)."""

    seed: int = _DEFAULTS.seed
    image_size: int = _DEFAULTS.image_size
    num_train: int = _DEFAULTS.num_train
    num_val: int = _DEFAULTS.num_val
    num_test: int = _DEFAULTS.num_test

    def data_config(self) -> DataConfig:
        """The pipeline's DataConfig that produces the same images."""
        return DataConfig(
            dataset="synthetic",
            seed=self.seed,
            image_size=self.image_size,
            num_train=self.num_train,
            num_val=self.num_val,
            num_test=self.num_test,
        )


class Builder(tfds.core.GeneratorBasedBuilder):
    """Synthetic serial-section EM images of neural tissue, with cell labels."""

    # Explicit, so the name does not depend on how the module was imported (by path in tests).
    name = "synthetic_em"
    # README.md and CITATIONS.bib (description, citation) live next to this file.
    pkg_dir_path = epath.Path(__file__).resolve().parent
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release: the images of pipeline.data.load(DataConfig()).",
    }
    BUILDER_CONFIGS = [
        SyntheticEmConfig(
            name="default",
            description=(
                f"The pipeline's default data set: {_DEFAULTS.image_size} px images, "
                f"{_DEFAULTS.num_train}/{_DEFAULTS.num_val}/{_DEFAULTS.num_test} "
                f"train/validation/test, seed {_DEFAULTS.seed}."
            ),
        ),
        SyntheticEmConfig(
            name="small",
            description="64 px images, 2/1/1 train/validation/test: for tests.",
            image_size=64,
            num_train=2,
            num_val=1,
            num_test=1,
        ),
    ]
    DEFAULT_CONFIG_NAME = "default"

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=pipeline_data.tfds_features(
                {
                    "image": "grey-level EM-like image",
                    "label": "semantic label, ISBI 2012 convention: 255 = cell, 0 = membrane",
                    "instances": "cell instances: 0 = membrane, 1..N = cells",
                    "id": 'stable example id, e.g. "train_003"',
                },
                size=self.builder_config.image_size,
            ),
            supervised_keys=("image", "label"),
            # Written in generation order, so split order = id order = pipeline order.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # nothing to download: the images are generated
        splits = pipeline_data.load(self.builder_config.data_config())
        return {
            name: self._generate_examples(splits[source], name) for name, source in _SPLITS.items()
        }

    def _generate_examples(self, split: pipeline_data.Split, prefix: str):
        labels = split.labels  # 1 = cell, 0 = membrane
        for index, image in enumerate(split.images):
            key = f"{prefix}_{index:03d}"
            yield key, {
                "image": image,
                "label": (labels[index] * 255).astype(np.uint8)[..., None],
                "instances": split.instances[index],
                "id": key,
            }
