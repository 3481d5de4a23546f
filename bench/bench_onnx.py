"""CPU inference of `predict`: the engine (TensorFlow, ONNX Runtime, TensorFlow in bfloat16) apart
from the tiling (overlap-tile as `predict` runs it, with a fixed tile as it ran before, or one
pass over the whole mirror-padded image), on the same images, side by side in one run; Mpx/s,
the ratios to `predict` and to the fixed tile, and how many mask pixels differ from `predict`'s.

    PYTHONPATH=. python bench/bench_onnx.py [--run-dir runs/X] [--sides 512 1024] [--repeats 3]
                                            [--tile-sizes 604 1116]

Needs the `onnx` extra. With a run directory, its trained model and settings; without one,
an untrained `cpu`-preset network. The images are the embedded synthetic EM data.

Rows, per image:
- `predict`: TensorFlow, overlap-tile (`segmentation_function`: per image the valid tile up
  to `predict.tile_size` with the fewest network pixels, `tiling.fitted_tile`;
  `predict.tiles_per_batch`), the reference of the first ratio and of every mask;
- TensorFlow, overlap-tile fixed: every image in tiles of `predict.tile_size`
  (`overlap_tile_predict(..., fitted=False)`, normalised and thresholded as `predict`
  does), what `predict` ran before it fitted the tile: the reference of the second ratio;
- ONNX Runtime, overlap-tile: the same tiling code (`tiling.overlap_tile_predict`, same
  tiles, same batch), only the network's call on each batch of tiles run by an ONNX
  Runtime session of the same model (tf2onnx, `bioimageio.onnx_file`), through
  `tf.numpy_function`;
- TensorFlow bfloat16, overlap-tile: the same weights in a `mixed_bfloat16` copy of the
  network, only where the CPU has avx512_bf16 or AMX (/proc/cpuinfo);
- TensorFlow, overlap-tile up to each of `--tile-sizes`: `predict` with that
  `predict.tile_size`, larger tiles allowed (more memory);
- TensorFlow and ONNX Runtime, whole image: the zoo package's network (`zoo_network`), one
  pass over the image mirror-padded to the next valid size.
"tile" and "network Mpx": the tile side (or the padded image's) and what the network computes
on per image (tiles x tile side², or the padded image): the work the tiling adds, apart from
the engine's speed.

Interleaved: every repeat times each row once, and the best of the repeats counts, so that
a background load changing over the run weighs on every row alike; each timed call starts
after a pause (`SETTLE_SECONDS`), as ONNX Runtime's threads spin on after a run and took
the cores from the row timed next (a TensorFlow call right after an ONNX Runtime one was
15% slower, after a 0.5 s pause not). Also printed: the
seconds ONNX Runtime needs before its first tile (tf2onnx conversion and session), and
how many images of each side repay them.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path

import pipeline  # noqa: F401  before TensorFlow: its quiet console hides the CUDA probe lines
import keras
import numpy as np
import onnxruntime
import tensorflow as tf

from bench.common import cpu_model
from pipeline.config import resolve as configuration
from pipeline.config.schema import Config
from pipeline.data.synthetic import synthetic_em_image
from pipeline.files.bioimageio import onnx_file, zoo_network
from pipeline.files.rundir import RunDir
from pipeline.inference.segmenter import load_model, segmentation_function
from pipeline.inference.tiling import Network, fitted_tile, overlap_tile_predict, tile_geometry
from pipeline.normalization import normalize
from pipeline.sizes import alignment, context, valid_input_sizes
from pipeline.training.model import unet, unet_in_precision

Segment = Callable[[np.ndarray], np.ndarray]  # [H, W, 1] float32 image -> [H, W] uint8 mask


def bf16_cpu() -> bool:
    """Whether the CPU computes bfloat16 natively (AVX-512 BF16 or AMX)."""
    flags = Path("/proc/cpuinfo").read_text().split()
    return "avx512_bf16" in flags or any(flag.startswith("amx") for flag in flags)


def onnx_session(model: keras.Model) -> onnxruntime.InferenceSession:
    """An ONNX Runtime session of `model`, converted in memory as the zoo package converts it."""
    return onnxruntime.InferenceSession(onnx_file(model), providers=["CPUExecutionProvider"])


def onnx_network(session: onnxruntime.InferenceSession, classes: int) -> Network:
    """The session as the tiling's `Network`: each batch of tiles handed to it by tf.numpy_function."""
    name = session.get_inputs()[0].name

    def network(tiles: tf.Tensor) -> tf.Tensor:
        probabilities = tf.numpy_function(lambda batch: session.run(None, {name: batch})[0], [tiles], tf.float32,
                                          stateful=False)
        return tf.ensure_shape(probabilities, [None, None, None, classes])

    return network


def overlap_tile(model: keras.Model, config: Config, network: Network | None = None) -> Segment:
    """`predict`'s computation (`segmentation_function`), with `network` running the tiles if given."""
    # Traced for any shape, as `Segmenter` traces it for `predict`.
    segment = tf.function(segmentation_function(model, config, network),
                          input_signature=[tf.TensorSpec(None, tf.float32)])
    return lambda image: segment(tf.constant(image))["mask"].numpy()


def fixed_overlap_tile(model: keras.Model, config: Config) -> Segment:
    """`predict` before it fitted the tile: every image in tiles of `predict.tile_size`."""
    depth, padding, settings = config.model.depth, config.model.padding, config.predict

    @tf.function(input_signature=[tf.TensorSpec([None, None, 1], tf.float32)])
    def probabilities(image: tf.Tensor) -> tf.Tensor:
        return overlap_tile_predict(model, normalize(image), depth, settings.tile_size, settings.tiles_per_batch,
                                    settings.test_time_augmentation, padding, fitted=False)

    return lambda image: _mask(probabilities(tf.constant(image)).numpy()[None], settings.threshold)


def whole_image_tensorflow(zoo: keras.Model, threshold: float) -> Segment:
    """The zoo network in TensorFlow: one pass over the mirror-padded image."""
    run = tf.function(lambda batch: zoo(batch, training=False))
    return lambda image: _mask(run(normalize(tf.constant(image[None]))).numpy(), threshold)


def whole_image_onnx(session: onnxruntime.InferenceSession, threshold: float) -> Segment:
    """The zoo network in ONNX Runtime, as the package's ONNX weights run."""
    name = session.get_inputs()[0].name
    return lambda image: _mask(session.run(None, {name: normalize(image[None]).numpy()})[0], threshold)


def _mask(probabilities: np.ndarray, threshold: float) -> np.ndarray:
    return np.where(probabilities[0, ..., 1] > threshold, 255, 0).astype(np.uint8)


def with_tile_size(config: Config, tile_size: int) -> Config:
    return dataclasses.replace(config, predict=dataclasses.replace(config.predict, tile_size=tile_size))


def tiled_megapixels(height: int, width: int, tile: int, config: Config) -> float:
    """Mpx the network computes on for an image by overlap-tile with `tile`: tiles x tile²."""
    _, _, step = tile_geometry(tile, config.model.depth, config.model.padding)
    return math.ceil(height / step) * math.ceil(width / step) * tile ** 2 / 1e6


def whole_megapixels(side: int, config: Config) -> tuple[int, float]:
    """The side and Mpx the zoo network computes on: the image padded by the context to the next valid size."""
    depth, padding = config.model.depth, config.model.padding
    low = side + 2 * context(depth, padding)
    padded = valid_input_sizes(depth, low, low + alignment(depth), padding)[0]
    return padded, padded ** 2 / 1e6


# Pause before each timed call: ONNX Runtime's worker threads spin on after a run.
SETTLE_SECONDS = 0.5
# The rows the ratios and the ONNX Runtime summary refer to.
PREDICT, FIXED, ONNX = ("TensorFlow, overlap-tile (`predict`)", "TensorFlow, overlap-tile fixed (`predict` before)",
                        "ONNX Runtime, overlap-tile")
# A row's network input per image side: (its tile, or the padded image, in words; Mpx computed).
Geometry = Callable[[int], tuple[str, float]]


def rows(
    model: keras.Model, config: Config, tile_sizes: list[int]
) -> tuple[dict[str, tuple[Segment, Geometry]], float]:
    """The measured computations by label, each with its network input per side; and the seconds
    ONNX Runtime took to convert the model and open its session."""
    start = time.perf_counter()
    tile_session = onnx_session(model)
    convert_seconds = time.perf_counter() - start
    classes, threshold, tile = model.output_shape[-1], config.predict.threshold, config.predict.tile_size

    def fixed(side: int) -> tuple[str, float]:
        return f"{tile}", tiled_megapixels(side, side, tile, config)

    def fitted(largest: int) -> Geometry:
        def geometry(side: int) -> tuple[str, float]:
            size = int(fitted_tile(side, side, largest, config.model.depth, config.model.padding)[0])
            return f"{size}", tiled_megapixels(side, side, size, config)
        return geometry

    def whole(side: int) -> tuple[str, float]:
        padded, megapixels = whole_megapixels(side, config)
        return f"whole ({padded})", megapixels

    measured = {
        PREDICT: (overlap_tile(model, config), fitted(tile)),
        FIXED: (fixed_overlap_tile(model, config), fixed),
        ONNX: (overlap_tile(model, config, onnx_network(tile_session, classes)), fitted(tile)),
    }
    if bf16_cpu():
        low = unet_in_precision(config.model, "mixed_bfloat16")
        low.set_weights(model.get_weights())
        measured["TensorFlow bfloat16, overlap-tile"] = (overlap_tile(low, config), fitted(tile))
    for size in tile_sizes:
        measured[f"TensorFlow, overlap-tile up to {size}"] = (overlap_tile(model, with_tile_size(config, size)),
                                                              fitted(size))
    zoo = zoo_network(model, config)
    measured["TensorFlow, whole image"] = (whole_image_tensorflow(zoo, threshold), whole)
    measured["ONNX Runtime, whole image"] = (whole_image_onnx(onnx_session(zoo), threshold), whole)
    return measured, convert_seconds


def timed_seconds(segments: dict[str, Segment], image: np.ndarray, repeats: int) -> tuple[dict[str, list], dict]:
    """Each computation's seconds in each of `repeats`, interleaved, after a warm-up call each; and its mask."""
    masks = {label: segment(image) for label, segment in segments.items()}
    seconds = {label: [] for label in segments}
    for _ in range(repeats):
        for label, segment in segments.items():
            time.sleep(SETTLE_SECONDS)  # the previous row's threads (ONNX Runtime's spin) quiet
            start = time.perf_counter()
            segment(image)
            seconds[label].append(time.perf_counter() - start)
    return seconds, masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", help="a trained run (default: an untrained cpu-preset network)")
    parser.add_argument("--sides", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tile-sizes", type=int, nargs="*", default=[604, 1116],
                        help="other predict.tile_size bounds for TensorFlow's overlap-tile (default: the cpu "
                             "preset's tiles covering a 512 and a 1024 px image in one)")
    args = parser.parse_args()
    if args.run_dir:
        run = RunDir(args.run_dir)
        model = load_model(run.trained_model())
        config = run.model_settings(run.saved_config())
    else:
        config = configuration.preset("cpu")
        keras.utils.set_random_seed(0)
        model = unet(config.model)
    measured, convert_seconds = rows(model, config, args.tile_sizes)
    print(f"{cpu_model()}; {'trained' if args.run_dir else 'untrained cpu-preset'} network (depth "
          f"{config.model.depth}, {config.model.base_filters} filters), predict.tile_size {config.predict.tile_size}, "
          f"tiles_per_batch {config.predict.tiles_per_batch}; ONNX Runtime {onnxruntime.__version__}, "
          f"TensorFlow {tf.__version__}; best of {args.repeats}, interleaved")
    print("| image | engine, tiling | tile | network Mpx | Mpx/s | vs `predict` | vs fixed tile "
          "| mask px differing from `predict`'s |\n"
          "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    repaid, paired = [], []
    for side in args.sides:
        image = synthetic_em_image(side, seed=side)[0][..., None].astype(np.float32)
        seconds, masks = timed_seconds({label: segment for label, (segment, _) in measured.items()}, image,
                                       args.repeats)
        best = {label: min(times) for label, times in seconds.items()}
        # The two rows are timed back to back in every repeat: their ratio per repeat shares its load.
        paired.append(f"{side} px {np.median(np.divide(seconds[FIXED], seconds[PREDICT])):.2f}x")
        for label, (_, geometry) in measured.items():
            different = int(np.count_nonzero(masks[label] != masks[PREDICT]))
            tile, megapixels = geometry(side)
            print(f"| {side} x {side} | {label} | {tile} | {megapixels:.2f} | {side * side / 1e6 / best[label]:.3f} | "
                  f"{best[PREDICT] / best[label]:.2f}x | {best[FIXED] / best[label]:.2f}x | "
                  f"{different} of {side * side} |")
        gain = best[PREDICT] - best[ONNX]  # seconds ONNX Runtime's overlap-tile saves an image
        repaid.append(f"after {math.ceil(convert_seconds / gain)} image(s) of {side} px" if gain > 0 else
                      f"never at {side} px (not faster)")
    print(f"`predict` against the fixed tile, the median of the repeats' ratios (timed back to back, so less "
          f"exposed to a changing load than the best times): {', '.join(paired)}")
    print(f"ONNX Runtime before its first tile (tf2onnx conversion of the model and session): "
          f"{convert_seconds:.1f} s; repaid {', '.join(repaid)}")
    print("bfloat16: " + ("TensorFlow's mixed_bfloat16 measured above (avx512_bf16/AMX); ONNX Runtime's CPU provider "
                          "is given the float32 model only" if bf16_cpu() else
                          "not measured: the CPU has neither avx512_bf16 nor AMX"))


if __name__ == "__main__":
    main()
