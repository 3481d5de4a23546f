"""Warped 572x572 (image, label, weight) triples per second on ONE CPU core.

Side by side: our op in a tf.function and under XLA, elasticdeform.deform_random_grid
(order 3 for the image, 0 for the label, 1 for the weights; 3x3 grid, sigma 10) and
OpenCV remap (INTER_CUBIC / INTER_NEAREST / INTER_LINEAR, BORDER_REFLECT_101) with the
same field as our op. One core: the process is pinned to CPU 0 and every library is told
to use one thread, so the numbers are per core.

    python bench/bench_elastic_warp.py [--seconds 5]
"""

from __future__ import annotations

import os

os.sched_setaffinity(0, {0})  # before the libraries start their thread pools
for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[variable] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import time  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)
cv2.setNumThreads(1)

from pipeline.elastic_warp import displacement_field, elastic_warp  # noqa: E402

SIZE = 572


def _example(rng: np.random.Generator):
    image = rng.random((SIZE, SIZE, 1), dtype=np.float32)
    label = (image[..., 0] > 0.5).astype(np.int32)
    return image, label, image[..., 0].copy()


def _rate(warp_once, seconds: float) -> float:
    """Triples per second: warm up once, then repeat for about `seconds`."""
    warp_once(0)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        count += 1
        warp_once(count)
    return count / (time.perf_counter() - start)


def _ours(image, label, weight, jit_compile: bool):
    warp = tf.function(elastic_warp, jit_compile=jit_compile)
    image, label, weight = (tf.constant(a) for a in (image, label, weight))
    return lambda i: [part.numpy() for part in warp(image, label, weight, tf.constant([0, i]))]


def _opencv(image, label, weight):
    rows, cols = np.mgrid[:SIZE, :SIZE].astype(np.float32)
    field = displacement_field((SIZE, SIZE), tf.constant([0, 1])).numpy()
    label = label.astype(np.uint8)  # remap has no int32

    def warp(_):
        map_y, map_x = rows + field[..., 0], cols + field[..., 1]
        border = dict(borderMode=cv2.BORDER_REFLECT_101)
        return (cv2.remap(image, map_x, map_y, cv2.INTER_CUBIC, **border),
                cv2.remap(label, map_x, map_y, cv2.INTER_NEAREST, **border),
                cv2.remap(weight, map_x, map_y, cv2.INTER_LINEAR, **border))

    return warp


def _elasticdeform(image, label, weight):
    try:
        import elasticdeform
    except ImportError as error:  # its NumPy 1 wheel fails under NumPy 2; see requirements.txt
        print(f"elasticdeform unavailable ({error}); skipped")
        return None
    arrays = [image[..., 0], label, weight]
    return lambda _: elasticdeform.deform_random_grid(arrays, sigma=10, points=3, order=[3, 0, 1], mode="mirror")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="time per method")
    args = parser.parse_args()
    image, label, weight = _example(np.random.default_rng(0))
    methods = {
        "ours, tf.function": _ours(image, label, weight, jit_compile=False),
        "ours, tf.function + XLA": _ours(image, label, weight, jit_compile=True),
        "elasticdeform (order 3/0/1)": _elasticdeform(image, label, weight),
        "OpenCV remap, same field": _opencv(image, label, weight),
    }
    rates = {name: _rate(warp, args.seconds) for name, warp in methods.items() if warp is not None}
    best_ours = max(rates["ours, tf.function"], rates["ours, tf.function + XLA"])
    print(f"\n{SIZE}x{SIZE} image + label + weight triples per second, one CPU core (pinned to CPU 0)")
    print(f"{'method':32s} {'triples/s':>10s} {'ms/triple':>10s} {'ours (best) / this':>19s}")
    for name, rate in rates.items():
        print(f"{name:32s} {rate:10.1f} {1000 / rate:10.2f} {best_ours / rate:19.2f}")


if __name__ == "__main__":
    main()
