"""napari fine-tuning: how many corrected images and minutes bring a weak model to a trained one's test IoU.

On the embedded synthetic data (`--dataset synthetic`, `data.seed` 0), all scored on the
same test images by the evaluate stage (`stages.evaluate.run`, the report's overall
`foreground_iou`, "IoU cell" in its table):

1. Reference: the `--preset` (default `smoke`; `--reference-epochs`: longer) trained as
   `--stage all` trains it (`stages.prepare.run`, `stages.train.run`, under the run lock).
2. Weak model: the same recipe stopped after `--weak-epochs` x `--weak-steps` steps.
3. For each k of `--images` and each length of `--steps`: the first k training images of
   the reference, with their TRUE instance labels standing in for a user's corrections
   (an upper bound on what a user's corrections are worth), fine-tune the weak model
   through the widget's own model-process code (`napari_plugin.child.Server.fine_tune`:
   `corrections.settings`, `write_dataset` and `new_run`, then the prepare and train
   stages), timed from the request to the new model loaded, as the widget waits for it.
   The weak model is loaded first, untimed: the widget has it loaded from segmenting.

Prints each model's test cell IoU, its gap to the reference's and their ratio. One seed
(`train.seed` 0) per row, so no spread.

    PYTHONPATH=. python bench/napari_finetune.py [--preset smoke] [--reference-epochs N] [--test-images 8]
        [--weak-epochs 1] [--weak-steps 2] [--images 1 2 4] [--steps 200] [--keep FOLDER] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from bench import common

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pipeline import data  # noqa: E402
from pipeline.config import resolve as configuration  # noqa: E402
from pipeline.config.schema import Config  # noqa: E402
from pipeline.files import model_source  # noqa: E402
from pipeline.files.rundir import RunDir  # noqa: E402
from pipeline.metrics.report import summary  # noqa: E402
from pipeline.napari_plugin import corrections, segmentation  # noqa: E402
from pipeline.napari_plugin.child import Server  # noqa: E402
from pipeline.stages import evaluate, prepare, train  # noqa: E402


def recipe(preset: str, test_images: int, overrides: dict | None = None) -> Config:
    """The preset on the embedded data set with `test_images` test images, then `overrides`; checked."""
    config = configuration.preset(preset)
    config = configuration.apply_overrides(config, {"data": {"num_test": test_images}} | (overrides or {}), "bench")
    configuration.validate(config)
    return config


def trained(config: Config, folder: Path) -> tuple[RunDir, float]:
    """A run prepared and trained as `--stage all` does, and the minutes that took."""
    run = RunDir(folder)
    start = time.perf_counter()
    with run.lock(exclusive=True):
        prepare.run(config, run)
        train.run(config, run)
    return run, (time.perf_counter() - start) / 60


def cell_iou(reference: RunDir, model: Path, output: Path) -> float:
    """The test cell IoU of the model `model` names, on `reference`'s test split, as
    `--stage evaluate --run-dir REFERENCE --model MODEL --output OUTPUT` scores it."""
    with model_source.opened([model]) as models, reference.lock(exclusive=False):
        report = evaluate.run(reference.saved_config(), reference, None, models, output)
    return summary(report)["foreground_iou"]


def corrected_images(config: Config, count: int) -> list[corrections.Correction]:
    """The first `count` training images of `config`'s data set, read as the widget reads an image
    layer (`segmentation.model_stack`), each with its true cells as its corrections."""
    split = data.load(config.data, config.model.input_channels)["train"]
    if count > len(split.images):
        raise SystemExit(f"--images {count}: the data set has {len(split.images)} training images")
    found = []
    for index in range(count):
        name = f"train-{index}"
        [image] = segmentation.model_stack(split.images[index, ..., 0], False, name, config.model.input_channels)
        found.append(corrections.Correction(f"{index:02d}-{name}", image, split.instances[index]))
    return found


def fine_tuned(weak: RunDir, found: list[corrections.Correction], root: Path, steps: int) -> tuple[RunDir, float]:
    """The weak model fine-tuned on `found` for `steps` steps by the widget's model process code, in a
    new run under `root` (`corrections.new_run`); the minutes from the request to the new model loaded."""
    server = Server()
    server.load(weak.root, lambda value: None)  # loaded before: the widget segmented with it
    run, corrected = corrections.new_run(root)
    start = time.perf_counter()
    server.fine_tune(weak.root, found, run.root, corrected, steps, lambda value: None)
    return run, (time.perf_counter() - start) / 60


def measure(folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The reference, the weak model, then the fine-tunes; every one scored on the reference's test split."""
    longer = {"train": {"epochs": args.reference_epochs}} if args.reference_epochs else None
    config = recipe(args.preset, args.test_images, longer)
    weak_config = recipe(args.preset, args.test_images,
                         {"train": {"epochs": args.weak_epochs, "steps_per_epoch": args.weak_steps}})
    machine = common.machine()
    reference, reference_minutes = trained(config, folder / "reference")
    target = cell_iou(reference, reference.root, folder / "scores" / "reference.json")
    print(f"reference ({args.preset}, {config.train.epochs} x {config.train.steps_per_epoch} steps, "
          f"{reference_minutes:.2f} min): test cell IoU {target:.4f}", flush=True)
    weak, weak_minutes = trained(weak_config, folder / "weak")
    weak_iou = cell_iou(reference, weak.root, folder / "scores" / "weak.json")
    print(f"weak ({args.weak_epochs} x {args.weak_steps} steps, {weak_minutes:.2f} min): test cell IoU {weak_iou:.4f}",
          flush=True)
    rows = []
    for steps in args.steps:
        for count in args.images:
            run, minutes = fine_tuned(weak, corrected_images(config, count), folder / f"{count}-images-{steps}-steps",
                                      steps)
            length = run.saved_config().train  # the widget's choice: whole epochs of the weak model's length
            epochs, per_epoch = length.epochs, length.steps_per_epoch
            iou = cell_iou(reference, run.root, folder / "scores" / f"{count}-{steps}.json")
            rows.append({"images": count, "steps": steps, "epochs": epochs, "steps_per_epoch": per_epoch,
                         "minutes": minutes, "iou": iou})
            print(f"{count} corrected image(s), {steps} steps ({epochs} x {per_epoch}): {minutes:.2f} min, "
                  f"test cell IoU {iou:.4f} ({iou - target:+.4f}, {iou / target:.3f} of the reference)", flush=True)
    return {"machine": machine, "load_average_after": list(os.getloadavg()), "preset": args.preset,
            "test_images": args.test_images, "train_images": config.data.num_train,
            "reference": {"epochs": config.train.epochs, "steps_per_epoch": config.train.steps_per_epoch,
                          "minutes": reference_minutes, "iou": target},
            "weak": {"epochs": args.weak_epochs, "steps_per_epoch": args.weak_steps, "minutes": weak_minutes,
                     "iou": weak_iou},
            "fine_tuned": rows}


def _length(model: dict[str, Any]) -> str:
    """'210 (14 x 15)': the steps trained, as epochs x steps per epoch."""
    return f"{model['epochs'] * model['steps_per_epoch']} ({model['epochs']} x {model['steps_per_epoch']})"


def _scores(model: dict[str, Any], target: float) -> list[str]:
    """A model's test cell IoU, its gap to the reference's `target` and their ratio."""
    return [f"{model['iou']:.4f}", f"{model['iou'] - target:+.4f}", f"{model['iou'] / target:.3f}"]


def render(results: dict[str, Any]) -> str:
    """The table and the sentences of docs/napari.md's measurement."""
    target = results["reference"]["iou"]
    rows = [[f"reference: `{results['preset']}` preset, its {results['train_images']} training images, "
             f"{results['reference']['epochs']} epochs", "-",
             _length(results["reference"]), f"{results['reference']['minutes']:.2f}",
             *_scores(results["reference"], target)],
            [f"weak: the same recipe stopped after {results['weak']['epochs'] * results['weak']['steps_per_epoch']} "
             "steps", "-", _length(results["weak"]),
             f"{results['weak']['minutes']:.2f}", *_scores(results["weak"], target)]]
    rows += [["weak, fine-tuned", str(row["images"]), _length(row),
              f"{row['minutes']:.2f}", *_scores(row, target)] for row in results["fine_tuned"]]
    machine = results["machine"]
    return "\n\n".join([
        common.markdown_table(["model", "corrected images", "steps (epochs x steps)", "minutes", "test cell IoU",
                               "gap", "/ reference"], rows, "lrrrrrr"),
        common.paragraph(
            f"Test cell IoU: `evaluate`'s overall `foreground_iou` on {results['test_images']} test images of the "
            f"embedded data (`data.seed` 0); minutes of a fine-tune: from the request to the new model loaded "
            f"(writing the corrections, prepare, train), the model process already running. Machine: "
            f"{machine['cpu']}, {machine['usable_cores']} cores, load average {machine['load_average'][0]:.1f} "
            f"before and {results['load_average_after'][0]:.1f} after; "
            f"TensorFlow {machine['versions']['TensorFlow']}."),
    ])


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smoke", help="the reference's preset (default: smoke)")
    parser.add_argument("--reference-epochs", type=int, help="epochs of the reference (default: the preset's)")
    parser.add_argument("--test-images", type=int, default=8, help="test images scored (data.num_test; default 8)")
    parser.add_argument("--weak-epochs", type=int, default=1, help="epochs of the weak model (default 1)")
    parser.add_argument("--weak-steps", type=int, default=2, help="steps per epoch of the weak model (default 2)")
    parser.add_argument("--images", type=int, nargs="+", default=[1, 2, 4], help="corrected images (default 1 2 4)")
    parser.add_argument("--steps", type=int, nargs="+", default=[200],
                        help="fine-tuning steps (default: the widget's 200)")
    parser.add_argument("--keep", type=Path, help="keep the run directories in this folder")
    common.add_json_argument(parser)
    args = parser.parse_args()
    json_path = args.json.resolve() if args.json else None
    with common.run_folder(args.keep) as folder:
        common.finish(json_path, measure(folder, args), render)


if __name__ == "__main__":
    cli()
