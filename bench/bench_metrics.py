"""Times the ISBI metrics on 30 slices of 512x512 at all thresholds, on ONE CPU core.

Ground truth: the real ISBI 2012 labels when present (repeated to 30 slices), else
synthetic labels. Proposal: the labels blurred and noised into a probability map.
The segment metrics are timed twice: on the map's 4-connected components (the
challenge's reading) and on the cells as `predict.instances=watershed` separates them,
with the ratio of the two.
The warping error is compared with the tests' one-pixel-at-a-time oracle (the
reference's visiting order in plain Python) on a few slices, checked equal, and the
ratio reported. One core: the process is pinned to CPU 0, one thread per library.

    PYTHONPATH=. python bench/bench_metrics.py [--slices 30] [--oracle-slices 1] [--size N]
        [--json PATH]
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Callable

from bench import common

if __name__ == "__main__":
    common.use_one_core()  # before NumPy, OpenCV and TensorFlow start their thread pools

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import tifffile  # noqa: E402

from pipeline.metrics import isbi, warping  # noqa: E402

ISBI_LABELS = common.ROOT.parent / "shared" / "data" / "isbi2012" / "train-labels.tif"
# The metrics issue: the warping error of 30 test-sized slices on all thresholds must
# take "seconds, not minutes" on one core.
GOAL_WARPING_SECONDS = 60.0
SWEEPS = {  # name in the JSON: (label in the table, sweep)
    "pixel_error_sweep": ("pixel error", isbi.pixel_error_sweep),
    "rand_error_sweep": ("Rand error", isbi.rand_error_sweep),
    "warping_error_sweep": ("warping error", warping.warping_error_sweep),
    "v_rand_sweep": ("V_rand", isbi.v_rand_sweep),
    "v_info_sweep": ("V_info", isbi.v_info_sweep),
}
SEGMENT_SWEEPS = ("rand_error_sweep", "warping_error_sweep", "v_rand_sweep", "v_info_sweep")  # take a method


def labels() -> tuple[np.ndarray, str]:
    """The binary label stack of ISBI 2012 (else synthetic labels), and where it comes from."""
    if ISBI_LABELS.is_file():
        stack = tifffile.imread(ISBI_LABELS) > 0
        return stack, f"the {len(stack)} ISBI 2012 training labels"
    from pipeline.data.synthetic import synthetic_em_stack
    return synthetic_em_stack(4, 512, 0)[1] > 0, "4 synthetic label images (ISBI 2012 not found)"


def proposal(truth: np.ndarray, seed: int = 0) -> np.ndarray:
    """A plausible network output: blurred labels with smooth noise, in [0, 1]."""
    rng = np.random.default_rng(seed)
    out = []
    for cells in truth:
        p = cv2.GaussianBlur(cells.astype(np.float32), (0, 0), 2.0)
        p += rng.normal(0, 0.15, cells.shape).astype(np.float32)
        out.append(np.clip(cv2.GaussianBlur(p, (0, 0), 1.0), 0, 1))
    return np.stack(out)


def timed(function: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """The function's result and the seconds it took."""
    start = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - start


def _oracle_warp() -> Callable[[np.ndarray, np.ndarray, float], np.ndarray]:
    """The tests' plain-Python warping oracle (tests/ is not a package, hence the path)."""
    sys.path.insert(0, str(common.ROOT / "tests"))
    from test_metrics_warping import oracle_warp

    return oracle_warp


def measure(slices: int = 30, oracle_slices: int = 1, size: int | None = None) -> dict[str, Any]:
    """Seconds of every sweep over the stack, and of our warping against the oracle's.

    `size` crops the slices to their top-left size x size corner (default: whole slices).
    Raises RuntimeError if our warping differs from the oracle's.
    """
    stack, source = labels()
    # np.resize repeats the stack when it has fewer slices than asked for.
    truth = np.resize(stack, (slices,) + stack.shape[1:])[:, :size, :size]
    probability = proposal(truth).astype(np.float64)
    rows = []
    for name, (_, sweep_of) in SWEEPS.items():
        sweep, seconds = timed(sweep_of, probability, truth)
        rows.append({"metric": name, "seconds": seconds, "thresholds": len(sweep.thresholds),
                     "error": sweep.error, "threshold": sweep.threshold})
        print(f"  {name:>20}: {seconds:7.2f} s   best {sweep.error:.6f} at t = {sweep.threshold!r}", flush=True)
        if name in SEGMENT_SWEEPS:
            cut, seconds = timed(sweep_of, probability, truth, "watershed")
            rows[-1] |= {"watershed_seconds": seconds, "watershed_error": cut.error}
            print(f"  {'watershed':>20}: {seconds:7.2f} s   best {cut.error:.6f} at t = {cut.threshold!r}", flush=True)
    oracle_warp = _oracle_warp()
    ours = reference = 0.0
    for cells, p in zip(truth[:oracle_slices], probability[:oracle_slices]):
        for t in warping.warping_thresholds():
            fast, seconds = timed(warping.warp_truth, cells, p, t)
            ours += seconds
            slow, seconds = timed(oracle_warp, cells, p, t)
            reference += seconds
            if not np.array_equal(fast, slow):
                raise RuntimeError(f"warping differs from the oracle at t = {t}")
    print(f"  simple-point warping: ours {ours:.2f} s, oracle {reference:.1f} s", flush=True)
    return {"slices": slices, "height": int(truth.shape[1]), "width": int(truth.shape[2]), "size": size,
            "source": source, "source_slices": len(stack), "rows": rows,
            "oracle": {"slices": min(oracle_slices, slices), "thresholds": len(warping.warping_thresholds()),
                       "ours": ours, "reference": reference}}


def render(results: dict[str, Any]) -> str:
    """The markdown section: what is timed, the table, the warping against the oracle."""
    slices, height, width = results["slices"], results["height"], results["width"]
    oracle = results["oracle"]
    command = f"PYTHONPATH=. python bench/bench_metrics.py --slices {slices} --oracle-slices {oracle['slices']}"
    if results["size"] is not None:
        command += f" --size {results['size']}"
    table = [[SWEEPS[row["metric"]][0], str(row["thresholds"]), f"{row['seconds']:.2f}",
              f"{1000 * row['seconds'] / slices:.1f}", f"{row['error']:.6f}", repr(row["threshold"]),
              *([f"{row['watershed_seconds']:.2f}", f"{row['watershed_seconds'] / row['seconds']:.1f}x",
                 f"{row['watershed_error']:.6f}"] if "watershed_seconds" in row else ["-", "-", "-"])]
             for row in results["rows"]]
    total = sum(row["seconds"] for row in results["rows"])
    cut = sum(row.get("watershed_seconds", row["seconds"]) for row in results["rows"])
    warping = next(row["seconds"] for row in results["rows"] if row["metric"] == "warping_error_sweep")
    return "\n\n".join([
        f"## Evaluation metrics: ISBI 2012 sweeps over {slices} slices of {height}x{width}, one CPU core",
        f"`{command}`",
        common.paragraph(
            "One core as for the elastic warp (pinned to CPU 0, one thread per library). Ground truth: "
            f"{results['source']}, {'repeated to' if slices > results['source_slices'] else 'the first'} {slices} "
            "slices; proposal: the labels blurred and noised into a "
            "probability map. Each sweep scores the whole stack at every threshold of the reference's grid, as "
            "`evaluate` does; the segment metrics also as `evaluate --set predict.instances=watershed` scores them, "
            "the cells' thin necks cut at every threshold first (seconds, their ratio to the map's, best error)."),
        common.markdown_table(["metric", "thresholds", "seconds", "ms per slice", "best error", "at threshold",
                               "watershed: seconds", "ratio", "best error"], table, "lrrrrrrrr"),
        common.paragraph(
            f"All five sweeps: {total:.1f} s for {slices} slices ({1000 * total / slices:.0f} ms per slice); with "
            f"the watershed's cells, {cut:.1f} s ({cut / total:.1f}x). "
            "The warping error's simple-point warping against the tests' oracle (the reference's visiting order, "
            f"one pixel at a time in plain Python) on {common.count(oracle['slices'], 'slice')} x "
            f"{oracle['thresholds']} thresholds: ours {oracle['ours']:.2f} s, oracle {oracle['reference']:.1f} s, "
            f"{oracle['reference'] / oracle['ours']:.0f}x faster, results identical.",
            f"The warping error sweep took {warping:.1f} s for {slices} slices (goal for 30 ISBI-sized slices: "
            f"under {GOAL_WARPING_SECONDS:.0f} s, seconds not minutes: "
            f"{common.verdict(warping < GOAL_WARPING_SECONDS) if slices >= 30 and height >= 512 else 'not measured at that size'})."),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=30)
    parser.add_argument("--oracle-slices", type=int, default=1, help="slices warped by the plain-Python oracle")
    parser.add_argument("--size", type=int, help="crop the slices to size x size (default: whole slices)")
    common.add_json_argument(parser)
    args = parser.parse_args()
    common.finish(args.json, measure(args.slices, args.oracle_slices, args.size), render)


if __name__ == "__main__":
    main()
