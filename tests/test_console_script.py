"""The `unet-pipeline` command that `pip install` adds: a stage as its subcommand
(`unet-pipeline predict -i IN -o OUT --model M`), --version, --help naming it, and help,
not training, when it is run bare; the same program as `run_pipeline.py --stage STAGE`."""

import ast
import importlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from pipeline import __version__, cli
from pipeline.cli import console, console_parser, main, parse
from pipeline.data.synthetic import synthetic_em_image

from same_outputs import assert_same_outputs

ROOT = Path(__file__).resolve().parents[1]
# The command as its console script starts it, with this checkout's code (the venv's own
# script may import another checkout's: it was installed from there).
COMMAND = "import sys; from pipeline.cli import console; sys.exit(console())"


def unet_pipeline(args: list, cwd: Path) -> subprocess.CompletedProcess:
    """`unet-pipeline ARGS` run in `cwd`."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-c", COMMAND, *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def setup_keywords(*names: str) -> list:
    """The values of these literal keyword arguments of setup.py's setup() call."""
    call = next(node for node in ast.walk(ast.parse((ROOT / "setup.py").read_text()))
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup")
    values = {keyword.arg: keyword.value for keyword in call.keywords}
    return [ast.literal_eval(values[name]) for name in names]


def test_setup_installs_the_command_this_module_describes():
    distribution, version, entry_points = setup_keywords("name", "version", "entry_points")
    [script] = entry_points["console_scripts"]
    name, target = script.split("=")
    module, function = target.split(":")
    assert name == cli.CONSOLE == distribution
    assert getattr(importlib.import_module(module), function) is console
    assert version == __version__


def test_version_help_and_a_bare_command_answer_without_tensorflow_and_write_nothing(tmp_path):
    probe = ("import sys\nfrom pipeline.cli import console\n"
             "for argv in (['--version'], [], ['predict', '--help']):\n"
             "    try:\n        code = console(argv)\n    except SystemExit as exit:\n        code = exit.code\n"
             "    print('exit', code)\n"
             "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))\n")
    process = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert process.returncode == 0 and process.stderr == "", process.stderr[-3000:]
    out = process.stdout.splitlines()
    assert out[0] == f"unet-pipeline {__version__}" and out[-1] == "[]"
    assert out.count("exit 0") == 3
    assert list(tmp_path.iterdir()) == []  # above all no runs/: a bare command trains nothing


def test_a_bare_command_prints_its_help_naming_every_stage(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert console([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: unet-pipeline [-h] [--version] STAGE ...")
    for stage in cli.EVERY:
        assert re.search(rf"^    {stage} +\S", out, re.MULTILINE), stage
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, usage", [
    (["--help"], "usage: unet-pipeline [-h]"),
    (["predict", "--help"], "usage: unet-pipeline predict [-h]"),
])
def test_help_names_the_command_it_was_invoked_as(capsys, argv, usage):
    with pytest.raises(SystemExit) as exit:
        console(argv)
    assert exit.value.code == 0 and capsys.readouterr().out.startswith(usage)
    with pytest.raises(SystemExit):
        main(["--help"])
    assert capsys.readouterr().out.startswith("usage: run_pipeline.py [-h]")


def options(stage: str) -> set[str]:
    """The options `unet-pipeline STAGE --help` lists."""
    commands = next(a for a in console_parser()._actions if a.dest == "stage")
    return {flag for action in commands.choices[stage]._actions for flag in action.option_strings}


def test_each_stage_lists_the_options_it_uses_and_run_pipeline_takes_them_all():
    assert {"-i", "--input", "-o", "--output", "--model", "--runner"} <= options("predict")
    assert not {"--init-from", "--strategy", "--prediction", "--split"} & options("predict")
    assert {"--init-from", "--strategy"} <= options("train") and not {"--input", "--model"} & options("train")
    assert {"--prediction", "--ground-truth", "--split", "--model", "-o"} <= options("evaluate")
    assert {"--model", "--init-from"} <= options("crossval") and "--input" not in options("crossval")
    every = {flag for action in cli.parser()._actions for flag in action.option_strings}
    assert set().union(*map(options, cli.EVERY)) | {"--stage"} == every


# (unet-pipeline's arguments, run_pipeline.py's): the same command.
SAME = [
    (["predict", "-i", "in.tif", "-o", "out", "--model", "m.zip"],
     ["--stage", "predict", "--model", "m.zip", "--input", "in.tif", "--output", "out"]),
    (["predict", "--runner", "beam", "-i", "list.txt", "-o", "out", "--", "--direct_num_workers=2"],
     ["--stage", "predict", "--runner", "beam", "--input", "list.txt", "--output", "out", "--", "--direct_num_workers=2"]),
    (["all", "--preset", "smoke", "--set", "train.epochs=1"], ["--preset", "smoke", "--set", "train.epochs=1"]),
    (["train", "--run-dir", "r", "--init-from", "w.keras", "--overwrite"],
     ["--stage", "train", "--run-dir", "r", "--init-from", "w.keras", "--overwrite"]),
    (["evaluate", "--prediction", "p.tif", "--ground-truth", "g.tif", "-o", "r.json"],
     ["--stage", "evaluate", "--prediction", "p.tif", "--ground-truth", "g.tif", "--output", "r.json"]),
    (["evaluate", "--split", "val", "--verbose"], ["--stage", "evaluate", "--split", "val", "--verbose"]),
    (["crossval", "--run-dir", "cv0", "--model", "cv1"], ["--stage", "crossval", "--run-dir", "cv0", "--model", "cv1"]),
    (["export", "--set", "export.version=3"], ["--stage", "export", "--set", "export.version=3"]),
    (["prepare", "--dataset", "isbi2012", "--data-dir", "d"], ["--stage", "prepare", "--dataset", "isbi2012",
                                                              "--data-dir", "d"]),
]


@pytest.mark.parametrize("subcommand, stage", SAME, ids=[case[0][0] for case in SAME])
def test_a_subcommand_is_the_same_command_as_run_pipeline_with_stage(subcommand, stage):
    assert vars(parse(subcommand, console_parser())) == vars(parse(stage))


@pytest.mark.parametrize("argv, expected", [
    (["fit"], "error: argument STAGE: invalid choice: 'fit' (choose from 'prepare', 'train', 'evaluate', "),
    (["--overwrite"], "error: the following arguments are required: STAGE"),
    (["train", "--input", "x.tif"], "error: unrecognized arguments: --input x.tif"),
    (["predict", "--model", "m.zip", "-i", "x.tif"], "error: predict --model needs --output"),
    (["predict", "-i", "x.tif", "--", "--direct_num_workers=2"], "error: options after -- are Beam pipeline options"),
])
def test_a_refused_subcommand_is_one_error_line_and_creates_nothing(capsys, tmp_path, monkeypatch, argv, expected):
    monkeypatch.chdir(tmp_path)
    assert console(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(expected) and captured.err.count("\n") == 1 and "usage" not in captured.err
    assert list(tmp_path.iterdir()) == []


def test_messages_name_a_stage_as_the_command_in_use_runs_it(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    missing = "error: r/prepared/manifest.json: not found; run {} first for this run directory\n"
    assert console(["evaluate", "--run-dir", "r"]) == 2
    assert capsys.readouterr().err == missing.format("unet-pipeline prepare")
    assert main(["--stage", "evaluate", "--run-dir", "r"]) == 2
    assert capsys.readouterr().err == missing.format("--stage prepare")
    assert list(tmp_path.iterdir()) == []


def test_predict_with_a_zoo_package_needs_no_run_and_writes_what_run_pipeline_writes(smoke_run, tmp_path):
    """The issue's acceptance: `unet-pipeline predict -i IN -o OUT --model ZIP` where no runs/ is."""
    from pipeline.files import model_source  # TensorFlow: only for the test that predicts

    package = smoke_run["exports"] / "unet" / "1" / model_source.EXPORT_PACKAGE
    image = tmp_path / "em.tif"
    tifffile.imwrite(image, synthetic_em_image(100, 3)[0])
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    process = unet_pipeline(["predict", "-i", image, "-o", "out", "--model", package], fresh)
    assert process.returncode == 0, process.stderr[-3000:]
    assert main(["--stage", "predict", "--model", str(package), "--input", str(image),
                 "--output", str(tmp_path / "by-stage")]) == 0
    assert sorted(p.name for p in fresh.iterdir()) == ["out"]  # no runs/ read or created
    mask = tifffile.imread(fresh / "out" / "em_mask.tif")
    assert 0 < np.count_nonzero(mask) < mask.size  # a segmentation, not an empty or full image
    assert_same_outputs(fresh / "out", tmp_path / "by-stage")  # written in another process


def documented_commands() -> list[str]:
    """Every `unet-pipeline ...` line in the README's and the user guide's code blocks."""
    lines = []
    for doc in (ROOT / "README.md", ROOT / "docs" / "user-guide.md"):
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), re.DOTALL):
            lines += [line.split("  #")[0] for line in block.splitlines() if line.startswith("unet-pipeline ")]
    return lines


def test_the_documented_commands_parse():
    commands = documented_commands()
    assert any(line.startswith("unet-pipeline predict -i ") and "--model" in line for line in commands)
    for line in commands:
        words = shlex.split(line.replace("\\", ""))[1:]
        parse(words, console_parser())  # a PipelineError names the wrong word
