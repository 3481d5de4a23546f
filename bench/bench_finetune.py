"""Fine-tuning: steps to a from-scratch model's test IoU on 2 images, from other weights or from scratch.

On the embedded synthetic data, all scored on the same 2 test images of `data.seed` 0:

1. Target: the `cpu` preset (the README's first command's settings: 6 training images,
   30 epochs of 25 steps) trained from scratch with `--stage prepare` and `--stage train`;
   its best model's cell IoU, as `--stage evaluate` computes it.
2. Source: the same preset trained on `data.seed` 1, other images of the same kind
   (`--source-epochs`: fewer epochs, for a source that does not reach the target alone).
3. Two runs on only 2 training images of seed 0 (`data.num_train=2`), same preset and
   seeds: one starting from the source's weights (as `--init-from` does), one from the
   random initialisation. Each is scored before its first step and after every
   `--every` steps, and stops at the first score that reaches the target, or after
   `--budget` steps.

Prints the ratio steps from scratch / steps fine-tuning. These two runs are `model.fit`
with the training stage's model, loss, optimizer and tile stream (model.compiled_model,
finetune.copy_weights, input_pipeline.training_dataset), without its checkpoints and logs,
so that they can be scored between steps. The machine's speed is measured too: a
4096x4096 float32 matmul (bench_training.matmul_gflops). 8.5 minutes on 2 cores (docs/results.md).

    PYTHONPATH=. python bench/bench_finetune.py [--epochs 30] [--source-epochs N] [--every 5] [--budget 750]
        [--keep FOLDER] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from bench import common
from bench.bench_training import matmul_gflops

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from pipeline.cli import main as pipeline  # noqa: E402
from pipeline.config.schema import Config  # noqa: E402
from pipeline.files import rundir  # noqa: E402
from pipeline.files.rundir import RunDir  # noqa: E402
from pipeline.inference.segmenter import Segmenter, load_model  # noqa: E402
from pipeline.metrics.isbi import foreground_iou  # noqa: E402
from pipeline.training import finetune, input_pipeline  # noqa: E402
from pipeline.training.distribution import strategy  # noqa: E402
from pipeline.training.model import compiled_model  # noqa: E402

TARGET_SEED, SOURCE_SEED = 0, 1
OWN_IMAGES = 2


def trained_run(folder: Path, data_seed: int, epochs: int) -> RunDir:
    """A `cpu` preset run prepared and trained from scratch with the command line."""
    run = RunDir(folder)
    settings = ["--run-dir", str(folder), "--preset", "cpu", "--set", f"data.seed={data_seed}",
                "--set", f"train.epochs={epochs}"]
    for stage in ("prepare", "train"):
        if pipeline(["--stage", stage, *settings]) != 0:
            raise RuntimeError(f"--stage {stage} {' '.join(settings)} failed")
    return run


def cell_iou(segment: Segmenter, split: dict[str, np.ndarray], threshold: float) -> float:
    """Cell IoU over the split's images, counts summed over them (the report's overall value)."""
    probabilities = np.stack([segment(image) for image in split["images"]])
    return foreground_iou(probabilities, split["instances"] > 0, threshold)


class ScoreUntilReached(keras.callbacks.Callback):
    """Scores the model after every epoch (of `every` steps); stops training once it reaches `target`."""

    def __init__(self, model: keras.Model, split: dict[str, np.ndarray], config: Config,
                 target: float, every: int):
        super().__init__()
        # One traced function for all scores: it reads the weights as they are at each call.
        self.segment = Segmenter(model, config)
        self.split, self.threshold, self.target, self.every = split, config.predict.threshold, target, every
        self.curve: list[tuple[int, float]] = []

    def score(self, steps: int) -> bool:
        """Records the score after `steps` steps; whether it reaches the target."""
        self.curve.append((steps, cell_iou(self.segment, self.split, self.threshold)))
        return self.curve[-1][1] >= self.target

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self.score((epoch + 1) * self.every):
            self.model.stop_training = True


def steps_to_target(run: RunDir, config: Config, source: Path | None, target: float,
                    every: int, budget: int) -> dict[str, Any]:
    """Trains on `run`'s prepared data from `source`'s weights (None: from scratch) until `target`."""
    settings = config.train
    initial = finetune.load_initial_model(source) if source else None  # before the seed, as the train stage does
    keras.utils.set_random_seed(settings.seed)
    tf.config.experimental.enable_op_determinism()
    split = rundir.load_split(run, "train", config)
    data = input_pipeline.training_dataset(split["images"], split["instances"] > 0, split["weights"],
                                           config.model.depth, settings, config.augment, padding=config.model.padding)
    with strategy(settings).scope():
        model = compiled_model(config)
        if initial is not None:
            finetune.copy_weights(initial, model, source)
    scorer = ScoreUntilReached(model, rundir.load_split(run, "test", config), config, target, every)
    start = time.perf_counter()
    if not scorer.score(0):
        model.fit(data, epochs=budget // every, steps_per_epoch=every, callbacks=[scorer], verbose=0, shuffle=False)
    steps, iou = scorer.curve[-1]
    return {"reached": iou >= target, "steps": steps, "iou": iou, "curve": scorer.curve,
            "seconds": time.perf_counter() - start}


def measure(folder: Path, epochs: int, source_epochs: int, every: int, budget: int) -> dict[str, Any]:
    """The target, the source, then the two runs on 2 images; with the machine and its matmul rate."""
    peak = matmul_gflops()
    print(f"4096x4096 float32 matmul: {peak:.0f} GFLOP/s", flush=True)
    start = time.perf_counter()
    reference = trained_run(folder / "scratch-6-images", TARGET_SEED, epochs)
    config = reference.saved_config()
    test = rundir.load_split(reference, "test", config)
    target = cell_iou(Segmenter(load_model(reference), config), test, config.predict.threshold)
    reference_seconds = time.perf_counter() - start
    print(f"from scratch on 6 images, {epochs} epochs: test cell IoU {target:.4f}", flush=True)
    source_run = trained_run(folder / f"source-seed-{SOURCE_SEED}", SOURCE_SEED, source_epochs)

    own = RunDir(folder / "own-2-images")
    own_settings = ["--run-dir", str(own.root), "--preset", "cpu", "--set", f"data.seed={TARGET_SEED}",
                    "--set", f"data.num_train={OWN_IMAGES}"]
    if pipeline(["--stage", "prepare", *own_settings]) != 0:
        raise RuntimeError(f"--stage prepare {' '.join(own_settings)} failed")
    own_config = own.saved_config()
    if not np.array_equal(rundir.load_split(own, "test", own_config)["images"], test["images"]):
        raise RuntimeError("the 2-image run's test split differs from the target's: the scores would not compare")
    runs = {}
    for name, source in (("fine-tuned", source_run.best_model), ("from scratch", None)):
        runs[name] = steps_to_target(own, own_config, source, target, every, budget)
        print(f"{name} on {OWN_IMAGES} images: {'reached' if runs[name]['reached'] else 'not reached'} after "
              f"{runs[name]['steps']} steps (IoU {runs[name]['iou']:.4f})", flush=True)
    results = {"machine": common.machine(), "matmul_gflops": peak, "epochs": epochs, "source_epochs": source_epochs,
               "steps_per_epoch": config.train.steps_per_epoch, "every": every, "budget": budget, "target": target,
               "reference_seconds": reference_seconds, "runs": runs}
    print(f"steps from scratch / steps fine-tuning: {ratio(results)}", flush=True)
    return results


def ratio(results: dict[str, Any]) -> str:
    """Steps from scratch / steps fine-tuning, as a bound where one of them did not reach the target."""
    tuned, scratch = results["runs"]["fine-tuned"], results["runs"]["from scratch"]
    if not tuned["reached"]:
        return f"fine-tuning did not reach the target in {tuned['steps']} steps"
    if tuned["steps"] == 0:
        return "the source model reaches the target before any step"
    bound = "" if scratch["reached"] else "more than "
    return f"{bound}{scratch['steps'] / tuned['steps']:.1f}x"


def render(results: dict[str, Any]) -> str:
    """The Fine-tuning section's table and sentences."""
    machine = results["machine"]
    trained = results["epochs"] * results["steps_per_epoch"]
    rows = [[f"target: `cpu` preset from scratch, 6 images of data.seed {TARGET_SEED}", f"({trained}: all it trains)",
             f"{results['target']:.4f}", "-"]]
    origin = {"fine-tuned": f" from the source (`cpu` preset, data.seed {SOURCE_SEED}, {results['source_epochs']} epochs)",
              "from scratch": ""}
    for name, run in results["runs"].items():
        steps = str(run["steps"]) if run["reached"] else f"not within {run['steps']}"
        rows.append([f"{name}{origin[name]}, {OWN_IMAGES} images of data.seed {TARGET_SEED}", steps,
                     f"{run['iou']:.4f}", f"{run['curve'][0][1]:.4f}"])
    return "\n\n".join([
        common.markdown_table(["run", "steps to the target", "test cell IoU then", "before any step"], rows, "lrrr"),
        f"Steps from scratch / steps fine-tuning: {ratio(results)}. Scored every {results['every']} steps, budget "
        f"{results['budget']}. Machine: {machine['cpu']}, {machine['usable_cores']} cores, "
        f"{results['matmul_gflops']:.0f} GFLOP/s (4096x4096 float32 matmul).",
    ])


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30, help="epochs of the target and source runs (cpu: 30)")
    parser.add_argument("--source-epochs", type=int, help="epochs of the source run (default: --epochs)")
    parser.add_argument("--every", type=int, default=5, help="steps between scores of the 2-image runs")
    parser.add_argument("--budget", type=int, default=750, help="most steps of each 2-image run (cpu: 30 x 25)")
    parser.add_argument("--keep", type=Path, help="keep the run directories in this folder")
    common.add_json_argument(parser)
    args = parser.parse_args()
    json_path = args.json.resolve() if args.json else None
    with common.run_folder(args.keep) as folder:
        common.finish(json_path, measure(folder, args.epochs, args.source_epochs or args.epochs, args.every, args.budget), render)


if __name__ == "__main__":
    cli()
