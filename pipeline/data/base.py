"""What a data set is (`Dataset`, its description) and what it yields (`Split`s of `Example`s).

Every split holds images [N, H, W, C] uint8 and, where labelled, instance labels
[N, H, W] (0 = membrane/background, 1.. = cells; the semantic label is instances > 0).
C is 1 for the grey data sets; a `multichannel` one reads its files with the model's
channel count (`model.input_channels`), e.g. 3 for RGB images.

Images of different sizes within a split are padded at the bottom and right to the
largest one (images by mirroring, labels with background); `Split.sizes` keeps each
image's own size so that weights and scores can leave the padding out.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import numpy as np

from pipeline.config.presets import PRESETS
from pipeline.config.schema import DataConfig, Range
from pipeline.errors import PipelineError
from pipeline.mirror import mirror_pad_array

SPLITS = ("train", "val", "test")
# What a data set's ground truth is: binary masks (their instances are the 4-connected
# components of the cell class), instance labels as annotated, or either, mask by mask.
LABELS = ("binary", "instances", "either")


@dataclasses.dataclass
class Example:
    """One image [H, W, C] uint8 with its instance labels [H, W] int32 (None: unlabelled)."""

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


@dataclasses.dataclass(frozen=True)
class Reference:
    """A published result on a data set, which evaluate prints beside ours (its `paper*` row)."""

    values: Mapping[str, float]  # report keys (warping_error, ...) -> the published values
    note: str  # where they were measured; "{split}" stands for the split that we score

    def row(self, split: str) -> dict[str, Any]:
        """The report's row beside our scores on `split`: the values and the note."""
        return dict(self.values) | {"note": self.note.format(split=split)}


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Everything the pipeline knows about one data set (see docs/datasets.md).

    The stages ask the description and never compare names: `pipeline.data.load` calls
    `read`, `pipeline.config.resolve` applies `recipes` and checks `settings`, evaluate groups
    scores by `sequence_of` and prints the `reference`.
    """

    name: str  # what data.dataset and --dataset say
    # The SPLITS, from a checked configuration: read(config), or for a `multichannel`
    # data set read(config, channels), its images with the model's channel count.
    read: Callable[..., dict[str, Split]]
    labels: str  # LABELS
    # Whether its images may have any number of channels (the user's own files: grey,
    # RGB, fluorescence composites), so that `read` takes the model's; else they are grey.
    multichannel: bool = False
    data_dir: str | None = None  # what --data-dir holds; None: nothing is read from it
    needs_data_dir: bool = False  # else --data-dir is optional (ctc2d downloads without it)
    # Its own DataConfig fields and their allowed values; validate checks those of every
    # data set whichever is chosen, so that no saved configuration holds nonsense.
    settings: Mapping[str, Range] = dataclasses.field(default_factory=dict)
    # The setting that fixes every image's side before reading, checked against the
    # training tile; the other data sets' sizes are checked once read (input_pipeline).
    image_size_setting: str | None = None
    sequence_of: Callable[[str], str] | None = None  # example id -> its sequence (time-lapse data)
    # Whether, with these settings, its labelled test split is kept apart from the
    # validation split that chooses the model; else evaluate's score is a flattering one.
    held_out_test: Callable[[DataConfig], bool] = lambda config: False
    reference: Reference | None = None
    # Preset name -> {section: {field: value}}, applied when a new run picks both.
    recipes: Mapping[str, Mapping[str, Mapping[str, Any]]] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        """Refuses, in one line, a description that the pipeline could not follow."""
        unknown_settings = sorted(set(self.settings) - {field.name for field in dataclasses.fields(DataConfig)})
        unknown_presets = sorted(set(self.recipes) - set(PRESETS))
        problems = [
            (self.labels not in LABELS, f"labels={self.labels!r} must be one of {', '.join(LABELS)}"),
            (unknown_settings, f"settings {unknown_settings} are not DataConfig fields"),
            (self.image_size_setting not in (None, *self.settings), "image_size_setting must be one of its settings"),
            (self.needs_data_dir and not self.data_dir, "needs_data_dir needs data_dir to say what the folder holds"),
            (unknown_presets, f"recipes for unknown presets {unknown_presets}"),
        ]
        for failed, problem in problems:
            if failed:
                raise PipelineError(f"data set {self.name!r}: {problem}")


def stack_examples(examples: list[Example]) -> Split:
    """Stacks examples into a Split, padding smaller images to the largest (see the module doc)."""
    height = max(e.image.shape[0] for e in examples)
    width = max(e.image.shape[1] for e in examples)
    sizes = np.array([e.image.shape[:2] for e in examples], np.int32)
    images = np.stack([mirror_pad_array(e.image, _pads(e.image, height, width)) for e in examples])
    instances = None
    if examples[0].instances is not None:  # [H, W]
        instances = np.stack([np.pad(e.instances, _pads(e.instances, height, width)) for e in examples])
    return Split(images, instances, sizes, [e.id for e in examples])


def _pads(array: np.ndarray, height: int, width: int) -> list[tuple[int, int]]:
    """The pads after the last row and column that make `array` [H, W, ...] `height` x `width`."""
    return [(0, height - array.shape[0]), (0, width - array.shape[1])]


def tfds_features(
    docs: dict[str, str], size: int | None = None, channels: int | None = 1, **extra
) -> "tfds.features.FeaturesDict":
    """The features every TFDS builder's examples share, plus a builder's `extra` ones.

    `image` is a uint8 [H, W, `channels`] image (None: each example's own, as its file
    has them), `label` (uint8, 255 = cell) an [H, W, 1] image, `instances` int32 [H, W],
    `id` a stable text id; `docs` gives each its description, `size` fixes the side where
    all images have one. The builders in `datasets/` call this.
    """
    import tensorflow_datasets as tfds  # only the builders need TFDS

    shape = (size, size)
    return tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=shape + (channels,), dtype=np.uint8, doc=docs["image"]),
        "label": tfds.features.Image(shape=shape + (1,), dtype=np.uint8, doc=docs["label"]),
        "instances": tfds.features.Tensor(shape=shape, dtype=np.int32, encoding="zlib", doc=docs["instances"]),
        "id": tfds.features.Text(doc=docs["id"]),
        **extra,
    })
