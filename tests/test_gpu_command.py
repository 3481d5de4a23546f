"""The documented GPU path of the `paper` preset on ISBI 2012 (docs/results.md) runs end to end,
at a tiny scale on the CPU: scripts/gpu_paper.py's device steps train with Keras' JAX backend
and no TensorFlow (a JAX-only machine), the model comes back in parts, and TensorFlow evaluates
it here with test-time averaging, selected by the Rand error, and exports it."""

import argparse
import json
import os
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from pipeline.data.synthetic import synthetic_em_stack

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_paper.py"
# What makes it tiny: 2 filters, 3 levels and 92 px tiles (the paper's 5 levels at 572 px cost
# XLA 3 minutes of compiling on a 2-core CI machine), 2 steps.
TINY = ["--set", "model.base_filters=2", "--set", "model.depth=3", "--set", "train.tile_size=92",
        "--set", "train.epochs=1", "--set", "train.steps_per_epoch=2", "--set", "train.val_tiles_per_image=1"]
# Found first on PYTHONPATH by the device steps and every process they start: `import tensorflow`
# fails, as on the device, where there is none.
NO_TENSORFLOW = 'raise ImportError("no TensorFlow on the device")\n'

pytest.importorskip("jax", reason="the JAX path needs the jax extra (pip install .[jax])")


def documented_steps() -> list[list[str]]:
    """The `gpu_paper.py` steps of docs/results.md's GPU section, in order, as arguments."""
    section = (ROOT / "docs" / "results.md").read_text().split("### The paper's network on one GPU", 1)[1]
    section = section.split("\n### ", 1)[0]
    return [shlex.split(line.split("gpu_paper.py", 1)[1].split("#")[0]) for line in section.splitlines()
            if line.startswith(("python scripts/gpu_paper.py", "# device call"))]


def fake_isbi(folder: Path, slices: int, size: int) -> None:
    """The challenge's three files, of synthetic EM sections: membranes and cells the metrics find quickly."""
    folder.mkdir()
    images, instances = synthetic_em_stack(slices, size, seed=0)
    tifffile.imwrite(folder / "train-volume.tif", images)
    tifffile.imwrite(folder / "train-labels.tif", np.where(instances > 0, 255, 0).astype(np.uint8))
    tifffile.imwrite(folder / "test-volume.tif", synthetic_em_stack(2, size, seed=1)[0])


def _device_step(step: str, staging: Path, out: Path, *extra: str) -> None:
    """A device step, run as the device runs it: TensorFlow not importable (the JAX backend)."""
    blocker = staging.parent / "no-tensorflow"
    (blocker / "tensorflow").mkdir(parents=True, exist_ok=True)
    (blocker / "tensorflow" / "__init__.py").write_text(NO_TENSORFLOW)
    environment = dict(os.environ, GPU_PAPER_STAGING=str(staging), PYTHONPATH=os.pathsep.join([str(blocker), str(ROOT)]))
    subprocess.run([sys.executable, str(SCRIPT), step, "--out", str(out), *extra], env=environment, check=True,
                   cwd=ROOT, timeout=600)


def test_the_documented_gpu_path_runs_at_a_tiny_scale_without_tensorflow_on_the_device(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs/.latest of the prepare stage
    steps = documented_steps()
    assert [step[0] for step in steps] == ["pack", "device", "fetch", "unpack"]
    data = tmp_path / "isbi"
    fake_isbi(data, slices=10, size=200)  # test 4, validation 4, training 2 slices
    # `pack` downloads wheels (network): the test's Python already has Keras. The device steps:
    staging, first, second = tmp_path / "staging", tmp_path / "first", tmp_path / "second"
    _device_step("device", staging, first, "--data-dir", str(data), *TINY)
    _device_step("fetch", staging, second)
    timings = json.loads((second / "timings.json").read_text())
    assert timings["tiles_per_s"] > 0 and timings["train_s"] > 0
    returned = sorted(first.iterdir()) + sorted(second.iterdir())
    assert all(path.stat().st_size <= 16 * 2**20 for path in returned) and len(list(first.iterdir())) <= 8
    # Here, with TensorFlow: the documented unpack, on the returned files.
    unpack = steps[3]
    run_dir = tmp_path / "run"
    assert unpack[unpack.index("--run-dir") + 1] and unpack[unpack.index("--data-dir") + 1]
    script = runpy.run_path(str(SCRIPT))  # in this process, whose TensorFlow is loaded already
    script["unpack"](argparse.Namespace(files=[str(path) for path in returned], run_dir=str(run_dir),
                                        data_dir=str(data)))
    assert set(json.loads((run_dir / "train" / "best.json").read_text())) == {"val_rand_error", "epoch"}
    report = json.loads((run_dir / "evaluation" / "report.json").read_text())
    assert report["split"] == "test" and report["model_selection"].startswith("held out")
    assert "without_test_time_augmentation" in report  # the paper's averaging, and the score without it
    assert any((run_dir / "export").rglob("saved_model.pb"))
