"""Builds and loads the compiled warp kernel (`warp_kernel.cc`) on first use.

The kernel is compiled against the TensorFlow that is installed, with the flags TensorFlow
itself reports (`tf.sysconfig`), so that nothing binary ships with the project and the
shared library always matches the running TensorFlow. The result is cached per source,
TensorFlow version, compiler flags and CPU features:

    $UNET_KERNEL_CACHE, else $XDG_CACHE_HOME/unet-pipeline, else ~/.cache/unet-pipeline

Where there is no C++ compiler (or the build fails), `load()` says why once, in a
warning, and returns None: callers then use the graph implementation, which computes
the same samples, more slowly on a CPU (BENCHMARKS.md).
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from types import ModuleType

import tensorflow as tf

SOURCE = Path(__file__).with_name("warp_kernel.cc")


def _cpu_flags() -> list[str]:
    """-march for the vector path where the CPU has AVX2 and FMA (Linux x86-64), else none."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = set(next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), []))
    # x86-64-v3 (AVX2, FMA, BMI2, ...), not -march=native: a cache on a shared home
    # directory must not hold code that a different node's CPU cannot run.
    return ["-march=x86-64-v3"] if {"avx2", "fma", "bmi2"} <= flags else []


def _command(compiler: str, output: Path) -> list[str]:
    return [compiler, "-shared", "-fPIC", "-O3", "-w", *_cpu_flags(), *tf.sysconfig.get_compile_flags(),
            str(SOURCE), "-o", str(output), *tf.sysconfig.get_link_flags()]


def _cache_dir() -> Path:
    if "UNET_KERNEL_CACHE" in os.environ:
        return Path(os.environ["UNET_KERNEL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "unet-pipeline"


def build(compiler: str | None = None) -> Path:
    """Compiles the kernel unless the cache holds it already; returns the shared library.

    Raises RuntimeError with the compiler's message when the build fails.
    """
    compiler = compiler or os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")
    key = hashlib.sha256()
    key.update(SOURCE.read_bytes())
    key.update(" ".join(_command(compiler, Path("out"))).encode())
    key.update(f"{tf.__version__} {platform.machine()} {sys.version_info[:2]}".encode())
    library = _cache_dir() / f"warp_kernel-{key.hexdigest()[:16]}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    # Compiled to a temporary name and renamed into place: a concurrent build or an
    # interrupted one never leaves a half-written library under the cached name.
    with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
        partial = Path(scratch) / library.name
        result = subprocess.run(_command(compiler, partial), capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"compiling {SOURCE.name} failed: {result.stderr.strip()[-2000:]}")
        os.replace(partial, library)
    return library


@functools.cache
def load() -> ModuleType | None:
    """The compiled op module (`unet_warp`), built on first use; None where it cannot be."""
    if os.environ.get("UNET_KERNEL", "").lower() in ("0", "off", "false"):
        return None
    try:
        return tf.load_op_library(str(build()))
    except (RuntimeError, OSError, tf.errors.NotFoundError) as error:
        warnings.warn(f"compiled warp kernel unavailable, using the graph implementation: {error}", stacklevel=2)
        return None
