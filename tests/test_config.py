import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import resolve as configuration
from pipeline.config.presets import PRESETS
from pipeline.config.schema import Config
from pipeline.data import DATASETS
from pipeline.errors import PipelineError


def test_presets_differ_where_they_should():
    paper, cpu, smoke = (configuration.preset(n) for n in ("paper", "cpu", "smoke"))
    assert (paper.model.depth, paper.model.base_filters, paper.train.tile_size) == (5, 64, 572)
    assert (paper.train.optimizer, paper.train.momentum, paper.train.batch_size) == ("sgd", 0.99, 1)
    assert cpu.model.base_filters < paper.model.base_filters and cpu.train.tile_size < 572
    assert smoke.train.epochs * smoke.train.steps_per_epoch < cpu.train.epochs * cpu.train.steps_per_epoch
    with pytest.raises(PipelineError, match="unknown preset 'gpu'"):
        configuration.preset("gpu")


def test_set_overrides_are_typed():
    overrides = configuration.parse_set(["train.epochs=45", "train.learning_rate=1e-2", "data.data_dir=/x",
                                         "augment.flip=false", "data.data_dir=null"])
    config = configuration.apply_overrides(configuration.preset("cpu"), overrides, "--set")
    assert config.train.epochs == 45 and config.train.learning_rate == 0.01
    assert config.augment.flip is False and config.data.data_dir is None
    assert configuration.preset("cpu").train.epochs != 45  # presets are not mutated


@pytest.mark.parametrize("assignment,message", [
    ("train.epochs=many", r"train.epochs: expected int, got 'many'"),
    ("train.epoch=3", "unknown field train.epoch"),
    ("trainer.epochs=3", "unknown configuration section 'trainer'"),
    ("epochs=3", "expected section.field=value"),
])
def test_bad_overrides_are_refused_with_one_line(assignment, message):
    with pytest.raises(PipelineError, match=message):
        configuration.apply_overrides(configuration.preset("cpu"), configuration.parse_set([assignment]), "--set")


def test_saved_config_reproduces_the_run(tmp_path):
    config = configuration.apply_overrides(configuration.preset("smoke"), {"train": {"seed": 7}}, "test")
    configuration.save(config, tmp_path / "config.yaml")
    assert configuration.load(tmp_path / "config.yaml") == config


def test_the_data_section_of_an_earlier_run_loads_as_it_was_saved(tmp_path):
    # As runs saved it before the data sets' own settings were described in pipeline.data.
    saved = {"dataset": "isbi2012", "data_dir": "/data/isbi", "seed": 0, "image_size": 128, "num_train": 4,
             "num_val": 1, "num_test": 2, "val_slices": 3, "test_slices": 4, "val_images": 1}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"preset": "smoke", "data": saved}))
    config = configuration.load(tmp_path / "config.yaml")
    assert dataclasses.asdict(config.data) == saved | {"folds": 0, "fold": 0}  # fields added since: their defaults
    configuration.validate(config)


def test_json_and_yaml_files(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"preset": "smoke", "model": {"base_filters": 6}}))
    (tmp_path / "c.yaml").write_text("train:\n  epochs: 2\n")
    assert configuration.load(tmp_path / "c.json").model.base_filters == 6
    assert configuration.read_file(tmp_path / "c.yaml") == {"train": {"epochs": 2}}
    (tmp_path / "bad.yaml").write_text("train: [1, 2\n")
    with pytest.raises(PipelineError, match="bad.yaml: not valid YAML/JSON"):
        configuration.read_file(tmp_path / "bad.yaml")


def test_a_data_set_recipe_applies_under_explicit_overrides(tmp_path):
    from pipeline.cli import parser, resolve, run_dir

    def resolved(*argv):
        args = parser().parse_args(["--run-dir", str(tmp_path / str(len(list(tmp_path.iterdir())))), *argv])
        return resolve(args, run_dir(args))

    isbi = resolved("--dataset", "isbi2012", "--preset", "cpu")
    recipe = DATASETS["isbi2012"].recipes["cpu"]
    assert (isbi.model.depth, isbi.train.tile_size) == (recipe["model"]["depth"], recipe["train"]["tile_size"])
    assert isbi.augment == configuration.preset("cpu").augment  # untouched sections stay the preset's
    assert resolved("--set", "data.dataset=isbi2012").model.depth == isbi.model.depth
    assert resolved("--dataset", "isbi2012", "--set", "model.depth=4").model.depth == 4
    assert resolved("--dataset", "synthetic") == configuration.preset("cpu", "synthetic") == configuration.preset("cpu")
    assert resolved("--dataset", "isbi2012", "--preset", "paper").predict.test_time_augmentation


def test_the_isbi_recipe_is_the_one_its_results_describe():
    """docs/results.md quotes the recipe's training beside the scores it got: the two must agree."""
    docs = " ".join((Path(__file__).resolve().parents[1] / "docs" / "results.md").read_text().split())
    found = re.search(r"(\d+)-filter U-Net \([\d.]+ M parameters\) for ([\d,]+) steps of (\d+) tiles of (\d+) px", docs)
    assert found, "docs/results.md no longer describes the ISBI cpu recipe"
    filters, steps, batch, tile = (int(group.replace(",", "")) for group in found.groups())
    isbi = configuration.preset("cpu", "isbi2012")
    assert (filters, batch, tile) == (isbi.model.base_filters, isbi.train.batch_size, isbi.train.tile_size)
    assert steps == isbi.train.epochs * isbi.train.steps_per_epoch


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("dataset", [None, *DATASETS])
def test_every_preset_and_recipe_validates(name, dataset):
    configuration.validate(configuration.preset(name, dataset))


def test_every_recipe_is_among_the_validated_combinations():
    assert {preset for dataset in DATASETS.values() for preset in dataset.recipes} <= set(PRESETS)


def smoke_with(*assignments: str) -> Config:
    """The smoke preset with `section.field=value` assignments, as --set applies them."""
    overrides = configuration.parse_set(list(assignments))
    return configuration.apply_overrides(configuration.preset("smoke"), overrides, "--set")


# One bad value per checked field, set on the smoke preset (depth 3, 92 px tiles).
BAD_VALUES = [
    (["data.dataset=mnist"], "data.dataset"),
    (["data.seed=-1"], "data.seed"),
    (["data.image_size=0"], "data.image_size"),
    (["data.image_size=40"], "data.image_size"),  # smaller than the 52 px output window
    (["data.num_train=0"], "data.num_train"),
    (["data.num_val=0"], "data.num_val"),
    (["data.num_test=0"], "data.num_test"),
    (["data.val_slices=0"], "data.val_slices"),
    (["data.val_images=0"], "data.val_images"),
    (["model.depth=1"], "model.depth"),
    (["model.base_filters=0"], "model.base_filters"),
    (["model.num_classes=1"], "model.num_classes"),
    (["model.input_channels=0"], "model.input_channels"),
    (["model.dropout=1"], "model.dropout"),
    (["model.dropout=-0.1"], "model.dropout"),
    (["model.padding=full"], "model.padding"),
    (["weight_map.w0=-1"], "weight_map.w0"),
    (["weight_map.w0=.inf"], "weight_map.w0"),
    (["weight_map.sigma=0"], "weight_map.sigma"),
    (["weight_map.sigma=.nan"], "weight_map.sigma"),
    (["weight_map.separation=0"], "weight_map.separation"),
    (["augment.elastic_grid=1"], "augment.elastic_grid"),
    (["augment.elastic_sigma=-1"], "augment.elastic_sigma"),
    (["augment.interpolation=nearest"], "augment.interpolation"),
    (["augment.brightness=-0.1"], "augment.brightness"),
    (["augment.contrast=1"], "augment.contrast"),
    (["augment.contrast=-0.1"], "augment.contrast"),
    (["augment.gamma=-0.2"], "augment.gamma"),
    (["train.seed=-1"], "train.seed"),
    (["train.tile_size=93"], "train.tile_size"),
    (["train.batch_size=0"], "train.batch_size"),
    (["train.epochs=0"], "train.epochs"),
    (["train.steps_per_epoch=0"], "train.steps_per_epoch"),
    (["train.optimizer=rmsprop"], "train.optimizer"),
    (["train.learning_rate=0"], "train.learning_rate"),
    (["train.learning_rate=.nan"], "train.learning_rate"),
    (["train.momentum=1"], "train.momentum"),
    (["train.ema_momentum=1"], "train.ema_momentum"),  # the average would never move
    (["train.ema_momentum=-0.5"], "train.ema_momentum"),
    (["train.cldice_weight=-1"], "train.cldice_weight"),
    (["train.cldice_weight=.inf"], "train.cldice_weight"),
    (["train.cldice_iterations=0"], "train.cldice_iterations"),
    (["train.val_tiles_per_image=0"], "train.val_tiles_per_image"),
    (["train.early_stopping_patience=-1"], "train.early_stopping_patience"),
    (["train.lr_schedule=step"], "train.lr_schedule"),
    (["train.warmup_steps=-1"], "train.warmup_steps"),
    (["train.warmup_steps=60"], "train.warmup_steps"),  # all of the smoke preset's 4 x 15 steps
    (["train.select_by=val_iou"], "train.select_by"),
    (["train.include_validation=true", "train.select_by=val_rand_error"], "train.select_by"),
    (["train.include_validation=true", "train.early_stopping_patience=2"], "train.early_stopping_patience"),
    (["train.select_by=last", "train.early_stopping_patience=2"], "train.early_stopping_patience"),
    (["data.test_slices=-1"], "data.test_slices"),
    (["predict.max_whole_pixels=0"], "predict.max_whole_pixels"),
    (["predict.chunk_size=0"], "predict.chunk_size"),
    (["train.strategy=tpu"], "train.strategy"),
    (["train.precision=float16"], "train.precision"),
    (["predict.tile_size=101"], "predict.tile_size"),
    (["model.depth=4", "predict.tile_size=92"], "predict.tile_size"),  # valid, but a 4 px output < alignment 8
    (["predict.tiles_per_batch=0"], "predict.tiles_per_batch"),
    (["predict.threshold=2"], "predict.threshold"),
    (["predict.threshold=.nan"], "predict.threshold"),
    (["predict.instances=stardist"], "predict.instances"),
    (["predict.min_size=0"], "predict.min_size"),
    (["export.name="], "export.name"),
    (["export.name=a/b"], "export.name"),
    (["export.name=.."], "export.name"),
    (["export.name=.hidden"], "export.name"),
    (["export.version=-1"], "export.version"),
]


@pytest.mark.parametrize("assignments,field", BAD_VALUES)
def test_a_bad_value_is_refused_with_one_line_naming_its_field(assignments, field):
    with pytest.raises(PipelineError, match=rf"^{re.escape(field)}=") as refused:
        configuration.validate(smoke_with(*assignments))
    assert "\n" not in str(refused.value)


def test_an_unknown_preset_is_refused():
    with pytest.raises(PipelineError, match="^preset='gpu': must be one of paper, cpu, smoke$"):
        configuration.validate(dataclasses.replace(configuration.preset("smoke"), preset="gpu"))


@pytest.mark.parametrize("assignment,message", [
    ("predict.tile_size=101", "predict.tile_size=101: not a valid tile size for a U-Net of depth 3 "
                              "(every pooling needs an even size; nearest valid sizes: 100 and 104)"),
    ("train.tile_size=20", "train.tile_size=20: not a valid tile size for a U-Net of depth 3 "
                           "(the smallest valid size is 44)"),
    ("data.image_size=40", "data.image_size=40: must be at least 52, the output window of train.tile_size=92"),
    ("train.steps_per_epoch=0", "train.steps_per_epoch=0: must be at least 1"),
    ("predict.threshold=2", "predict.threshold=2: must lie in [0, 1]"),
    ("predict.instances=stardist", "predict.instances='stardist': must be one of components, watershed"),
    ("predict.min_size=0", "predict.min_size=0: must be at least 1"),
    ("train.learning_rate=.inf", "train.learning_rate=inf: must be a finite number greater than 0"),
    ("train.precision=float16", "train.precision='float16': must be one of float32, mixed_float16, mixed_bfloat16"),
])
def test_the_message_says_what_is_allowed(assignment, message):
    with pytest.raises(PipelineError) as refused:
        configuration.validate(smoke_with(assignment))
    assert str(refused.value) == message


def test_the_synthetic_image_size_is_not_checked_against_other_data_sets():
    # Their images are read later; pipeline.training.input_pipeline checks them against the tile.
    config = configuration.apply_overrides(configuration.preset("smoke", "isbi2012"),
                                           {"data": {"image_size": 40}}, "test")
    configuration.validate(config)


def test_validating_loads_neither_tensorflow_nor_keras():
    probe = ("import sys; from pipeline.config import resolve; resolve.validate(resolve.preset('cpu')); "
             "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.stdout.strip() == "[]"
