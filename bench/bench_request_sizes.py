"""Bytes on the wire for one whole-image request to TF Serving's REST API: JSON numbers
(`serving_default`) against PNG files (`segment_png`), request and answer, side by side.

    PYTHONPATH=. python bench/bench_request_sizes.py [--run-dir runs/X] [--side 2048]

With a run directory, its trained model segments the image (a realistic mask compresses
as a real one would); without one, an untrained `cpu`-preset network does (its noisy mask
is the worst case for PNG). The image is the embedded synthetic EM data at `--side` px.
"""

from __future__ import annotations

import argparse
import base64
import json

import pipeline  # noqa: F401  before TensorFlow: its quiet console hides the CUDA probe lines
import cv2
import keras
import numpy as np
import tensorflow as tf

from pipeline.config import resolve as configuration
from pipeline.data.synthetic import synthetic_em_image
from pipeline.files.rundir import RunDir
from pipeline.inference.segmenter import load_model, png_segmentation_function, segmentation_function
from pipeline.training.model import unet


def rest_body(inputs: dict) -> int:
    """Size of TF Serving's columnar REST request or answer holding `inputs`."""
    return len(json.dumps({"inputs": inputs}, separators=(",", ":")))


def b64(data: bytes) -> dict:
    return {"b64": base64.b64encode(data).decode()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", help="a trained run (default: an untrained cpu-preset network)")
    parser.add_argument("--side", type=int, default=2048)
    args = parser.parse_args()
    if args.run_dir:
        run = RunDir(args.run_dir)
        config, model = run.saved_config(), load_model(run)
    else:
        config = configuration.preset("cpu")
        keras.utils.set_random_seed(0)
        model = unet(config.model)
    image, _ = synthetic_em_image(args.side, seed=0)
    image = image.astype(np.uint8)
    plain = segmentation_function(model, config)(tf.constant(image, tf.float32))
    png = cv2.imencode(".png", image)[1].tobytes()
    encoded = png_segmentation_function(model, config)(tf.constant(png))
    sizes = {
        "request, JSON numbers (serving_default)": rest_body({"image": image.tolist()}),
        "request, PNG (segment_png)": rest_body({"image_bytes": b64(png)}),
        "answer, JSON numbers (mask, probabilities)": rest_body(
            {"mask": plain["mask"].numpy().tolist(), "probabilities": plain["probabilities"].numpy().tolist()}),
        "answer, PNG (mask, labels)": rest_body(
            {name: b64(encoded[name].numpy()) for name in ("mask_bytes", "labels_bytes")}),
    }
    print(f"{args.side} x {args.side} px image, {'trained' if args.run_dir else 'untrained'} network")
    for name, size in sizes.items():
        print(f"  {name:45s} {size / 2**20:9.2f} MiB")
    names = list(sizes)
    print(f"  request ratio JSON / PNG: {sizes[names[0]] / sizes[names[1]]:.0f}x; "
          f"answer ratio: {sizes[names[2]] / sizes[names[3]]:.0f}x")


if __name__ == "__main__":
    main()
