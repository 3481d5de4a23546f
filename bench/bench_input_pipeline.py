"""Input pipeline tiles/s against training-step tiles/s, for the `cpu` and `paper` presets.

Augmentation must never be the bottleneck: the pipeline should deliver tiles at least 3x
as fast as the model consumes them. Both are measured alone, on all cores of this machine
(the pipeline with its AUTOTUNE parallelism, the step with TensorFlow's default threads),
on random images of the preset's data size with the preset's augmentation.

    python bench/bench_input_pipeline.py [--presets cpu paper] [--paper-steps 3]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from pipeline import config as configuration  # noqa: E402
from pipeline.input_pipeline import training_dataset  # noqa: E402
from pipeline.train import compiled_model  # noqa: E402


def _data(config: configuration.Config):
    rng = np.random.default_rng(0)
    shape = (config.data.num_train, config.data.image_size, config.data.image_size)
    labels = rng.random(shape) > 0.3
    images = (rng.random(shape + (config.model.input_channels,)) * 255).astype(np.uint8)
    return images, labels, rng.random(shape).astype(np.float32) * 10


def pipeline_rate(config: configuration.Config, tiles: int) -> float:
    """Tiles per second out of the training dataset, after the first batch."""
    dataset = training_dataset(*_data(config), config.model.depth, config.train, config.augment)
    batches = iter(dataset)
    next(batches)
    start = time.perf_counter()
    for _ in range(max(1, tiles // config.train.batch_size)):
        next(batches)
    return max(1, tiles // config.train.batch_size) * config.train.batch_size / (time.perf_counter() - start)


def step_rate(config: configuration.Config, steps: int) -> float:
    """Tiles per second through `train_on_batch`, after one warm-up step."""
    dataset = training_dataset(*_data(config), config.model.depth, config.train, config.augment)
    tile, label, weight = next(iter(dataset))
    model = compiled_model(config)
    model.train_on_batch(tile, label, sample_weight=weight)
    start = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(tile, label, sample_weight=weight)
    return steps * config.train.batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["cpu", "paper"])
    parser.add_argument("--tiles", type=int, default=200, help="tiles drawn from the pipeline")
    parser.add_argument("--steps", type=int, default=10, help="training steps timed (cpu)")
    parser.add_argument("--paper-steps", type=int, default=3, help="training steps timed (paper)")
    args = parser.parse_args()
    tf.config.experimental.enable_op_determinism()  # as the train stage runs
    devices = ", ".join(d.device_type for d in tf.config.list_logical_devices())
    rows = []
    for name in args.presets:
        config = configuration.preset(name)
        steps = args.paper_steps if name == "paper" else args.steps
        rows.append((name, config.train.tile_size, pipeline_rate(config, args.tiles), step_rate(config, steps)))
    print(f"\ntiles per second, {os.cpu_count()} CPU cores, devices: {devices}")
    print(f"{'preset':8s} {'tile':>5s} {'pipeline':>10s} {'training':>10s} {'pipeline / training':>20s}")
    for name, size, pipeline, training in rows:
        print(f"{name:8s} {size:5d} {pipeline:10.1f} {training:10.2f} {pipeline / training:20.1f}")


if __name__ == "__main__":
    main()
