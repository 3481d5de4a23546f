"""Data sets as in-memory splits, and the readers that the TFDS builders share.

Every split holds images [N, H, W, C] and, where labelled, instance labels [N, H, W]
(0 = membrane/background, 1.. = cells; the semantic label is instances > 0).

Data sets (`DataConfig.dataset`):

* `synthetic`: the embedded default, generated from a seed.
* `isbi2012`: the ISBI 2012 challenge stacks in `data_dir`.
* `ctc2d/<NAME>` (e.g. `ctc2d/PhC-C2DH-U373`): a 2-D Cell Tracking Challenge training
  set. `data_dir` holds `<NAME>.zip` or its extracted `<NAME>/` folder; without
  `data_dir` the zip is downloaded once into TFDS's download folder. Only frames with a
  segmentation ground truth are used; train = sequence 01, val = test = sequence 02.
* `image_folder`: the user's `data_dir/images/NAME.{png,tif}` with
  `data_dir/masks/NAME.{png,tif}` (binary or instance labels); the last `val_images`
  names (sorted) are held out for validation, which is also the test split.

Images that are not 8-bit (the CTC's 16-bit frames, 16-bit or float user images) are
scaled robustly to 8 bits per image: the 1st and 99.8th percentiles map to 0 and 255,
values beyond are clipped, so that a few hot or dead pixels do not squash the contrast.

Images of different sizes within a split are padded at the bottom and right to the
largest one (images by mirroring, labels with background); `Split.sizes` keeps each
image's own size so that weights and scores can leave the padding out.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np

from pipeline import io
from pipeline.config import DataConfig
from pipeline.errors import PipelineError
from pipeline.synthetic import synthetic_em_stack
from pipeline.weight_map import instances_from_binary

SPLITS = ("train", "val", "test")
ISBI_FILES = {"train": "train-volume.tif", "labels": "train-labels.tif", "test": "test-volume.tif"}
# The 2-D Cell Tracking Challenge sets; any other 2-D set is one more entry.
CTC2D_SETS = ("PhC-C2DH-U373", "DIC-C2DH-HeLa")
CTC2D_URL = "http://data.celltrackingchallenge.net/training-datasets/{name}.zip"
CTC2D_SEQUENCES = ("01", "02")
# Robust 8-bit scaling: these percentiles of each image map to 0 and 255 (as in CSBDeep).
PERCENTILES = (1.0, 99.8)
DATASETS = ("synthetic", "isbi2012", *(f"ctc2d/{name}" for name in CTC2D_SETS), "image_folder")


@dataclasses.dataclass
class Example:
    """One image [H, W, 1] uint8 with its instance labels [H, W] int32 (None: unlabelled)."""

    id: str
    image: np.ndarray
    instances: np.ndarray | None


@dataclasses.dataclass
class Split:
    """Images of one split, with labels when the split is annotated."""

    images: np.ndarray
    instances: np.ndarray | None = None
    sizes: np.ndarray | None = None  # [N, 2] own (height, width) of each image; None = all full size
    ids: list[str] | None = None

    @property
    def labels(self) -> np.ndarray | None:
        return None if self.instances is None else (self.instances > 0).astype(np.uint8)


def load(config: DataConfig) -> dict[str, Split]:
    """Loads the configured data set as train, val and test splits."""
    if config.dataset == "synthetic":
        return _synthetic(config)
    if config.dataset == "isbi2012":
        return _isbi2012(config)
    if config.dataset.startswith("ctc2d/"):
        return _ctc2d(config)
    if config.dataset == "image_folder":
        return _image_folder(config)
    raise PipelineError(f"unknown data set {config.dataset!r}; choose one of {', '.join(DATASETS)}")


def _synthetic(config: DataConfig) -> dict[str, Split]:
    # Independent seeds per split, so the test images are never seen in training.
    seeds = np.random.SeedSequence(config.seed).generate_state(len(SPLITS))
    counts = {"train": config.num_train, "val": config.num_val, "test": config.num_test}
    splits = {}
    for name, seed in zip(SPLITS, seeds):
        images, instances = synthetic_em_stack(counts[name], config.image_size, int(seed))
        splits[name] = Split(images[..., None], instances)
    return splits


def _isbi2012(config: DataConfig) -> dict[str, Split]:
    if not config.data_dir:
        raise PipelineError("the isbi2012 data set needs --data-dir (the folder with train-volume.tif)")
    folder = Path(config.data_dir)
    if not folder.is_dir():
        raise PipelineError(f"{folder}: data folder does not exist")
    if not any(folder.iterdir()):
        raise PipelineError(f"{folder}: data folder is empty (expected {', '.join(ISBI_FILES.values())})")
    paths = {key: folder / name for key, name in ISBI_FILES.items()}
    for path in paths.values():
        if not path.is_file():
            raise PipelineError(f"{path}: missing ISBI 2012 file")
    volume = _read_isbi_stack(paths["train"])
    labels = _read_isbi_stack(paths["labels"])
    test = _read_isbi_stack(paths["test"])
    if labels.shape != volume.shape:
        raise PipelineError(
            f"{paths['labels']}: {labels.shape[0]} labels of {labels.shape[1:]} px do not match "
            f"{paths['train'].name} ({volume.shape[0]} images of {volume.shape[1:]} px)"
        )
    values = np.unique(labels)
    if not np.isin(values, (0, 255)).all():
        shown = ", ".join(str(v) for v in values[:6]) + (", ..." if len(values) > 6 else "")
        raise PipelineError(f"{paths['labels']}: labels must be binary (0 = membrane, 255 = cell), found {shown}")
    if not 0 < config.val_slices < len(volume):
        raise PipelineError(
            f"data.val_slices={config.val_slices} must leave training slices among {len(volume)}"
        )
    instances = np.stack([instances_from_binary(label) for label in labels])
    cut = len(volume) - config.val_slices  # consecutive sections: hold out the last ones
    return {
        "train": Split(volume[:cut, ..., None], instances[:cut]),
        "val": Split(volume[cut:, ..., None], instances[cut:]),
        "test": Split(test[..., None]),
    }


def _read_isbi_stack(path: Path) -> np.ndarray:
    stack = io.read_stack(path)[..., 0]
    if stack.dtype != np.uint8:
        raise PipelineError(f"{path}: expected 8-bit grey images, got {stack.dtype}")
    return stack


def _ctc2d(config: DataConfig) -> dict[str, Split]:
    name = config.dataset.partition("/")[2]
    if name not in CTC2D_SETS:
        raise PipelineError(f"unknown Cell Tracking Challenge set {name!r}; choose one of {', '.join(CTC2D_SETS)}")
    root = ctc2d_root(name, config.data_dir)
    # Frames of one sequence are near-duplicates in time: hold out a whole sequence.
    train, val = (stack_examples(read_ctc2d_sequence(root, s)) for s in CTC2D_SEQUENCES)
    return {"train": train, "val": val, "test": val}


def _image_folder(config: DataConfig) -> dict[str, Split]:
    if not config.data_dir:
        raise PipelineError("the image_folder data set needs --data-dir (the folder with images/ and masks/)")
    examples = read_image_folder(Path(config.data_dir))
    if not 0 < config.val_images < len(examples):
        raise PipelineError(
            f"data.val_images={config.val_images} must leave training images among the {len(examples)} "
            f"in {config.data_dir}"
        )
    cut = len(examples) - config.val_images
    val = stack_examples(examples[cut:])
    return {"train": stack_examples(examples[:cut]), "val": val, "test": val}


def stack_examples(examples: list[Example]) -> Split:
    """Stacks examples into a Split, padding smaller images to the largest (see the module doc)."""
    height = max(e.image.shape[0] for e in examples)
    width = max(e.image.shape[1] for e in examples)
    sizes = np.array([e.image.shape[:2] for e in examples], np.int32)
    images = np.stack([_pad(e.image, height, width, "reflect") for e in examples])
    instances = None
    if examples[0].instances is not None:
        instances = np.stack([_pad(e.instances, height, width, "constant") for e in examples])
    return Split(images, instances, sizes, [e.id for e in examples])


def _pad(array: np.ndarray, height: int, width: int, mode: str) -> np.ndarray:
    pads = [(0, height - array.shape[0]), (0, width - array.shape[1])] + [(0, 0)] * (array.ndim - 2)
    return np.pad(array, pads, mode=mode)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """An image as uint8: 8-bit images unchanged, others scaled robustly by percentiles.

    The `PERCENTILES` (1st, 99.8th) of the image map to 0 and 255; values beyond are
    clipped. A constant image becomes all 0.
    """
    if image.dtype == np.uint8:
        return image
    low, high = np.percentile(image, PERCENTILES)
    if not high > low:
        return np.zeros(image.shape, np.uint8)
    scaled = (image.astype(np.float64) - low) / (high - low)
    return np.round(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)


def read_grey_image(path: Path) -> np.ndarray:
    """One grey image file as [H, W, 1] uint8 (see `to_uint8`); a stack or colour image is refused."""
    return to_uint8(_one_image(path))[..., None]


def _one_image(path: Path) -> np.ndarray:
    """The one grey [H, W] image of a file (colour by `io.COLOUR_AS_GREY`); a stack is refused."""
    stack = io.read_stack(path)
    if len(stack) != 1:
        raise PipelineError(f"{path}: expected one image, got a stack of {len(stack)}")
    return stack[0, ..., 0]


def read_label_image(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """A label image (0 = background, k > 0 = object k) as int32, checked against its image's shape."""
    labels = _one_image(path)
    if labels.dtype.kind not in "iu":
        raise PipelineError(f"{path}: unexpected label values: labels must be integers, got {labels.dtype} pixels")
    if labels.min() < 0:
        raise PipelineError(f"{path}: unexpected label values: negative label {labels.min()}")
    if labels.max() > np.iinfo(np.int32).max:
        raise PipelineError(f"{path}: unexpected label values: label {labels.max()} exceeds int32")
    if labels.shape != tuple(shape[:2]):
        raise PipelineError(
            f"{path}: labels of {labels.shape[0]}x{labels.shape[1]} px do not match "
            f"the image's {shape[0]}x{shape[1]} px"
        )
    return labels.astype(np.int32)


# --- Cell Tracking Challenge ---------------------------------------------------------------


def ctc2d_root(name: str, data_dir: str | Path | None, dl_manager=None) -> Path:
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
        archive = _download_manager(dl_manager, None).download_and_extract(CTC2D_URL.format(name=name))
        return _ctc2d_extracted(Path(archive), name)
    folder = Path(data_dir)
    if not folder.is_dir():
        raise PipelineError(f"{folder}: data folder does not exist")
    for candidate in (folder / name, folder):
        if (candidate / CTC2D_SEQUENCES[0]).is_dir():
            return candidate
    archive = folder / f"{name}.zip"
    if not archive.is_file():
        raise PipelineError(
            f"{folder}: neither {name}.zip nor {name}/{CTC2D_SEQUENCES[0]}/ (the challenge's training data) found"
        )
    return _ctc2d_extracted(Path(_download_manager(dl_manager, folder).extract(archive)), name)


def _download_manager(dl_manager, folder: Path | None):
    if dl_manager is not None:
        return dl_manager
    import tensorflow_datasets as tfds  # only here: it takes seconds to import

    if folder is None:
        folder = Path(tfds.core.constants.DATA_DIR).expanduser() / "downloads"
    return tfds.download.DownloadManager(download_dir=folder)


def _ctc2d_extracted(extracted: Path, name: str) -> Path:
    for candidate in (extracted / name, extracted):
        if (candidate / CTC2D_SEQUENCES[0]).is_dir():
            return candidate
    raise PipelineError(f"{extracted}: the archive holds no {name}/{CTC2D_SEQUENCES[0]}/ folder")


def read_ctc2d_sequence(root: Path, sequence: str) -> list[Example]:
    """The frames of one CTC sequence that have a segmentation ground truth, in frame order.

    `root/<sequence>/tNNN.tif` are the frames, `root/<sequence>_GT/SEG/man_segNNN.tif`
    their 16-bit instance labels (only some frames; objects may be partly annotated, and
    unannotated pixels count as background). Example ids are `<sequence>_tNNN`.
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
        image = read_grey_image(frame)
        examples.append(Example(f"{sequence}_t{match.group(1)}", image, read_label_image(truth, image.shape)))
    return examples


# --- folder of images and masks -----------------------------------------------------------


def read_image_folder(folder: Path) -> list[Example]:
    """Pairs `folder/images/NAME.{png,tif}` with `folder/masks/NAME.{png,tif}`, sorted by NAME.

    A mask with exactly one non-zero value (e.g. 0/255 or 0/1) is binary: its instances
    are the 4-connected components. Any other mask is an instance label image
    (0 = background, k > 0 = object k). Example ids are the NAMEs.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise PipelineError(f"{folder}: data folder does not exist")
    images, masks = (_images_by_name(folder / sub) for sub in ("images", "masks"))
    if not images:
        raise PipelineError(f"{folder / 'images'}: folder is empty (expected NAME.png or NAME.tif images)")
    for name in sorted(masks.keys() - images.keys()):
        raise PipelineError(f"{masks[name]}: mask with no image {name}.* in {folder / 'images'}")
    for name in sorted(images.keys() - masks.keys()):
        raise PipelineError(f"{images[name]}: image with no mask {name}.* in {folder / 'masks'}")
    examples = []
    for name in sorted(images):
        image = read_grey_image(images[name])
        labels = read_label_image(masks[name], image.shape)
        instances = instances_from_binary(labels) if len(np.unique(labels)) <= 2 else labels
        examples.append(Example(name, image, instances))
    return examples


def _images_by_name(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise PipelineError(f"{folder}: missing folder (expected images/ and masks/ side by side)")
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in io.IMAGE_SUFFIXES or path.name.startswith("."):
            continue
        if path.stem in files:
            raise PipelineError(f"{path}: two files named {path.stem} ({files[path.stem].name}, {path.name})")
        files[path.stem] = path
    return files


def tfds_features(docs: dict[str, str], size: int | None = None, **extra) -> "tfds.features.FeaturesDict":
    """The features every TFDS builder's examples share, plus a builder's `extra` ones.

    `image` and `label` (uint8, 255 = cell) are [H, W, 1] images, `instances` int32
    [H, W], `id` a stable text id; `docs` gives each its description, `size` fixes the
    side where all images have one. The builders in `datasets/` call this.
    """
    import tensorflow_datasets as tfds  # only the builders need TFDS

    shape = (size, size)
    return tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=shape + (1,), dtype=np.uint8, doc=docs["image"]),
        "label": tfds.features.Image(shape=shape + (1,), dtype=np.uint8, doc=docs["label"]),
        "instances": tfds.features.Tensor(shape=shape, dtype=np.int32, encoding="zlib", doc=docs["instances"]),
        "id": tfds.features.Text(doc=docs["id"]),
        **extra,
    })
