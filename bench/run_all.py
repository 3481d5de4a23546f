"""Runs every benchmark and writes BENCHMARKS.md: the machine, the date and every table.

    PYTHONPATH=. python bench/run_all.py [--output BENCHMARKS.md] [--quick] [--only TITLE ...]

Each benchmark runs in a Python process of its own, one after the other: pinning to one
core, op determinism and logical devices are per process, and no benchmark may compete
with another for the cores. Each hands back its results as JSON (`--json`), rendered here
by its script's `render`, so the file holds exactly what was measured in this run. The
file is written atomically; a benchmark that fails gets its error in its section and the
command exits with status 1.

`--only "Training throughput"` runs the named benchmarks alone and replaces just their
sections in the existing file, each marked with the machine, date and load of its own run
(the header keeps describing the run that wrote the rest).

`--quick` makes every benchmark tiny (short durations, small images, no `paper`-size
cases) to check the suite in a few minutes; its numbers are not measurements, and it
writes to the temporary folder unless `--output` says otherwise.

A benchmark of the GPU runs only where TensorFlow sees one; elsewhere the file keeps the
section it has, with the machine and date it was measured on.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bench import (bench_beam, bench_elastic_warp, bench_gpu_step, bench_input_pipeline,  # noqa: E402
                   bench_large_image, bench_metrics, bench_overlap_tile, bench_training, common)
from pipeline.files.io import atomic_write_text  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """One script of the suite; its defaults are the full run, `quick` the arguments of --quick."""

    title: str
    module: ModuleType
    quick: list[str]
    # Measured only where TensorFlow sees a GPU; elsewhere the file keeps the section it has,
    # measured on another machine, so that a CPU run does not erase the GPU's figures.
    needs_gpu: bool = False


BENCHMARKS = [
    Benchmark("Elastic warp", bench_elastic_warp, ["--seconds", "0.5", "--size", "188"]),
    Benchmark("Input pipeline", bench_input_pipeline, ["--presets", "cpu", "--tiles", "16", "--steps", "1"]),
    Benchmark("Training throughput", bench_training,
              ["--presets", "cpu", "--threads", "default", "--freed-memory", "kept", "--processes", "1", "--steps", "1",
               "--matmul-size", "2048", "--matmul-repeats", "3"]),
    Benchmark("Overlap-tile prediction", bench_overlap_tile, ["--presets", "cpu", "--sizes", "512", "--repeats", "1"]),
    Benchmark("Evaluation metrics", bench_metrics, ["--slices", "3", "--size", "256"]),
    Benchmark("Batch prediction on Apache Beam", bench_beam, ["--images", "2", "--size", "256", "--workers", "2"]),
    Benchmark("Images larger than memory", bench_large_image, ["--sizes", "512", "1024", "--chunk-size", "416"]),
    Benchmark("Training step on one GPU", bench_gpu_step, ["--steps", "2", "--steps-per-execution", "1", "--tile", "188"],
              needs_gpu=True),
]


def run_benchmark(benchmark: Benchmark, quick: bool) -> str:
    """The benchmark's markdown section; raises RuntimeError if its process failed."""
    results = common.run_json(Path(benchmark.module.__file__), benchmark.quick if quick else [])
    return benchmark.module.render(results)


def header(machine: dict[str, Any], started: datetime.datetime, seconds: float, command: str, quick: bool) -> str:
    """The file's top: what ran where and when, and how to run it again."""
    memory = "unknown memory" if machine["memory_gib"] is None else f"{machine['memory_gib']:.0f} GiB memory"
    gpus = ", ".join(machine["gpus"]) or "none"
    versions = ", ".join(f"{name} {version}" for name, version in machine["versions"].items())
    load = ", ".join(f"{value:.2f}" for value in machine["load_average"])
    cores = f"{machine['cores']} CPU cores"
    if machine["usable_cores"] != machine["cores"]:
        cores += f" ({machine['usable_cores']} usable by this run)"
    lines = ["# Benchmarks", ""]
    if quick:
        lines += ["> **Quick run (`--quick`)**: every benchmark shrunk to seconds (short durations, small images,",
                  "> no `paper`-size cases). It shows that the suite works; its numbers are not measurements.", ""]
    lines += [
        "Written by `bench/run_all.py` in one run: every ratio below compares figures measured side by",
        "side on this machine in this run. Each section names the script and arguments that repeat it",
        "alone. Change the scripts' `render` functions, not this file, and run the suite again.",
        "",
        f"- Machine: {machine['cpu']}, {cores}, {memory}; GPUs seen by TensorFlow: {gpus}",
        f"- Date: {started:%Y-%m-%d %H:%M %Z}; the run took {seconds / 60:.1f} min; load average when it started: "
        f"{load} (1, 5, 15 min; the figures assume an otherwise idle machine)",
        f"- Versions: {versions}",
        f"- Command: `{command}`",
        "",
        "```bash",
        "pip install -r bench/requirements.txt   # builds elasticdeform from source (NumPy 2)",
        "PYTHONPATH=. python bench/run_all.py    # --quick: a check of the suite in a few minutes",
        "```",
    ]
    return "\n".join(lines)


def remeasured(section: str, machine: dict[str, Any], started: datetime.datetime) -> str:
    """A section measured by `--only`: its title, then where and when, then the rest."""
    title, _, body = section.partition("\n\n")
    load = ", ".join(f"{value:.2f}" for value in machine["load_average"])
    note = (f"_Measured alone (`run_all.py --only`) on {started:%Y-%m-%d %H:%M %Z}, {machine['cpu']}, "
            f"{machine['usable_cores']} usable cores, load average {load} when it started; the header describes "
            "the run that wrote the other sections._")
    return f"{title}\n\n{note}\n\n{body}"


def existing_section(text: str, title: str) -> str | None:
    """The section of `text` (a BENCHMARKS.md) whose heading starts with `title`, if it has one."""
    for part in text.split("\n\n## ")[1:]:
        if part.startswith(title):
            return "## " + part.rstrip("\n")
    return None


def section_without_gpu(benchmark: Benchmark, output: Path) -> str:
    """What a machine without a GPU writes for `benchmark`: the section the file has, else a note."""
    kept = existing_section(output.read_text(), benchmark.title) if output.is_file() else None
    script = Path(benchmark.module.__file__).relative_to(common.ROOT)
    return kept or (f"## {benchmark.title}\n\nNot measured: TensorFlow sees no GPU on this machine. "
                    f"Run `PYTHONPATH=. python {script}` on one (see its docstring).")


def replace_sections(text: str, sections: dict[str, str]) -> str:
    """`text` (a BENCHMARKS.md) with each section whose heading starts with a key replaced by its value."""
    parts = text.split("\n\n## ")
    replaced = list(parts)
    for title, section in sections.items():
        matches = [index for index, part in enumerate(parts[1:], 1) if part.startswith(title)]
        if len(matches) != 1:
            raise ValueError(f"{len(matches)} sections titled {title!r}... in the file to update, not 1")
        replaced[matches[0]] = section.removeprefix("## ").rstrip("\n")
    return "\n\n## ".join(replaced).rstrip("\n") + "\n"


def failed_section(benchmark: Benchmark, error: Exception) -> str:
    """The section of a benchmark whose process failed: its title and the error."""
    return f"## {benchmark.title}\n\n**Failed**:\n\n```\n{error}\n```"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path,
                        help="file to write (default: BENCHMARKS.md at the top of the repository; with --quick, "
                             "BENCHMARKS-quick.md in the temporary folder)")
    parser.add_argument("--quick", action="store_true", help="tiny benchmarks: checks the suite, measures nothing")
    parser.add_argument("--only", nargs="+", metavar="TITLE", choices=[benchmark.title for benchmark in BENCHMARKS],
                        help="run these benchmarks and replace only their sections in the existing file")
    args = parser.parse_args()
    output = args.output or (Path(tempfile.gettempdir()) / "BENCHMARKS-quick.md" if args.quick
                             else common.ROOT / "BENCHMARKS.md")
    python_path = os.environ.get("PYTHONPATH")
    command = (f"PYTHONPATH={shlex.quote(python_path)} " if python_path else "") + "python " + shlex.join(sys.argv)

    started, start = datetime.datetime.now().astimezone(), time.perf_counter()
    machine = common.machine()  # first: the load average must not include our own benchmarks
    chosen = [benchmark for benchmark in BENCHMARKS if not args.only or benchmark.title in args.only]
    if args.only and not output.is_file():
        parser.error(f"--only updates an existing file; {output} does not exist")
    sections, measured, failures = [], [], 0
    for number, benchmark in enumerate(chosen, 1):
        print(f"[{number}/{len(chosen)}] {benchmark.title}", flush=True)
        began = time.perf_counter()
        if benchmark.needs_gpu and not machine["gpus"]:
            print(f"[{number}/{len(chosen)}] {benchmark.title}: no GPU here, its section is kept", flush=True)
            sections.append(section_without_gpu(benchmark, output))
            continue
        measured.append(benchmark.title)
        try:
            sections.append(run_benchmark(benchmark, args.quick))
        except RuntimeError as error:
            print(error, file=sys.stderr)
            sections.append(failed_section(benchmark, error))
            failures += 1
        print(f"[{number}/{len(chosen)}] {benchmark.title}: {time.perf_counter() - began:.0f} s", flush=True)

    if args.only:
        updated = {benchmark.title: remeasured(section, machine, started)
                   for benchmark, section in zip(chosen, sections) if benchmark.title in measured}
        atomic_write_text(output, replace_sections(output.read_text(), updated))
    else:
        text = header(machine, started, time.perf_counter() - start, command, args.quick)
        atomic_write_text(output, "\n\n".join([text, *sections]) + "\n")
    print(f"wrote {output}" + (f" ({failures} benchmark(s) failed)" if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
