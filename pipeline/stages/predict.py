"""Stage `predict`: segment TIFF/PNG images or stacks with `inference`, write masks, labels and overlays.

Per input NAME: the probability of cell, the mask at `predict.threshold`, the cell
instances (`pipeline.inference.labelling.instances`, by `predict.instances` and `predict.min_size`) as a label
image and a CSV of their measurements, and overlays with each cell outlined in its colour
(`pipeline.inference.outputs` writes them).

Two runners predict the same inputs into the same files. `local` (the default) reads and
checks every input before it writes anything, then segments them one after another in
this process. `beam` hands them to the Apache Beam pipeline of `pipeline.inference.beam` (on this
machine or on a Flink, Spark or Dataflow cluster): an input that cannot be read or
segmented is listed in `failures.csv` while the others are written, and the command
fails at the end.
"""

from __future__ import annotations

import dataclasses
import glob
from pathlib import Path

import keras
import numpy as np

from pipeline.config.schema import Config
from pipeline.console import progress_bar
from pipeline.errors import PipelineError
from pipeline.files import io, model_source, rundir
from pipeline.files.model_source import ModelSource
from pipeline.files.rundir import RunDir
from pipeline.inference import large_image, outputs
from pipeline.inference.segmenter import Ensemble, load_model
from pipeline.normalization import notice_constant

# A file of input paths, one a line, rather than an image.
LIST_SUFFIX = ".txt"


def run(
    config: Config,
    run: RunDir | None,
    input_path: Path | None = None,
    output_dir: Path | None = None,
    overwrite: bool = False,
    runner: str = "local",
    beam_options: list[str] | None = None,
    models: list[ModelSource] | None = None,
) -> list[Path]:
    """Writes NAME_prob.tif, NAME_mask.tif, NAME_labels.tif, NAME_instances.csv and
    NAME_overlay*.png per input image or stack; the TIFFs keep the input's pixel size.

    `input_path` is an image, a folder of images, a glob pattern or a list file (see
    `input_files`); without it, the local runner predicts the prepared test split of the
    run. The output folder, the inputs' names and existing outputs (refused unless
    `overwrite`) are checked before anything is written; an input's files appear
    together or not at all. `runner="beam"` runs `pipeline.inference.beam` with the Beam pipeline
    options `beam_options` (e.g. ["--direct_num_workers=2"]); the local runner returns
    the files written, the Beam runner the files of the inputs it segmented.

    `models` (`files.model_source.opened`) segment instead of the run's model: several
    give their ensemble (`inference.segmenter.Ensemble`: the mean probability of cell,
    each model tiling with its own settings), in this process and for images up to
    `predict.max_whole_pixels`. `config` is then the command's settings for the outputs
    (threshold, labelling, large images), the run's configuration is not saved, and `run`
    is None where `input_path` names files and `output_dir` is given.
    """
    if runner not in ("local", "beam"):
        raise ValueError(f"runner must be 'local' or 'beam', not {runner!r}")
    if models is None:
        config = run.model_settings(config)
    else:
        model_source.check_compatible(models, config.model.input_channels)
    if beam_options and runner != "beam":
        raise PipelineError("Beam pipeline options need the Beam runner (--runner beam)")
    if run is None and (output_dir is None or input_path is None):
        raise PipelineError("--model without --run-dir predicts the files --input names into the folder --output "
                            "names: give both")
    output_dir = Path(output_dir or run.predictions)
    io.check_output_folder(output_dir)
    if runner == "beam":
        return _run_beam(config, run, input_path, output_dir, overwrite, beam_options or [], models)
    return _run_local(config, run, input_path, output_dir, overwrite, models)


def _run_local(config: Config, run: RunDir | None, input_path: Path | None, output_dir: Path,
               overwrite: bool, models: list[ModelSource] | None) -> list[Path]:
    """Every input read (or, if large, opened) and checked first, then segmented one after
    another in this process; a large input chunk by chunk (`large_image.segment_large`)."""
    sources = [] if input_path is None else large_image.sources(input_files(input_path), config)
    large = [source for source in sources if source.large]
    if large and models is not None and len(models) > 1:
        raise PipelineError(f"{large[0].path}: larger than predict.max_whole_pixels, so predicted chunk by chunk, "
                            "which takes one model; give it one --model")
    # A large input: one model, chunk by chunk, with its own network and tiling.
    chunked = config if models is None else _with_tiling(config, models[0].config)
    large_space = _check_large(large, output_dir, chunked, overwrite)
    stacks = _test_split(config, run) if input_path is None else _read(
        [source.path for source in sources if not source.large], config.model.input_channels)
    for name in stacks:
        io.refuse_existing(outputs.existing(output_dir, name), overwrite)
    # float32 probabilities, uint8 mask, uint16 (rarely uint32) labels, at most 3 bytes per
    # pixel of overlay PNG; the CSV, a line per cell, is small beside them.
    io.check_free_space(output_dir, large_space + sum(12 * stack[..., 0].size for stack, _ in stacks.values()))
    members = _members(config, run, models)
    segment = Ensemble(members)
    if models is None:
        run.save_config(config)
    progress = progress_bar(sum(len(stack) for stack, _ in stacks.values()), "image")
    written = []
    for name, (stack, calibration) in stacks.items():
        probability = np.stack([_progress(segment(image), progress) for image in stack])
        written += outputs.write(output_dir, name, stack, probability, config, calibration, overwrite)
    for source in large:
        written += large_image.segment_large(members[0][0], source.path, output_dir, source.name, chunked, overwrite)
    print(f"predicted {len(stacks) + len(large)} input(s) -> {output_dir} ({len(written)} files)")
    return written


def _check_large(large: list[outputs.Source], output_dir: Path, config: Config, overwrite: bool) -> int:
    """Refuses, before anything is written, a large input that cannot be segmented chunk by
    chunk (`large_image.check`: settings, the file, existing outputs unless `overwrite`, free
    space); returns the bytes they need together, which the free space must hold besides the
    other inputs'."""
    needed = 0
    for source in large:
        height, width = large_image.check(source.path, output_dir, source.name, config, overwrite)
        needed += large_image.space_needed(source.path, height, width)
    return needed


def _members(config: Config, run: RunDir | None, models: list[ModelSource] | None) -> list[tuple[keras.Model, Config]]:
    """The models that segment, each with its settings: the run's model, or `models`."""
    if models is None:
        return [(load_model(run.trained_model()), config)]
    return [(load_model(source.file), source.config) for source in models]


def _with_tiling(config: Config, settings: Config) -> Config:
    """`config` for the outputs with one model's network and tiling (tile size, batch, test-time
    augmentation): what predicts with that model alone where `Ensemble` cannot (chunks, Beam)."""
    tiling = settings.predict
    predict = dataclasses.replace(config.predict, tile_size=tiling.tile_size, tiles_per_batch=tiling.tiles_per_batch,
                                  test_time_augmentation=tiling.test_time_augmentation)
    return dataclasses.replace(config, model=settings.model, predict=predict)


def _run_beam(config: Config, run: RunDir | None, input_path: Path | None, output_dir: Path, overwrite: bool,
              beam_options: list[str], models: list[ModelSource] | None) -> list[Path]:
    """The inputs as a Beam pipeline; fails, after the good ones are written, if any input failed."""
    if input_path is None:
        raise PipelineError("--runner beam predicts files: give --input (an image, a folder, a glob pattern "
                            f"or a {LIST_SUFFIX} list of paths)")
    if models is not None and len(models) > 1:
        raise PipelineError("--runner beam takes one --model; an ensemble predicts in this process (--runner local)")
    if models is not None:
        config = _with_tiling(config, models[0].config)
    missing: list[Path] = []
    sources = large_image.sources(input_files(input_path, missing), config)
    for source in sources:
        io.refuse_existing(outputs.existing_of(output_dir, source), overwrite)
    io.refuse_existing([outputs.failures_path(output_dir)], overwrite)
    if models is None:
        model_path = run.trained_model()
        run.save_config(config)
    else:
        model_path = models[0].file
    from pipeline.inference import beam  # Apache Beam: only for this runner (the `beam` extra)

    refused = [(str(path), "no such file or folder") for path in missing]
    failures = beam.predict(sources, output_dir, model_path, config, beam_options, refused)
    failed, total = {file for file, _ in failures}, len(sources) + len(missing)
    print(f"segmented {total - len(failed)}, failed {len(failed)} (see {outputs.FAILURES})")
    if failed:
        raise PipelineError(f"{outputs.failures_path(output_dir)}: {len(failed)} of {total} input(s) failed; "
                            f"the other {total - len(failed)} are written")
    return [path for source in sources for path in outputs.existing_of(output_dir, source)]


def input_files(input_path: Path, missing: list[Path] | None = None) -> list[Path]:
    """The images an input names, for both runners.

    An image file or an OME-Zarr image (NAME.zarr, NAME.ome.zarr); a folder (its TIFF and
    PNG files and OME-Zarr images, `io.image_files`); a glob pattern (quoted on the command
    line, e.g. 'data/*/em_*.tif'; the images it matches, sorted); or a list file
    (`LIST_SUFFIX`: a path a line, of an image or a folder, relative ones relative to the
    list file; blank lines and lines starting with # skipped). Two inputs with one name are
    refused (`io.refuse_same_names`): their outputs would overwrite each other. A listed
    path that does not exist is refused, or, given a `missing` list (the Beam runner's,
    which lists it in failures.csv), added to it and left out.
    """
    path = Path(input_path)
    if not path.exists() and any(character in str(path) for character in "*?["):
        files = _glob(str(path))
    elif path.is_file() and path.suffix.lower() == LIST_SUFFIX:
        entries = _listed(path)
        if missing is not None:
            missing += [entry for entry in entries if not entry.exists()]
            entries = [entry for entry in entries if entry.exists()]
        files = [file for entry in entries for file in io.image_files(entry)]
    else:
        files = io.image_files(path)
    io.refuse_same_names(files)
    return files


def _glob(pattern: str) -> list[Path]:
    """The image files a glob pattern matches (`**` spans folders), sorted."""
    files = sorted(path for path in map(Path, glob.glob(pattern, recursive=True)) if io.is_image(path))
    if not files:
        raise PipelineError(f"{pattern}: matches no {'/'.join(io.IMAGE_SUFFIXES)} images or OME-Zarr images")
    return files


def _listed(list_file: Path) -> list[Path]:
    """The paths a list file names, relative ones resolved against the list file's folder."""
    try:
        lines = list_file.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise PipelineError(f"{list_file}: cannot read the list of inputs ({error})") from None
    entries = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not entries:
        raise PipelineError(f"{list_file}: lists no inputs")
    return [list_file.parent / entry for entry in entries]  # an absolute entry stays as it is


def _progress(result: np.ndarray, progress: keras.utils.Progbar) -> np.ndarray:
    progress.add(1)
    return result


def _test_split(config: Config, run: RunDir) -> dict[str, tuple[np.ndarray, io.Calibration | None]]:
    """Named ([N, H, W, C] stack, no pixel size) of the run's prepared test split."""
    test = rundir.load_split(run, "test", config)
    # Prepared images of different sizes are padded to the largest: crop them back.
    return {f"test_{i:03d}": (image[None, :height, :width], None)
            for i, (image, (height, width)) in enumerate(zip(test["images"], test["sizes"]))}


def _read(files: list[Path], channels: int) -> dict[str, tuple[np.ndarray, io.Calibration | None]]:
    """Named ([N, H, W, C] stack, the pixel size its file declares) of each file, read whole; a
    constant image gets a notice (`normalization.notice_constant`)."""
    stacks = {io.image_name(file): (io.read_stack(file, channels), io.read_calibration(file)) for file in files}
    for file, (stack, _) in zip(files, stacks.values()):
        notice_constant(stack, file)
    return stacks
