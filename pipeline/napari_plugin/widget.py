"""The dock widget: pick a model, segment an image layer, correct the cells, fine-tune on them.

A thin Qt layer (magicgui) over `segmentation` and `corrections`: the network and the training
run in the model process (`model_process`: napari's process never imports TensorFlow), driven
from napari's worker threads, so the viewer stays responsive; Cancel kills that process. A
refused input is one line in a notification (`PipelineError`), never a traceback. The
threshold, minimum size and instance method re-label the last segmentation from its
probability layer in napari's process, without running the network again.
"""

from __future__ import annotations

import csv
import dataclasses
import re
from pathlib import Path

import napari
import numpy as np
from magicgui.widgets import ComboBox, Container, FileEdit, FloatSpinBox, Label, ProgressBar, PushButton, SpinBox
from magicgui.widgets import create_widget
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QFileDialog

from pipeline.config.schema import INSTANCE_METHODS
from pipeline.errors import PipelineError
from pipeline.files.rundir import RUNS, RunDir
from pipeline.napari_plugin import corrections, samples, segmentation
from pipeline.napari_plugin.model_process import ModelProcess
from pipeline.napari_plugin.protocol import ModelInfo

LAST_MODEL, RUNS_FOLDER = "model", "runs_folder"  # the settings keys of the remembered choices
LOSS_POLL_MS = 1000  # how often the training history is read while fine-tuning
DEFAULT_STEPS = 200


@dataclasses.dataclass(frozen=True)
class Segmentation:
    """The layers of one segmentation: the image, its probability of cell, its (correctable) cells."""

    image: napari.layers.Image
    probability: napari.layers.Image
    labels: napari.layers.Labels


class SegmentWidget(Container):
    """Segment and fine-tune with a U-Net of this pipeline (docs/napari.md)."""

    def __init__(self, napari_viewer: napari.viewer.Viewer, model_process: ModelProcess | None = None):
        """`model_process`: where the network runs (a new one by default; the tests share one)."""
        super().__init__()
        self._viewer = napari_viewer
        self._settings = samples.settings()
        self.process = model_process or ModelProcess()
        self.model: ModelInfo | None = None  # the model loaded, as the model process describes it
        self.worker = None  # the running (or last) worker
        self.busy = False  # from a worker's start until its end (a queued worker is not running yet)
        self._tuning: RunDir | None = None  # the run a fine-tuning in progress makes
        self._made: list[Segmentation] = []  # what fine-tuning learns from: the widget's labels layers
        self._history: Path | None = None  # the training history the loss is read from while fine-tuning
        self._timer = QTimer()
        self._timer.setInterval(LOSS_POLL_MS)
        self._timer.timeout.connect(self._show_loss)

        self.model_path = FileEdit(label="model", mode="r", value=self._settings.value(LAST_MODEL, ""),
                                   tooltip="a run directory, a .keras file, an export version folder or a zoo .zip")
        self.choose_folder = PushButton(text="Model folder (run or export version)...")
        self.load_button = PushButton(text="Load model")
        self.model_info = Label(value="no model loaded")
        self.image = create_widget(annotation=napari.layers.Image, label="image")
        self.threshold = FloatSpinBox(label="threshold", min=0.0, max=1.0, step=0.01, value=0.5)
        self.min_size = SpinBox(label="minimum size (px)", min=1, max=2**31 - 1, value=16)
        self.method = ComboBox(label="cells", choices=INSTANCE_METHODS)
        self.segment_button = PushButton(text="Segment")
        self.progress = ProgressBar(label="progress", min=0, max=1, value=0)
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.steps = SpinBox(label="fine-tune steps", min=1, max=1_000_000, value=DEFAULT_STEPS)
        self.runs = FileEdit(label="new runs in", mode="d", value=self._settings.value(RUNS_FOLDER, str(RUNS)))
        self.finetune_button = PushButton(text="Fine-tune on the corrected cells")
        self.loss = Label(value="")
        self.extend([self.model_path, self.choose_folder, self.load_button, self.model_info, self.image,
                     self.threshold, self.min_size, self.method, self.segment_button, self.progress,
                     self.cancel_button, self.steps, self.runs, self.finetune_button, self.loss])

        self.choose_folder.changed.connect(self._choose_folder)
        self.load_button.changed.connect(self.load_model)
        self.segment_button.changed.connect(self.segment)
        self.cancel_button.changed.connect(self.cancel)
        self.finetune_button.changed.connect(self.fine_tune)
        for field in (self.threshold, self.min_size, self.method):
            field.changed.connect(self.relabel)

    def _choose_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(None, "Run directory or export version", str(self.model_path.value))
        if folder:
            self.model_path.value = folder
            self.load_model()

    def load_model(self) -> None:
        """Loads, in the model process, the model the model field names (`_loaded` then takes its
        settings); a path that names no model is a notification."""
        if self.busy:
            return
        self.model_info.value = f"loading {Path(self.model_path.value).name} ..."
        self._start(self.process.call, ("load", Path(self.model_path.value)), self._loaded)

    def _loaded(self, model: ModelInfo) -> None:
        """Takes a loaded model's threshold, minimum size and instance method, and remembers it."""
        self.model = model
        predict, shape = model.config.predict, model.config.model
        with self._fields_quiet():
            self.threshold.value, self.min_size.value, self.method.value = (
                predict.threshold, predict.min_size, predict.instances)
        self._settings.setValue(LAST_MODEL, str(model.named))
        self._describe_model()

    def _describe_model(self) -> None:
        shape = self.model.config.model if self.model else None
        self.model_info.value = (f"depth-{shape.depth} U-Net, {shape.input_channels} channel(s): "
                                 f"{self.model.named.name}" if shape else "no model loaded")

    def segment(self) -> None:
        """Segments the chosen image layer in the model process (loading the model field's model if
        none is loaded) into a probability and a labels layer, with the images done as progress."""
        layer = self.image.value
        if layer is None:
            show_error("no image layer to segment: open or add an image")
            return
        if self.busy:
            return
        named = self.model.named if self.model else Path(self.model_path.value)
        self.progress.value = 0
        self._start(self.process.call, ("segment", named, np.asarray(layer.data), layer.rgb, layer.name),
                    lambda answer: self._segmented(layer, *answer), self._progressed)

    def _progressed(self, done_of: tuple[int, int]) -> None:
        self.progress.max, self.progress.value = done_of[1], done_of[0]

    def _segmented(self, layer: napari.layers.Image, model: ModelInfo, probability: np.ndarray) -> None:
        """Takes the model's settings if it was loaded for this segmentation, then shows its layers."""
        if self.model != model:
            self._loaded(model)
        self._show(layer, probability)

    def cancel(self) -> None:
        """Kills the model process of a segmentation (its layers are left as they were) or a
        fine-tuning (whose run is left without a model: `corrections.abandon`)."""
        if not self.busy:
            return
        self.worker.quit()
        self.process.stop()
        if self._tuning is not None:
            try:
                corrections.abandon(self._tuning)
            except PipelineError as error:
                show_error(str(error))
            self.loss.value = f"cancelled: {self._tuning} holds no model"

    def _show(self, image: napari.layers.Image, probability: np.ndarray) -> None:
        """The probability and cells layers of `image`, with its scale and translation (replacing
        this widget's earlier layers of it)."""
        probability = probability.reshape(image.data.shape[:image.ndim])
        placed = {"scale": image.scale, "translate": image.translate}
        labels = self._cells(probability)
        earlier = next((made for made in self._made if made.image is image and made.labels in self._viewer.layers),
                       None)
        if earlier is not None and earlier.probability in self._viewer.layers:
            earlier.probability.data, earlier.labels.data = probability, labels
            return
        made = Segmentation(
            image,
            self._viewer.add_image(probability, name=f"{image.name} probability", colormap="magma",
                                   contrast_limits=(0.0, 1.0), visible=False, **placed),
            self._viewer.add_labels(labels, name=f"{image.name} cells", **placed))
        self._made = [one for one in self._made if one.image is not image] + [made]

    def _cells(self, probability: np.ndarray) -> np.ndarray:
        return segmentation.cells(probability, self.threshold.value, self.method.value, self.min_size.value)

    def relabel(self) -> None:
        """The last segmentation's cells again at the fields' threshold, minimum size and method,
        from its probability layer (the network does not run again; corrections are replaced)."""
        if self._made and self._made[-1].labels in self._viewer.layers:
            last = self._made[-1]
            last.labels.data = self._cells(np.asarray(last.probability.data))

    def corrected(self) -> list[corrections.Correction]:
        """The images this widget segmented that are still in the viewer, with their cells as
        corrected now: a stack's slices each as an image."""
        found = []
        channels = self.model.config.model.input_channels
        for index, made in enumerate(self._made):
            if made.image not in self._viewer.layers or made.labels not in self._viewer.layers:
                continue
            stack = segmentation.model_stack(made.image.data, made.image.rgb, made.image.name, channels)
            labels = np.asarray(made.labels.data).reshape(stack.shape[:3])
            name = f"{index:02d}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', made.image.name)}"
            found += [corrections.Correction(name if len(stack) == 1 else f"{name}-{number:03d}", image, cells)
                      for number, (image, cells) in enumerate(zip(stack, labels))]
        return found

    def fine_tune(self) -> None:
        """Trains a new run on the corrected cells from the loaded model, in the model process, with
        the epochs done and the loss shown; then segments with the new run's model. Refused
        settings are checked there before anything is written, and are a notification."""
        if self.busy or self.model is None:
            show_error("load a model and segment an image first" if not self.busy else "busy: wait for the run")
            return
        try:
            run, data = corrections.new_run(Path(self.runs.value))
            found = self.corrected()
        except PipelineError as error:
            show_error(str(error))
            return
        self._settings.setValue(RUNS_FOLDER, str(self.runs.value))
        self._tuning, self._history, self.loss.value = run, run.history, f"fine-tuning {run} ..."
        self.progress.max, self.progress.value = corrections.length(self.model.config, self.steps.value)[0], 0
        self._start(self.process.call, ("fine_tune", self.model.named, found, run.root, data, self.steps.value),
                    self._tuned)
        self._timer.start()

    def _tuned(self, model: ModelInfo) -> None:
        """Switches to the fine-tuned run's model (loaded by the model process)."""
        self._show_loss()
        self.model_path.value = str(model.named)
        self._loaded(model)
        show_info(f"fine-tuned: {RunDir(model.named).best_model}")

    def _show_loss(self) -> None:
        """The epochs done and the last one's loss, from the run's training history (a row per epoch)."""
        rows = _history_rows(self._history) if self._history else []
        if rows:
            last = rows[-1]
            self.progress.value = min(len(rows), self.progress.max)
            self.loss.value = f"epoch {int(last['epoch']) + 1}: loss {float(last['loss']):.4f}"

    def _start(self, call, request: tuple, returned, yielded=None) -> None:
        """Runs `call(*request)` (a generator) in a worker thread: wires its answer, its progress, its
        failure (one line) and its end, then starts it."""
        # Its errors are ours to show (`_notify`), not to raise again in Qt's event loop.
        self.worker = create_worker(call, *request, _start_thread=False, _ignore_errors=True)
        self.worker.returned.connect(returned)
        if yielded is not None:
            self.worker.yielded.connect(yielded)
        self.worker.errored.connect(_notify)
        self.worker.finished.connect(self._idle)
        self.segment_button.enabled = self.finetune_button.enabled = self.load_button.enabled = False
        self.cancel_button.enabled = self.busy = True
        self.worker.start()

    def _idle(self) -> None:
        self.busy = False
        self._tuning = None
        self._timer.stop()
        self.segment_button.enabled = self.finetune_button.enabled = self.load_button.enabled = True
        self.cancel_button.enabled = False
        self._describe_model()  # after a failed or cancelled load too

    def _fields_quiet(self):
        """The labelling fields set together, without re-labelling on each."""
        return _Blocked([self.threshold, self.min_size, self.method])


class _Blocked:
    """Blocks the `changed` signals of magicgui widgets for a `with` block."""

    def __init__(self, widgets: list):
        self._widgets = widgets

    def __enter__(self) -> None:
        for widget in self._widgets:
            widget.changed.block()

    def __exit__(self, *exc) -> None:
        for widget in self._widgets:
            widget.changed.unblock()


def _history_rows(path: Path) -> list[dict[str, str]]:
    """The whole rows of a training history being written (a row cut short is left out)."""
    try:
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
    except OSError:  # not written yet
        return []
    return [row for row in rows if None not in row.values() and row.get("loss")]


def _notify(error: Exception) -> None:
    """A worker's failure as one line: ours as it is, another's first line."""
    lines = str(error).strip().splitlines() or [type(error).__name__]
    show_error(lines[0])
