"""The `paper` preset on ISBI 2012 trained on a lent GPU machine that has JAX but no TensorFlow,
then evaluated and exported here with TensorFlow (docs/results.md, "The paper's network on one GPU").

Four steps; the two `device` ones run there through the device tool, the others here:

    python scripts/gpu_paper.py pack --data-dir ../shared/data/isbi2012   # here: .device/ (wheels, data)
    # device, carry [".device"], timeout 600:  python3 scripts/gpu_paper.py device
    # device, at once (the machine stays warm 30 s): python3 scripts/gpu_paper.py fetch
    python scripts/gpu_paper.py unpack DEVICE_FILES... --run-dir runs/paper-gpu --data-dir ../shared/data/isbi2012

- `pack` downloads the wheels the device lacks (Keras and its optree and namex: it has
  JAX, numpy, h5py, OpenCV, tifffile and PyYAML) from the configured package index and copies
  the three ISBI files: about 21 MB of the 64 MiB a call may carry. `.device/` must be
  ignored by git (`echo /.device/ >> .git/info/exclude`) and named in the call's `carry`.
- `device` installs them, prepares the run and trains it with `KERAS_BACKEND=jax` (the
  README's protocol: `--preset paper`, the epoch with the lowest validation Rand error),
  measures the input pipeline's tiles/s there, and writes the model without its optimizer
  state (124 MB of float32 weights) in parts of 16,000,000 bytes. A call returns at most
  64 MiB, so the first returns the first 4 parts; `fetch`, the next call, the rest with
  the log, the history and the timings (`timings.json`).
- `unpack` joins the parts into `train/best.keras` of a run prepared here with the same
  command (the preparation is deterministic), and evaluate (with the paper's test-time
  averaging) and export run here with TensorFlow.

`--set` options after `device` shrink the run for a rehearsal on a CPU (tests/test_gpu_command.py does that with a 2-filter network and 2 steps).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `pipeline`, from any working folder
CARRIED = ROOT / ".device"
# On the device: what `fetch` returns after `device` (another folder for a rehearsal: GPU_PAPER_STAGING).
STAGING = Path(os.environ.get("GPU_PAPER_STAGING", "/tmp/gpu-paper"))
PART_BYTES = 16_000_000  # a returned file is at most 16 MiB
FIRST_CALL_PARTS = 4  # 64 MB: the most one call returns
WHEELS = ("keras==3.15.1", "optree==0.20.0", "namex==0.1.0")  # what the device's image lacks (KINDS.md)
ISBI_FILES = ("train-volume.tif", "train-labels.tif", "test-volume.tif")
# The README's protocol for the paper preset on ISBI 2012, as docs/results.md documents it.
PREPARE = ["--stage", "prepare", "--preset", "paper", "--dataset", "isbi2012"]
TRAIN = ["--stage", "train", "--set", "train.select_by=val_rand_error"]


def pack(args: argparse.Namespace) -> None:
    """Here: the wheels and the data that the device call carries, in .device/."""
    wheels = CARRIED / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
                    "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64", "--platform",
                    "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64", "-d", str(wheels), *WHEELS],
                   check=True)
    data = CARRIED / "isbi2012"
    data.mkdir(exist_ok=True)
    for name in ISBI_FILES:
        shutil.copyfile(Path(args.data_dir) / name, data / name)
    size = sum(path.stat().st_size for path in CARRIED.rglob("*") if path.is_file())
    print(f"{CARRIED}: {size / 2**20:.1f} MiB to carry (name it in the call's carry; ignored by git: "
          f"echo /.device/ >> .git/info/exclude)")


def _environment(site: Path | None) -> dict[str, str]:
    paths = [str(site)] if site is not None else []
    paths += [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    return dict(os.environ, KERAS_BACKEND="jax", PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(paths))


def _timed(command: list[str], environment: dict[str, str], log: Path) -> float:
    """Runs `command` with its output both shown and appended to `log`; its seconds."""
    start = time.perf_counter()
    with open(log, "a") as handle, subprocess.Popen(command, env=environment, stdout=subprocess.PIPE,
                                                    stderr=subprocess.STDOUT, text=True, cwd=ROOT) as process:
        for line in process.stdout:
            print(line, end="", flush=True)
            handle.write(line)
    if process.returncode:
        raise SystemExit(f"{' '.join(command)}: exit status {process.returncode} (log: {log})")
    return time.perf_counter() - start


def device(args: argparse.Namespace) -> None:
    """On the device: install the wheels, prepare, measure the tiles/s, train; the first parts to $OUT."""
    out = Path(args.out or os.environ["OUT"])
    site = None
    if (CARRIED / "wheels").is_dir():
        site = Path("/tmp/site")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--target", str(site), *map(str, sorted((CARRIED / "wheels").glob("*.whl")))], check=True)
    shutil.rmtree(STAGING, ignore_errors=True)
    STAGING.mkdir(parents=True)
    run_dir, log, environment = STAGING / "run", STAGING / "log.txt", _environment(site)
    data_dir = args.data_dir or str(CARRIED / "isbi2012")
    pipeline = [sys.executable, str(ROOT / "run_pipeline.py")]
    overrides = [word for assignment in args.set for word in ("--set", assignment)]
    timings = {"prepare_s": _timed([*pipeline, *PREPARE, "--data-dir", data_dir, "--run-dir", str(run_dir)],
                                   environment, log)}
    timings["tiles_per_s"] = tiles_per_second(run_dir, args.set)
    timings["train_s"] = _timed([*pipeline, *TRAIN, "--run-dir", str(run_dir), *overrides], environment, log)
    subprocess.run([sys.executable, __file__, "slim", str(run_dir)], env=environment, check=True, cwd=ROOT)
    (STAGING / "timings.json").write_text(json.dumps(timings, indent=1))
    print(json.dumps(timings))
    _return(sorted(STAGING.glob("best.keras.part*"))[:FIRST_CALL_PARTS], out)


def fetch(args: argparse.Namespace) -> None:
    """On the device, the call after `device`: the other parts, the log, history and timings to $OUT."""
    out = Path(args.out or os.environ["OUT"])
    if not STAGING.is_dir():
        raise SystemExit(f"{STAGING}: not there: the machine was given back after `device` (it stays warm 30 s); "
                         "train again")
    run = STAGING / "run"
    small = [STAGING / "log.txt", STAGING / "timings.json", run / "train" / "history.csv",
             run / "train" / "best.json", run / "config.yaml"]
    _return(sorted(STAGING.glob("best.keras.part*"))[FIRST_CALL_PARTS:] + small, out)


def _return(paths: list[Path], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for path in paths:
        shutil.copyfile(path, out / path.name)
    print(f"-> {out}: {', '.join(path.name for path in paths)}")


def slim(args: argparse.Namespace) -> None:
    """(KERAS_BACKEND=jax) train/best.keras without the optimizer's state, in parts, into the staging folder."""
    import keras

    from pipeline.files import model_file
    from pipeline.files.rundir import RunDir

    run = RunDir(Path(args.run_dir))
    trained = keras.saving.load_model(run.best_model, compile=False)
    config = model_file.trained_config(run.best_model)
    slimmed = STAGING / "best.keras"
    model_file.save(trained, slimmed, config)  # uncompiled: the weights and the settings only
    data = slimmed.read_bytes()
    for index, start in enumerate(range(0, len(data), PART_BYTES)):
        (STAGING / f"best.keras.part{index:02d}").write_bytes(data[start : start + PART_BYTES])
    slimmed.unlink()


def tiles_per_second(run_dir: Path, assignments: list[str]) -> float:
    """Tiles per second of the numpy input pipeline with its default workers, from the prepared
    run (numpy only: no Keras in this process)."""
    from pipeline.config import resolve as configuration
    from pipeline.files import rundir
    from pipeline.files.rundir import RunDir
    from pipeline.training import numpy_tiles

    run = RunDir(run_dir)
    config = configuration.apply_overrides(run.saved_config(), configuration.parse_set(assignments), "--set")
    split = rundir.load_split(run, "train", config)
    source = numpy_tiles.TileSource(split["images"], split["instances"] > 0, split["weights"], config.model.depth,
                                    config.train, config.augment, config.model.padding)
    workers = numpy_tiles.default_workers()
    stream = numpy_tiles.batches(source, workers=workers)
    try:
        for _ in range(2 * max(workers, 1)):  # the workers started and each warm
            next(stream)
        count, start = 8 * max(workers, 1), time.perf_counter()
        for _ in range(count):
            next(stream)
        seconds = time.perf_counter() - start
    finally:
        stream.close()
    return round(count * config.train.batch_size / seconds, 1)


def unpack(args: argparse.Namespace) -> None:
    """Here: the run prepared as on the device, the joined model, then evaluate and export with TensorFlow."""
    from pipeline.cli import main
    from pipeline.files.rundir import RunDir

    files = sorted(Path(path) for path in args.files)
    parts = [path for path in files if ".part" in path.name]
    if not parts:
        raise SystemExit("no best.keras.partNN among the files")
    run = RunDir(Path(args.run_dir))
    if main([*PREPARE, "--data-dir", args.data_dir, "--run-dir", str(run.root)]):
        raise SystemExit(1)
    run.best_model.parent.mkdir(parents=True, exist_ok=True)
    with open(run.best_model, "wb") as joined:
        for part in sorted(parts, key=lambda path: path.name):
            joined.write(part.read_bytes())
    for path in files:
        if path.name in ("history.csv", "best.json"):
            shutil.copyfile(path, run.best_model.parent / path.name)
    # The export into the run, as `--stage all` keeps it (an explicit one publishes to export.root).
    for stage in (["evaluate"], ["export", "--set", f"export.root={run.export_root}"]):
        if main(["--stage", *stage, "--run-dir", str(run.root)]):
            raise SystemExit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    steps = parser.add_subparsers(dest="step", required=True)
    step = steps.add_parser("pack", help="here: .device/ with the wheels and the ISBI files")
    step.add_argument("--data-dir", required=True)
    for name, function in (("device", device), ("fetch", fetch)):
        step = steps.add_parser(name, help=function.__doc__.splitlines()[0])
        step.add_argument("--out", help="default: $OUT")
        if name == "device":
            step.add_argument("--data-dir", help="default: .device/isbi2012")
            step.add_argument("--set", action="append", default=[], help="as run_pipeline.py's (a rehearsal)")
    step = steps.add_parser("slim")
    step.add_argument("run_dir")
    step = steps.add_parser("unpack", help=unpack.__doc__.splitlines()[0])
    step.add_argument("files", nargs="+")
    step.add_argument("--run-dir", required=True)
    step.add_argument("--data-dir", required=True)
    args = parser.parse_args()
    {"pack": pack, "device": device, "fetch": fetch, "slim": slim, "unpack": unpack}[args.step](args)


if __name__ == "__main__":
    main()
