"""Configuration: resolving a run's `Config` from a preset, files and overrides, and `validate`.

A run starts from a named preset (`pipeline.config.presets`) with its data set's recipe,
optionally updated from a YAML/JSON file and from `section.field=value` strings, and is
saved into the run directory so that the run can be repeated exactly.

`validate` checks a resolved configuration once, when a command is resolved and before
TensorFlow loads; the stages then trust it. The data sets and their own `data.*` settings
are described in `pipeline.data`.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any

import yaml

from pipeline.config.presets import PRESETS
from pipeline.config.schema import (
    IMAGE_INTERPOLATIONS,
    INSTANCE_METHODS,
    LR_SCHEDULES,
    OPTIMIZERS,
    PRECISIONS,
    SELECTIONS,
    STRATEGIES,
    Config,
    Range,
)
from pipeline.data import DATASETS
from pipeline.errors import PipelineError
from pipeline.files.io import atomic_write_text
from pipeline.sizes import PADDINGS, input_size_problem, output_size, prediction_tile_problem


def preset(name: str, dataset: str | None = None) -> Config:
    """Returns a fresh copy of the named preset for `dataset` (default: the embedded one).

    The data set's recipe for the preset, if it has one, is applied on top (`--dataset
    isbi2012 --preset cpu`); --config and --set still override it.
    """
    if name not in PRESETS:
        raise PipelineError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    config = PRESETS[name]()
    config.data.dataset = dataset or config.data.dataset
    described = DATASETS.get(config.data.dataset)  # an unknown name is refused by validate
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
    atomic_write_text(Path(path), yaml.safe_dump(config.to_dict(), sort_keys=False))


def load(path: str | Path) -> Config:
    """Reads a configuration written by `save` (or written by hand)."""
    return from_dict(read_file(path), str(path))


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
    "train.ema_momentum": Range(0, 1, open_high=True),  # 1 would never move the average
    "train.cldice_weight": Range(0),
    "train.cldice_iterations": Range(1),
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


def _check_folds(config: Config) -> None:
    """A fold among the folds; at least 3 folds, since one is tested, the next validates, the others train."""
    folds, fold = config.data.folds, config.data.fold
    _refuse("data.folds", folds, "must be 0 (off) or at least 3: one fold is tested, the next validates, "
            "the others train" if folds in (1, 2) else None)
    _refuse("data.fold", fold, (f"must lie in [0, {folds - 1}] with data.folds={folds}" if folds
                                else "needs data.folds > 0") if fold >= max(folds, 1) else None)


def validate(config: Config) -> None:
    """Raises a one-line error naming the first field, its value and what is allowed, if any is wrong.

    Checks everything the stages would otherwise trip on later, without TensorFlow.
    """
    _refuse("preset", config.preset, _choice_problem(config.preset, tuple(PRESETS)))
    _refuse("data.dataset", config.data.dataset, _choice_problem(config.data.dataset, tuple(DATASETS)))
    for dataset in DATASETS.values():
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
    _check_folds(config)
    _check_tile_sizes(config, DATASETS[config.data.dataset].image_size_setting)
    _refuse("export.name", config.export.name, _folder_name_problem(config.export.name))
