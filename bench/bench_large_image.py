"""Images larger than memory: peak resident memory and speed of chunked prediction per image size.

For each side, a synthetic square uint8 tiled TIFF is written tile by tile (the generator
never holds the image), then segmented by `large_image.segment_large`'s steps (plan,
statistics, predict and write every chunk, finish: labels, measurements, tiled BigTIFFs)
in a fresh Python process, whose peak resident set size (ru_maxrss) is the measurement.
Side by side, up to `WHOLE_IMAGE_LIMIT`, the whole-image path of the predict stage in a
process of its own: the image read whole, `segmenter.Segmenter`, the labels of
`instances.cell_instances`, the measurements and the TIFFs. The `cpu` preset with
untrained weights: speed and memory do not depend on the weights. Memory must not grow
with the image: the ratio of the largest size's chunked peak to the smallest's is the
headline (by default 40,000 px against 4,096 px). The 40,000 px case writes a 1.6 GB
input and needs about 29 GB free in `--folder` for its outputs.

    PYTHONPATH=. python bench/bench_large_image.py [--sizes 4096 16384 40000] [--chunk-size 2048]
        [--folder DIR] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bench import common  # noqa: E402

TILE = 256  # the input TIFF's tiles
# The largest side whose whole-image prediction is measured: at 16384 px its float32
# copies (image, padded image, two-class output, mosaic) alone need over 8 GB.
WHOLE_IMAGE_LIMIT = 4096


def write_synthetic_tiff(path: Path, side: int) -> None:
    """A side x side uint8 tiled TIFF of membrane-like stripes and noise, written tile by tile."""
    import numpy as np
    import tifffile

    def tiles() -> Iterator[np.ndarray]:
        rng = np.random.default_rng(0)
        for row in range(0, side, TILE):
            for col in range(0, side, TILE):
                rows, cols = np.mgrid[row:min(row + TILE, side), col:min(col + TILE, side)]
                cells = np.sin(rows / 7.0 + np.sin(cols / 23.0)) * np.cos(cols / 9.0 + np.sin(rows / 17.0))
                noise = rng.normal(0, 20, rows.shape)
                yield np.clip(128 + 90 * cells + noise, 0, 255).astype(np.uint8)

    tifffile.imwrite(path, tiles(), shape=(side, side), dtype=np.uint8, tile=(TILE, TILE), bigtiff=True,
                     photometric="minisblack")


def peak_rss_mib() -> float:
    """This process's peak resident set size so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_preset(chunk_size: int):
    """The `cpu` preset with every image large, chunks of `chunk_size`, and its untrained model."""
    import dataclasses

    import keras

    from pipeline.config import resolve as configuration
    from pipeline.training.model import unet

    config = configuration.preset("cpu")
    config = dataclasses.replace(config, predict=dataclasses.replace(config.predict, max_whole_pixels=1,
                                                                     chunk_size=chunk_size))
    keras.utils.set_random_seed(0)
    return config, unet(config.model)


def segment(path: Path, output_dir: Path, chunk_size: int) -> dict[str, Any]:
    """A child: chunked prediction of one file, timed by step, with the peak memory before and after."""
    from pipeline.inference import chunk_grid, large_image

    config, model = cpu_preset(chunk_size)
    # The fixed cost: TensorFlow, the model and one traced chunk-sized graph on a small image.
    warm = output_dir / "warm-up.tif"
    write_synthetic_tiff(warm, chunk_grid.chunk_side(config) + 100)
    large_image.segment_large(model, warm, output_dir, "warm-up", config)
    baseline = peak_rss_mib()
    times = {}
    start = time.perf_counter()
    outputs = large_image.plan(path, output_dir, "large", config)
    stats = large_image.statistics(path, config)
    times["statistics"] = time.perf_counter() - start
    grid = chunk_grid.chunks(outputs.height, outputs.width, config)
    start = time.perf_counter()
    for chunk in grid:
        large_image.write_chunk(outputs, chunk, large_image.predict_chunk(model, path, chunk, stats, config), config)
    times["chunks"] = time.perf_counter() - start
    predicted = peak_rss_mib()
    start = time.perf_counter()
    written = large_image.finish(outputs, config)
    times["finish"] = time.perf_counter() - start
    with open(written[3]) as measurements:
        cells = sum(1 for _ in measurements) - 1
    return {"side": outputs.height, "chunk_side": chunk_grid.chunk_side(config), "chunks": len(grid),
            "times": times, "baseline_mib": baseline, "predict_peak_mib": predicted, "peak_mib": peak_rss_mib(),
            "cells": cells, "output_mib": sum(path.stat().st_size for path in written) / 2**20}


def segment_whole(path: Path, output_dir: Path, chunk_size: int) -> dict[str, Any]:
    """A child: the predict stage's whole-image path on one file, with the peak memory before and after."""
    import numpy as np

    from pipeline.files import io
    from pipeline.inference.labelling import instances
    from pipeline.inference.segmenter import Segmenter

    config, model = cpu_preset(chunk_size)
    segmenter = Segmenter(model, config)
    segmenter(np.zeros((1764, 1764, 1), np.uint8))  # the same warm-up as the chunked child's
    baseline = peak_rss_mib()
    times = {}
    start = time.perf_counter()
    image = io.read_stack(path, 1)[0]
    times["statistics"] = time.perf_counter() - start  # here: reading the image
    start = time.perf_counter()
    probability = segmenter(image)
    times["chunks"] = time.perf_counter() - start  # here: the whole image at once
    start = time.perf_counter()
    labels = instances.cell_instances(probability, config.predict.threshold, "components", config.predict.min_size)
    table = instances.measure(labels, probability)
    mask = instances.cell_mask(probability, config.predict.threshold).astype(np.uint8) * 255
    for name, array in (("prob", probability), ("mask", mask), ("labels", instances.label_image(labels))):
        io.write_tiff(output_dir / f"large_{name}.tif", array)
    times["finish"] = time.perf_counter() - start
    return {"side": image.shape[0], "cells": len(table), "times": times, "baseline_mib": baseline,
            "peak_mib": peak_rss_mib()}


def measure(sizes: list[int], chunk_size: int, folder: Path) -> dict[str, Any]:
    """Per size: write the input in this process, segment it in a fresh one."""
    rows = []
    for side in sizes:
        work = Path(tempfile.mkdtemp(prefix=f"large-{side}-", dir=folder))
        try:
            path = work / "large.tif"
            start = time.perf_counter()
            write_synthetic_tiff(path, side)
            print(f"{side} px: input written in {time.perf_counter() - start:.0f} s; segmenting", flush=True)
            arguments = ["--child", str(path), "--chunk-size", str(chunk_size)]
            row = common.run_json(Path(__file__), arguments)
            print(f"{side} px: {sum(row['times'].values()):.0f} s, peak {row['peak_mib']:.0f} MiB", flush=True)
            if side <= WHOLE_IMAGE_LIMIT:
                row["whole"] = common.run_json(Path(__file__), [*arguments, "--whole"])
                print(f"{side} px whole: {sum(row['whole']['times'].values()):.0f} s, "
                      f"peak {row['whole']['peak_mib']:.0f} MiB", flush=True)
            rows.append(row)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return {"machine": common.machine(), "chunk_size": chunk_size, "rows": rows}


def render(results: dict[str, Any]) -> str:
    """The markdown section: what is measured, the table, the memory ratio."""
    rows, machine = results["rows"], results["machine"]
    smallest, largest = rows[0], rows[-1]
    table = []
    for row in rows:
        table.append(_table_row(row, f"chunked ({row['chunks']} chunks)", smallest["peak_mib"]))
        if "whole" in row:
            table.append(_table_row(row["whole"], "whole image", smallest["peak_mib"]))
    ratio = largest["peak_mib"] / smallest["peak_mib"]
    growth = (largest["peak_mib"] - largest["baseline_mib"]) / max(smallest["peak_mib"] - smallest["baseline_mib"], 1)
    device = ", ".join(machine["gpus"]) or f"{machine['usable_cores']} CPU cores ({machine['cpu']})"
    sides = " ".join(str(row["side"]) for row in rows)
    return "\n\n".join([
        f"## Images larger than memory (chunked prediction, `cpu` preset, {device})",
        f"`PYTHONPATH=. python bench/bench_large_image.py --sizes {sides} --chunk-size {results['chunk_size']}`",
        common.paragraph(
            "Synthetic square uint8 tiled TIFFs, segmented chunk by chunk in a fresh process each: read "
            "(the statistics' streaming pass for the normalisation), predict (every chunk read, predicted and "
            "written: probability and mask), finish (labels in two passes, measurements, tiled BigTIFFs). "
            f"Up to {WHOLE_IMAGE_LIMIT} px, the whole-image path beside it: read (the image whole), predict "
            "(`Segmenter`), finish (labels, measurements, TIFFs). Untrained weights. Peak memory is the "
            "process's ru_maxrss (after the predict step, and at the end); the baseline is its peak after "
            "TensorFlow, the model and a warm-up prediction of a chunk-sized image; finish also holds the "
            f"measurements of every cell. Chunk side {rows[0]['chunk_side']} px. The last column is the peak "
            f"as a multiple of the chunked peak at the smallest side ({smallest['side']:,} px)."),
        common.markdown_table(["side (px)", "path", "cells", "read (s)", "predict (s)", "finish (s)",
                               "Mpx/s overall", "Mpx/s predict", "baseline RSS (MiB)", "peak RSS predict (MiB)",
                               "peak RSS (MiB)", "peak RSS / smallest"], table, "rlrrrrrrrrrr"),
        common.paragraph(
            f"Peak RSS of {largest['side']:,} px against {smallest['side']:,} px: {ratio:.2f}x for "
            f"{(largest['side'] / smallest['side']) ** 2:.0f}x the pixels; above the baseline, {growth:.2f}x.",
            *[_against_whole(row) for row in rows if "whole" in row]),
    ])


def _against_whole(row: dict[str, Any]) -> str:
    """A sentence: the chunked path's time and peak memory as multiples of the whole-image path's."""
    whole = row["whole"]
    time_ratio = sum(row["times"].values()) / sum(whole["times"].values())
    return (f"At {row['side']:,} px, chunked prediction takes {time_ratio:.2f}x the whole-image path's time "
            f"and {row['peak_mib'] / whole['peak_mib']:.2f}x its peak memory "
            f"({(row['peak_mib'] - row['baseline_mib']) / max(whole['peak_mib'] - whole['baseline_mib'], 1):.2f}x "
            "above the baselines).")


def _table_row(row: dict[str, Any], path: str, smallest_peak: float) -> list[str]:
    """One line of the table: a size segmented by one path; its peak memory also as a multiple of `smallest_peak`."""
    megapixels = row["side"] ** 2 / 1e6
    times = row["times"]
    predicted = f"{row['predict_peak_mib']:,.0f}" if "predict_peak_mib" in row else "-"
    return [f"{row['side']:,}", path, f"{row['cells']:,}", f"{times['statistics']:.1f}", f"{times['chunks']:.1f}",
            f"{times['finish']:.1f}", f"{megapixels / sum(times.values()):.2f}",
            f"{megapixels / times['chunks']:.2f}", f"{row['baseline_mib']:,.0f}", predicted, f"{row['peak_mib']:,.0f}",
            f"{row['peak_mib'] / smallest_peak:.2f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[4096, 16384, 40000], help="image sides in pixels")
    parser.add_argument("--chunk-size", type=int, default=2048, help="predict.chunk_size")
    parser.add_argument("--folder", type=Path, default=None, help="where the images are written (default: temp)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # one measurement, in its own process
    parser.add_argument("--whole", action="store_true", help=argparse.SUPPRESS)  # the child's: whole image
    common.add_json_argument(parser)
    args = parser.parse_args()
    if args.child:
        child = segment_whole if args.whole else segment
        with tempfile.TemporaryDirectory(dir=args.child.parent) as output_dir:
            common.finish(args.json, child(args.child, Path(output_dir), args.chunk_size), str)
        return
    common.finish(args.json, measure(sorted(args.sizes), args.chunk_size, args.folder), render)


if __name__ == "__main__":
    main()
