"""`--stage predict --runner beam`: a real Beam pipeline (DirectRunner, in this process and in
two worker processes) with a real Keras model on real files, against the local runner's files."""

import csv
import dataclasses
import logging
import shutil

import cv2
import keras
import numpy as np
import pytest
import tifffile

from pipeline.cli import main
from pipeline.config import resolve as configuration
from pipeline.data.synthetic import synthetic_em_image, synthetic_em_stack
from pipeline.errors import PipelineError
from pipeline.files.rundir import RunDir
from pipeline.inference import beam as beam_pipeline
from pipeline.inference import chunk_grid, large_image, outputs
from pipeline.stages import predict
from pipeline.training import model as unet_model

from same_outputs import assert_same_outputs, files_of


@pytest.fixture(scope="module")
def untrained_run(tmp_path_factory):
    """A run directory with a smoke-sized U-Net of random weights as its best model: the
    runners must agree whatever the weights."""
    config = configuration.preset("smoke")
    run = RunDir(tmp_path_factory.mktemp("beam") / "run")
    run.train.mkdir(parents=True)
    keras.utils.set_random_seed(0)
    unet_model.unet(config.model).save(run.best_model)
    run.save_config(config)
    return config, run


@pytest.fixture
def images(tmp_path):
    """A folder of a grey TIFF, a 3-slice stack and a PNG of different sizes."""
    folder = tmp_path / "in"
    folder.mkdir()
    tifffile.imwrite(folder / "em.tif", synthetic_em_image(60, 1)[0])
    tifffile.imwrite(folder / "stack.tif", synthetic_em_stack(3, 44, 2)[0], photometric="minisblack")
    cv2.imwrite(str(folder / "small.png"), np.random.default_rng(3).integers(0, 255, (30, 37), np.uint8))
    return folder


def predict_args(run, input_path, output, *extra):
    return ["--stage", "predict", "--run-dir", str(run), "--input", str(input_path), "--output", str(output), *extra]


def test_beam_writes_the_same_bytes_as_the_local_runner(untrained_run, images, tmp_path, capsys):
    config, run = untrained_run
    predict.run(config, run, images, tmp_path / "local")
    predict.run(config, run, images, tmp_path / "beam", runner="beam")
    local, beam = files_of(tmp_path / "local"), files_of(tmp_path / "beam")
    assert beam.pop("failures.csv") == b"file,reason\r\n"
    assert beam == local and len(local) == 3 * 4 + 1 + 3 + 1  # overlays: a stack has 3
    assert "segmented 3, failed 0 (see failures.csv)" in capsys.readouterr().out


def test_a_corrupt_tiff_is_listed_while_every_good_input_is_written(untrained_run, images, tmp_path, capsys):
    _, run = untrained_run
    broken = images / "broken.tif"
    broken.write_bytes(b"II*\x00" + b"\x07" * 100)
    out = tmp_path / "out"
    assert main(predict_args(run.root, images, out, "--runner", "beam")) == 2
    captured = capsys.readouterr()
    assert "segmented 3, failed 1 (see failures.csv)" in captured.out
    assert captured.err.startswith(f"error: {out / 'failures.csv'}: 1 of 4 input(s) failed")
    assert captured.err.count("\n") == 1
    with open(out / "failures.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows == [["file", "reason"], [str(broken), "corrupt or unreadable TIFF (no image data)"]]
    for name in ("em", "stack", "small"):
        assert (out / f"{name}_labels.tif").exists() and (out / f"{name}_instances.csv").exists()
    assert not list(out.glob("broken*"))


def test_a_listed_path_that_does_not_exist_is_listed_while_the_others_are_written(untrained_run, images, tmp_path,
                                                                                  capsys):
    _, run = untrained_run
    listing = tmp_path / "inputs.txt"
    listing.write_text(f"{images / 'em.tif'}\nin/gone.tif\nin/small.png\n")
    out = tmp_path / "out"
    # The local runner checks every input before it writes anything: it refuses the batch.
    assert main(predict_args(run.root, listing, out)) == 2
    assert capsys.readouterr().err == f"error: {images / 'gone.tif'}: no such file or folder\n"
    assert not out.exists()

    assert main(predict_args(run.root, listing, out, "--runner", "beam")) == 2
    captured = capsys.readouterr()
    assert "segmented 2, failed 1 (see failures.csv)" in captured.out
    assert captured.err == f"error: {out / 'failures.csv'}: 1 of 3 input(s) failed; the other 2 are written\n"
    assert outputs.read_failures(out) == [(str(images / "gone.tif"), "no such file or folder")]
    for name in ("em", "small"):
        assert (out / f"{name}_labels.tif").exists() and (out / f"{name}_instances.csv").exists()


@pytest.mark.parametrize("existing", ["stack_overlay_007.png", "failures.csv"])
def test_existing_outputs_are_refused_before_the_pipeline_starts(untrained_run, images, tmp_path, capsys, existing):
    _, run = untrained_run
    out = tmp_path / "out"
    out.mkdir()
    (out / existing).write_bytes(b"an earlier batch's")  # an earlier, longer stack's overlay, or a report
    assert main(predict_args(run.root, images, out, "--runner", "beam")) == 2
    assert f"{existing}: already exists (pass --overwrite" in capsys.readouterr().err
    assert [path.name for path in out.iterdir()] == [existing]


def test_a_rerun_with_overwrite_rewrites_identical_bytes_and_nothing_else(untrained_run, images, tmp_path):
    config, run = untrained_run
    out = tmp_path / "out"
    predict.run(config, run, images, out, runner="beam")
    first = files_of(out)
    predict.run(config, run, images, out, overwrite=True, runner="beam")
    assert files_of(out) == first  # no temporaries, no duplicates, the same bytes


def test_glob_and_list_file_inputs(untrained_run, images, tmp_path):
    config, run = untrained_run
    listing = tmp_path / "inputs.txt"
    listing.write_text("# two of the three\nin/em.tif\n\n" + f"{images / 'small.png'}\n")
    predict.run(config, run, listing, tmp_path / "listed", runner="beam")
    predict.run(config, run, images / "s*.*", tmp_path / "globbed", runner="beam")
    assert sorted(path.name for path in (tmp_path / "listed").glob("*_prob.tif")) == ["em_prob.tif", "small_prob.tif"]
    assert sorted(path.name for path in (tmp_path / "globbed").glob("*_prob.tif")) == ["small_prob.tif",
                                                                                         "stack_prob.tif"]


def test_the_beam_runner_needs_files_and_valid_options(untrained_run, images, tmp_path):
    config, run = untrained_run
    with pytest.raises(PipelineError, match="give --input"):
        predict.run(config, run, None, tmp_path / "out", runner="beam")
    with pytest.raises(PipelineError, match="Beam pipeline options --runner=NoSuchRunner"):
        predict.run(config, run, images, tmp_path / "out", runner="beam", beam_options=["--runner=NoSuchRunner"])


def large_settings(untrained_run, tmp_path):
    """(config, run): images over 10,000 pixels large, 60 px tiles, 100 px chunks, in a run of
    their own, as the runs save the changed settings."""
    config, trained = untrained_run
    config = dataclasses.replace(config, predict=dataclasses.replace(
        config.predict, tile_size=60, max_whole_pixels=10_000, chunk_size=110))
    run = RunDir(tmp_path / "run")
    run.train.mkdir(parents=True)
    shutil.copy(trained.best_model, run.best_model)
    return config, run


def test_two_worker_processes_write_what_the_local_runner_writes_large_images_in_chunks(untrained_run, images,
                                                                                        tmp_path, capfd):
    """One image over the predict.max_whole_pixels limit: chunks spread over both workers, the
    files of large_image.segment_large in one process (the local runner's). The workers log
    at WARNING: none of Beam's INFO lines (channels, harness, batch statistics)."""
    config, run = large_settings(untrained_run, tmp_path)
    rows, cols = np.mgrid[:290, :250]
    big = (100 + 60 * np.sin(rows / 9.0) * np.cos(cols / 13.0)).astype(np.uint8)
    tifffile.imwrite(images / "big.tif", big, tile=(64, 64), photometric="minisblack")
    assert large_image.is_large(images / "big.tif", config) and len(chunk_grid.chunks(290, 250, config)) == 9
    predict.run(config, run, images, tmp_path / "local")
    predict.run(config, run, images, tmp_path / "beam", runner="beam",
                beam_options=["--direct_num_workers=2", "--direct_running_mode=multi_processing"])
    assert (tmp_path / "beam" / "failures.csv").read_bytes() == b"file,reason\r\n"
    (tmp_path / "beam" / "failures.csv").unlink()
    assert {"big_prob.tif", "big_labels.tif", "big_instances.csv"} <= set(files_of(tmp_path / "local"))
    assert_same_outputs(tmp_path / "beam", tmp_path / "local")
    assert "INFO:apache_beam" not in capfd.readouterr().err


def test_the_workers_log_at_the_level_this_process_logs_beam_at():
    """WARNING by default; INFO once the command's --verbose has set logging to INFO."""
    logger = logging.getLogger("apache_beam")
    assert logger.getEffectiveLevel() == logging.WARNING
    assert beam_pipeline.worker_log_level() == "--default_sdk_harness_log_level=WARNING"
    logger.setLevel(logging.INFO)
    try:
        assert beam_pipeline.worker_log_level() == "--default_sdk_harness_log_level=INFO"
    finally:
        logger.setLevel(logging.NOTSET)


def test_a_large_input_that_cannot_be_chunked_is_listed_and_leaves_no_scratch(untrained_run, images, tmp_path):
    config, run = large_settings(untrained_run, tmp_path)
    tifffile.imwrite(images / "big_stack.tif", np.zeros((2, 120, 120), np.uint8), tile=(64, 64),
                     photometric="minisblack")
    out = tmp_path / "out"
    with pytest.raises(PipelineError, match="1 of 4 input"):
        predict.run(config, run, images, out, runner="beam")
    [(file, reason)] = outputs.read_failures(out)
    assert file == str(images / "big_stack.tif") and reason.startswith("a stack of 2 images")
    assert len(files_of(out)) == 3 * 4 + 5 + 1  # the other three inputs' files, failures.csv, no hidden scratch


@pytest.mark.parametrize("runner", ["local", "beam"])
def test_each_input_is_classified_once_for_every_step(untrained_run, images, tmp_path, monkeypatch, runner):
    """Whether an input is large (which opens its header) is decided once and passed on to the
    checks and the runners."""
    config, run = large_settings(untrained_run, tmp_path)
    tifffile.imwrite(images / "big.tif", np.zeros((120, 120), np.uint8), tile=(64, 64), photometric="minisblack")
    asked, is_large = [], large_image.is_large
    monkeypatch.setattr(large_image, "is_large", lambda path, config: asked.append(path.name) or is_large(path, config))
    predict.run(config, run, images, tmp_path / "out", runner=runner)
    assert sorted(asked) == ["big.tif", "em.tif", "small.png", "stack.tif"]
    assert (tmp_path / "out" / "big_labels.tif").exists() and (tmp_path / "out" / "em_labels.tif").exists()
