"""The paper network's training step on one accelerator: float32 against mixed precision.

Side by side in one run: `model.fit` steps of the `paper` preset's U-Net (31 M parameters,
572 px tiles, SGD with momentum 0.99, the weighted loss) in float32, then in each mixed
precision, each with Keras running one step per call of the compiled function and
several (`steps_per_execution`, no Python between them), at the preset's one tile a step
and at other batch sizes (`--batch`). It prints the milliseconds per step, each row's
speed per tile against the first row of its batch size, and how long the preset's 20,000
tiles would take against the 10 minutes that docs/results.md ("The paper's network on
one GPU") sets for the whole command.

The tiles are random and sit in host memory, so the figures are the training step's,
with its copy to the device, not the input pipeline's (bench_input_pipeline.py). The
model, loss and optimizer are pipeline.training.model's, pipeline.training.loss's and the preset's, built
with Keras alone, so this script runs on any Keras backend: KERAS_BACKEND picks it
(TensorFlow by default). The GPU machines lent to this project have JAX but no
TensorFlow, which needs 1.9 GB and CUDA 12 libraries that cannot be carried to them; its
GPU figures were taken with KERAS_BACKEND=jax, where Keras compiles the step with XLA,
as `train.jit_compile=true` does with TensorFlow.

    KERAS_BACKEND=jax PYTHONPATH=. python bench/bench_gpu_step.py [--precisions float32
        mixed_float16 mixed_bfloat16] [--steps-per-execution 1 25] [--steps 300] [--tile 572]
        [--batch 1 4] [--json PATH]
"""

from __future__ import annotations

import argparse
import math
import os
import time
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402  before pipeline, which would set the TensorFlow backend for this process
import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from pipeline.config.resolve import preset  # noqa: E402
from pipeline.config.schema import PRECISIONS  # noqa: E402
from pipeline.sizes import output_size  # noqa: E402
from pipeline.training.loss import weighted_cross_entropy  # noqa: E402
from pipeline.training.model import unet_in_precision  # noqa: E402

WARM_UP_STEPS = 3  # the first compiles the step; none of them is timed
BUDGET_MINUTES = 10  # the whole GPU command's goal (docs/results.md)


def accelerators() -> list[str]:
    """The accelerators Keras' backend sees, by name; empty on a CPU."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return [device.device_kind for device in jax.devices() if device.platform != "cpu"]
    if backend == "tensorflow":
        return common.tensorflow_gpus()
    if backend == "torch":
        import torch

        return [torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count())]
    return []


def compiled(precision: str, steps_per_execution: int) -> keras.Model:
    """The paper preset's U-Net in `precision`, compiled as training.model.compiled_model does (constant rate)."""
    config = preset("paper")
    model = unet_in_precision(config.model, precision)
    # Keras wraps the optimizer in loss scaling itself when the model's policy is mixed_float16.
    model.compile(
        optimizer=keras.optimizers.SGD(config.train.learning_rate, momentum=config.train.momentum),
        loss=weighted_cross_entropy(),
        steps_per_execution=steps_per_execution,
    )
    return model


def tiles(count: int, tile: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random images, two-class labels and weight maps shaped as the preset's training batches."""
    config = preset("paper")
    side = output_size(tile, config.model.depth, config.model.padding)
    generator = np.random.default_rng(seed)
    images = generator.standard_normal((count, tile, tile, config.model.input_channels), dtype=np.float32)
    labels = generator.integers(0, config.model.num_classes, (count, side, side), dtype=np.int32)
    weights = generator.uniform(1.0, 10.0, (count, side, side)).astype(np.float32)
    return images, labels, weights


def measure(precision: str, steps_per_execution: int, tile: int, batch: int, steps: int) -> dict[str, Any]:
    """Milliseconds per `model.fit` step after warm-up, and the last loss (finite or not)."""
    model = compiled(precision, steps_per_execution)
    images, labels, weights = tiles(batch * steps, tile)
    warm = slice(0, batch * WARM_UP_STEPS * steps_per_execution)
    model.fit(images[warm], labels[warm], sample_weight=weights[warm], batch_size=batch, epochs=1, shuffle=False,
              verbose=0)
    start = time.perf_counter()
    # fit returns the epoch's loss as a number: the device has finished every step by then.
    history = model.fit(images, labels, sample_weight=weights, batch_size=batch, epochs=1, shuffle=False, verbose=0)
    seconds = time.perf_counter() - start
    loss = float(history.history["loss"][-1])
    return {"precision": precision, "steps_per_execution": steps_per_execution, "ms_per_step": 1000 * seconds / steps,
            "loss": loss, "finite": math.isfinite(loss)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every batch size's, precision's and steps per execution's figures, and where they were measured."""
    config = preset("paper")
    measured = []
    for batch in args.batch:
        for steps_per_execution in args.steps_per_execution:
            for precision in args.precisions:
                print(f"{precision}, {steps_per_execution} step(s) per execution: {args.steps} steps of {batch} x "
                      f"{args.tile} px", flush=True)
                measured.append(measure(precision, steps_per_execution, args.tile, batch, args.steps) | {"batch": batch})
    return {
        "backend": keras.backend.backend(),
        "keras": keras.__version__,
        "accelerators": accelerators(),
        "cpu": common.cpu_model(),
        "tile": args.tile,
        "steps": args.steps,
        "preset_tiles": config.train.epochs * config.train.steps_per_epoch * config.train.batch_size,
        "results": measured,
    }


def render(results: dict[str, Any]) -> str:
    """The markdown section: a row per setting, its speed against the first row of its batch size, and
    the minutes that the preset's tiles would take."""
    accelerator = ", ".join(results["accelerators"]) or f"no accelerator ({results['cpu']})"
    baselines: dict[int, float] = {}
    rows = []
    for result in results["results"]:
        ms_per_tile = result["ms_per_step"] / result["batch"]
        baselines.setdefault(result["batch"], ms_per_tile)
        minutes = ms_per_tile * results["preset_tiles"] / 60_000
        rows.append([
            str(result["batch"]),
            f"`{result['precision']}`",
            str(result["steps_per_execution"]),
            f"{result['ms_per_step']:.1f}",
            f"{1000 / ms_per_tile:.1f}",
            f"{baselines[result['batch']] / ms_per_tile:.2f}x",
            f"{minutes:.1f} ({common.verdict(minutes <= BUDGET_MINUTES)})",
            f"{result['loss']:.3g}" + ("" if result["finite"] else " (not finite)"),
        ])
    table = common.markdown_table(
        ["batch", "precision", "steps per execution", "ms per step", "tiles/s", "speed-up over the batch's first row",
         f"minutes for {results['preset_tiles']:,} tiles (goal {BUDGET_MINUTES})", "last loss"],
        rows, "rlrrrrrr")
    intro = common.paragraph(
        f"{accelerator}; Keras {results['keras']} on its {results['backend']} backend. "
        f"{common.count(results['steps'], 'step')} per row of {results['tile']} px random tiles from host memory, "
        f"after {WARM_UP_STEPS} warm-up steps, the `paper` preset's U-Net, loss and optimizer (the preset trains "
        "one tile a step).",
        "The minutes are the training step's alone: the input pipeline, validation and export come on top.")
    return f"## Training step on one GPU: float32 against mixed precision\n\n{intro}\n\n{table}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS),
                        help="the first is the one the others are compared with")
    parser.add_argument("--steps-per-execution", type=int, nargs="+", default=[1, 25],
                        help="Keras' steps_per_execution: steps run in one call of the compiled function, "
                             "without Python in between")
    parser.add_argument("--steps", type=int, default=300,
                        help="timed steps per row, a multiple of every --steps-per-execution")
    parser.add_argument("--tile", type=int, default=preset("paper").train.tile_size)
    parser.add_argument("--batch", type=int, nargs="+", default=[preset("paper").train.batch_size],
                        help="tiles per step; the preset's is 1")
    common.add_json_argument(parser)
    args = parser.parse_args()
    common.finish(args.json, run(args), render)


if __name__ == "__main__":
    main()
