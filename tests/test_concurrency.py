"""Two commands at once: real processes started together, many times, nothing lost, every refusal one line.

The run lock (`RunDir.lock`) is tested first on its own, in many rounds of small processes
that do nothing but hold it, then through the command line: two trainings of one run,
commands that read or rewrite a run while it trains, exports that publish into one root.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.files import model_file
from test_cli import error_line, pipeline

ROOT = Path(__file__).resolve().parents[1]
PYTHON = Path(sys.executable).name  # how a holder's command line starts

HOLD = textwrap.dedent("""
    import sys, time
    from pipeline.errors import PipelineError
    from pipeline.files.rundir import RunDir
    try:
        with RunDir(sys.argv[1]).lock(exclusive=sys.argv[2] == "exclusive"):
            print("in", flush=True)
            time.sleep(float(sys.argv[3]))
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
""")


def holder(run: Path, mode: str, seconds: float) -> subprocess.Popen:
    """A process that holds the run lock in `mode` for `seconds`."""
    return subprocess.Popen([sys.executable, "-c", HOLD, str(run), mode, str(seconds)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished(process: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = process.communicate(timeout=600)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def start(args: list, cwd: Path) -> subprocess.Popen:
    """run_pipeline.py started in the background, as a user in a second terminal would."""
    return subprocess.Popen([sys.executable, str(ROOT / "run_pipeline.py"), *map(str, args)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.parametrize("round_", range(8))
def test_of_two_writers_started_together_one_is_refused_naming_the_other(tmp_path, round_):
    run = tmp_path / "run"
    first, second = holder(run, "exclusive", 1.5), holder(run, "exclusive", 1.5)
    results = [finished(first), finished(second)]
    admitted = [r for r in results if r.returncode == 0]
    refused = [r for r in results if r.returncode != 0]
    assert len(admitted) == 1 and admitted[0].stdout == "in\n" and len(refused) == 1
    winner = first if results[0] is admitted[0] else second
    line = error_line(refused[0])
    assert line.startswith(f"error: {run}: in use by PID {winner.pid} (`{PYTHON} -c") and "which is writing it" in line
    assert sorted(p.name for p in run.iterdir()) == [".lock"] and run.joinpath(".lock").read_text() == ""


def test_readers_share_the_lock_and_keep_writers_out(tmp_path):
    run = tmp_path / "run"
    readers = [holder(run, "shared", 30), holder(run, "shared", 30)]
    assert [reader.stdout.readline() for reader in readers] == ["in\n", "in\n"]  # both hold it now
    writer = finished(holder(run, "exclusive", 0))
    line = error_line(writer)
    assert all(f"PID {reader.pid} (" in line for reader in readers) and "reading its model" in line
    for reader in readers:
        reader.kill()
        reader.wait()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    run = tmp_path / "run"
    stuck = holder(run, "exclusive", 600)
    wait_for(lambda: stuck.stdout.readline() == "in\n")
    assert f"in use by PID {stuck.pid} (" in error_line(finished(holder(run, "exclusive", 0)))
    stuck.send_signal(signal.SIGKILL)
    stuck.wait()
    assert finished(holder(run, "exclusive", 0)).returncode == 0


def test_a_refused_command_leaves_no_lock_file_or_run_folder_behind(tmp_path):
    """A new run directory made for the lock goes again when the command is refused."""
    assert main(["--stage", "prepare", "--run-dir", str(tmp_path / "new"), "--set", "train.epochs=0"]) == 2
    assert not (tmp_path / "new").exists()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A prepared (untrained) smoke run, copied by each test that trains it."""
    run = tmp_path_factory.mktemp("prepared") / "run"
    assert main(["--stage", "prepare", "--preset", "smoke", "--run-dir", str(run)]) == 0
    return run


# A training of a few seconds: long enough for a second command to meet it.
SHORT = ["--set", "train.epochs=3", "--set", "train.steps_per_epoch=5", "--set", "train.val_tiles_per_image=1"]


def history_epochs(run: Path) -> list[int]:
    return [int(line.split(",")[0]) for line in (run / "train" / "history.csv").read_text().splitlines()[1:]]


def test_two_trainings_of_one_run_started_together(prepared, tmp_path):
    # One round: the race for the lock itself is tried in many rounds above, with cheap processes.
    run = shutil.copytree(prepared, tmp_path / "run")
    processes = [start(["--stage", "train", "--run-dir", run, *SHORT], tmp_path) for _ in range(2)]
    results = [finished(p) for p in processes]
    assert sorted(r.returncode for r in results) == [0, 2], [r.stderr[-2000:] for r in results]
    winner, loser = (processes[0], results[1]) if results[0].returncode == 0 else (processes[1], results[0])
    line = error_line(loser)
    assert f"in use by PID {winner.pid} (`{PYTHON} run_pipeline.py --stage train " in line
    assert history_epochs(run) == [0, 1, 2]  # every epoch once, written by one training
    best = json.loads((run / "train" / "best.json").read_text())
    assert best["epoch"] in (1, 2, 3)
    assert model_file.trained_config(run / "train" / "best.keras").train.epochs == 3


def test_while_a_run_trains_other_commands_on_it_are_refused_and_after_it_see_the_final_model(prepared, tmp_path):
    run = shutil.copytree(prepared, tmp_path / "run")
    training = start(["--stage", "train", "--run-dir", run, *SHORT], tmp_path)
    assert training.stdout.readline().startswith("== train")  # printed once it holds the run's lock
    readers = [start(["--stage", stage, "--run-dir", run, "--set", f"export.root={tmp_path / 'saved'}"], tmp_path)
               for stage in ("predict", "evaluate", "export")]
    writers = [start([*args, "--run-dir", run], tmp_path)
               for args in (["--stage", "prepare", "--overwrite"], ["--stage", "train", "--overwrite"])]
    for reader in readers:
        line = error_line(finished(reader))
        assert f"in use by PID {training.pid} (`{PYTHON} run_pipeline.py --stage train " in line, line
        assert "holds no final model" in line
    for writer in writers:
        assert f"in use by PID {training.pid} (" in error_line(finished(writer))
    assert training.poll() is None, "the training ended before the other commands met it"
    assert finished(training).returncode == 0
    assert history_epochs(run) == [0, 1, 2]
    assert not (tmp_path / "saved").exists()
    assert pipeline(["--stage", "predict", "--run-dir", run], tmp_path).returncode == 0


def test_starting_over_never_leaves_a_model_beside_other_settings(smoke_run, tmp_path):
    """`prepare --overwrite` with new settings removes the model trained on the old data; a
    `train --overwrite` killed before its first epoch leaves no model rather than the old one."""
    run = shutil.copytree(smoke_run["run_dir"], tmp_path / "run")
    assert main(["--stage", "prepare", "--overwrite", "--run-dir", str(run), "--set", "model.base_filters=16"]) == 0
    assert not (run / "train").exists()
    assert "train/best.keras: not found; run --stage train first" in error_line(
        pipeline(["--stage", "export", "--run-dir", run, "--set", f"export.root={tmp_path / 'saved'}"], tmp_path))

    run = shutil.copytree(smoke_run["run_dir"], tmp_path / "again")
    training = start(["--stage", "train", "--overwrite", "--run-dir", run, "--set", "model.base_filters=16",
                      "--set", "train.steps_per_epoch=500"], tmp_path)
    wait_for(lambda: not (run / "train" / "best.keras").exists())
    training.send_signal(signal.SIGKILL)
    training.wait()
    assert "run --stage train first" in error_line(pipeline(["--stage", "evaluate", "--run-dir", run], tmp_path))


def test_export_describes_the_model_it_holds_not_a_configuration_saved_after_it(smoke_run, tmp_path):
    run = shutil.copytree(smoke_run["run_dir"], tmp_path / "run")
    config = run / "config.yaml"
    config.write_text(re.sub(r"base_filters: \d+", "base_filters: 16", config.read_text()))
    assert main(["--stage", "export", "--run-dir", str(run), "--set", f"export.root={tmp_path / 'saved'}"]) == 0
    provenance = json.loads((tmp_path / "saved" / "unet" / "1" / "assets.extra" / "provenance.json").read_text())
    assert provenance["configuration"]["model"]["base_filters"] == 8


def test_exports_started_together_publish_every_version(smoke_run, tmp_path):
    """Two exports of one run and one of another into one root: three versions, none replaced."""
    first = shutil.copytree(smoke_run["run_dir"], tmp_path / "first")
    second = shutil.copytree(smoke_run["run_dir"], tmp_path / "second")
    saved = tmp_path / "saved"
    processes = [start(["--stage", "export", "--run-dir", run, "--set", f"export.root={saved}"], tmp_path)
                 for run in (first, first, second)]
    results = [finished(p) for p in processes]
    assert [r.returncode for r in results] == [0, 0, 0], [r.stderr[-2000:] for r in results]
    published = {}
    for version in sorted((saved / "unet").iterdir()):
        if version.name.isdigit():
            published[version.name] = json.loads((version / "assets.extra" / "provenance.json").read_text())["run_dir"]
    assert sorted(published) == ["1", "2", "3"]
    assert sorted(published.values()) == sorted(str(run.resolve()) for run in (first, first, second))
    said = sorted(re.search(r"-> \S+/unet/(\d+)", r.stdout).group(1) for r in results)
    assert said == ["1", "2", "3"]
    assert not [p for p in (saved / "unet").iterdir() if p.name.startswith(".")]
    assert os.path.getsize(saved / "models.config") > 0
