"""What the benchmark scripts share: pinning to one core, JSON results, the machine, tables.

Only the standard library and `pipeline` (which imports nothing else at first) are imported
at module level: the one-core scripts import this module before NumPy, OpenCV and
TensorFlow, which must not start their thread pools before `use_one_core` has pinned the
process. `pipeline` first, for every script that imports this module before TensorFlow:
its quiet console (`pipeline.quiet`) hides TensorFlow's CUDA probe lines on machines
without a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator

import pipeline  # noqa: F401  (see the module doc)

ROOT = Path(__file__).resolve().parents[1]


def use_one_core() -> None:
    """Pins this process to CPU 0 and tells every library to use one thread.

    Call it before NumPy, OpenCV or TensorFlow is imported anywhere in the process: their
    thread pools are sized when they start, from the environment and the CPU affinity.
    """
    os.sched_setaffinity(0, {0})
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = "1"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import cv2
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    cv2.setNumThreads(1)


# --- results as JSON: how run_all (and bench_training's parent) collect them ---------------


def add_json_argument(parser: argparse.ArgumentParser) -> None:
    """Adds `--json PATH`: write the results there instead of printing markdown."""
    parser.add_argument("--json", type=Path, metavar="PATH",
                        help="write the results as JSON to PATH instead of printing the markdown section")


@contextlib.contextmanager
def run_folder(keep: Path | None) -> Iterator[Path]:
    """The folder a benchmark's run directories go in: `keep` (created) or a temporary one,
    and the working directory meanwhile: `prepare` records its run in ./runs/.latest, which
    belongs there, not in the checkout. Resolve relative paths before entering."""
    previous = Path.cwd()
    with tempfile.TemporaryDirectory() as scratch:
        folder = keep.resolve() if keep else Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        os.chdir(folder)
        try:
            yield folder
        finally:
            os.chdir(previous)


def finish(json_path: Path | None, results: Any, render: Callable[[Any], str]) -> None:
    """Writes `results` as JSON to `json_path`, or prints their markdown section."""
    if json_path is not None:
        json_path.write_text(json.dumps(results, indent=1))
    else:
        print("\n" + render(results))


def run_json(script: Path, arguments: list[str]) -> Any:
    """Runs `script --json TEMP arguments` in a fresh Python process; returns its results.

    The child's stdout (its progress lines) goes to ours; its stderr (TensorFlow's log) is
    kept and shown only when it fails.
    """
    environment = dict(os.environ)
    environment.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / "results.json"
        command = [sys.executable, str(script), *arguments, "--json", str(output)]
        process = subprocess.run(command, env=environment, stderr=subprocess.PIPE, text=True)
        if process.returncode != 0:
            tail = "\n".join(process.stderr.strip().splitlines()[-15:])
            raise RuntimeError(f"{' '.join(command[1:])} failed (exit status {process.returncode}):\n{tail}")
        return json.loads(output.read_text())


# --- the machine -----------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else `lscpu`, else the platform's word.

    Virtual machines may name only the brand ("AMD EPYC"), so /proc/cpuinfo's family and
    model numbers follow the name: they tell the generations apart (AMD family 25 is Zen 3
    or Zen 4, 26 Zen 5; Intel family 6 model 143 is Sapphire Rapids, 207 Emerald Rapids),
    whose matmul rates differ by more than two times.
    """
    try:
        fields = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
        if "model name" in fields:
            numbers = [f"{name} {fields[key]}" for key, name in (("cpu family", "family"), ("model", "model")) if key in fields]
            return fields["model name"] + (f" (CPU {', '.join(numbers)})" if numbers else "")
    except OSError:
        pass
    try:
        output = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in output.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float | None:
    """Total memory in GiB from /proc/meminfo, or None where there is none."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def tensorflow_gpus() -> list[str]:
    """The GPUs TensorFlow sees, by name (imports TensorFlow)."""
    import tensorflow as tf

    names = []
    for gpu in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        names.append(details.get("device_name", gpu.name))
    return names


def versions() -> dict[str, str]:
    """Versions of the libraries the benchmarks measure, by distribution name."""
    found = {"Python": platform.python_version()}
    for label, distributions in (("TensorFlow", ["tensorflow", "tensorflow-cpu"]), ("Keras", ["keras"]),
                                 ("NumPy", ["numpy"]),
                                 ("OpenCV", ["opencv-python-headless", "opencv-python",
                                             "opencv-contrib-python-headless", "opencv-contrib-python"]),
                                 ("elasticdeform", ["elasticdeform"])):
        found[label] = "not installed"
        for distribution in distributions:
            try:
                found[label] = metadata.version(distribution)
                break
            except metadata.PackageNotFoundError:
                continue
    return found


def machine() -> dict[str, Any]:
    """The machine in words and numbers: CPU, cores, memory, GPUs, library versions."""
    memory = memory_gib()
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "memory_gib": None if memory is None else round(memory, 1),
        "gpus": tensorflow_gpus(),
        "load_average": [round(load, 2) for load in os.getloadavg()],
        "versions": versions(),
    }


# --- markdown --------------------------------------------------------------------------


def markdown_table(header: list[str], rows: list[list[str]], align: str) -> str:
    """A markdown table; `align` has one letter per column: l (text) or r (numbers)."""
    if len(align) != len(header):
        raise ValueError(f"align {align!r} has {len(align)} letters for {len(header)} columns")
    rule = ["---" if a == "l" else "---:" for a in align]
    lines = [header, rule, *rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def verdict(met: bool) -> str:
    """How a goal reads in the prose: met, or not met in bold."""
    return "met" if met else "**not met**"


def paragraph(*sentences: str) -> str:
    """Sentences joined into one paragraph, wrapped at 90 columns like the rest of the file."""
    return textwrap.fill(" ".join(sentences), width=90, break_long_words=False, break_on_hyphens=False)


def count(number: int, noun: str) -> str:
    """'1 step', '3 steps'."""
    return f"{number} {noun}{'' if number == 1 else 's'}"
