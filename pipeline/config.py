"""Configuration: dataclasses, named presets and overrides.

A run is fully described by one `Config`. It starts from a named preset (`paper`, `cpu`,
`smoke`), optionally updated from a YAML/JSON file and from `section.field=value` strings,
and is saved into the run directory so that the run can be repeated exactly.

`validate` checks a resolved configuration once, when a command is resolved and before
TensorFlow loads; the stages then trust it. The choices of every text field are tuples of
this module (or of `pipeline.sizes` and `pipeline.instances`), which the code that branches
on them uses too; the data sets and their own `data.*` settings are described in
`pipeline.data`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import PipelineError
from pipeline.instances import METHODS as INSTANCE_METHODS
from pipeline.sizes import PADDINGS, input_size_problem, output_size, prediction_tile_problem

if typing.TYPE_CHECKING:
    from pipeline.data import Dataset

# Image sampling of rotations and elastic deformations (labels are always sampled nearest).
IMAGE_INTERPOLATIONS = ("bicubic", "bilinear")
OPTIMIZERS = ("sgd", "adam")
# How the learning rate falls from train.learning_rate to 0 over the run (after the warm-up):
# not at all, along half a cosine, or as (1 - progress)^0.9, nnU-Net's "poly" schedule.
LR_SCHEDULES = ("constant", "cosine", "polynomial")
# What chooses train/best.keras among the epochs: the weighted loss on the validation
# tiles, or the challenge's own Rand or warping error on the whole validation images.
# "last": the last epoch, chosen by nothing (nnU-Net keeps its final checkpoint), for decayed schedules.
SELECTIONS = ("val_loss", "val_rand_error", "val_warping_error", "last")
STRATEGIES = ("mirrored", "multi_worker")  # this machine's devices, or the TF_CONFIG cluster
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")


@dataclasses.dataclass
class DataConfig:
    """Which images to train and evaluate on.

    The fields after `data_dir` belong to one data set each, which reads them and lists
    them with their allowed values (`Dataset.settings` in `pipeline.data`); the others
    ignore them. They stay flat fields, so that `--set data.val_slices=2` and the saved
    configurations and prepared data of earlier runs keep working.
    """

    dataset: str = "synthetic"  # a name of pipeline.data.DATASETS (docs/datasets.md)
    data_dir: str | None = None  # folder of the data set's files (ctc2d: optional, else downloaded)
    seed: int = 0  # synthetic: the images are a pure function of this seed
    image_size: int = 384  # synthetic: side length of each generated image
    num_train: int = 6  # synthetic: number of images per split
    num_val: int = 2
    num_test: int = 2
    val_slices: int = 4  # isbi2012: last labelled slices held out for validation (model selection)
    test_slices: int = 4  # isbi2012: first labelled slices held out for the score; 0 = none
    val_images: int = 1  # image_folder: last images (sorted by name) held out for validation


@dataclasses.dataclass
class ModelConfig:
    """The U-Net's shape; `paper` is Ronneberger et al. (2015) exactly."""

    depth: int = 5  # resolution levels; depth - 1 max-poolings
    base_filters: int = 64  # channels of the first level, doubled at every level
    num_classes: int = 2  # 0 = membrane/background, 1 = cell
    input_channels: int = 1
    dropout: float = 0.5  # rate of the drop-out at the end of the contracting path
    padding: str = "valid"  # PADDINGS: the paper's unpadded convolutions; "same" only for ablations


@dataclasses.dataclass
class WeightMapConfig:
    """The paper's weight map w = w_c + w0 * exp(-(d1 + d2)^2 / (2 sigma^2))."""

    w0: float = 10.0
    sigma: float = 5.0
    class_balance: bool = True  # w_c from class frequencies, else w_c = 1
    separation: int = 1  # px of background inserted between touching instances (>= 1)


@dataclasses.dataclass
class AugmentConfig:
    """Random transformations of training tiles (the paper's augmentation, sec. 3.1).

    Random shifts are the random tile positions. Gray values act on normalised tiles
    (zero mean, unit variance per image), so amounts are in units of the image's std.
    """

    flip: bool = True  # mirror left-right
    rotate90: bool = True  # multiples of 90 degrees
    rotate: bool = True  # any angle, uniform in [0, 360); mirror extrapolation
    elastic: bool = True  # random displacements on a coarse grid, bicubically interpolated
    elastic_grid: int = 3  # nodes per side of the grid
    elastic_sigma: float = 10.0  # std of the nodes' displacements, px
    interpolation: str = "bicubic"  # IMAGE_INTERPOLATIONS
    brightness: float = 0.1  # added offset uniform in [-b, b] std; 0 = off
    contrast: float = 0.1  # gain uniform in [1 - c, 1 + c]; 0 = off
    gamma: float = 0.2  # gamma curve exp(uniform [-g, g]) on the logistic scale; 0 = off


@dataclasses.dataclass
class TrainConfig:
    """How the network is trained."""

    seed: int = 0
    tile_size: int = 572  # input tile side; the label tile is the network's output size
    batch_size: int = 1
    epochs: int = 100
    steps_per_epoch: int = 200
    optimizer: str = "sgd"  # OPTIMIZERS
    learning_rate: float = 0.001  # the peak, reached after the warm-up
    lr_schedule: str = "constant"  # LR_SCHEDULES
    warmup_steps: int = 0  # steps of linear warm-up from 0 to learning_rate
    momentum: float = 0.99  # sgd only
    # Scales the gradients down to this global norm where they exceed it, so that one
    # outlying batch cannot wreck the weights and Adam's moments; 0 = off. nnU-Net clips at 12.
    clipnorm: float = 0.0
    val_tiles_per_image: int = 4  # fixed validation tiles cut from each validation image
    select_by: str = "val_loss"  # SELECTIONS: what picks the best epoch (and early stopping watches)
    early_stopping_patience: int = 0  # epochs without improvement of select_by; 0 = off
    # Train on the validation images too, as the paper trained on every labelled slice,
    # once a run without it has chosen the number of epochs: best.keras is then the last
    # epoch's model. The test split stays held out.
    include_validation: bool = False
    jit_compile: bool = False  # XLA; slower for this network on CPU
    # glibc's malloc keeps freed memory for the next step instead of unmapping it, which
    # saves the kernel zeroing fresh pages every step (pipeline/allocator.py).
    keep_freed_memory: bool = True
    strategy: str = "mirrored"  # STRATEGIES
    precision: str = "float32"  # PRECISIONS
    # Fine-tuning: the weights to start from (a run directory, a .keras file or a package
    # this project exported) instead of the paper's random initialisation.
    init_from: str | None = None


@dataclasses.dataclass
class PredictConfig:
    """Overlap-tile prediction used by evaluate, export and predict."""

    tile_size: int = 572  # input tile side
    tiles_per_batch: int = 4  # bounds memory: tiles run through the network at once
    threshold: float = 0.5  # probability of cell above which a pixel is cell
    test_time_augmentation: bool = False  # average over the 8 rotations/flips (8x the work)
    # NAME_labels.tif of the predict stage (docs/user-guide.md#outputs):
    instances: str = "components"  # INSTANCE_METHODS: 4-connected cells, or "watershed" to cut thin necks
    # Smaller objects are dropped from the labels: specks that thresholding leaves along
    # membranes, while the smallest cells of the data sets here are 20 px (synthetic) or
    # hundreds (ISBI 2012, CTC). 16 px is a 4 x 4 square.
    min_size: int = 16
    # Images of more pixels are never read whole: they are predicted chunk by chunk from
    # a lazily read tiled TIFF or OME-Zarr and written chunk by chunk (docs/user-guide.md,
    # "Images larger than memory"). 4096 x 4096 by default.
    max_whole_pixels: int = 16_777_216
    # Output side of one chunk (rounded down to whole prediction tiles): bounds the memory
    # of chunked prediction and is the unit of work that Beam hands to its workers.
    chunk_size: int = 2048


@dataclasses.dataclass
class ExportConfig:
    """Where the SavedModel for TF Serving goes."""

    name: str = "unet"
    root: str = "saved_models"
    version: int = 0  # 0 = the next free version


@dataclasses.dataclass
class Config:
    """Everything that defines a run."""

    preset: str = "paper"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    weight_map: WeightMapConfig = dataclasses.field(default_factory=WeightMapConfig)
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    predict: PredictConfig = dataclasses.field(default_factory=PredictConfig)
    export: ExportConfig = dataclasses.field(default_factory=ExportConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _paper() -> Config:
    # The dataclass defaults are the paper's settings.
    return Config(preset="paper")


def _cpu() -> Config:
    return Config(
        preset="cpu",
        model=ModelConfig(depth=4, base_filters=16),
        # 400 steps: the first result within 3 minutes of training on a slow 2-core machine
        # (docs/results.md, "The first result"); Adam at 2e-3 comes near in them to what 1e-3 did in 750.
        train=TrainConfig(
            tile_size=188,
            batch_size=4,
            epochs=16,
            steps_per_epoch=25,
            optimizer="adam",
            learning_rate=2e-3,
        ),
        predict=PredictConfig(tile_size=508, tiles_per_batch=2),
    )


def _smoke() -> Config:
    return Config(
        preset="smoke",
        model=ModelConfig(depth=3, base_filters=8),
        train=TrainConfig(
            tile_size=92,
            batch_size=4,
            epochs=4,
            steps_per_epoch=15,
            optimizer="adam",
            learning_rate=1e-2,
            val_tiles_per_image=4,
        ),
        predict=PredictConfig(tile_size=92, tiles_per_batch=8),
        # Sixty steps are too few to profit from deformations and gray-value changes: with
        # them the test IoU ranged from 0.71 to 0.84 over train seeds 0-2.
        augment=AugmentConfig(rotate=False, elastic=False, brightness=0.0, contrast=0.0, gamma=0.0),
    )


PRESETS: dict[str, typing.Callable[[], Config]] = {"paper": _paper, "cpu": _cpu, "smoke": _smoke}


def _datasets() -> dict[str, Dataset]:
    """`pipeline.data.DATASETS`, imported on first use: pipeline.data imports this module."""
    from pipeline.data import DATASETS

    return DATASETS


def preset(name: str, dataset: str | None = None) -> Config:
    """Returns a fresh copy of the named preset for `dataset` (default: the embedded one).

    The data set's recipe for the preset, if it has one, is applied on top (`--dataset
    isbi2012 --preset cpu`); --config and --set still override it.
    """
    if name not in PRESETS:
        raise PipelineError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    config = PRESETS[name]()
    config.data.dataset = dataset or config.data.dataset
    described = _datasets().get(config.data.dataset)  # an unknown name is refused by validate
    recipe = described.recipes.get(name, {}) if described else {}
    return apply_overrides(config, recipe, f"recipe {name}/{config.data.dataset}")


def _section_types(section: Any) -> dict[str, Any]:
    return typing.get_type_hints(type(section))


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Checks a parsed YAML value against a field's type, allowing int for float."""
    allowed = typing.get_args(annotation) or (annotation,)
    if value is None and type(None) in allowed:
        return None
    for kind in allowed:
        if kind is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:  # YAML reads 1e-3 (no dot) as a string
                return float(value)
            except ValueError:
                continue
        if kind is int and isinstance(value, bool):
            continue
        if kind is not type(None) and isinstance(value, kind):
            return value
    names = " or ".join(getattr(k, "__name__", str(k)) for k in allowed)
    raise PipelineError(f"{where}: expected {names}, got {value!r}")


def apply_overrides(config: Config, overrides: dict[str, Any], source: str) -> Config:
    """Returns a copy of `config` with nested `{section: {field: value}}` overrides applied."""
    config = dataclasses.replace(config)
    for key, value in overrides.items():
        if key == "preset":
            continue
        if not hasattr(config, key) or not isinstance(value, dict):
            raise PipelineError(f"{source}: unknown configuration section {key!r}")
        section = dataclasses.replace(getattr(config, key))
        types = _section_types(section)
        for field, raw in value.items():
            if field not in types:
                raise PipelineError(f"{source}: unknown field {key}.{field}")
            setattr(section, field, _coerce(raw, types[field], f"{source}: {key}.{field}"))
        setattr(config, key, section)
    return config


def parse_set(assignments: list[str]) -> dict[str, Any]:
    """Turns `["train.epochs=20", ...]` into nested overrides; values are parsed as YAML."""
    overrides: dict[str, dict[str, Any]] = {}
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        section, dot, field = key.strip().partition(".")
        if not sep or not dot or not field:
            raise PipelineError(f"--set {assignment!r}: expected section.field=value")
        overrides.setdefault(section, {})[field] = yaml.safe_load(raw) if raw else ""
    return overrides


def read_file(path: str | Path) -> dict[str, Any]:
    """Reads a YAML or JSON configuration file into a nested dict."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise PipelineError(f"{path}: cannot read configuration ({error.strerror})") from None
    try:
        content = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as error:
        first_line = str(error).splitlines()[0]
        raise PipelineError(f"{path}: not valid YAML/JSON ({first_line})") from None
    if not isinstance(content, dict):
        raise PipelineError(f"{path}: expected a mapping of sections, got {type(content).__name__}")
    return content


def from_dict(content: dict[str, Any], source: str) -> Config:
    """Builds a Config from a saved dict: its preset and data set's recipe, then every field it lists."""
    dataset = content.get("data", {}).get("dataset") if isinstance(content.get("data"), dict) else None
    return apply_overrides(preset(content.get("preset", "paper"), dataset), content, source)


def save(config: Config, path: str | Path) -> None:
    """Writes the resolved configuration as YAML (atomically)."""
    from pipeline.io import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(config.to_dict(), sort_keys=False))


def load(path: str | Path) -> Config:
    """Reads a configuration written by `save` (or written by hand)."""
    return from_dict(read_file(path), str(path))


@dataclasses.dataclass(frozen=True)
class Range:
    """The finite numbers a numeric field allows: from `low` up to `high`, ends included unless open."""

    low: float
    high: float = math.inf
    open_low: bool = False
    open_high: bool = False

    def problem(self, value: float) -> str | None:
        """What `value` breaks, or None if it lies in the range."""
        finite = not isinstance(value, float) or math.isfinite(value)  # YAML reads .nan and .inf
        above = value > self.low if self.open_low else value >= self.low
        below = value < self.high if self.open_high else value <= self.high
        if finite and above and below:
            return None
        if self.high < math.inf:
            left, right = "(" if self.open_low else "[", ")" if self.open_high else "]"
            return f"must lie in {left}{self.low:g}, {self.high:g}{right}"
        number = "a finite number " if isinstance(value, float) else ""
        return f"must be {number}{'greater than' if self.open_low else 'at least'} {self.low:g}"


# Where numpy's seeds, Keras' layers and optimizers, the weight map or the loops of the
# stages would fail, diverge or do nothing. The data sets' own data.* fields are in their
# descriptions (`Dataset.settings`).
_RANGES: dict[str, Range] = {
    "model.depth": Range(2),
    "model.base_filters": Range(1),
    "model.num_classes": Range(2),
    "model.input_channels": Range(1),
    "model.dropout": Range(0, 1, open_high=True),
    "weight_map.w0": Range(0),
    "weight_map.sigma": Range(0, open_low=True),
    "weight_map.separation": Range(1),
    "augment.elastic_grid": Range(2),
    "augment.elastic_sigma": Range(0),
    "augment.brightness": Range(0),
    "augment.contrast": Range(0, 1, open_high=True),  # a gain of 1 - c must stay positive
    "augment.gamma": Range(0),
    "train.seed": Range(0),
    "train.batch_size": Range(1),
    "train.epochs": Range(1),
    "train.steps_per_epoch": Range(1),
    "train.learning_rate": Range(0, open_low=True),
    "train.warmup_steps": Range(0),
    "train.momentum": Range(0, 1, open_high=True),
    "train.clipnorm": Range(0),
    "train.val_tiles_per_image": Range(1),
    "train.early_stopping_patience": Range(0),
    "predict.tiles_per_batch": Range(1),
    "predict.threshold": Range(0, 1),
    "predict.min_size": Range(1),  # 1 keeps every object
    "predict.max_whole_pixels": Range(1),
    "predict.chunk_size": Range(1),
    "export.version": Range(0),
}

_CHOICES: dict[str, tuple[str, ...]] = {
    "model.padding": PADDINGS,
    "augment.interpolation": IMAGE_INTERPOLATIONS,
    "train.optimizer": OPTIMIZERS,
    "train.lr_schedule": LR_SCHEDULES,
    "train.select_by": SELECTIONS,
    "train.strategy": STRATEGIES,
    "train.precision": PRECISIONS,
    "predict.instances": INSTANCE_METHODS,
}


def _field(config: Config, dotted: str) -> Any:
    """The value of a field named `section.field`."""
    section, field = dotted.split(".")
    return getattr(getattr(config, section), field)


def _shown(value: Any) -> str:
    """A field's value as the user would write it: 0.001, nan, 'adam'."""
    if isinstance(value, float):
        return f"{value:g}"
    return repr(value) if isinstance(value, str) else str(value)


def _refuse(field: str, value: Any, problem: str | None) -> None:
    """Raises `field=value: problem`, unless there is no problem."""
    if problem:
        raise PipelineError(f"{field}={_shown(value)}: {problem}")


def _choice_problem(value: str, choices: tuple[str, ...]) -> str | None:
    """What a text field's value breaks, or None if it is one of `choices`."""
    return None if value in choices else f"must be one of {', '.join(choices)}"


def _folder_name_problem(name: str) -> str | None:
    """What the export name breaks, or None if it names one visible folder."""
    # The model goes to export.root/name/version: a path or '..' would leave the root.
    if name and "/" not in name and not name.startswith("."):
        return None
    return "must be a plain folder name (not empty, no '/', not starting with '.')"


def _check_tile_sizes(config: Config, image_size_setting: str | None) -> None:
    """Tile sizes that the network, overlap-tile prediction and images of a configured size accept."""
    depth, padding, tile = config.model.depth, config.model.padding, config.train.tile_size
    _refuse("train.tile_size", tile, input_size_problem(tile, depth, padding))
    _refuse("predict.tile_size", config.predict.tile_size,
            prediction_tile_problem(config.predict.tile_size, depth, padding))
    out = output_size(tile, depth, padding)
    if image_size_setting is not None:  # other images' sizes are checked once read (input_pipeline)
        size = getattr(config.data, image_size_setting)
        _refuse(f"data.{image_size_setting}", size,
                f"must be at least {out}, the output window of train.tile_size={tile}" if size < out else None)


def validate(config: Config) -> None:
    """Raises a one-line error naming the first field, its value and what is allowed, if any is wrong.

    Checks everything the stages would otherwise trip on later, without TensorFlow.
    """
    datasets = _datasets()
    _refuse("preset", config.preset, _choice_problem(config.preset, tuple(PRESETS)))
    _refuse("data.dataset", config.data.dataset, _choice_problem(config.data.dataset, tuple(datasets)))
    for dataset in datasets.values():
        for field, allowed in dataset.settings.items():
            value = getattr(config.data, field)
            _refuse(f"data.{field}", value, allowed.problem(value))
    for field, allowed in _RANGES.items():
        value = _field(config, field)
        _refuse(field, value, allowed.problem(value))
    for field, choices in _CHOICES.items():
        value = _field(config, field)
        _refuse(field, value, _choice_problem(value, choices))
    if config.train.include_validation:
        _refuse("train.select_by", config.train.select_by,
                "with train.include_validation=true the validation images are trained on and cannot choose the "
                "model: keep val_loss or last (the last epoch is kept)"
                if config.train.select_by not in ("val_loss", "last") else None)
        _refuse("train.early_stopping_patience", config.train.early_stopping_patience,
                "must be 0 with train.include_validation=true: the validation images are trained on"
                if config.train.early_stopping_patience else None)
    if config.train.select_by == "last":
        _refuse("train.early_stopping_patience", config.train.early_stopping_patience,
                "must be 0 with train.select_by=last: early stopping watches a validation score"
                if config.train.early_stopping_patience else None)
    total = config.train.epochs * config.train.steps_per_epoch
    _refuse("train.warmup_steps", config.train.warmup_steps,
            f"must be less than the run's {total} steps (train.epochs x train.steps_per_epoch)"
            if config.train.warmup_steps >= total else None)
    _check_tile_sizes(config, datasets[config.data.dataset].image_size_setting)
    _refuse("export.name", config.export.name, _folder_name_problem(config.export.name))
