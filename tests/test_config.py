import json

import pytest

from pipeline import config as configuration
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


def test_json_and_yaml_files(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"preset": "smoke", "model": {"base_filters": 6}}))
    (tmp_path / "c.yaml").write_text("train:\n  epochs: 2\n")
    assert configuration.load(tmp_path / "c.json").model.base_filters == 6
    assert configuration.read_file(tmp_path / "c.yaml") == {"train": {"epochs": 2}}
    (tmp_path / "bad.yaml").write_text("train: [1, 2\n")
    with pytest.raises(PipelineError, match="bad.yaml: not valid YAML/JSON"):
        configuration.read_file(tmp_path / "bad.yaml")


def test_a_data_set_recipe_applies_under_explicit_overrides(tmp_path):
    from pipeline.cli import parser, resolve

    def resolved(*argv):
        return resolve(parser().parse_args(["--run-dir", str(tmp_path / str(len(list(tmp_path.iterdir())))), *argv]))[0]

    isbi = resolved("--dataset", "isbi2012", "--preset", "cpu")
    recipe = configuration.RECIPES[("cpu", "isbi2012")]
    assert (isbi.model.depth, isbi.train.tile_size) == (recipe["model"]["depth"], recipe["train"]["tile_size"])
    assert isbi.augment == configuration.preset("cpu").augment  # untouched sections stay the preset's
    assert resolved("--set", "data.dataset=isbi2012").model.depth == isbi.model.depth
    assert resolved("--dataset", "isbi2012", "--set", "model.depth=4").model.depth == 4
    assert resolved("--dataset", "synthetic") == configuration.preset("cpu", "synthetic") == configuration.preset("cpu")
    assert resolved("--dataset", "isbi2012", "--preset", "paper").predict.test_time_augmentation
