"""The command line as a careless user meets it: every mistake is refused with one line and
changes nothing; the run directory and saved_models/ have one owner each."""

import hashlib
import json
import os
import re
import resource
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from pipeline.cli import main
from pipeline.config import resolve as configuration
from pipeline.files import io
from test_data import isbi_folder

ROOT = Path(__file__).resolve().parents[1]
# TensorFlow's own start-up lines on stderr, which no setting turns off in TF 2.21.
TF_CHATTER = re.compile(r"^(WARNING: All log messages before absl::InitializeLog|[IWE]\d{4} \d\d:\d\d:\d\d)")


def pipeline(args: list[str], cwd: Path, fsize: int | None = None) -> subprocess.CompletedProcess:
    """run_pipeline.py as a user starts it; `fsize` caps the size of any file it writes."""
    limit = (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))) if fsize else None
    return subprocess.run([sys.executable, str(ROOT / "run_pipeline.py"), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, preexec_fn=limit, timeout=300)


def error_line(process: subprocess.CompletedProcess) -> str:
    """The one line a refused command prints, after checking it is the only one."""
    lines = [line for line in process.stderr.splitlines() if line.strip() and not TF_CHATTER.match(line)]
    assert process.returncode == 2, process.stderr[-3000:]
    assert "Traceback" not in process.stderr and len(lines) == 1, process.stderr[-3000:]
    assert lines[0].startswith("error: ")
    return lines[0]


def snapshot(*folders: Path) -> dict[str, str]:
    """Every file under the folders with its hash and mode, and every folder."""
    state = {}
    for folder in folders:
        for path in sorted(Path(folder).rglob("*")):
            mode = oct(path.stat().st_mode)
            state[str(path)] = f"{mode} " + (hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir")
    return state


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Bad inputs, one file or folder each."""
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    tifffile.imwrite(folder / "rgb.tif", rng.integers(0, 255, (128, 128, 3), np.uint8), photometric="rgb")
    nan = rng.uniform(size=(40, 40)).astype(np.float32)
    nan[5, 7] = np.nan
    tifffile.imwrite(folder / "nan.tif", nan)
    (folder / "nan_folder").mkdir()
    tifffile.imwrite(folder / "nan_folder" / "a_good.tif", rng.uniform(size=(40, 40)).astype(np.float32))
    tifffile.imwrite(folder / "nan_folder" / "b_bad.tif", nan)
    (folder / "twins").mkdir()
    tifffile.imwrite(folder / "twins" / "x.tif", rng.integers(0, 255, (40, 40), np.uint8))
    cv2.imwrite(str(folder / "twins" / "x.png"), rng.integers(0, 255, (40, 40), np.uint8))
    cv2.imwrite(str(folder / "big.png"), rng.integers(0, 255, (300, 300), np.uint8))
    (folder / "a_file").write_text("not a folder")
    (folder / "a_folder").mkdir()
    tifffile.imwrite(folder / "prob.tif", rng.uniform(size=(32, 32)).astype(np.float32))
    tifffile.imwrite(folder / "truth.tif", np.where(rng.random((32, 32)) < 0.7, 255, 0).astype(np.uint8))
    return folder


# (name, arguments after `--run-dir RUN`, text the error line must contain). RUN is the
# trained smoke run, IN the folder of bad inputs, OUT a fresh output folder, EXPORTS the
# export root the run publishes to.
BAD_INVOCATIONS = [
    ("retrain a finished run", ["--stage", "train", "--set", "train.epochs=30"], "train.epochs"),
    ("retrain without overwrite", ["--stage", "train"], "best.keras: already exists"),
    ("invalid prediction tile", ["--stage", "evaluate", "--set", "predict.tile_size=101"], "predict.tile_size"),
    ("zero tiles per batch", ["--stage", "predict", "--set", "predict.tiles_per_batch=0"], "predict.tiles_per_batch"),
    ("threshold above 1", ["--stage", "evaluate", "--set", "predict.threshold=2"], "predict.threshold"),
    ("zero steps per epoch", ["--stage", "train", "--overwrite", "--set", "train.steps_per_epoch=0"],
     "train.steps_per_epoch"),
    ("zero epochs", ["--stage", "train", "--overwrite", "--set", "train.epochs=0"], "train.epochs"),
    ("negative epochs", ["--stage", "train", "--overwrite", "--set", "train.epochs=-1"], "train.epochs"),
    ("zero batch", ["--stage", "train", "--overwrite", "--set", "train.batch_size=0"], "train.batch_size"),
    ("unknown field", ["--stage", "evaluate", "--set", "predict.tile=92"], "predict.tile"),
    ("other preset", ["--stage", "evaluate", "--preset", "paper"], "preset"),
    ("model changed under a trained model", ["--stage", "predict", "--set", "model.base_filters=16"], "model.base_filters"),
    ("data changed under a trained model", ["--stage", "evaluate", "--set", "weight_map.w0=5"], "weight_map.w0"),
    ("prepare over a trained model", ["--stage", "prepare"], "best.keras"),
    ("colour TIFF for a grey model", ["--stage", "predict", "--input", "IN/rgb.tif", "--output", "OUT"], "rgb.tif"),
    ("two inputs with one name", ["--stage", "predict", "--input", "IN/twins", "--output", "OUT"], "x.png"),
    ("NaN in an input", ["--stage", "predict", "--input", "IN/nan.tif", "--output", "OUT"], "nan.tif"),
    ("NaN in a folder's second input", ["--stage", "predict", "--input", "IN/nan_folder", "--output", "OUT"],
     "b_bad.tif"),
    ("output folder is a file", ["--stage", "predict", "--input", "IN/big.png", "--output", "IN/a_file"], "a_file"),
    ("existing export version", ["--stage", "export", "--set", "export.version=1"], "export version 1 already exists"),
    ("export name with a slash", ["--stage", "export", "--set", "export.name=../elsewhere"], "export.name"),
    ("missing config file", ["--stage", "evaluate", "--config", "IN/missing.yaml"], "missing.yaml"),
    ("beam runner for training", ["--stage", "train", "--runner", "beam"], "--runner beam"),
    ("beam options without the beam runner", ["--stage", "predict", "--", "--direct_num_workers=2"],
     "Beam pipeline options"),
]


@pytest.mark.parametrize("name,args,expected", BAD_INVOCATIONS, ids=[case[0] for case in BAD_INVOCATIONS])
def test_bad_invocation_is_refused_with_one_line_and_changes_nothing(smoke_run, inputs, tmp_path, name, args, expected):
    run_dir, exports = smoke_run["run_dir"], smoke_run["exports"]
    out = tmp_path / "out"
    replaced = [str(a).replace("IN", str(inputs)).replace("OUT", str(out)) for a in args]
    before = snapshot(run_dir, exports, inputs)
    line = error_line(pipeline(["--run-dir", run_dir, "--set", f"export.root={exports}", *replaced], tmp_path))
    assert expected in line
    assert snapshot(run_dir, exports, inputs) == before
    assert not out.exists()


@pytest.mark.parametrize("args, expected", [
    (["--preset", "huge"], "error: argument --preset: invalid choice: 'huge' (choose from 'cpu', 'paper', 'smoke')"),
    (["--dataset", "isbi"], "error: argument --dataset: invalid choice: 'isbi' (choose from 'synthetic', 'isbi2012', "),
    (["--stage", "fit"], "error: argument --stage: invalid choice: 'fit' (choose from 'prepare', 'train', "),
    (["--stage", "train", "--epochs", "3"], "error: unrecognized arguments: --epochs 3"),
    (["--stage", "train", "--run-dir"], "error: argument --run-dir: expected one argument"),
])
def test_a_bad_argument_is_one_error_line_naming_the_choices(capsys, args, expected):
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(expected) and captured.err.count("\n") == 1 and "usage" not in captured.err


def test_help_still_prints_the_usage(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--help"])
    assert exit.value.code == 0 and capsys.readouterr().out.startswith("usage: run_pipeline.py")


def test_run_directory_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "run").write_text("")
    line = error_line(pipeline(["--stage", "prepare", "--preset", "smoke", "--run-dir", "run"], tmp_path))
    assert line == "error: run: run directory is a file, not a folder"


def test_refused_new_run_creates_nothing(tmp_path):
    line = error_line(pipeline(["--stage", "all", "--preset", "smoke", "--set", "train.steps_per_epoch=0"], tmp_path))
    assert "train.steps_per_epoch" in line and list(tmp_path.iterdir()) == []


def test_evaluate_output_that_is_a_folder_is_refused(inputs, tmp_path):
    before = snapshot(inputs)
    line = error_line(pipeline(["--stage", "evaluate", "--prediction", inputs / "prob.tif", "--ground-truth",
                                inputs / "truth.tif", "--output", inputs / "a_folder"], tmp_path))
    assert "a_folder" in line and snapshot(inputs) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders: no way to test it as root")
def test_read_only_output_folder_is_refused_before_the_work(smoke_run, inputs, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        line = error_line(pipeline(["--stage", "predict", "--run-dir", smoke_run["run_dir"], "--input",
                                    inputs / "big.png", "--output", locked], tmp_path))
    finally:
        locked.chmod(0o755)
    assert "locked" in line and list(locked.iterdir()) == []


def test_a_full_disk_leaves_no_partial_output_set(smoke_run, inputs, tmp_path):
    # A file-size limit makes writes fail as a full disk does (EFBIG instead of ENOSPC):
    # the 300x300 probability map (360 kB) does not fit in 100 kB.
    out = tmp_path / "out"
    out.mkdir()
    line = error_line(pipeline(["--stage", "predict", "--run-dir", smoke_run["run_dir"], "--input",
                                inputs / "big.png", "--output", out], tmp_path, fsize=100_000))
    assert "big_prob.tif" in line and "File too large" in line
    assert list(out.iterdir()) == []


def test_without_run_dir_the_last_prepared_run_is_used_and_named(tmp_path):
    """A named run (runs/kill) sorts after every dated one: it must not be picked for that."""
    quick = ["--preset", "smoke", "--set", "data.num_train=1", "--set", "data.num_test=1"]
    assert pipeline(["--stage", "prepare", "--run-dir", "runs/kill", *quick], tmp_path).returncode == 0
    assert pipeline(["--stage", "prepare", *quick], tmp_path).returncode == 0
    [dated] = [p for p in (tmp_path / "runs").iterdir() if p.name not in ("kill", ".latest")]
    process = pipeline(["--stage", "evaluate"], tmp_path)
    assert f"using run directory runs/{dated.name}" in process.stdout
    assert f"runs/{dated.name}/train/best.keras: not found" in error_line(process)


def test_without_any_prepared_run_the_error_says_what_to_do(tmp_path):
    assert "run --stage prepare first or give --run-dir" in error_line(pipeline(["--stage", "train"], tmp_path))


@pytest.fixture
def trained(smoke_run, tmp_path) -> Path:
    """A copy of the trained smoke run, for commands that change its configuration."""
    return shutil.copytree(smoke_run["run_dir"], tmp_path / "trained")


def test_files_get_the_mode_the_umask_gives(trained, inputs, tmp_path):
    previous = os.umask(0o027)
    try:
        assert main(["--stage", "predict", "--run-dir", str(trained), "--input", str(inputs / "big.png"),
                     "--output", str(tmp_path / "out")]) == 0
        assert main(["--stage", "export", "--run-dir", str(trained),
                     "--set", f"export.root={tmp_path / 'saved'}"]) == 0
    finally:
        os.umask(previous)
    written = [p for p in (tmp_path / "out").iterdir()] + [p for p in (tmp_path / "saved").rglob("*") if p.is_file()]
    assert len(written) > 5
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, path


def test_stage_all_keeps_its_export_in_the_run_and_records_where_a_version_came_from(smoke_run):
    run_dir, exports = smoke_run["run_dir"], smoke_run["exports"]
    assert not smoke_run["exports_after_all"], "--stage all wrote into the shared export root"
    assert (run_dir / "export" / "unet" / "1" / "saved_model.pb").is_file()
    provenance = json.loads((exports / "unet" / "1" / "assets.extra" / "provenance.json").read_text())
    report = json.loads((run_dir / "evaluation" / "report.json").read_text())
    assert provenance["run_dir"] == str(run_dir.resolve()) and provenance["version"] == 1
    assert provenance["configuration"]["preset"] == "smoke"
    assert provenance["evaluation"]["rand_error"] == report["overall"]["rand_error"]
    assert provenance["model_sha256"] == hashlib.sha256((run_dir / "train" / "best.keras").read_bytes()).hexdigest()
    assert report["model_sha256"] == provenance["model_sha256"]  # the evaluation names the model it scored
    assert provenance["exported_at"].startswith("20")


def test_an_export_killed_earlier_leaves_no_scratch_folder_behind(trained, tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    # Named as an export writing versions 1 and 2 names them: the first's writer has died.
    abandoned = tmp_path / "saved" / "unet" / io.scratch_name("new-1").replace(f"-{os.getpid()}-", f"-{dead.pid}-")
    (abandoned / "variables").mkdir(parents=True)
    alive = tmp_path / "saved" / "unet" / io.scratch_name("new-2")
    alive.mkdir()
    assert main(["--stage", "export", "--run-dir", str(trained), "--set", f"export.root={tmp_path / 'saved'}"]) == 0
    assert not abandoned.exists() and alive.exists()


def test_overwriting_a_longer_stack_leaves_no_stale_overlays(smoke_run, tmp_path):
    rng = np.random.default_rng(5)
    out, image = tmp_path / "out", tmp_path / "in" / "stack.tif"
    image.parent.mkdir()
    args = ["--stage", "predict", "--run-dir", str(smoke_run["run_dir"]), "--input", str(image), "--output", str(out)]
    tifffile.imwrite(image, rng.integers(0, 255, (3, 30, 30), np.uint8), photometric="minisblack")
    assert main(args) == 0
    tifffile.imwrite(image, rng.integers(0, 255, (2, 30, 30), np.uint8), photometric="minisblack")
    assert main(args + ["--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "stack_instances.csv", "stack_labels.tif", "stack_mask.tif", "stack_overlay_000.png", "stack_overlay_001.png",
        "stack_prob.tif"]
    tifffile.imwrite(image, rng.integers(0, 255, (30, 30), np.uint8), photometric="minisblack")
    assert main(args + ["--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "stack_instances.csv", "stack_labels.tif", "stack_mask.tif", "stack_overlay.png", "stack_prob.tif"]


def test_a_run_model_loads_without_importing_the_training_stage(smoke_run):
    script = ("import sys; from pipeline.inference.segmenter import load_model; "
              "from pipeline.files.rundir import RunDir; "
              f"load_model(RunDir({str(smoke_run['run_dir'])!r}).trained_model()); "
              "assert not [m for m in sys.modules if m == 'pipeline.stages.train' or m.startswith('pipeline.training')]")
    process = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert process.returncode == 0, process.stderr[-2000:]


def test_relative_input_paths_are_recorded_as_the_folders_they_named(tmp_path, monkeypatch):
    """A later command from another working directory (a resumed cross-validation preparing its next
    fold) must read the files this one meant."""
    isbi_folder(tmp_path / "isbi")
    monkeypatch.chdir(tmp_path)
    assert main(["--stage", "prepare", "--preset", "smoke", "--dataset", "isbi2012", "--data-dir", "isbi",
                 "--run-dir", "run", "--set", "data.val_slices=2", "--set", "data.test_slices=0",
                 "--set", "train.init_from=weights/best.keras"]) == 0
    saved = configuration.load(tmp_path / "run" / "config.yaml")
    assert (saved.data.data_dir, saved.train.init_from) == (str(tmp_path / "isbi"),
                                                           str(tmp_path / "weights" / "best.keras"))
