"""The user's own images (`--dataset image_folder --data-dir DIR`).

DIR holds `images/NAME.{png,tif}` with `masks/NAME.{png,tif}`, binary or instance masks.
Images are read with the model's channels (`model.input_channels`: 1 for grey, 3 for RGB
such as H&E or fluorescence composites), as their files declare them; a colour image for a
1-channel model follows `io.COLOUR_AS_GREY`. The last `data.val_images` names (sorted) are
held out for validation, which is also the test split. Its TFDS builder is
`datasets/image_folder/`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.config.schema import DataConfig, Range
from pipeline.data.base import Dataset, Example, Split, stack_examples
from pipeline.data.image_files import read_image, read_label_image
from pipeline.data.weight_map import instances_from_binary
from pipeline.errors import PipelineError
from pipeline.files import io


def read(config: DataConfig, channels: int) -> dict[str, Split]:
    """Train: the pairs but the last `val_images` (sorted by name); val = test: those.

    Images have `channels` channels, the model's (see `read_pairs`).
    """
    examples = read_pairs(Path(config.data_dir), channels)
    if not 0 < config.val_images < len(examples):
        raise PipelineError(
            f"data.val_images={config.val_images} must leave training images among the {len(examples)} "
            f"in {config.data_dir}"
        )
    cut = len(examples) - config.val_images
    val = stack_examples(examples[cut:])
    return {"train": stack_examples(examples[:cut]), "val": val, "test": val}


def read_pairs(folder: Path, channels: int | None = 1) -> list[Example]:
    """Pairs `folder/images/NAME.{png,tif}` with `folder/masks/NAME.{png,tif}`, sorted by NAME.

    Images are [H, W, `channels`] uint8 (`image_files.read_image`: a file with other
    channels is refused, a grey one stored as colour read as grey for `channels=1`), or
    with None each as many as its file has. A mask with exactly one non-zero value (e.g.
    0/255 or 0/1) is binary: its instances are the 4-connected components. Any other mask
    is an instance label image (0 = background, k > 0 = object k). Example ids are the NAMEs.
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
        image = read_image(images[name], channels)
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


DATASET = Dataset(
    name="image_folder",
    read=read,
    labels="either",
    data_dir="the folder with images/ and masks/",
    needs_data_dir=True,
    multichannel=True,
    settings={"val_images": Range(1)},
)
