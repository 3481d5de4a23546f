"""The documented GPU command of the `paper` preset on ISBI 2012 (docs/results.md) runs end to
end, at a tiny scale on the CPU: every stage, XLA, selection by the Rand error and a
held-out test score."""

import json
import shlex
from pathlib import Path

import numpy as np
import tifffile
import yaml

from pipeline.cli import main
from pipeline.data.synthetic import synthetic_em_stack

ROOT = Path(__file__).resolve().parents[1]
# What makes it tiny: the paper's shapes and tiles, but 2 filters and 2 steps.
TINY = ["--set", "model.base_filters=2", "--set", "train.epochs=1", "--set", "train.steps_per_epoch=2",
        "--set", "train.val_tiles_per_image=1"]


def documented_command() -> list[str]:
    """The one `python run_pipeline.py ... --preset paper ...` line of docs/results.md, as arguments."""
    lines = [line for line in (ROOT / "docs" / "results.md").read_text().splitlines()
             if line.startswith("python run_pipeline.py") and "train.jit_compile=true" in line]
    assert len(lines) == 1, lines
    words = shlex.split(lines[0])
    assert words[:2] == ["python", "run_pipeline.py"]
    return words[2:]


def fake_isbi(folder: Path, slices: int, size: int) -> None:
    """The challenge's three files, of synthetic EM sections: membranes and cells the metrics find quickly."""
    folder.mkdir()
    images, instances = synthetic_em_stack(slices, size, seed=0)
    tifffile.imwrite(folder / "train-volume.tif", images)
    tifffile.imwrite(folder / "train-labels.tif", np.where(instances > 0, 255, 0).astype(np.uint8))
    tifffile.imwrite(folder / "test-volume.tif", synthetic_em_stack(2, size, seed=1)[0])


def test_the_documented_gpu_command_runs_at_a_tiny_scale(tmp_path):
    args = documented_command()
    assert args[args.index("--preset") + 1] == "paper" and args[args.index("--dataset") + 1] == "isbi2012"
    data = tmp_path / "isbi"
    fake_isbi(data, slices=10, size=400)  # test 4, validation 4, training 2 slices of 400 px
    args[args.index("--data-dir") + 1] = str(data)
    run_dir = tmp_path / "run"
    assert main([*args, "--run-dir", str(run_dir), *TINY]) == 0
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["train"]["precision"] == "float32" and config["train"]["jit_compile"]
    assert (config["train"]["tile_size"], config["model"]["depth"]) == (572, 5)
    assert json.loads((run_dir / "train" / "best.json").read_text())["epoch"] == 1
    report = json.loads((run_dir / "evaluation" / "report.json").read_text())
    assert report["split"] == "test" and report["model_selection"].startswith("held out")
    assert "without_test_time_augmentation" in report  # the paper's averaging, and the score without it
    assert any((run_dir / "export").rglob("saved_model.pb"))
