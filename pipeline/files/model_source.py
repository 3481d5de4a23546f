"""A model the user names (`--model PATH`), with the settings it was trained with, whatever its form.

    a run directory            its best model (train/best.keras), with the run's settings
                               (`RunDir.model_settings`: the model's own trained sections)
    NAME.keras                 the settings inside the file (`model_file`); a .keras file
                               without them (another program's, or saved before models
                               carried them) is refused: its tile sizes, normalisation and
                               threshold would be guesses
    an export version folder   the zoo package beside the SavedModel (EXPORT_PACKAGE), whose
                               rdf.yaml holds the settings and whose keras_v3 weights are
                               the model (a SavedModel cannot be read back as a Keras model)
    NAME.zip                   an exported zoo package, read the same way

`opened` resolves several paths at once, refuses models that cannot form one ensemble
(other input channels or classes), and holds the .keras files extracted from packages in
a temporary folder while the command runs. It loads no model: that is inference's
(`pipeline.inference.segmenter.load_model`), given `ModelSource.file`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from pipeline.config import resolve as configuration
from pipeline.config.schema import Config
from pipeline.errors import PipelineError
from pipeline.files import bioimageio, model_file, rundir
from pipeline.files.rundir import RunDir

# Where an export version keeps its zoo package (`pipeline.stages.export` writes it there).
EXPORT_PACKAGE = Path("assets.extra") / "bioimageio.zip"
KINDS = "a run directory, a .keras file, an export version folder or a bioimage.io package (.zip)"
# The settings every model of an ensemble must share: the images they read, the classes they give.
SHARED = ("input_channels", "num_classes")


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """A model to load: what the user named, the .keras file that holds it, its settings."""

    named: Path
    file: Path
    config: Config


@contextlib.contextmanager
def opened(paths: list[Path], adjust: Callable[[Config], Config] = lambda config: config
           ) -> Iterator[list[ModelSource]]:
    """The models `paths` name (see the module doc), each with its settings passed through
    `adjust` (the command's overrides: --config, --set) but for the sections it was trained
    with, which stay the model's, then checked; refuses, in one line, a path that names no
    model and models that `check_compatible` refuses. Packages' weights are extracted into
    a temporary folder that lasts as long as the context."""
    with tempfile.TemporaryDirectory(prefix="unet-models-") as scratch:
        sources = [_source(Path(path), Path(scratch) / f"model-{index}.keras", adjust)
                   for index, path in enumerate(paths)]
        check_compatible(sources)
        yield sources


def check_compatible(sources: list[ModelSource], channels: int | None = None) -> None:
    """Refuses models whose SHARED settings differ from each other's (or `channels`, the input
    channels of the data they are to score), in one line naming both."""
    first = sources[0]
    for source in sources[1:]:
        for field in SHARED:
            mine, theirs = getattr(first.config.model, field), getattr(source.config.model, field)
            if mine != theirs:
                raise PipelineError(f"{source.named}: model.{field}={theirs!r}, but {first.named} has {mine!r}; "
                                    "the models of one ensemble must read the same images and give the same classes")
    if channels is not None and first.config.model.input_channels != channels:
        raise PipelineError(f"{first.named}: reads model.input_channels={first.config.model.input_channels!r}, "
                            f"the run's data has {channels!r}")


def _source(path: Path, scratch: Path, adjust: Callable[[Config], Config]) -> ModelSource:
    """One path's model and settings."""
    if not path.exists():
        raise PipelineError(f"{path}: no such file or folder (--model takes {KINDS})")
    if path.is_dir():
        file, trained = _folder(path, scratch)
    elif path.suffix == ".keras":
        file, trained = path, _keras_settings(path)
    elif path.suffix == ".zip":
        file, trained = _package(path, scratch, path)
    else:
        raise PipelineError(f"{path}: not a model (--model takes {KINDS})")
    return ModelSource(path, file, _settings(trained, adjust, path))


def _folder(path: Path, scratch: Path) -> tuple[Path, Config]:
    """A run directory's best model and settings, or an export version's package."""
    run = RunDir(path)
    if run.folds.is_dir():
        raise PipelineError(f"{path}: a cross-validation, whose folds hold the models: --model {run.fold(0)}, ..., "
                            "or all folds at once with --stage crossval --model")
    if run.config.exists() or run.train.exists():
        model = run.trained_model()
        saved = run.saved_config()
        return model, (_keras_settings(model) if saved is None else run.model_settings(saved))
    if (path / EXPORT_PACKAGE).is_file():
        return _package(path / EXPORT_PACKAGE, scratch, path)
    if (path / "saved_model.pb").exists():
        raise PipelineError(f"{path}: an export version without its zoo package {EXPORT_PACKAGE}, which --model "
                            "reads (a SavedModel cannot be read back as a Keras model); export the run again")
    raise PipelineError(f"{path}: neither a run directory (train/best.keras) nor an export version "
                        f"({EXPORT_PACKAGE})")


def _keras_settings(path: Path) -> Config:
    """The settings inside a .keras file; one line for a file without them."""
    trained = model_file.trained_config(path)
    if trained is None:
        raise PipelineError(f"{path}: holds no settings it was trained with (a .keras file of another program, "
                            "or saved before models carried them); give its run directory instead")
    return trained


def _package(package: Path, scratch: Path, named: Path) -> tuple[Path, Config]:
    """A zoo package's keras_v3 weights, written to `scratch`, and the settings its rdf.yaml holds."""
    settings = bioimageio.trained_settings(package)
    if settings is None:
        raise PipelineError(f"{named}: its {bioimageio.RDF} holds no config: unet_pipeline: configuration, "
                            "so not a package this pipeline exported")
    scratch.write_bytes(bioimageio.keras_weights(package))  # Keras reads models from paths only
    return scratch, configuration.from_dict(settings, f"{package} ({bioimageio.RDF})")


def _settings(trained: Config, adjust: Callable[[Config], Config], named: Path) -> Config:
    """`trained` with the command's overrides, except in the sections the model was trained with."""
    config = rundir.with_trained_sections(adjust(trained), trained)
    try:
        configuration.validate(config)
    except PipelineError as error:
        raise PipelineError(f"{named}: {error}") from None
    return config
