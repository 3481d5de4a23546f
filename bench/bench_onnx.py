"""CPU inference of `predict`: TensorFlow (overlap-tile, as `predict` runs) against ONNX Runtime
(the zoo package's ONNX weights: the zoo network, one pass over the mirror-padded image), on
the same images, side by side in one run; Mpx/s, their ratio, and whether the masks are equal.

    PYTHONPATH=. python bench/bench_onnx.py [--run-dir runs/X] [--sides 512 1024] [--repeats 3]

Needs the `onnx` extra. With a run directory, its trained model; without one, an untrained
`cpu`-preset network. The images are the embedded synthetic EM data. bfloat16 is measured
only where the CPU has avx512_bf16 or AMX (/proc/cpuinfo); elsewhere the table says so.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import keras
import numpy as np
import onnxruntime
import tensorflow as tf

from bench.common import cpu_model
from pipeline.config import resolve as configuration
from pipeline.data.synthetic import synthetic_em_image
from pipeline.files.bioimageio import ONNX, weight_files, zoo_network
from pipeline.files.rundir import RunDir
from pipeline.inference.segmenter import load_model, segmentation_function
from pipeline.normalization import normalize
from pipeline.training.model import unet


def bf16_cpu() -> bool:
    """Whether the CPU computes bfloat16 natively (AVX-512 BF16 or AMX)."""
    flags = Path("/proc/cpuinfo").read_text().split()
    return "avx512_bf16" in flags or any(flag.startswith("amx") for flag in flags)


def seconds(function, repeats: int) -> tuple[float, np.ndarray]:
    """The best time of `repeats` calls after one warm-up call, and the last result."""
    result = function()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", help="a trained run (default: an untrained cpu-preset network)")
    parser.add_argument("--sides", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.run_dir:
        run = RunDir(args.run_dir)
        config, model = run.saved_config(), load_model(run.best_model)
    else:
        config = configuration.preset("cpu")
        keras.utils.set_random_seed(0)
        model = unet(config.model)
    tensorflow_predict = tf.function(segmentation_function(model, config))
    threshold = config.predict.threshold
    session = onnxruntime.InferenceSession(weight_files(zoo_network(model, config))[ONNX])

    def onnx_predict(image: np.ndarray) -> np.ndarray:
        probabilities = session.run(None, {session.get_inputs()[0].name: normalize(image[None]).numpy()})[0]
        return np.where(probabilities[0, ..., 1] > threshold, 255, 0).astype(np.uint8)

    print(f"{cpu_model()}; {'trained' if args.run_dir else 'untrained cpu-preset'} network, "
          f"tile {config.predict.tile_size}, ONNX Runtime {onnxruntime.__version__}, TensorFlow {tf.__version__}")
    print("| image | TensorFlow Mpx/s | ONNX Runtime Mpx/s | ONNX / TF | masks equal |\n| --- | ---: | ---: | ---: | --- |")
    for side in args.sides:
        image = synthetic_em_image(side, seed=side)[0][..., None].astype(np.float32)
        ours_s, ours = seconds(lambda: tensorflow_predict(tf.constant(image))["mask"].numpy(), args.repeats)
        onnx_s, theirs = seconds(lambda: onnx_predict(image), args.repeats)
        megapixels = side * side / 1e6
        different = int(np.count_nonzero(ours != theirs))
        print(f"| {side} x {side} | {megapixels / ours_s:.3f} | {megapixels / onnx_s:.3f} | "
              f"{ours_s / onnx_s:.2f}x | {'yes' if different == 0 else f'no ({different} px differ)'} |")
    print("bfloat16: " + ("the CPU has it, but ONNX Runtime runs this float32 model in float32 (not measured)" if bf16_cpu() else
                          "not measured: the CPU has neither avx512_bf16 nor AMX"))


if __name__ == "__main__":
    main()
