"""What the widget's model process (`model_process`) and its child (`child`) say to each other
through their pipe; imports no TensorFlow, as napari's side must not."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pipeline.config.schema import Config

# What the child sends: (PROGRESS, value) any number of times, then (DONE, answer) or (ERROR, line).
PROGRESS, DONE, ERROR = "progress", "done", "error"


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """A model the child loaded: what the user named, and its settings."""

    named: Path
    config: Config
