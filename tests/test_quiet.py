"""A quiet console (pipeline.quiet): no TensorFlow C++ log lines and no cuInit error where no
GPU is, every other line of stderr kept, and the variables a user set respected."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import quiet

ROOT = Path(__file__).resolve().parents[1]
CPP_LINE = re.compile(r"^[IWEF]\d{4} |cuInit|absl::InitializeLog", re.MULTILINE)
# A library import as a user's script makes it: the package first, then TensorFlow, one op.
SCRIPT = "import pipeline, tensorflow as tf; print(float(tf.reduce_sum(tf.ones(3))))"


def python(code: str, **env: str) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter whose environment has none of the variables
    pipeline.quiet sets (this process imported the package, which set them), but `env`."""
    clean = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLED_DEVICE_TYPES")}
    clean["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    return done


def test_tensorflow_imported_after_the_package_prints_no_cpp_log_line():
    done = python(SCRIPT)
    assert done.stdout == "3.0\n"
    assert not CPP_LINE.search(done.stderr), done.stderr


@pytest.mark.skipif(quiet.has_gpu_driver(), reason="with a GPU driver a failed cuInit is news and shows")
def test_the_onnx_conversion_prints_no_cuinit_error_without_a_gpu():
    """tf2onnx's grappler pass lists devices past TF_ENABLED_DEVICE_TYPES: the zoo export
    wrapped it in quiet.device_probe_hidden."""
    pytest.importorskip("tf2onnx")
    convert = ("import pipeline; from pipeline.config.resolve import preset; from pipeline.training.model import unet; "
               "from pipeline.files.bioimageio import ONNX, weight_files; "
               "print(ONNX in weight_files(unet(preset('smoke').model)))")
    done = python(convert)
    assert done.stdout == "True\n"
    assert not CPP_LINE.search(done.stderr), done.stderr


def test_a_level_the_user_set_is_respected():
    """TF_CPP_MIN_LOG_LEVEL=0 (everything): TensorFlow's INFO lines come through, the one
    that TF_ENABLED_DEVICE_TYPES makes on every machine among them."""
    done = python(SCRIPT, TF_CPP_MIN_LOG_LEVEL="0", TF_ENABLED_DEVICE_TYPES="CPU")
    assert done.stdout == "3.0\n"
    assert re.search(r"^I\d{4} .*disabled by TF_ENABLED_DEVICE_TYPES", done.stderr, re.MULTILINE), done.stderr


def test_defaults_only_where_the_user_set_nothing():
    show = "import os, pipeline; print(os.environ['TF_CPP_MIN_LOG_LEVEL'], os.environ.get('TF_ENABLED_DEVICE_TYPES'))"
    assert python(show).stdout.split() == ["2", "None" if quiet.has_gpu_driver() else "CPU"]
    assert python(show, TF_CPP_MIN_LOG_LEVEL="1", TF_ENABLED_DEVICE_TYPES="CPU,GPU").stdout.split() == ["1", "CPU,GPU"]


@pytest.mark.parametrize("level, shown", [
    (2, ["plain text\n", "E0000 00:00:1796617512.778646   32555 cuda_platform.cc:52] an error\n"]),
    (0, None),  # all of it
    (3, ["plain text\n"]),
])
def test_only_cpp_log_lines_below_the_level_are_hidden(capfd, level, shown):
    written = [quiet.ABSL_PREAMBLE.decode() + "\n",
               "I0000 00:00:1796617504.030648   32555 cudart_stub.cc:31] Could not find cuda drivers\n",
               "plain text\n",
               "W0000 00:00:1796617504.030648   32555 x.cc:1] a warning\n",
               "E0000 00:00:1796617512.778646   32555 cuda_platform.cc:52] an error\n"]
    capfd.readouterr()
    with quiet.cpp_lines_hidden(level):
        os.write(2, "".join(written).encode())  # as C++ writes: to the file descriptor
    assert capfd.readouterr().err == "".join(written if shown is None else shown)


def test_stderr_written_by_python_during_the_import_is_kept(capfd):
    capfd.readouterr()
    with quiet.cpp_lines_hidden(2):
        print("a Python warning", file=sys.stderr)
    assert capfd.readouterr().err == "a Python warning\n"
