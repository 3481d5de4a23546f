"""Times the ISBI metrics on 30 slices of 512x512 at all thresholds, on one core.

    python bench/bench_metrics.py [--slices 30] [--oracle-slices 2]

Ground truth: the real ISBI 2012 labels when present (repeated to 30 slices), else
synthetic labels. Proposal: the labels blurred and noised into a probability map.
The warping error is compared with the tests' one-pixel-at-a-time oracle (the
reference's visiting order in plain Python) on a few slices, checked equal, and the
ratio printed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import tifffile  # noqa: E402

cv2.setNumThreads(1)

from pipeline import metrics  # noqa: E402
from test_metrics import oracle_warp  # noqa: E402

ISBI_LABELS = ROOT.parent / "shared" / "data" / "isbi2012" / "train-labels.tif"


def labels(slices: int) -> np.ndarray:
    if ISBI_LABELS.is_file():
        stack = tifffile.imread(ISBI_LABELS) > 0
    else:
        from pipeline.synthetic import synthetic_em_stack
        stack = synthetic_em_stack(4, 512, 0)[1] > 0
    return np.resize(stack, (slices,) + stack.shape[1:])


def proposal(truth: np.ndarray, seed: int = 0) -> np.ndarray:
    """A plausible network output: blurred labels with smooth noise, in [0, 1]."""
    rng = np.random.default_rng(seed)
    out = []
    for cells in truth:
        p = cv2.GaussianBlur(cells.astype(np.float32), (0, 0), 2.0) + rng.normal(0, 0.15, cells.shape).astype(np.float32)
        out.append(np.clip(cv2.GaussianBlur(p, (0, 0), 1.0), 0, 1))
    return np.stack(out)


def timed(function, *args):
    start = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slices", type=int, default=30)
    parser.add_argument("--oracle-slices", type=int, default=1)
    args = parser.parse_args()
    truth = labels(args.slices)
    probability = proposal(truth).astype(np.float64)
    print(f"{args.slices} slices of {truth.shape[1]}x{truth.shape[2]}, one core")
    for name in ("pixel_error_sweep", "rand_error_sweep", "warping_error_sweep", "v_rand_sweep", "v_info_sweep"):
        sweep, seconds = timed(getattr(metrics, name), probability, truth)
        print(f"{name:>20}: {seconds:7.2f} s   best {sweep.error:.6f} at t = {sweep.threshold!r}")
    ours = oracle = 0.0
    for cells, p in zip(truth[:args.oracle_slices], probability[:args.oracle_slices]):
        for t in metrics.warping_thresholds():
            fast, seconds = timed(metrics.warp_truth, cells, p, t)
            ours += seconds
            slow, seconds = timed(oracle_warp, cells, p, t)
            oracle += seconds
            assert np.array_equal(fast, slow), f"warping differs from the oracle at t = {t}"
    print(f"simple-point warping, {args.oracle_slices} slice(s) x 10 thresholds: ours {ours:.2f} s, "
          f"plain-Python reference order {oracle:.1f} s, ratio {oracle / ours:.0f}x (results identical)")


if __name__ == "__main__":
    main()
