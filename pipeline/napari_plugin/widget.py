"""The dock widget: pick a model, segment an image layer, correct the cells, fine-tune on them.

A thin Qt layer (magicgui) over `segmentation` and `corrections`: the network and the training
run in napari's worker threads, so the viewer stays responsive; a refused input is one line
in a notification (`PipelineError`), never a traceback. The threshold, minimum size and
instance method re-label the last segmentation from its probability layer without running
the network again.
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
from pipeline.napari_plugin.segmentation import LoadedModel

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

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__()
        self._viewer = napari_viewer
        self._settings = samples.settings()
        self.model: LoadedModel | None = None
        self.worker = None  # the running (or last) worker
        self.busy = False  # from a worker's start until its end (a queued worker is not running yet)
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

    def load_model(self) -> bool:
        """Loads the model the model field names, takes its threshold, minimum size and instance method,
        and remembers it; a path that names no model is a notification. Whether it loaded."""
        path = Path(self.model_path.value)
        try:
            self.model = segmentation.load(path)
        except PipelineError as error:
            show_error(str(error))
            return False
        predict, shape = self.model.config.predict, self.model.config.model
        with self._fields_quiet():
            self.threshold.value, self.min_size.value, self.method.value = (
                predict.threshold, predict.min_size, predict.instances)
        self._settings.setValue(LAST_MODEL, str(path))
        self.model_info.value = (f"depth-{shape.depth} U-Net, {shape.input_channels} channel(s): "
                                 f"{self.model.named.name}")
        return True

    def segment(self) -> None:
        """Segments the chosen image layer in a worker thread into a probability and a labels layer."""
        layer = self.image.value
        if layer is None:
            show_error("no image layer to segment: open or add an image")
            return
        if self.busy or (self.model is None and not self.load_model()):
            return
        model = self.model
        try:
            stack = segmentation.model_stack(layer.data, layer.rgb, layer.name, model.config.model.input_channels)
        except PipelineError as error:
            show_error(str(error))
            return
        self.progress.max, self.progress.value = len(stack), 0
        self._start(create_worker(segmentation.segment, model.segmenter, stack, _start_thread=False),
                    lambda probability: self._show(layer, probability))
        self.worker.yielded.connect(lambda done: setattr(self.progress, "value", done))
        self.cancel_button.enabled = True
        self.worker.start()

    def cancel(self) -> None:
        """Stops a segmentation after the image it is on; its layers are left as they were."""
        if self.busy:
            self.worker.quit()

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
        """Trains a new run on the corrected cells from the loaded model, in a worker thread, with the
        loss shown per epoch; then segments with the new run's model."""
        if self.busy or self.model is None:
            show_error("load a model and segment an image first" if not self.busy else "busy: wait for the run")
            return
        try:
            run, data = corrections.new_run(Path(self.runs.value))
            found = self.corrected()
            # Checked here, before the worker: a refused fine-tuning is a notification and writes nothing.
            corrections.settings(self.model.config, corrections.weights_of(self.model.named), data, self.steps.value)
        except PipelineError as error:
            show_error(str(error))
            return
        self._settings.setValue(RUNS_FOLDER, str(self.runs.value))
        self._history, self.loss.value = run.history, f"fine-tuning {run} ..."
        self._start(create_worker(corrections.fine_tune, self.model.config, self.model.named, found, run, data,
                                  self.steps.value, _start_thread=False), self._tuned)
        self._timer.start()
        self.worker.start()

    def _tuned(self, run: RunDir) -> None:
        """Switches to the fine-tuned run's model."""
        self._show_loss()
        self.model_path.value = str(run.root)
        if self.load_model():
            show_info(f"fine-tuned: {run.best_model}")

    def _show_loss(self) -> None:
        """The last finished epoch's loss from the run's training history (a row per epoch)."""
        rows = _history_rows(self._history) if self._history else []
        if rows:
            last = rows[-1]
            self.loss.value = f"epoch {int(last['epoch']) + 1}: loss {float(last['loss']):.4f}"

    def _start(self, worker, returned) -> None:
        """Wires a worker's results, its failure (one line) and its end; does not start it."""
        self.worker = worker
        worker.returned.connect(returned)
        worker.errored.connect(_notify)
        worker.finished.connect(self._idle)
        self.segment_button.enabled = self.finetune_button.enabled = False
        self.busy = True

    def _idle(self) -> None:
        self.busy = False
        self._timer.stop()
        self.segment_button.enabled = self.finetune_button.enabled = True
        self.cancel_button.enabled = False

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
