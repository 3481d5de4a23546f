"""2-D Cell Tracking Challenge training sets (`--dataset ctc2d/<NAME>`), one description per set.

The challenge's training archive `<NAME>.zip` holds time-lapse sequences `01/tNNN.tif`
and `02/`, with 16-bit instance labels of some frames in `01_GT/SEG/man_segNNN.tif`
(objects may be partly annotated; unannotated pixels count as background). `--data-dir`
holds the zip or its extracted `<NAME>/`; without it the zip is downloaded once into
TFDS's download folder. Only frames with a segmentation ground truth are used; train =
sequence 01, val = test = sequence 02. Its TFDS builder is `datasets/ctc2d/`.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

from pipeline.config.schema import DataConfig
from pipeline.data.base import Dataset, Example, Split, stack_examples
from pipeline.data.image_files import read_image, read_label_image
from pipeline.errors import PipelineError

# The sets the U-Net paper segmented; any other 2-D set is one more name.
SETS = ("PhC-C2DH-U373", "DIC-C2DH-HeLa")
URL = "http://data.celltrackingchallenge.net/training-datasets/{name}.zip"
SEQUENCES = ("01", "02")


def read(name: str, config: DataConfig) -> dict[str, Split]:
    """Set `name`'s annotated frames: sequence 01 trains, sequence 02 validates and tests."""
    root = training_folder(name, config.data_dir)
    # Frames of one sequence are near-duplicates in time: hold out a whole sequence.
    train, val = (stack_examples(read_sequence(root, s)) for s in SEQUENCES)
    return {"train": train, "val": val, "test": val}


def sequence_of(example_id: str) -> str:
    """The sequence of an example id of `read_sequence` (`<sequence>_tNNN`)."""
    return example_id.partition("_")[0]


def training_folder(name: str, data_dir: str | Path | None, dl_manager=None) -> Path:
    """The extracted training data of CTC set `name`: the folder holding 01/ and 01_GT/.

    From `data_dir` (the extracted `<name>/` folder, the folder itself, or `<name>.zip`,
    extracted by TFDS's download manager), else downloaded from the challenge's server.

    Args:
        name: e.g. "PhC-C2DH-U373".
        data_dir: folder with the data, or None to download.
        dl_manager: a `tfds.download.DownloadManager`; by default one that keeps its
            files in `data_dir`, or in TFDS's `~/tensorflow_datasets/downloads`.
    """
    if data_dir is None:
        archive = _download_manager(dl_manager, None).download_and_extract(URL.format(name=name))
        return _extracted(Path(archive), name)
    folder = Path(data_dir)
    if not folder.is_dir():
        raise PipelineError(f"{folder}: data folder does not exist")
    for candidate in (folder / name, folder):
        if (candidate / SEQUENCES[0]).is_dir():
            return candidate
    archive = folder / f"{name}.zip"
    if not archive.is_file():
        raise PipelineError(
            f"{folder}: neither {name}.zip nor {name}/{SEQUENCES[0]}/ (the challenge's training data) found"
        )
    return _extracted(Path(_download_manager(dl_manager, folder).extract(archive)), name)


def _download_manager(dl_manager, folder: Path | None):
    if dl_manager is not None:
        return dl_manager
    import tensorflow_datasets as tfds  # only here: it takes seconds to import

    if folder is None:
        folder = Path(tfds.core.constants.DATA_DIR).expanduser() / "downloads"
    return tfds.download.DownloadManager(download_dir=folder)


def _extracted(extracted: Path, name: str) -> Path:
    for candidate in (extracted / name, extracted):
        if (candidate / SEQUENCES[0]).is_dir():
            return candidate
    raise PipelineError(f"{extracted}: the archive holds no {name}/{SEQUENCES[0]}/ folder")


def read_sequence(root: Path, sequence: str) -> list[Example]:
    """The frames of one CTC sequence that have a segmentation ground truth, in frame order.

    `root/<sequence>/tNNN.tif` are the frames, `root/<sequence>_GT/SEG/man_segNNN.tif`
    their 16-bit instance labels. Example ids are `<sequence>_tNNN`.
    """
    frames_dir, truth_dir = Path(root) / sequence, Path(root) / f"{sequence}_GT" / "SEG"
    for folder in (frames_dir, truth_dir):
        if not folder.is_dir():
            raise PipelineError(f"{folder}: missing folder of the Cell Tracking Challenge layout")
    truths = sorted(truth_dir.glob("man_seg*.tif"))
    if not truths:
        raise PipelineError(f"{truth_dir}: no man_segNNN.tif ground-truth frames")
    examples = []
    for truth in truths:
        match = re.fullmatch(r"man_seg(\d+)\.tif", truth.name)
        if match is None:
            raise PipelineError(f"{truth}: unexpected file name (expected man_segNNN.tif)")
        frame = frames_dir / f"t{match.group(1)}.tif"
        if not frame.is_file():
            raise PipelineError(f"{truth}: ground-truth frame with no matching image {frame}")
        image = read_image(frame)
        examples.append(Example(f"{sequence}_t{match.group(1)}", image, read_label_image(truth, image.shape)))
    return examples


DATASETS = tuple(
    Dataset(
        name=f"ctc2d/{name}",
        read=functools.partial(read, name),
        labels="instances",
        data_dir=f"the folder with {name}.zip or its extracted {name}/; without it the zip is downloaded once",
        sequence_of=sequence_of,
    )
    for name in SETS
)
