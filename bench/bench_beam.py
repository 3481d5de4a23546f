"""Batch prediction: the predict stage's local runner against Apache Beam's DirectRunner.

The same images, side by side in one run, megapixels of input per second of the whole
command (the model loaded, every input read, segmented, labelled and its files written):
- `local`: `--runner local`, one image after another in this process;
- `beam, in process`: `--runner beam` with Beam's defaults (one worker in this process);
- `beam, N worker(s)`: `--runner beam -- --direct_num_workers=N
  --direct_running_mode=multi_processing`: N worker processes, each starting TensorFlow
  and loading the model once.

Weights are untrained: speed does not depend on them. Libraries use every core they see
(no pinning), as the command does: with N workers, N TensorFlow thread pools share them.

    PYTHONPATH=. python bench/bench_beam.py [--images 8] [--size 1024] [--workers 1 2] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import io as text_io
import tempfile
import time
from pathlib import Path
from typing import Any

import pipeline  # noqa: F401  before TensorFlow: its quiet console hides the CUDA probe lines
import keras
import numpy as np
import tifffile

from bench import common
from pipeline.config import resolve as configuration
from pipeline.config.schema import Config
from pipeline.files.rundir import RunDir
from pipeline.stages import predict
from pipeline.training import model as unet_model


def untrained_run(root: Path, config: Config) -> RunDir:
    """A run directory whose best model is the preset's U-Net with random weights."""
    run = RunDir(root / "run")
    run.train.mkdir(parents=True)
    keras.utils.set_random_seed(0)
    unet_model.unet(config.model).save(run.best_model)
    return run


def write_images(folder: Path, count: int, size: int) -> None:
    """`count` random 8-bit grey TIFFs of `size` x `size` pixels."""
    folder.mkdir()
    for index in range(count):
        tifffile.imwrite(folder / f"image_{index:03d}.tif",
                         np.random.default_rng(index).integers(0, 256, (size, size), np.uint8))


def methods(workers: list[int]) -> dict[str, tuple[str, list[str]]]:
    """Label -> (runner, Beam pipeline options)."""
    found = {"local": ("local", []), "beam, in process": ("beam", [])}
    for count in workers:
        found[f"beam, {common.count(count, 'worker')}"] = (
            "beam", [f"--direct_num_workers={count}", "--direct_running_mode=multi_processing"])
    return found


def timed_predict(config: Config, run: RunDir, images: Path, output: Path, runner: str,
                  options: list[str]) -> float:
    """Seconds of one predict command; its printed lines are kept out of the results."""
    start = time.perf_counter()
    with contextlib.redirect_stdout(text_io.StringIO()):
        predict.run(config, run, images, output, runner=runner, beam_options=options)
    return time.perf_counter() - start


def measure(images: int, size: int, workers: list[int]) -> dict[str, Any]:
    """Seconds and Mpx/s of each method on the same `images` images of `size` x `size`."""
    config = configuration.preset("cpu")
    megapixels = images * size * size / 1e6
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        run = untrained_run(root, config)
        write_images(root / "images", images, size)
        # Warm-up: imports, TensorFlow's start and the first trace stay out of every timing.
        write_images(root / "warm-up", 1, 64)
        timed_predict(config, run, root / "warm-up", root / "warm-up-out", "local", [])
        for label, (runner, options) in methods(workers).items():
            seconds = timed_predict(config, run, root / "images", root / label.replace(" ", "_"), runner, options)
            rows.append({"method": label, "seconds": seconds, "mpx_per_s": megapixels / seconds})
            print(f"  {label:20s} {seconds:7.1f} s {megapixels / seconds:7.3f} Mpx/s", flush=True)
    return {"images": images, "size": size, "workers": workers, "cores": common.machine()["usable_cores"],
            "rows": rows}


def render(results: dict[str, Any]) -> str:
    """The markdown section: the methods' times and rates, and each one's ratio to local."""
    local = next(row for row in results["rows"] if row["method"] == "local")
    table = [[row["method"], f"{row['seconds']:.1f}", f"{row['mpx_per_s']:.3f}",
              f"{row['mpx_per_s'] / local['mpx_per_s']:.2f}"] for row in results["rows"]]
    size, count = results["size"], results["images"]
    command = (f"PYTHONPATH=. python bench/bench_beam.py --images {count} --size {size} "
               f"--workers {' '.join(map(str, results['workers']))}")
    return "\n\n".join([
        "## Batch prediction: local runner and Apache Beam",
        f"`{command}`",
        common.paragraph(
            f"{common.count(count, 'image')} of {size}x{size} pixels, `cpu` preset, untrained weights (speed does "
            "not depend on them), on "
            f"{common.count(results['cores'], 'usable core')}. Each figure is one whole predict command: model "
            "loaded, every input read, segmented, labelled and its five files written; worker processes start "
            "TensorFlow and load the model inside the timing, as they do in use."),
        common.markdown_table(["method", "seconds", "Mpx/s", "x local"], table, "lrrr"),
        _throughput_model(results, local),
    ])


def _throughput_model(results: dict[str, Any], local: dict[str, Any]) -> str:
    """The written model of N workers' throughput, with its start cost and rate from this run."""
    one = next(row for row in results["rows"] if row["method"] == "beam, 1 worker")
    start = one["seconds"] - local["seconds"]  # the same work, plus starting one worker process
    rate = local["mpx_per_s"]
    return common.paragraph(
        f"Throughput model. A batch of P megapixels on N worker machines takes about s + P / (N r): each worker "
        f"starts once (s = {start:.1f} s here: the 1-worker time less the local one, for TensorFlow's import, the "
        f"model's load and the first trace) and then segments at its own rate r ({rate:.2f} Mpx/s per "
        f"{common.count(results['cores'], 'core')} here, prediction, labels and files included). Storage bounds "
        "it next: a worker reads 1-2 bytes and writes about 10 per pixel (4 probability, 1 mask, 2 labels, about "
        "3 overlay PNG), so a file system writing W MB/s caps any number of workers at about W / 10 Mpx/s (100 "
        "Mpx/s at 1 GB/s). Workers sharing one machine share its cores: TensorFlow already uses them all in one "
        "process, so N r cannot exceed the one-process rate, and more DirectRunner workers only add their start "
        "cost (the rows above). A single huge image adds two serial parts: one streaming read on the submitting "
        "machine for its normalisation, and one worker's labelling and writing of its final files.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8, help="images in the batch")
    parser.add_argument("--size", type=int, default=1024, help="side of each image, in pixels")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                        help="worker processes of the multi-processing DirectRunner")
    common.add_json_argument(parser)
    args = parser.parse_args()
    common.finish(args.json, measure(args.images, args.size, args.workers), render)


if __name__ == "__main__":
    main()
