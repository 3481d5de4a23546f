"""The napari plugin in a real viewer (napari's `make_napari_viewer`, pytest-qt): its labels are
predict's, its fine-tuning makes a new run that it switches to, Cancel kills the model process (and
leaves no model of a cancelled fine-tuning), a bad layer or a crashed model process is a one-line
notification, and napari's process never imports TensorFlow.

napari's canvas needs OpenGL, which Qt's offscreen platform does not give: without a display
the tests start Xvfb (`.ci/run` installs it), and skip only where there is none.
"""

import ctypes
import dataclasses
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

napari = pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from fakes import write_isbi  # noqa: E402
from pipeline.cli import main  # noqa: E402
from pipeline.config import resolve as configuration  # noqa: E402
from pipeline.data.image_folder import read_pairs  # noqa: E402
from pipeline.data.synthetic import synthetic_em_stack  # noqa: E402
from pipeline.files.rundir import RunDir  # noqa: E402
from pipeline.napari_plugin import corrections, samples, segmentation  # noqa: E402
from pipeline.napari_plugin.model_process import ModelProcess  # noqa: E402

PLUGIN = "pipeline/napari_plugin/napari.yaml"


@pytest.fixture(scope="session", autouse=True)
def display():
    """An X display for Qt's OpenGL: the session's own, or a private Xvfb started before any QApplication
    (local, so without access control: no cookie to hand over). The server lives as long as this
    process: Qt keeps its connection until the process ends and aborts if the server goes first."""
    if os.environ.get("DISPLAY"):
        return
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        pytest.skip("napari's viewer needs an X display or Xvfb (.ci/run installs xvfb with apt)")
    read, write = os.pipe()
    subprocess.Popen([xvfb, "-displayfd", str(write), "-screen", "0", "1280x1024x24", "-nolisten", "tcp", "-ac"],
                     pass_fds=(write,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     preexec_fn=_end_with_parent)
    os.close(write)
    # Written once the server accepts clients, maybe in pieces: read to the line's end, or the
    # server's next piece finds the pipe closed and it quits.
    number = b""
    while not number.endswith(b"\n"):
        piece = os.read(read, 32)
        if not piece:
            break
        number += piece
    os.close(read)
    number = number.decode().strip()
    os.environ["DISPLAY"] = f":{number}"


def _end_with_parent() -> None:
    """In the child: Linux sends it SIGTERM when the process that started it ends (prctl PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


@pytest.fixture
def remembered(tmp_path, qapp):
    """The plugin's remembered choices in a folder of the test's own, not the user's."""
    from qtpy.QtCore import QSettings

    QSettings.setPath(QSettings.IniFormat, QSettings.UserScope, str(tmp_path / "settings"))
    return samples.settings


@pytest.fixture(scope="module")
def model_process():
    """One model process for the file's widgets: each new one imports TensorFlow anew (seconds)."""
    shared = ModelProcess()
    yield shared
    shared.stop()


@pytest.fixture
def widget(make_napari_viewer, remembered, model_process):
    from pipeline.napari_plugin.widget import SegmentWidget

    viewer = make_napari_viewer()
    made = SegmentWidget(viewer, model_process)
    viewer.window.add_dock_widget(made)
    return viewer, made


def em_image(seed: int = 5, size: int = 96) -> np.ndarray:
    return synthetic_em_stack(1, size, seed)[0][0]


def idle(qtbot, made, timeout: int = 60_000) -> None:
    qtbot.waitUntil(lambda: not made.busy, timeout=timeout)


def segment(qtbot, made, layer) -> None:
    made.image.value = layer
    made.segment()
    idle(qtbot, made)


def loaded(qtbot, made, path) -> None:
    made.model_path.value = str(path)
    made.load_model()
    idle(qtbot, made)


def errors() -> list[str]:
    from napari.utils.notifications import NotificationSeverity, notification_manager

    return [record.message for record in notification_manager.records
            if record.severity == NotificationSeverity.ERROR]


def test_the_manifest_names_importable_commands():
    from npe2 import PluginManifest

    manifest = PluginManifest.from_file(PLUGIN)
    assert manifest.name == "unet-pipeline"
    for command in manifest.contributions.commands:
        assert callable(_resolve(command.python_name))
    assert {sample.key for sample in manifest.contributions.sample_data} == {"synthetic-em", "isbi2012"}


def _resolve(python_name: str):
    import importlib

    module, name = python_name.split(":")
    return getattr(importlib.import_module(module), name)


def test_the_widget_gives_predicts_labels_with_the_layers_scale(widget, qtbot, smoke_run, tmp_path):
    viewer, made = widget
    stack = np.stack([em_image(5), em_image(6)])
    tifffile.imwrite(tmp_path / "em.tif", stack, photometric="minisblack")
    assert main(["--stage", "predict", "--model", str(smoke_run["run_dir"]), "--input", str(tmp_path / "em.tif"),
                 "--output", str(tmp_path / "out")]) == 0
    expected = tifffile.imread(tmp_path / "out" / "em_labels.tif")

    loaded(qtbot, made, smoke_run["run_dir"])
    assert made.model.named == smoke_run["run_dir"]
    layer = viewer.add_image(stack, name="em", scale=(3.0, 2.0, 0.5), translate=(0.0, 10.0, -4.0))
    segment(qtbot, made, layer)
    labels, probability = viewer.layers["em cells"], viewer.layers["em probability"]
    # The widget's network runs in another thread than predict's, and on some CPUs the two round the last bit
    # of a probability differently: the probabilities agree to float rounding, the labels are the pipeline's
    # rule applied to them, and equal predict's wherever no probability sits within that rounding of a threshold.
    np.testing.assert_allclose(probability.data, tifffile.imread(tmp_path / "out" / "em_prob.tif"), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(labels.data, segmentation.cells(probability.data, made.threshold.value,
                                                                  made.method.value, made.min_size.value))
    assert np.mean(labels.data == expected) > 0.999
    assert labels.data.max() > 1  # cells, not an empty image
    for placed in (labels, probability):
        np.testing.assert_array_equal(placed.scale, layer.scale)
        np.testing.assert_array_equal(placed.translate, layer.translate)
    assert made.progress.value == made.progress.max == 2

    # The fields re-label from the probability layer: the network does not run again.
    made.threshold.value = 0.8
    np.testing.assert_array_equal(labels.data, segmentation.cells(probability.data, 0.8, made.method.value,
                                                                  made.min_size.value))
    assert not np.array_equal(labels.data, expected)
    # The model is remembered for the next session's widget.
    assert samples.settings().value("model") == str(smoke_run["run_dir"])


def test_a_bad_layer_is_a_one_line_notification(widget, qtbot, smoke_run):
    viewer, made = widget
    made.model_path.value = str(smoke_run["run_dir"])
    nan = viewer.add_image(np.where(np.eye(64, dtype=bool), np.nan, 1.0), name="holes")
    segment(qtbot, made, nan)
    colour = viewer.add_image(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8), name="rgb", rgb=True)
    segment(qtbot, made, colour)
    assert errors()[-2:] == ["layer holes: 64 pixel values are NaN, infinite or beyond float32's range (3.4e38)",
                             "layer rgb: colour image (3 channels) but the model takes 1 channel; "
                             "convert it to grey or train with model.input_channels=3"]
    loaded(qtbot, made, smoke_run["run_dir"] / "train")
    assert "neither a run directory" in errors()[-1]
    assert made.model is None and made.model_info.value == "no model loaded"
    assert [layer.name for layer in viewer.layers] == ["holes", "rgb"]  # nothing segmented


def test_a_fine_tuning_takes_whole_epochs_of_the_models_length_but_never_a_few_steps():
    """(epochs, steps per epoch): every epoch ends in a validation, which a 2-step epoch makes the most of the time."""
    def trained(steps_per_epoch: int):
        config = configuration.preset("smoke")
        return dataclasses.replace(config, train=dataclasses.replace(config.train, steps_per_epoch=steps_per_epoch))

    assert corrections.length(trained(25), 200) == (8, 25)
    assert corrections.length(trained(25), 210) == (9, 25)  # rounded up to whole epochs
    assert corrections.length(trained(2), 200) == (10, corrections.MIN_EPOCH_STEPS)
    assert corrections.length(trained(2), 5) == (1, 5)  # fewer steps asked than an epoch


def test_fine_tuning_makes_a_run_the_widget_switches_to(widget, qtbot, smoke_run, tmp_path):
    viewer, made = widget
    made.model_path.value = str(smoke_run["run_dir"])
    image = viewer.add_image(em_image(7), name="em 7")
    segment(qtbot, made, image)
    cells = viewer.layers["em 7 cells"]
    cells.selected_label = int(cells.data.max()) + 1
    cells.brush_size = 9
    cells.paint((40, 40), cells.selected_label)  # a correction, with napari's brush
    corrected = np.array(cells.data)
    made.steps.value, made.runs.value = 2, str(tmp_path / "runs")

    made.fine_tune()
    idle(qtbot, made, 120_000)
    [run_root] = [path for path in (tmp_path / "runs").iterdir() if not path.name.endswith("-corrections")]
    run = RunDir(run_root)
    assert run.best_model.is_file()
    assert made.model.named == run.root and made.model_path.value == run.root
    assert made.loss.value.startswith("epoch 1: loss ") and made.progress.value == made.progress.max == 1
    config = run.saved_config()
    assert (config.data.dataset, config.train.init_from) == ("image_folder", str(smoke_run["run_dir"]))
    assert config.train.epochs * config.train.steps_per_epoch == 2
    # The data set holds the image and its cells as corrected; the one image validates as its copy.
    [trained, validation] = read_pairs(config.data.data_dir)
    np.testing.assert_array_equal(trained.image[..., 0], image.data)
    assert np.array_equal(trained.instances > 0, corrected > 0) and trained.instances.max() == corrected.max()
    assert validation.id == trained.id + corrections.VALIDATION_COPY


def test_cancel_kills_a_fine_tuning_and_leaves_its_run_without_a_model(widget, qtbot, smoke_run, tmp_path):
    viewer, made = widget
    loaded(qtbot, made, smoke_run["run_dir"])
    image = viewer.add_image(em_image(8), name="em 8")
    segment(qtbot, made, image)
    made.steps.value, made.runs.value = 100_000, str(tmp_path / "runs")
    made.fine_tune()
    [child] = multiprocessing.active_children()
    # An epoch ends: the run holds a model half trained.
    qtbot.waitUntil(lambda: any((tmp_path / "runs").glob("*-napari/train/best.keras")), timeout=120_000)
    [run] = [RunDir(path) for path in (tmp_path / "runs").glob("*-napari")]
    made.cancel()
    idle(qtbot, made)
    assert child.exitcode == -signal.SIGKILL
    assert not run.has_trained_model() and not run.history.exists()  # nothing to take for a fine-tuned model
    assert run.saved_config().train.init_from == str(smoke_run["run_dir"])  # `--stage train` makes it
    assert made.model.named == smoke_run["run_dir"] and made.model_path.value == smoke_run["run_dir"]
    assert made.loss.value == f"cancelled: {run} holds no model"
    assert not [message for message in errors() if "model process" in message]


def test_a_crashed_model_process_is_a_one_line_notification(widget, qtbot, smoke_run):
    viewer, made = widget
    made.model_path.value = str(smoke_run["run_dir"])
    made.image.value = viewer.add_image(em_image(9), name="em 9")
    made.process.stop()  # a new model process, which is killed while it starts
    made.segment()
    qtbot.waitUntil(lambda: bool(multiprocessing.active_children()))
    [child] = multiprocessing.active_children()
    os.kill(child.pid, signal.SIGKILL)
    idle(qtbot, made)
    assert errors()[-1] == "the model process ended without an answer (killed by SIGKILL: out of memory?)"
    assert [layer.name for layer in viewer.layers] == ["em 9"]


# Run in a process of its own: the tests' process imports TensorFlow (conftest's smoke run).
WITHOUT_TENSORFLOW = """
import sys, time
import napari, numpy as np
from qtpy.QtWidgets import QApplication
from pipeline.napari_plugin.widget import SegmentWidget

if __name__ == "__main__":  # the model process (spawn) imports this file without running it
    viewer = napari.Viewer(show=False)
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.model_path.value = sys.argv[1]
    widget.image.value = viewer.add_image(np.random.default_rng(0).integers(0, 256, (64, 64), np.uint8), name="em")
    widget.segment()
    while widget.busy:
        QApplication.processEvents()
        time.sleep(0.01)
    assert viewer.layers["em cells"].data.shape == (64, 64), [layer.name for layer in viewer.layers]
    assert "tensorflow" not in sys.modules and "keras" not in sys.modules, "napari's process imported TensorFlow"
    viewer.close()
"""


def test_napari_segments_without_importing_tensorflow_and_exits_cleanly(smoke_run, tmp_path):
    """A napari process that segments with the widget never imports TensorFlow, and exits with 0
    (TensorFlow's LLVM beside Mesa's llvmpipe aborted it at exit: docs/napari.md)."""
    script = tmp_path / "segment.py"
    script.write_text(WITHOUT_TENSORFLOW)
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(script), str(smoke_run["run_dir"])], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_samples_are_the_embedded_image_and_the_isbi_test_slices(tmp_path, qapp):
    [(image, named, kind), (cells, _, cells_kind)] = samples.synthetic_em()
    assert (image.shape, image.dtype, kind, cells_kind) == ((384, 384), np.uint8, "image", "labels")
    assert cells.shape == image.shape and named == {"name": "synthetic EM"}
    arrays = write_isbi(tmp_path, slices=12)
    [(slices, _, _), (truth, _, _)] = samples.isbi2012_layers(tmp_path)
    np.testing.assert_array_equal(slices, arrays["train"][:4])  # the held-out test slices
    assert truth.shape == slices.shape
