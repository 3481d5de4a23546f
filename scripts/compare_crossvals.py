"""The levers table: cross-validations of the same folds set against the first, fold by fold.

    python scripts/compare_crossvals.py runs/cv-cpu-seed0 runs/cv-cpu-ema \
        runs/cv-cpu-seed0/crossval/ensemble/cv-cpu-seed1/report.json

Each argument is a cross-validation's run directory (its `crossval/report.json`) or a report
file (an ensemble's). Prints `pipeline.metrics.crossval.comparison_markdown`: per run the
settings it changes against the first, its Rand error over the folds, the paired difference
to the first's, the pooled warping error and the minutes of training (docs/results.md,
"Levers measured on the cross-validation"); then, for each recipe run with several seeds, its
mean over the seeds with their spread (`pipeline.metrics.crossval.seeds_markdown`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `pipeline`, from any working folder

from pipeline.errors import PipelineError  # noqa: E402
from pipeline.files import rundir  # noqa: E402
from pipeline.metrics import crossval  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="cross-validation run directories or report files")
    args = parser.parse_args()
    try:
        reports = [json.loads(rundir.crossval_report_file(path).read_text()) for path in args.runs]
        labels = [str(path) for path in args.runs]
        print(crossval.comparison_markdown(crossval.compare(reports), labels))
        groups = crossval.seeds(reports)
        if groups:
            print("\n" + crossval.seeds_markdown(groups, labels))
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
