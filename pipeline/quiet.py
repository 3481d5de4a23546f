"""A quiet console: no TensorFlow C++ log lines, no CUDA probe on machines without a GPU.

`pipeline/__init__.py` calls `configure` before anything imports TensorFlow: every entry
point imports the package first (the CLI, a Beam worker unpickling our steps, a library
import), so this is the one place. A variable the user set wins: `configure` only sets
defaults (TensorFlow reads them when it starts).

TensorFlow's shared libraries log "Could not find cuda drivers" (and absl's note that its
log is not yet initialised) while they load, before they read TF_CPP_MIN_LOG_LEVEL, so the
variable alone cannot hide them: the first import of `tensorflow` runs with the process's
stderr captured, and gives back every line but the C++ log lines below that level (what
other threads write meanwhile comes out once the import is done, in order).
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import re
import sys
import tempfile
import types
from typing import Iterator

# TF_CPP_MIN_LOG_LEVEL: 0 all, 1 no INFO, 2 no WARNING, 3 no ERROR. 2: the errors only.
LOG_LEVEL = "2"
SEVERITIES = "IWEF"  # absl's INFO, WARNING, ERROR, FATAL, as its lines begin
# An absl C++ log line: severity, MMDD, time, thread, file:line], e.g.
# "I0000 00:00:1796617504.030648   32555 cudart_stub.cc:31] Could not find cuda drivers ...".
CPP_LINE = re.compile(rb"([IWEF])\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [^ \]]+:\d+\] ")
# What absl writes before the first line it logs ahead of its initialisation: a warning.
ABSL_PREAMBLE = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
# What TensorFlow's CUDA build logs as an ERROR when code that lists devices past
# TF_ENABLED_DEVICE_TYPES (grappler's cluster, which tf2onnx's conversion builds) finds no
# GPU driver: expected on a CPU machine, and read as a failure.
CUINIT_FAILURE = re.compile(rb"E\d{4} \d\d:\d\d:\d+\.\d+ +\d+ cuda_platform\.cc:\d+\] failed call to cuInit")
# Device files of a GPU driver: NVIDIA's (also inside containers given a GPU), AMD ROCm's.
GPU_DRIVER_FILES = ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/kfd")


def configure() -> None:
    """Sets TensorFlow's console defaults and filters its first import; does nothing twice."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", LOG_LEVEL)
    if not has_gpu_driver():
        # Else TensorFlow's CUDA build calls cuInit anyway and logs its failure as an
        # ERROR ("failed call to cuInit ... (303)"), which reads as a failure on a CPU machine.
        os.environ.setdefault("TF_ENABLED_DEVICE_TYPES", "CPU")
    if "tensorflow" not in sys.modules and not any(isinstance(f, _QuietImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietImport())


def has_gpu_driver() -> bool:
    """Whether a GPU can be there: not Linux (Metal and other plugins: not ours to judge), or
    the device files of an NVIDIA or AMD driver exist."""
    return not sys.platform.startswith("linux") or any(os.path.exists(path) for path in GPU_DRIVER_FILES)


def min_log_level() -> int:
    """TF_CPP_MIN_LOG_LEVEL as TensorFlow reads it: a number, else 0 (everything)."""
    try:
        return int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        return 0


def hidden(line: bytes, level: int) -> bool:
    """Whether `line` is a C++ log line below `level` (TF_CPP_MIN_LOG_LEVEL)."""
    if line.rstrip(b"\r\n") == ABSL_PREAMBLE:
        return level > SEVERITIES.index("W")
    match = CPP_LINE.match(line)
    return bool(match) and SEVERITIES.index(match.group(1).decode()) < level


@contextlib.contextmanager
def device_probe_hidden() -> Iterator[None]:
    """Runs the block without the cuInit failure line on a machine with no GPU driver (other
    lines as TF_CPP_MIN_LOG_LEVEL says); with a driver, a failed cuInit is news and shows."""
    if has_gpu_driver():
        yield
        return
    with cpp_lines_hidden(min_log_level(), also=CUINIT_FAILURE):
        yield


@contextlib.contextmanager
def cpp_lines_hidden(level: int, also: re.Pattern[bytes] | None = None) -> Iterator[None]:
    """Runs the block with file descriptor 2 captured (C++ writes there, not to
    sys.stderr), then writes back what it got but the C++ log lines below `level` (and
    the lines `also` matches)."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all (a daemon): nothing to keep quiet
        yield
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            with open(2, "wb", closefd=False) as stderr:
                stderr.writelines(line for line in captured
                                  if not hidden(line, level) and not (also and also.match(line)))


class _QuietImport(importlib.abc.MetaPathFinder):
    """Finds `tensorflow` once, as the other finders do, with a loader that runs the module
    under `cpp_lines_hidden`; then leaves sys.meta_path."""

    def find_spec(self, name: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None and min_log_level() > 0:
            spec.loader = _QuietLoader(spec.loader)
        return spec


class _QuietLoader(importlib.abc.Loader):
    """A loader's work with the C++ start-up lines hidden; it hands the module back to that loader."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        module.__loader__ = module.__spec__.loader = self.loader  # as if found without us
        with cpp_lines_hidden(min_log_level()):
            self.loader.exec_module(module)
