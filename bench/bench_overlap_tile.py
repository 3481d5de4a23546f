"""Overlap-tile prediction: the exported in-graph version against a naive loop and the bound.

For each preset and image size, side by side in one process, milliseconds per megapixel
of output:
- `savedmodel`: our `serving_default` signature, loaded with `tf.saved_model.load` as TF
  Serving would load it (in-graph mirror padding, tiling and stitching);
- `naive loop`: what most U-Net code does: mirror-pad with NumPy, call the Keras model once
  per tile from Python, stitch with NumPy (same tiles, same aligned steps);
- `whole image`: one forward pass over the whole mirror-padded image, the lower bound
  (skipped where its activations would not fit in memory).

Weights are untrained: speed does not depend on them. Run: python bench/bench_overlap_tile.py
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from pipeline import config as configuration
from pipeline import model as unet_model
from pipeline.export import export_model
from pipeline.input_pipeline import normalize
from pipeline.tiling import tile_geometry


def best_time(function, repeats: int) -> float:
    """Seconds of the fastest of `repeats` calls, after one warm-up call."""
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def geometry(config: configuration.Config, height: int, width: int) -> tuple[int, int, int, int, int, int]:
    """(tile, output, step, margin, rows, cols): the tiles pipeline.tiling cuts."""
    tile = config.predict.tile_size
    out, margin, step = tile_geometry(tile, config.model.depth)
    return tile, out, step, margin, -(-height // step), -(-width // step)


def padded_image(image: np.ndarray, config: configuration.Config) -> np.ndarray:
    """The normalised image mirror-padded to the tile grid (what the tiles are cut from)."""
    _, out, step, margin, rows, cols = geometry(config, *image.shape)
    pads = [(margin, margin + rows * step - image.shape[0] + out - step),
            (margin, margin + cols * step - image.shape[1] + out - step)]
    return np.pad(normalize(image[..., None]).numpy()[..., 0], pads, mode="reflect")[..., None]


def naive_loop(model: keras.Model, image: np.ndarray, config: configuration.Config) -> np.ndarray:
    tile, _, step, _, rows, cols = geometry(config, *image.shape)
    padded = padded_image(image, config)
    result = np.zeros((rows * step, cols * step, config.model.num_classes), np.float32)
    for r in range(rows):
        for c in range(cols):
            window = padded[None, r * step : r * step + tile, c * step : c * step + tile]
            result[r * step : (r + 1) * step, c * step : (c + 1) * step] = model(window, training=False)[0, :step, :step]
    return result[: image.shape[0], : image.shape[1]]


def whole_image(model: keras.Model, image: np.ndarray, config: configuration.Config) -> np.ndarray:
    padded = padded_image(image, config)
    return model(padded[None], training=False)[0, : image.shape[0], : image.shape[1]].numpy()


def bench(preset: str, sizes: list[int], whole_limit: int, repeats: int) -> list[dict]:
    config = configuration.preset(preset)
    keras.utils.set_random_seed(0)
    model = unet_model.unet(config.model)
    with tempfile.TemporaryDirectory() as root:
        config.export.root = root
        served = tf.saved_model.load(str(export_model(model, config))).signatures["serving_default"]
        rows = []
        for size in sizes:
            image = np.random.default_rng(size).uniform(0, 255, (size, size)).astype(np.float32)
            megapixels = size * size / 1e6
            methods = {
                "savedmodel": lambda: served(image=tf.constant(image))["probabilities"].numpy(),
                "naive loop": lambda: naive_loop(model, image, config),
            }
            if size <= whole_limit:
                methods["whole image"] = lambda: whole_image(model, image, config)
            row = {"preset": preset, "size": size}
            for name, function in methods.items():
                row[name] = 1000 * best_time(function, repeats) / megapixels
                print(f"  {preset:6s} {size:5d}px {name:12s} {row[name]:10.0f} ms/Mpx", flush=True)
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--presets", nargs="+", default=["cpu", "paper"], choices=["cpu", "paper"])
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores, "
          f"TensorFlow {tf.__version__}")
    # The whole-image pass over 4096 px needs more memory than a 24 GiB machine has (its
    # activations are not tiled); the paper net takes minutes per 4096 px image on 2 cores.
    sizes = {"cpu": ([512, 2048, 4096], 2048), "paper": ([512], 1024)}
    rows = [row for preset in args.presets for row in bench(preset, *sizes[preset], repeats=args.repeats)]
    print("\n| preset | image | savedmodel ms/Mpx | naive loop ms/Mpx | whole image ms/Mpx "
          "| savedmodel / whole image | naive loop / savedmodel |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        whole = row.get("whole image")
        bound = f"{whole:.0f}" if whole else "-"
        ratio = f"{row['savedmodel'] / whole:.2f}" if whole else "-"
        print(f"| {row['preset']} | {row['size']}x{row['size']} | {row['savedmodel']:.0f} | {row['naive loop']:.0f} "
              f"| {bound} | {ratio} | {row['naive loop'] / row['savedmodel']:.2f} |")


if __name__ == "__main__":
    main()
