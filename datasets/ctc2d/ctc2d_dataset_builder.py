"""TFDS builder for the 2-D Cell Tracking Challenge training sets (one config per set).

The archive is downloaded from the challenge's data server by TFDS's download manager,
or taken from the manual directory (`<NAME>.zip` or its extracted `<NAME>/` folder).
The frames are read and checked by `pipeline.data.ctc2d` (`training_folder`,
`read_sequence`), the same code the pipeline's `--dataset ctc2d/<NAME>` runs, so a
malformed file is reported as a one-line `pipeline.errors.PipelineError` naming it.

Only frames with a segmentation ground truth (`<seq>_GT/SEG/man_segNNN.tif`) are
examples. Images are scaled to 8 bits robustly (`pipeline.data.image_files.to_uint8`:
the 1st and 99.8th percentiles of each frame map to 0 and 255).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from pipeline import data as pipeline_data
from pipeline.config.schema import WeightMapConfig
from pipeline.data.weight_map import separate_instances

# TFDS split -> sequence: a whole sequence is held out, its frames being near-duplicates.
SEQUENCES = dict(zip(("train", "validation"), pipeline_data.ctc2d.SEQUENCES))
# Width of the background borders between touching cells in `label` (the pipeline's default).
SEPARATION = WeightMapConfig().separation


class Builder(tfds.core.GeneratorBasedBuilder):
    """2-D Cell Tracking Challenge training data: annotated frames of two sequences."""

    # Explicit, so the name does not depend on how the module was imported (by path in tests).
    name = "ctc2d"
    # README.md and CITATIONS.bib (description, citation) live next to this file.
    pkg_dir_path = epath.Path(__file__).resolve().parent
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: annotated frames of sequences 01 (train) and 02 (validation)."}
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name=name, description=f"Cell Tracking Challenge {name}, training data")
        for name in pipeline_data.ctc2d.SETS
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
    Optional: without them the training archive is downloaded from
    {pipeline_data.ctc2d.URL.format(name="<NAME>")}.
    To build from a copy, place `<NAME>.zip` (as downloaded) or its extracted `<NAME>/`
    folder (holding 01/, 01_GT/SEG/, 02/, 02_GT/SEG/) in the manual directory, with
    <NAME> one of {", ".join(pipeline_data.ctc2d.SETS)}.
    """

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=pipeline_data.tfds_features(
                {
                    "image": "frame scaled to 8 bits (percentiles 1-99.8)",
                    "label": f"255 = cell, 0 = background, with {SEPARATION} px borders between touching cells",
                    "instances": "the challenge's instance labels as given: 0 = background, k > 0 = cell k",
                    "id": 'stable example id, "<sequence>_t<frame>", e.g. "01_t021"',
                },
                sequence=tfds.features.Text(doc='"01" or "02"'),
                frame=tfds.features.Scalar(dtype=np.int32, doc="time point: NNN of tNNN.tif"),
            ),
            supervised_keys=("image", "label"),
            homepage="https://celltrackingchallenge.net/2d-datasets/",
            # Time-lapse frames: keep them in order (split order = frame order).
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        name = self.builder_config.name
        root = pipeline_data.ctc2d.training_folder(name, self._manual_copy(dl_manager, name), dl_manager)
        return {split: self._generate_examples(root, sequence) for split, sequence in SEQUENCES.items()}

    @staticmethod
    def _manual_copy(dl_manager: tfds.download.DownloadManager, name: str) -> Path | None:
        """The manual directory if it holds this set, else None (download it)."""
        try:
            manual = Path(dl_manager.manual_dir)
        except AssertionError:  # TFDS's way of saying: no manual directory, or an empty one
            return None
        return manual if (manual / f"{name}.zip").is_file() or (manual / name).is_dir() else None

    def _generate_examples(self, root: Path, sequence: str):
        for example in pipeline_data.ctc2d.read_sequence(root, sequence):
            separated = separate_instances(example.instances, SEPARATION)
            yield example.id, {
                "image": example.image,
                "label": np.where(separated > 0, 255, 0).astype(np.uint8)[..., None],
                "instances": example.instances,
                "sequence": sequence,
                "frame": int(example.id.rpartition("_t")[2]),
                "id": example.id,
            }
