"""Input pipeline tiles/s against training-step tiles/s, for the `cpu` and `paper` presets.

Augmentation must never be the bottleneck: the pipeline should deliver tiles at least 3x
as fast as the model consumes them. Both are measured alone, on all cores of this machine
(the pipeline with its AUTOTUNE parallelism, the step with TensorFlow's default threads),
on random images of the preset's data size with the preset's augmentation.

    PYTHONPATH=. python bench/bench_input_pipeline.py [--presets cpu paper] [--tiles 200]
        [--steps 10] [--paper-steps 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pipeline  # noqa: F401, E402  before TensorFlow: its quiet console hides the CUDA probe lines
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from bench import common  # noqa: E402
from pipeline.config import resolve as configuration  # noqa: E402
from pipeline.config.schema import Config  # noqa: E402
from pipeline.training.model import compiled_model  # noqa: E402
from pipeline.training.input_pipeline import training_dataset  # noqa: E402

GOAL = 3.0  # the pipeline delivers at least this many times the tiles training consumes


def _data(config: Config) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    shape = (config.data.num_train, config.data.image_size, config.data.image_size)
    labels = rng.random(shape) > 0.3
    images = (rng.random(shape + (config.model.input_channels,)) * 255).astype(np.uint8)
    return images, labels, rng.random(shape).astype(np.float32) * 10


def pipeline_rate(config: Config, tiles: int) -> float:
    """Tiles per second out of the training dataset, after the first batch."""
    dataset = training_dataset(*_data(config), config.model.depth, config.train, config.augment)
    batches = iter(dataset)
    next(batches)
    count = max(1, tiles // config.train.batch_size)
    start = time.perf_counter()
    for _ in range(count):
        next(batches)
    return count * config.train.batch_size / (time.perf_counter() - start)


def step_rate(config: Config, steps: int) -> float:
    """Tiles per second through `train_on_batch`, after one warm-up step."""
    dataset = training_dataset(*_data(config), config.model.depth, config.train, config.augment)
    tile, label, weight = next(iter(dataset))
    model = compiled_model(config)
    model.train_on_batch(tile, label, sample_weight=weight)
    start = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(tile, label, sample_weight=weight)
    return steps * config.train.batch_size / (time.perf_counter() - start)


def measure(presets: list[str], tiles: int = 200, steps: int = 10, paper_steps: int = 3) -> dict[str, Any]:
    """Pipeline and training tiles/s per preset (`paper_steps` timed steps for `paper`).

    Turns on op determinism for the whole process, as the train stage does.
    """
    tf.config.experimental.enable_op_determinism()
    rows = []
    for name in presets:
        config = configuration.preset(name)
        timed_steps = paper_steps if name == "paper" else steps
        row = {"preset": name, "tile": config.train.tile_size, "batch": config.train.batch_size,
               "steps": timed_steps, "pipeline": pipeline_rate(config, tiles),
               "training": step_rate(config, timed_steps)}
        print(f"  {name:6s} pipeline {row['pipeline']:8.1f} tiles/s, training {row['training']:8.2f} tiles/s",
              flush=True)
        rows.append(row)
    return {"cores": len(os.sched_getaffinity(0)), "gpus": common.tensorflow_gpus(), "tiles": tiles, "steps": steps,
            "paper_steps": paper_steps, "rows": rows}


def render(results: dict[str, Any]) -> str:
    """The markdown section: what is measured, the table, the goal per preset."""
    rows, cores = results["rows"], results["cores"]
    steps = ", ".join(f"`{row['preset']}`: {common.count(row['steps'], 'step')}" for row in rows)
    table = [[f"`{row['preset']}`", str(row["tile"]), f"{row['pipeline']:.1f}", f"{row['training']:.2f}",
              f"{row['pipeline'] / row['training']:.1f}"] for row in rows]
    goals = [f"`{row['preset']}` {row['pipeline'] / row['training']:.1f}x "
             f"({common.verdict(row['pipeline'] / row['training'] >= GOAL)})" for row in rows]
    sections = [
        f"## Input pipeline against the training step (tiles per second, {cores} cores)",
        "`PYTHONPATH=. python bench/bench_input_pipeline.py "
        f"--presets {' '.join(row['preset'] for row in rows)} --tiles {results['tiles']} --steps {results['steps']} "
        f"--paper-steps {results['paper_steps']}`",
        common.paragraph(
            "The pipeline with the preset's augmentation (flips, rotation, elastic deformation, gray values), "
            "AUTOTUNE parallelism, on random images of the preset's data size, timed over "
            f"{results['tiles']} tiles after the first batch; the training step is `train_on_batch` of the compiled "
            f"U-Net on one pipeline batch after a warm-up step ({steps} timed). Both measured alone, with op "
            "determinism on, as `train` runs."),
        common.markdown_table(["preset", "tile", "pipeline tiles/s", "training tiles/s", "pipeline / training"],
                              table, "lrrrr"),
        common.paragraph(f"Goal: the pipeline delivers at least {GOAL:g}x the tiles the training step consumes: "
                         + "; ".join(goals) + "."),
    ]
    paper = [row for row in rows if row["preset"] == "paper"]
    if paper and not results["gpus"]:
        row = paper[0]
        sections.append(common.paragraph(
            "The `paper` preset is meant for a GPU, which this machine does not have: a GPU training step would "
            f"consume far more than {row['training']:.2f} tiles/s, and {row['pipeline']:.0f} tiles/s from {cores} "
            f"cores (~{row['pipeline'] / cores:.0f} per core) is the budget to compare it with; the pipeline scales "
            "with the cores `tf.data` gets."))
    return "\n\n".join(sections)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["cpu", "paper"], choices=["cpu", "paper"])
    parser.add_argument("--tiles", type=int, default=200, help="tiles drawn from the pipeline")
    parser.add_argument("--steps", type=int, default=10, help="training steps timed (cpu)")
    parser.add_argument("--paper-steps", type=int, default=3, help="training steps timed (paper)")
    common.add_json_argument(parser)
    args = parser.parse_args()
    common.finish(args.json, measure(args.presets, args.tiles, args.steps, args.paper_steps), render)


if __name__ == "__main__":
    main()
