"""The ablation table of docs/results.md: the ISBI 2012 recipe without each of the paper's ingredients.

Every variant is a run of `run_pipeline.py` (prepare, train, evaluate) with the same
preset, data, seeds and number of steps; only the overrides below differ. Scores are the
ISBI errors on the held-out validation slices, without test-time augmentation so that
they show what training alone buys. Finished variants are not run again, so an
interrupted table resumes where it stopped.

    PYTHONPATH=. python bench/ablations.py --data-dir ../shared/data/isbi2012 --epochs 8
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from pipeline.files.io import atomic_write_text

PLAIN_CROSS_ENTROPY = ["weight_map.w0=0", "weight_map.class_balance=false"]

# Overrides of each variant. "same" needs tile sides divisible by 16 (its pooling
# alignment) and then sees its whole tile as output: 384 px in and out, against the
# recipe's 380 px in and 196 px out for about the same work per step.
VARIANTS: dict[str, list[str]] = {
    "full recipe": [],
    "no elastic deformation": ["augment.elastic=false"],
    "no weight map (plain cross-entropy)": PLAIN_CROSS_ENTROPY,
    "padding same + plain cross-entropy": ["model.padding=same", "train.tile_size=384", "predict.tile_size=576"]
    + PLAIN_CROSS_ENTROPY,
}

METRICS = ("warping_error", "rand_error", "pixel_error", "foreground_iou")


def run_variant(name: str, overrides: list[str], run_dir: Path, preset: str, common: list[str]) -> dict:
    """Prepares, trains and evaluates one variant; returns its report (reused if present)."""
    report_path = run_dir / "evaluation" / "report.json"
    if not report_path.exists():
        settings = ["--preset", preset] + [a for override in common + overrides for a in ("--set", override)]
        started = time.time()
        for stage in ("prepare", "train", "evaluate"):
            command = [sys.executable, "run_pipeline.py", "--stage", stage, "--run-dir", str(run_dir)]
            command += settings if stage == "prepare" else []  # later stages read the run's config.yaml
            print(f"[{name}] {' '.join(command)}", flush=True)
            subprocess.run(command, check=True)
        atomic_write_text(run_dir / "wall_seconds.txt", f"{time.time() - started:.0f}\n")
    return json.loads(report_path.read_text())


def table(rows: list[tuple[str, list[str], dict, str]]) -> str:
    """Markdown table of the variants' headline errors (lower is better) and IoU."""
    lines = ["| variant | overrides | warping error | Rand error | pixel error | foreground IoU | wall time |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, overrides, report, wall in rows:
        values = [report[key] if key in report else report["overall"][key] for key in METRICS]
        cells = " | ".join(f"{value:.6f}" if i == 0 else f"{value:.4f}" for i, value in enumerate(values))
        lines.append(f"| {name} | {' '.join(overrides) or '-'} | {cells} | {wall} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data/isbi2012", help="the ISBI 2012 TIFF stacks")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--epochs", type=int, help="training budget per variant (default: the recipe's)")
    parser.add_argument("--root", type=Path, default=Path("runs/ablations"), help="one run directory per variant")
    args = parser.parse_args()

    common = ["data.dataset=isbi2012", f"data.data_dir={Path(args.data_dir).resolve()}",
              "predict.test_time_augmentation=false"]
    common += [f"train.epochs={args.epochs}"] if args.epochs else []
    rows = []
    for index, (name, overrides) in enumerate(VARIANTS.items()):
        run_dir = args.root / f"{index}-{args.preset}"
        report = run_variant(name, overrides, run_dir, args.preset, common)
        wall = run_dir / "wall_seconds.txt"
        rows.append((name, overrides, report, f"{wall.read_text().strip()} s" if wall.exists() else "-"))
    text = table(rows)
    print(text)
    atomic_write_text(args.root / "ablations.md", text)


if __name__ == "__main__":
    main()
