"""Configuration: the dataclasses of a run's settings, the choices of its text fields, `Range`.

A run is fully described by one `Config`. The choices of every text field are tuples of
this module (or of `pipeline.sizes`), which the code that branches on them uses too.
A leaf: it imports nothing of `pipeline`, so that every module may import it (the data
sets included, which `pipeline.config.resolve` imports in turn).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

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
# How `pipeline.inference.labelling.instances` cuts the cells into instances (`predict.instances`).
INSTANCE_METHODS = ("components", "watershed")


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
    # isbi2012: k > 0 cuts the labelled slices into k folds of consecutive slices: fold `fold` is
    # the test split, the next one (cyclically) validates, the others train; data.test_slices and
    # data.val_slices are then not used. 0 = off. `--stage crossval` runs every fold.
    folds: int = 0
    fold: int = 0  # isbi2012: which fold is the test split, 0 .. data.folds - 1
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
    # Levers against mergers (docs/training.md, "Beyond the paper"), both off by default.
    # Keeps an exponential moving average of the weights (Keras' optimizer `use_ema`):
    # validation, best.keras and last.keras use the average; 0 = off, e.g. 0.999.
    ema_momentum: float = 0.0
    # Adds cldice_weight x (1 - soft clDice) of the membrane class to the weighted cross-entropy
    # (Shit et al., CVPR 2021): rewards thin, unbroken membranes; 0 = off (the paper's loss).
    cldice_weight: float = 0.0
    cldice_iterations: int = 10  # erosions of the soft skeleton: at least half the thickest membrane, in px
    val_tiles_per_image: int = 4  # fixed validation tiles cut from each validation image
    select_by: str = "val_loss"  # SELECTIONS: what picks the best epoch (and early stopping watches)
    early_stopping_patience: int = 0  # epochs without improvement of select_by; 0 = off
    # Train on the validation images too, as the paper trained on every labelled slice,
    # once a run without it has chosen the number of epochs: best.keras is then the last
    # epoch's model. The test split stays held out.
    include_validation: bool = False
    jit_compile: bool = False  # XLA; slower for this network on CPU
    # glibc's malloc keeps freed memory for the next step instead of unmapping it, which
    # saves the kernel zeroing fresh pages every step (pipeline/training/allocator.py).
    keep_freed_memory: bool = True
    strategy: str = "mirrored"  # STRATEGIES
    precision: str = "float32"  # PRECISIONS
    # Fine-tuning: the weights to start from (a run directory, a .keras file or a package
    # this project exported) instead of the paper's random initialisation.
    init_from: str | None = None


@dataclasses.dataclass
class PredictConfig:
    """Overlap-tile prediction used by evaluate, export and predict."""

    # The largest tile side: bounds memory. Each image is tiled with the valid side up to it
    # that gives the network the fewest input pixels (the same result, less work).
    tile_size: int = 572
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
    """Where the SavedModel for TF Serving goes, and who the zoo package names."""

    name: str = "unet"
    root: str = "saved_models"
    version: int = 0  # 0 = the next free version
    # The zoo package's description (rdf.yaml): names separated by ";", GitHub user names of
    # who maintains the model there, the repository it came from ("" = none).
    authors: str = "unet-pipeline contributors"
    maintainers: str = ""
    git_repo: str = ""
    # A cross-validation of the model's recipe (a `--stage crossval` run directory) whose figures the
    # export records, and the zoo package states, as the model's estimated accuracy: for the final
    # model on every labelled slice, which has no held-out score ("" = none).
    crossval: str = ""


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
