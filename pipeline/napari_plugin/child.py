"""The model process's side (`model_process`): loads, segments and fine-tunes with the library, in
the child that napari's widget starts. The plugin's only module that imports TensorFlow.

Every rule is the library's: which model a path names and its settings (`files.model_source`),
segmenting (`inference.segmenter.Segmenter`, as predict's one-model `Ensemble`), a layer's
pixels as the model reads them (`segmentation.model_stack`), and the fine-tuning run
(`corrections`, prepared and trained by the stages' own `run`, under the run lock, as
the command line does).
"""

from __future__ import annotations

import dataclasses
import sys
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import PipelineError
from pipeline.files import io, model_source
from pipeline.files.rundir import RunDir
from pipeline.inference.segmenter import Segmenter, load_model
from pipeline.napari_plugin import corrections, segmentation
from pipeline.napari_plugin.protocol import DONE, ERROR, PROGRESS, ModelInfo
from pipeline.stages import prepare, train

Report = Callable[[Any], None]  # sends a progress report to the widget


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model ready to segment: what the widget is told about it, and its segmenter."""

    info: ModelInfo
    segmenter: Segmenter


def load(path: Path) -> LoadedModel:
    """The model `path` names, in any form `predict --model` takes (`model_source.KINDS`); one
    line for a path that names none. Loaded inside `opened`: a package's weights exist only there."""
    with model_source.opened([Path(path)]) as [source]:
        model = load_model(source.file)
    return LoadedModel(ModelInfo(source.named, source.config), Segmenter(model, source.config))


def weights_of(named: Path) -> Path:
    """What `train.init_from` takes for a model `--model` names: an export version by its zoo package
    (`model_source.EXPORT_PACKAGE`), a run directory, a .keras file or a package as named."""
    package = Path(named) / model_source.EXPORT_PACKAGE
    return package if package.is_file() else Path(named)


class Server:
    """Answers the widget's requests (COMMANDS), holding the last model loaded between them."""

    COMMANDS = ("load", "segment", "fine_tune")

    def __init__(self) -> None:
        self._held: LoadedModel | None = None

    def _model(self, named: Path) -> LoadedModel:
        """The model `named`: the one held, or loaded now (a new child holds none)."""
        if self._held is None or self._held.info.named != Path(named):
            self._held = load(named)
        return self._held

    def load(self, named: Path, report: Report) -> ModelInfo:
        """Loads the model `named` afresh (its files may have changed) and holds it."""
        self._held = load(named)
        return self._held.info

    def segment(self, named: Path, data: np.ndarray, rgb: bool, name: str, report: Report
                ) -> tuple[ModelInfo, np.ndarray]:
        """The model `named` and the probability of cell [N, H, W] of a layer's images
        (`segmentation.model_stack`), one by one, reporting (images done, images)."""
        model = self._model(named)
        stack = segmentation.model_stack(data, rgb, name, model.info.config.model.input_channels)
        probability = np.empty(stack.shape[:3], np.float32)
        report((0, len(stack)))
        for index, image in enumerate(stack):
            probability[index] = model.segmenter(image)
            report((index + 1, len(stack)))
        return model.info, probability

    def fine_tune(self, named: Path, found: list[corrections.Correction], root: Path, data: Path, steps: int,
                  report: Report) -> ModelInfo:
        """Writes the corrections as a data set into `data`, then prepares and trains the new run
        `root` (`corrections.new_run`) on it from the model `named` for at least `steps` steps;
        holds the new run's model and returns it. Everything is checked before anything is
        written; the run's `train/history.csv` grows a row per epoch while it trains."""
        run = RunDir(root)
        config = corrections.settings(self._model(named).info.config, weights_of(named), data, steps)
        io.refuse_existing([run.root, data])
        corrections.write_dataset(data, found)
        with run.lock(exclusive=True):
            prepare.run(config, run)
            train.run(config, run)
        return self.load(run.root, report)


def serve(connection: Connection) -> None:
    """Answers requests `(command, args)` from `connection` until the widget's end of it closes."""
    server = Server()

    def report(value: Any) -> None:
        connection.send((PROGRESS, value))

    while True:
        try:
            command, args = connection.recv()
        except EOFError:  # napari ended
            return
        try:
            if command not in Server.COMMANDS:
                raise PipelineError(f"the model process has no command {command!r}")
            connection.send((DONE, getattr(server, command)(*args, report)))
        except PipelineError as error:
            connection.send((ERROR, str(error)))
        except Exception as error:  # a bug, or the library's: the widget shows one line, the terminal the rest
            traceback.print_exc(file=sys.stderr)
            lines = str(error).strip().splitlines() or [""]
            connection.send((ERROR, f"{type(error).__name__}: {lines[0]}".rstrip(": ")))
