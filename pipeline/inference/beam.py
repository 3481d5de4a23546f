"""Batch prediction on Apache Beam: the predict stage's inputs as one Beam pipeline.

The same pipeline runs on this machine (Beam's DirectRunner, in one process or several)
and on a Flink, Spark or Dataflow cluster; the Beam pipeline options say where
(docs/user-guide.md, "Batch prediction on Apache Beam"). Nothing here schedules work:
Beam hands the elements to its workers.

    input files ─► Reshuffle ─► read ─┐                   ┌─► outputs.write ─────────────────────┐
                                      ├─► RunInference ───┤                                      │ inputs
    large inputs (planned on the      │                   └─► write_chunk ─► count per ─► finish ┤ done
    driver) ─► chunks ─► Reshuffle ───┘                                        input             ▼
                                                                                               count
    every step's failures (and the driver's) ───────────────────────────────────────────────► failures.csv

- read: `io.read_stack` per file; an input that cannot be read (a corrupt TIFF, a colour
  image for a grey model, ...) becomes a failure record (file, one-line reason) on a
  tagged dead-letter output instead of failing the pipeline;
- RunInference: TensorFlow's model handler (`TFModelHandlerNumpy`) loads the run's
  `train/best.keras` once per worker process (RunInference shares it between the
  threads of a worker) and runs `segmenter.Segmenter`, the local runner's overlap-tile
  computation, on each whole image (batches of one input, so images of different sizes
  are never stacked), and `large_image.predict_chunk` on each chunk;
- write: `outputs.write`, the local runner's writer, so the files are byte-identical;
  atomic per input, and a retried bundle rewrites the same bytes;
- an image larger than `predict.max_whole_pixels` (`large_image.sources`, decided once per
  input by the predict stage) is never read
  whole: the driver plans its scratch arrays and computes its normalisation
  (`large_image.plan`, `statistics`), its chunks are spread over the workers, each
  predicts and writes chunks (`predict_chunk`, `write_chunk`), and once all its chunks
  are written one worker labels the cells and renames the files into place (`finish`):
  the files `large_image.segment_large` writes in one process;
- `failures.csv`: a row per failed input, header only when none failed, written once
  every input is written or failed.

Paths travel as strings and are opened by the workers: on a cluster, inputs and the
output folder must be on a file system every worker mounts at the same path.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import apache_beam as beam
import keras
import numpy as np
from apache_beam.ml.inference.base import KeyedModelHandler, PredictionResult, RunInference
from apache_beam.ml.inference.tensorflow_inference import TFModelHandlerNumpy
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.config.schema import Config
from pipeline.errors import PipelineError
from pipeline.files import io
from pipeline.inference import chunk_grid, large_image, outputs
from pipeline.inference.segmenter import Segmenter
from pipeline.normalization import notice_constant

FAILED = "failed"  # the tag of the dead-letter outputs: (file, reason) records

Failure = tuple[str, str]


def predict(sources: Sequence[outputs.Source], output_dir: Path, model_path: Path, config: Config,
            options: Sequence[str] = (), refused: Sequence[Failure] = ()) -> list[Failure]:
    """Segments the input files `sources` (`large_image.sources`: the large ones chunk by chunk)
    into `output_dir` with the model at `model_path`; returns the
    failures (file, reason) that `failures.csv` lists, the driver's `refused` inputs
    (e.g. a listed path that does not exist) among them.

    `options` are Beam pipeline options as on a command line (`PipelineOptions`), e.g.
    ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]; without them,
    Beam's DirectRunner in this process. The caller has refused existing outputs: the
    pipeline replaces whatever it finds.
    """
    try:
        pipeline = beam.Pipeline(options=PipelineOptions([worker_log_level(), *options]))  # a user's level, later, wins
    except Exception as error:  # Beam raises several types for bad options
        raise PipelineError(f"Beam pipeline options {' '.join(options)}: {_first_line(error)}") from None
    whole = [source.path for source in sources if not source.large]
    planned, refused_large = plan_large([source for source in sources if source.large], output_dir, config)
    try:
        build(pipeline, whole, planned, [*refused, *refused_large], output_dir, model_path, config)
        pipeline.run().wait_until_finish()
    finally:  # a scratch folder that no finish removed: the pipeline failed, or the input did
        for each in planned:
            large_image.discard(each.outputs)
    return outputs.read_failures(output_dir)


def worker_log_level() -> str:
    """The Beam option that has the workers log at this process's level for Beam: WARNING,
    INFO with --verbose (else Beam's workers log at INFO, ~20 lines a worker)."""
    level = logging.getLogger("apache_beam").getEffectiveLevel()
    return f"--default_sdk_harness_log_level={logging.getLevelName(level)}"


def build(pipeline: beam.Pipeline, whole: Sequence[Path], large: Sequence[LargeInput], refused: Sequence[Failure],
          output_dir: Path, model_path: Path, config: Config) -> None:
    """Adds the steps that segment the `whole` images and the `large` ones into `output_dir`
    to `pipeline`, and list every failure, the `refused` ones included, in failures.csv.

    Whole images and chunks go through one RunInference, so that each worker loads the
    model once (`shared.Shared` keeps one model per RunInference step and process). Only
    the branches with inputs are built: every step costs time even without elements.
    """
    output_dir = str(output_dir)
    failures = [pipeline | "refused on the driver" >> beam.Create(list(refused))]
    examples = []
    if whole:
        read = _read_whole(pipeline, whole, config)
        examples.append(read.images)
        failures.append(read[FAILED])
    if large:
        examples.append(_chunk_jobs(pipeline, large, config))
    predicted, dead = (tuple(examples)
                       | "images and chunks" >> beam.Flatten(pipeline=pipeline)
                       | "segment" >> RunInference(_model_handler(model_path, Predict(config)))
                       .with_exception_handling())
    failures.append(dead.failed_inferences | "inference failures" >> beam.FlatMap(_inference_failures))
    images, chunks = predicted | "images or chunks" >> beam.Partition(_is_chunk, 2)
    done = []
    if whole:
        written = images | "write" >> beam.ParDo(WriteOutputs(output_dir, config)).with_outputs(FAILED, main="done")
        done.append(written.done)
        failures.append(written[FAILED])
    if large:
        finished, large_failures = _write_large(pipeline, chunks, large, config)
        done.append(finished)
        failures += large_failures
    _write_failures_at_end(pipeline, done, failures, output_dir)


def _read_whole(pipeline: beam.Pipeline, files: Sequence[Path], config: Config) -> beam.pvalue.DoOutputsTuple:
    """The files read whole: (Input, stack) on `images`, failure records on FAILED."""
    return (pipeline
            | "input files" >> beam.Create([str(file) for file in files])
            # Spreads the files over the workers: without it, one bundle holds them all.
            | "spread inputs" >> beam.Reshuffle()
            | "read" >> beam.ParDo(ReadInput(config.model.input_channels)).with_outputs(FAILED, main="images"))


def _chunk_jobs(pipeline: beam.Pipeline, large: Sequence[LargeInput], config: Config) -> beam.PCollection:
    """(LargeInput, ChunkJob) for every chunk of every large input, spread over the workers."""
    jobs = [(each, ChunkJob(each.path, chunk, each.stats))
            for each in large for chunk in chunk_grid.chunks(each.outputs.height, each.outputs.width, config)]
    return pipeline | "chunks" >> beam.Create(jobs) | "spread chunks" >> beam.Reshuffle()


def _is_chunk(element: tuple[Any, PredictionResult], partitions: int) -> int:
    """Partition 1 for a chunk's probability, 0 for a whole input's."""
    return int(isinstance(element[1].example, ChunkJob))


def _write_large(pipeline: beam.Pipeline, chunks: beam.PCollection, large: Sequence[LargeInput],
                 config: Config) -> tuple[beam.PCollection, list[beam.PCollection]]:
    """Chunks written into their scratch arrays, then each large input finished once all its
    chunks are: (the paths of the finished inputs, failure records)."""
    written = chunks | "write chunks" >> beam.ParDo(WriteChunk(config)).with_outputs(FAILED, main="done")
    # Every large input counted, from 0, so that one whose chunks all failed is finished (discarded) too.
    none_yet = pipeline | "large inputs" >> beam.Create([(each.path, 0) for each in large])
    finished = ((written.done | "one per chunk" >> beam.Map(lambda path: (path, 1)), none_yet)
                | "chunks and inputs" >> beam.Flatten()
                | "chunks written per input" >> beam.CombinePerKey(sum)
                | "finish" >> beam.ParDo(FinishLarge({each.path: each for each in large}, config)).with_outputs(
                    FAILED, main="done"))
    return finished.done, [written[FAILED], finished[FAILED]]


def plan_large(large: Sequence[outputs.Source], output_dir: Path, config: Config,
               ) -> tuple[list[LargeInput], list[Failure]]:
    """On the driver: each large file's scratch arrays (`large_image.plan`) and normalisation
    (`large_image.statistics`), or a failure record if it cannot be predicted in chunks.

    The driver has refused existing outputs unless asked to replace them: the plans
    replace them.
    """
    planned, refused = [], []
    for source in large:
        try:
            plan = large_image.plan(source.path, output_dir, source.name, config, overwrite=True)
        except PipelineError as error:
            refused.append(failure(str(source.path), error))
            continue
        try:
            planned.append(LargeInput(str(source.path), plan, large_image.statistics(source.path, config)))
        except PipelineError as error:
            large_image.discard(plan)
            refused.append(failure(str(source.path), error))
    return planned, refused


def _write_failures_at_end(pipeline: beam.Pipeline, done: list[beam.PCollection], failures: list[beam.PCollection],
                           output_dir: str) -> None:
    """Writes `failures.csv` from every failure record, once every input in `done` is written."""
    count = (tuple(done) | "inputs done" >> beam.Flatten(pipeline=pipeline)
             | "count done" >> beam.combiners.Count.Globally())
    (tuple(failures)
     | "all failures" >> beam.Flatten()
     | "failures as a list" >> beam.combiners.ToList()
     # The count as a side input makes this step wait for the last write.
     | "failures.csv" >> beam.Map(_write_failures, output_dir, beam.pvalue.AsSingleton(count)))


def _write_failures(failures: list[Failure], output_dir: str, done: int) -> None:
    """Writes one row per failed file (its first reason in sorted order) into failures.csv."""
    first: dict[str, str] = {}
    for file, reason in sorted(failures):
        first.setdefault(file, reason)
    outputs.write_failures(Path(output_dir), list(first.items()))


@dataclasses.dataclass(frozen=True)
class Input:
    """What travels with an input's pixels: its output name, its file and its pixel size."""

    name: str
    path: str
    calibration: io.Calibration | None


class ReadInput(beam.DoFn):
    """A file -> (Input, [N, H, W, C] stack); one that cannot be read -> a failure record on FAILED."""

    def __init__(self, channels: int):
        self._channels = channels

    def process(self, path: str) -> Iterator[Any]:
        try:
            stack = io.read_stack(Path(path), self._channels)
            calibration = io.read_calibration(Path(path))
        except (PipelineError, OSError) as error:
            yield beam.pvalue.TaggedOutput(FAILED, failure(path, error))
            return
        notice_constant(stack, path)
        yield Input(io.image_name(Path(path)), path, calibration), stack


class Predict:
    """RunInference's `inference_fn`: each example of a batch -> its float32 probability of cell.

    A whole input's [N, H, W, C] stack -> [N, H, W], image by image with
    `segmenter.Segmenter`: the local runner's computation, so the results are the same,
    and images are never stacked into one tensor, so a batch may mix sizes. A ChunkJob
    -> the chunk's [h, w] (`large_image.predict_chunk`, which reads only the chunk's box
    and margins). The Segmenter is made once per model a worker loads (it traces its
    TensorFlow function then).
    """

    def __init__(self, config: Config):
        self._config = config
        self._model: keras.Model | None = None
        self._segment: Segmenter | None = None

    def __getstate__(self) -> dict:
        return {"_config": self._config, "_model": None, "_segment": None}  # workers make their own

    def __call__(self, model: keras.Model, batch: Sequence[np.ndarray | ChunkJob], inference_args: dict | None = None,
                 model_id: str | None = None) -> list[PredictionResult]:
        return [PredictionResult(example, self._one(model, example), model_id) for example in batch]

    def _one(self, model: keras.Model, example: np.ndarray | ChunkJob) -> np.ndarray:
        if isinstance(example, ChunkJob):
            return large_image.predict_chunk(model, Path(example.path), example.chunk, example.stats, self._config)
        if model is not self._model:
            self._model, self._segment = model, Segmenter(model, self._config)
        return np.stack([self._segment(image) for image in example])


def _model_handler(model_path: Path, inference_fn: Any) -> KeyedModelHandler:
    """TensorFlow's model handler for (key, example) elements: `model_path` read by
    `tf.keras.models.load_model` (Keras 3 reads .keras files), without its training
    configuration; batches of one element, which a whole image or a chunk fills."""
    return KeyedModelHandler(TFModelHandlerNumpy(str(model_path), load_model_args={"compile": False},
                                                 inference_fn=inference_fn, max_batch_size=1))


class WriteOutputs(beam.DoFn):
    """(Input, PredictionResult) -> the input's files (`outputs.write`); its path, or a failure record on FAILED."""

    def __init__(self, output_dir: str, config: Config):
        self._output_dir = output_dir
        self._config = config

    def process(self, element: tuple[Input, PredictionResult]) -> Iterator[Any]:
        key, result = element
        try:
            # Overwrite: the driver refused existing outputs unless asked to replace them,
            # so what is there now is this batch's own earlier attempt at the input.
            outputs.write(Path(self._output_dir), key.name, result.example, result.inference, self._config,
                          key.calibration, overwrite=True)
        except PipelineError as error:  # e.g. a full disk, named by io.atomic_paths
            yield beam.pvalue.TaggedOutput(FAILED, failure(key.path, error))
            return
        yield key.path


@dataclasses.dataclass(frozen=True)
class LargeInput:
    """A large image on its way: its file, its planned outputs and its normalisation (mean, scale)."""

    path: str
    outputs: large_image.LargeOutputs
    stats: tuple[float, float]


@dataclasses.dataclass(frozen=True)
class ChunkJob:
    """What a worker needs to predict one chunk of a large image."""

    path: str
    chunk: chunk_grid.Chunk
    stats: tuple[float, float]


class WriteChunk(beam.DoFn):
    """(LargeInput, PredictionResult of a chunk) -> the chunk in the scratch arrays; the input's
    path, or a failure record on FAILED. Idempotent: a retried chunk rewrites the same bytes."""

    def __init__(self, config: Config):
        self._config = config

    def process(self, element: tuple[LargeInput, PredictionResult]) -> Iterator[Any]:
        key, result = element
        try:
            large_image.write_chunk(key.outputs, result.example.chunk, result.inference, self._config)
        except PipelineError as error:
            yield beam.pvalue.TaggedOutput(FAILED, failure(key.path, error))
            return
        yield key.path


class FinishLarge(beam.DoFn):
    """(path, chunks written) -> the large input's files (`large_image.finish`) once every chunk is
    written, its path; its scratch arrays discarded, and a failure record on FAILED, otherwise."""

    def __init__(self, large: dict[str, LargeInput], config: Config):
        self._large = large
        self._config = config

    def process(self, element: tuple[str, int]) -> Iterator[Any]:
        path, written = element
        planned = self._large[path]
        expected = len(chunk_grid.chunks(planned.outputs.height, planned.outputs.width, self._config))
        if written < expected:  # the failed chunks are listed already
            large_image.discard(planned.outputs)
            return
        try:
            large_image.finish(planned.outputs, self._config)
        except PipelineError as error:
            large_image.discard(planned.outputs)
            yield beam.pvalue.TaggedOutput(FAILED, failure(path, error))
            return
        yield path


def _inference_failures(record: tuple[Sequence[tuple[Input | LargeInput, Any]], Any]) -> Iterable[Failure]:
    """RunInference's dead letter (the batch, (type, repr, traceback)) -> a failure per input."""
    batch, (_, description, _) = record
    return [(key.path, f"inference failed: {_first_line(description)}") for key, _ in batch]


def failure(path: str, error: BaseException) -> Failure:
    """(file, one-line reason): the error's message without the file name it starts with."""
    return path, _first_line(error).removeprefix(f"{path}: ")


def _first_line(error: object) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
