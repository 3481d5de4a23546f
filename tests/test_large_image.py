"""Images larger than memory: chunked prediction equals the whole-image one, labels and
measurements equal the whole image's, outputs are all-or-nothing, reads stay near the chunk."""

from __future__ import annotations

import dataclasses
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
import tifffile
import zarr

from pipeline.config.resolve import preset
from pipeline.errors import PipelineError
from pipeline.files import io, lazy_image
from pipeline.inference import chunk_grid, large_image, outputs
from pipeline.inference.chunk_grid import Chunk
from pipeline.inference.labelling import instances
from pipeline.inference.segmenter import Segmenter
from pipeline.normalization import normalize, standardize
from pipeline.training.model import unet

HEIGHT, WIDTH = 290, 250  # chunks of 100: 3 x 3, the last row 90 high (not whole steps) and column 50 wide


def small_config(**predict):
    """The smoke preset with 60 px tiles (output 20, margin 20, step 20), 100 px chunks, and
    every image over 10,000 pixels large."""
    config = preset("smoke")
    settings = {"tile_size": 60, "tiles_per_batch": 8, "max_whole_pixels": 10_000, "chunk_size": 110,
                "min_size": 4, **predict}
    return dataclasses.replace(config, predict=dataclasses.replace(config.predict, **settings))


@pytest.fixture(scope="module")
def model() -> keras.Model:
    keras.utils.set_random_seed(0)
    return unet(small_config().model)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    """A grey uint8 image with structure at several scales, so that the untrained net's
    probabilities vary across the threshold."""
    rng = np.random.default_rng(1)
    rows, cols = np.mgrid[:HEIGHT, :WIDTH]
    smooth = 100 + 60 * np.sin(rows / 9.0) * np.cos(cols / 13.0)
    return np.clip(smooth + rng.normal(0, 25, (HEIGHT, WIDTH)), 0, 255).astype(np.uint8)


def write_tiled_tiff(path: Path, array: np.ndarray, **keywords) -> Path:
    tifffile.imwrite(path, array, tile=(64, 64), **{"photometric": "minisblack", **keywords})
    return path


def write_ome_zarr(path: Path, array: np.ndarray, zarr_format: int) -> Path:
    """An OME-Zarr image with axes c, y, x (one channel) and a pixel size of 0.25 um."""
    group = zarr.open_group(path, mode="w", zarr_format=zarr_format)
    axes = [{"name": "c", "type": "channel"}, {"name": "y", "type": "space", "unit": "micrometer"},
            {"name": "x", "type": "space", "unit": "micrometer"}]
    multiscale = {"axes": axes, "datasets": [
        {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 0.25, 0.25]}]}]}
    if zarr_format == 2:
        group.attrs["multiscales"] = [{"version": "0.4", **multiscale}]
    else:
        group.attrs["ome"] = {"version": "0.5", "multiscales": [multiscale]}
    group.create_array("0", shape=(1, *array.shape), chunks=(1, 64, 64), dtype=array.dtype)[:] = array[None]
    return path


def read_output(path: Path) -> np.ndarray:
    if path.name.endswith(".zarr"):
        return zarr.open_group(path, mode="r")["0"][:]
    return tifffile.imread(path)


def test_chunks_are_whole_steps_in_raster_order_clipped_at_the_borders():
    config = small_config()
    assert chunk_grid.chunk_side(config) == 100
    grid = chunk_grid.chunks(HEIGHT, WIDTH, config)
    assert grid[:4] == [Chunk(0, 0, 100, 100), Chunk(0, 100, 100, 100), Chunk(0, 200, 100, 50), Chunk(100, 0, 100, 100)]
    assert grid[-1] == Chunk(200, 200, 90, 50) and len(grid) == 9
    assert grid[4].box == (slice(100, 200), slice(100, 200))
    assert chunk_grid.chunk_side(small_config(chunk_size=7)) == 20  # at least one step


@pytest.mark.parametrize("kind", ["tiff", "striped tiff", "ome-zarr 0.4", "ome-zarr 0.5"])
def test_chunked_prediction_equals_the_whole_image_segmenter(tmp_path, model, image, kind):
    config = small_config()
    if kind == "tiff":
        source = write_tiled_tiff(tmp_path / "big.tif", image, resolution=(4.0, 4.0),
                                  resolutionunit="CENTIMETER")
    elif kind == "striped tiff":  # one uncompressed strip, as tifffile writes by default: memory-mapped
        source = tmp_path / "big.tif"
        tifffile.imwrite(source, image, resolution=(4.0, 4.0), resolutionunit="CENTIMETER")
    else:
        source = write_ome_zarr(tmp_path / "big.ome.zarr", image, 2 if kind.endswith("0.4") else 3)
    assert large_image.is_large(source, config)
    if kind.endswith("tiff"):  # large means more pixels than max_whole_pixels
        assert not large_image.is_large(source, small_config(max_whole_pixels=HEIGHT * WIDTH))
    written = large_image.segment_large(model, source, tmp_path / "out", "big", config)
    expected = Segmenter(model, config)(image[..., None])
    probability = read_output(written[0])
    assert probability.shape == (HEIGHT, WIDTH) and probability.dtype == np.float32
    np.testing.assert_allclose(probability, expected, atol=1e-5)
    mask = read_output(written[1])
    certain = np.abs(expected.astype(np.float64) - config.predict.threshold) > 1e-5
    assert 0.05 < instances.cell_mask(expected, 0.5).mean() < 0.95  # the threshold matters here
    np.testing.assert_array_equal(mask[certain], instances.cell_mask(expected, 0.5)[certain].astype(np.uint8) * 255)
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == sorted(path.name for path in written)
    umask = os.umask(0)
    os.umask(umask)
    files = [path for output in written for path in ([*output.rglob("*")] if output.is_dir() else [output])]
    assert {stat.S_IMODE(path.stat().st_mode) for path in files if path.is_file()} == {0o666 & ~umask}
    if kind.endswith("tiff"):
        with tifffile.TiffFile(written[0]) as tiff:
            assert tiff.is_bigtiff and tiff.pages.first.is_tiled
        calibration = io.read_calibration(written[2])
        assert calibration.unit == "um" and calibration.x == pytest.approx(2500.0)
    else:
        attributes = zarr.open_group(written[2], mode="r").attrs.asdict()
        multiscale = attributes.get("ome", attributes)["multiscales"][0]
        assert [axis["name"] for axis in multiscale["axes"]] == ["y", "x"]
        assert multiscale["axes"][0]["unit"] == "micrometer"
        assert multiscale["datasets"][0]["coordinateTransformations"][0]["scale"] == [0.25, 0.25]


def test_test_time_augmentation_is_exact_chunk_by_chunk(tmp_path, model, image):
    config = small_config(test_time_augmentation=True)
    part = image[:130, :170]  # 2 x 2 chunks, so that the flipped views' grids cross the chunks
    source = write_tiled_tiff(tmp_path / "big.tif", part)
    stats = large_image.statistics(source, config)
    chunked = np.zeros(part.shape, np.float32)
    for chunk in chunk_grid.chunks(*part.shape, config):
        chunked[chunk.box] = large_image.predict_chunk(model, source, chunk, stats, config)
    np.testing.assert_allclose(chunked, Segmenter(model, config)(part[..., None]), atol=1e-5)


def test_statistics_are_the_whole_image_s_normalisation(tmp_path, image, capsys):
    config = small_config(chunk_size=40)
    colour = np.stack([image, image, image], -1)
    source = write_tiled_tiff(tmp_path / "grey-as-colour.tif", colour, photometric="rgb")
    mean, scale = large_image.statistics(source, config)
    as_float = image.astype(np.float64)
    assert mean == pytest.approx(as_float.mean(), rel=1e-12)
    assert scale == pytest.approx(as_float.std(), rel=1e-12)
    np.testing.assert_allclose(standardize(image, mean, scale), normalize(image[..., None]).numpy()[..., 0], atol=1e-6)
    assert capsys.readouterr().err == ""
    # A constant image: deviation 0 (no floor), normalised to zeros, with a notice.
    flat = write_tiled_tiff(tmp_path / "flat.tif", np.full((HEIGHT, WIDTH), 0.1, np.float32))
    assert large_image.statistics(flat, config) == (pytest.approx(0.1), 0.0)
    assert f"notice: {flat}: constant image (every pixel 0.1)" in capsys.readouterr().err


@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1e-3, 1e3, 1e18, 1e20, 1e30, "offset"])
def test_chunks_of_an_image_of_any_magnitude_give_the_mask_of_its_unit_version(tmp_path, model, image, scale):
    config = small_config()
    unit = (image[:130, :170] / np.float32(255)).astype(np.float32)  # 2 x 2 chunks
    values = unit + np.float32(1000) if scale == "offset" else (unit.astype(np.float64) * scale).astype(np.float32)
    source = write_tiled_tiff(tmp_path / "big.tif", values)
    stats = large_image.statistics(source, config)
    chunked = np.zeros(unit.shape, np.float32)
    for chunk in chunk_grid.chunks(*unit.shape, config):
        chunked[chunk.box] = large_image.predict_chunk(model, source, chunk, stats, config)
    segment = Segmenter(model, config)
    whole, expected = segment(values[..., None]), segment(unit[..., None])
    assert 0.05 < instances.cell_mask(expected, 0.5).mean() < 0.95  # the threshold matters here
    tolerance = 1e-3 if scale == "offset" else 1e-5  # the offset pixels' own rounding, 2e-4 of the deviation
    np.testing.assert_allclose(chunked, whole, atol=1e-5)
    np.testing.assert_allclose(chunked, expected, atol=tolerance)
    certain = np.abs(expected - 0.5) > tolerance
    mask, expected_mask = instances.cell_mask(chunked, 0.5), instances.cell_mask(expected, 0.5)
    np.testing.assert_array_equal(mask[certain], expected_mask[certain])


def test_a_constant_image_predicts_chunk_by_chunk_as_a_blank_one(tmp_path, model):
    config = small_config()
    blank = np.zeros((130, 170), np.float32)
    source = write_tiled_tiff(tmp_path / "big.tif", np.full(blank.shape, -3e30, np.float32))
    stats = large_image.statistics(source, config)
    chunk = chunk_grid.chunks(*blank.shape, config)[3]
    np.testing.assert_allclose(large_image.predict_chunk(model, source, chunk, stats, config),
                               Segmenter(model, config)(blank[..., None])[chunk.box], atol=1e-6)


def cells_across_chunks() -> np.ndarray:
    """A probability of cell whose cells cross chunk borders: a U joined only in the chunk
    below its arms' chunks, a cell over a chunk corner, a long bar over three chunks, specks
    under min_size (one of them split by a border) and noise."""
    rng = np.random.default_rng(3)
    probability = rng.uniform(0, 0.45, (HEIGHT, WIDTH)).astype(np.float32)
    cells = np.zeros((HEIGHT, WIDTH), bool)
    cells[60:95, 20:30] = cells[60:95, 60:70] = True  # the U's arms, in chunk (0, 0)...
    cells[95:130, 20:70] = True  # ...joined in chunk (1, 0)
    cells[60:80, 40:50] = True  # a separate cell between the arms
    cells[90:110, 90:115] = True  # over the corner of four chunks
    cells[150:156, 10:240] = True  # a bar over three chunks
    cells[99:101, 180] = True  # a speck of 2 px split by the border between chunk rows
    cells[250, 5] = cells[270, 230:232] = True  # specks under min_size
    cells[200:290, 200:250] |= rng.random((90, 50)) < 0.55  # noise at the clipped corner chunk
    probability[cells] = rng.uniform(0.55, 1.0, np.count_nonzero(cells))
    probability[120, 120] = 0.5  # exactly the threshold: not cell
    return probability


def write_probability(tmp_path: Path, probability: np.ndarray, config, overwrite: bool = False) -> list[Path]:
    """plan, write_chunk per chunk, finish: the large-image outputs of a given probability."""
    source = tmp_path / "big.tif"
    if not source.exists():
        write_tiled_tiff(source, np.zeros(probability.shape, np.uint8))
    planned = large_image.plan(source, tmp_path / "out", "big", config, overwrite)
    for chunk in chunk_grid.chunks(*probability.shape, config):
        large_image.write_chunk(planned, chunk, probability[chunk.box], config)
    large_image.write_chunk(planned, chunk, probability[chunk.box], config)  # a retried chunk changes nothing
    return large_image.finish(planned, config)


def test_labels_and_measurements_equal_those_of_the_whole_image(tmp_path):
    config = small_config()
    probability = cells_across_chunks()
    written = write_probability(tmp_path, probability, config)
    expected = instances.cell_instances(probability, 0.5, "components", config.predict.min_size)
    labels = tifffile.imread(written[2])
    assert labels.dtype == np.uint16
    np.testing.assert_array_equal(labels, expected)
    assert labels[60, 20] == labels[60, 60] != labels[60, 40]  # the U is one cell
    assert labels[99, 180] == labels[250, 5] == 0  # specks dropped
    np.testing.assert_array_equal(tifffile.imread(written[0]), probability)
    # The file the predict stage writes for the same labels of an image read whole.
    outputs.write_measurements(tmp_path / "whole.csv", expected[None], probability[None], single=True)
    assert written[3].read_bytes() == (tmp_path / "whole.csv").read_bytes()


def test_more_than_65535_cells_take_32_bit_labels(tmp_path):
    config = small_config(min_size=1, max_whole_pixels=1, chunk_size=200)
    probability = np.zeros((600, 440), np.float32)
    probability[::2, ::2] = 1  # 66,000 single-pixel cells
    labels = tifffile.imread(write_probability(tmp_path, probability, config)[2])
    assert labels.dtype == np.uint32 and labels.max() == 66_000
    np.testing.assert_array_equal(labels, instances.cell_instances(probability, 0.5, "components", 1))


def test_existing_outputs_are_refused_unless_overwrite(tmp_path):
    config = small_config()
    probability = cells_across_chunks()
    first = write_probability(tmp_path, probability, config)
    os.chmod(first[0], 0o600)
    with pytest.raises(PipelineError, match=r"big_prob\.tif: already exists \(pass --overwrite"):
        write_probability(tmp_path, probability, config)
    written = write_probability(tmp_path, probability * 0.9, config, overwrite=True)
    assert written == first
    np.testing.assert_array_equal(tifffile.imread(written[0]), probability * 0.9)
    assert os.stat(written[0]).st_mode & 0o777 == 0o600  # a replaced file keeps its mode
    assert not any(path.name.startswith(".") for path in (tmp_path / "out").iterdir())


def test_a_failure_midway_leaves_no_output_and_no_scratch(tmp_path, model, image):
    config = small_config()
    source = write_tiled_tiff(tmp_path / "big.tif", image)
    out = tmp_path / "new" / "out"

    class Failing(keras.Model):
        """Fails on its tenth batch of tiles, in the third chunk: a crash in the middle of the chunks."""

        def __init__(self):
            super().__init__()
            self.batches = tf.Variable(0)

        def call(self, tiles, training=False):
            check = tf.debugging.assert_less(self.batches.assign_add(1), 10, message="out of memory")
            with tf.control_dependencies([check]):
                return model(tf.identity(tiles), training=training)

    with pytest.raises(Exception, match="out of memory"):
        large_image.segment_large(Failing(), source, out, "big", config)
    assert not (tmp_path / "new").exists()  # the folders it created went too
    out.mkdir(parents=True)
    (out / "big_mask.tif").write_text("an earlier result")
    with pytest.raises(PipelineError, match="big_mask.tif: already exists"):
        large_image.segment_large(model, source, out, "big", config)
    assert [path.name for path in out.iterdir()] == ["big_mask.tif"]


def test_a_failure_while_publishing_restores_what_was_there(tmp_path):
    config = small_config()
    probability = cells_across_chunks()
    first = write_probability(tmp_path, probability, config)
    before = {path: path.read_bytes() for path in first}
    planned = large_image.plan(tmp_path / "big.tif", tmp_path / "out", "big", config, overwrite=True)
    for chunk in chunk_grid.chunks(*probability.shape, config):
        large_image.write_chunk(planned, chunk, probability[chunk.box] * 0.5, config)
    # Where the old CSV would wait while the new one takes its place, a folder: moving it
    # there fails after the three TIFFs were renamed into place.
    (planned.scratch / "replaced-3" / "x").mkdir(parents=True)
    with pytest.raises(PipelineError, match="big_instances.csv"):
        large_image.finish(planned, config)
    large_image.discard(planned)
    for path in first[:3]:
        assert path.read_bytes() == before[path]
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == sorted(path.name for path in first)


def test_the_watershed_is_refused(tmp_path, image):
    source = write_tiled_tiff(tmp_path / "big.tif", image)
    message = r"big\.tif: predict\.instances=watershed cannot label .* use predict\.instances=components"
    for step in (large_image.check, large_image.plan):
        with pytest.raises(PipelineError, match=message):
            step(source, tmp_path / "out", "big", small_config(instances="watershed"))
    assert not (tmp_path / "out").exists()
    assert large_image.check(source, tmp_path / "out", "big", small_config()) == (HEIGHT, WIDTH)
    assert not (tmp_path / "out").exists()  # checking writes nothing


def test_unreadable_inputs_are_refused_in_one_line(tmp_path, image, monkeypatch):
    config = small_config()
    stack = write_tiled_tiff(tmp_path / "stack.tif", np.stack([image] * 4), metadata={"axes": "ZYX"})
    corrupt = tmp_path / "corrupt.tif"
    corrupt.write_bytes(write_tiled_tiff(tmp_path / "whole.tif", image).read_bytes()[:3000])
    text = tmp_path / "text.tif"
    text.write_text("not an image")
    colour = write_tiled_tiff(tmp_path / "colour.tif", np.stack([image, image, image // 2], -1), photometric="rgb")
    empty_zarr = tmp_path / "empty.ome.zarr"
    zarr.open_group(empty_zarr, mode="w")
    cases = [
        (stack, r"stack\.tif: a stack of 4 images .* one 2-D image per file"),
        (text, r"text\.tif: corrupt or unreadable TIFF"),
        (empty_zarr, r"empty\.ome\.zarr: not an OME-Zarr image"),
        (tmp_path / "missing.tif", r"missing\.tif: file not found"),
    ]
    for path, message in cases:
        with pytest.raises(PipelineError, match=message) as caught:
            large_image.plan(path, tmp_path / "out", path.stem, config)
        assert "\n" not in str(caught.value)
    # Tiles past the damage are found only when read: still one line naming the file.
    with pytest.raises(PipelineError, match=r"corrupt\.tif: corrupt or unreadable"):
        large_image.statistics(corrupt, config)
    with pytest.raises(PipelineError, match=r"colour\.tif: colour image \(3 channels\) but the model takes 1"):
        large_image.statistics(colour, config)
    unreadable = image.astype(np.float64)
    unreadable[0, 0], unreadable[-1, -1], unreadable[5, 7] = np.nan, 1e39, -np.inf  # in two chunks
    with pytest.raises(PipelineError, match=r"huge\.tif: 3 pixel values are NaN, infinite or beyond float32"):
        large_image.statistics(write_tiled_tiff(tmp_path / "huge.tif", unreadable), config)
    with pytest.raises(PipelineError, match=r"grey image \(1 channel\) but the model takes 3 channels"):
        lazy_image.open_lazy(write_tiled_tiff(tmp_path / "grey.tif", image), 3)
    assert not large_image.is_large(text, config)  # the whole-image reader names its problem
    monkeypatch.setattr(lazy_image, "_LARGEST_STRIP", 100 * WIDTH)  # strips of 290 rows are too large
    one_strip = tmp_path / "one-strip.tif"
    tifffile.imwrite(one_strip, image, compression="zlib", rowsperstrip=HEIGHT)
    with pytest.raises(PipelineError, match=r"one-strip\.tif: compressed in strips or tiles of 290 x 250 values"):
        lazy_image.open_lazy(one_strip, 1)
    assert not (tmp_path / "out").exists()


class RecordingImage:
    """A LazyImage that records every box read from it."""

    def __init__(self, image):
        self.image, self.shape, self.boxes = image, image.shape, []

    def __getitem__(self, key):
        self.boxes.append(key[:2])
        return self.image[key]

    def close(self):
        self.image.close()


def test_a_chunk_reads_only_its_box_and_margins(tmp_path, model, image, monkeypatch):
    config = small_config()
    source = write_tiled_tiff(tmp_path / "big.tif", image)
    stats = large_image.statistics(source, config)
    opened = []

    def recording_open(path, channels, notice=True):
        opened.append(RecordingImage(lazy_image.open_lazy(path, channels, notice)))
        return opened[-1]

    monkeypatch.setattr(large_image, "open_lazy", recording_open)
    tile = config.predict.tile_size
    for chunk in chunk_grid.chunks(HEIGHT, WIDTH, config):
        large_image.predict_chunk(model, source, chunk, stats, config)
        (rows, cols), = opened[-1].boxes
        assert chunk.row - tile <= rows.start and rows.stop <= chunk.row + chunk.height + tile
        assert chunk.col - tile <= cols.start and cols.stop <= chunk.col + chunk.width + tile


def test_an_ome_zarr_smaller_than_a_tile_is_predicted_as_a_whole_image_would_be(tmp_path, model, image):
    config = small_config()
    tiny = image[:7, :9]  # smaller than the network's context: mirrored several times over
    source = write_ome_zarr(tmp_path / "tiny.zarr", tiny, 3)
    assert large_image.is_large(source, config) and io.image_name(source) == "tiny"
    written = large_image.segment_large(model, source, tmp_path / "out", "tiny", config)
    assert [path.name for path in written] == ["tiny_prob.ome.zarr", "tiny_mask.ome.zarr", "tiny_labels.ome.zarr",
                                               "tiny_instances.csv"]
    np.testing.assert_allclose(read_output(written[0]), Segmenter(model, config)(tiny[..., None]), atol=1e-5)


def test_the_scratch_of_a_killed_chunked_prediction_is_removed_by_the_next_one(tmp_path, image):
    source, out = write_tiled_tiff(tmp_path / "big.tif", image), tmp_path / "out"
    script = ("import dataclasses, os, signal; from pipeline.config.resolve import preset; "
              "from pipeline.inference import large_image; config = preset('smoke'); "
              "config = dataclasses.replace(config, predict=dataclasses.replace(config.predict, tile_size=60, "
              "max_whole_pixels=10_000, chunk_size=110)); "
              f"large_image.plan({str(source)!r}, {str(out)!r}, 'big', config); os.kill(os.getpid(), signal.SIGKILL)")
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    [abandoned] = [path for path in out.iterdir() if path.name.startswith(".big.large")]
    planned = large_image.plan(source, out, "big", small_config())
    try:
        assert not abandoned.exists() and planned.scratch.is_dir()
        assert planned.scratch.name.startswith(".big.large.tmp-")  # io.scratch_name: named by its writer
        assert list(planned.targets) == outputs.large_paths(out, "big", ome_zarr=False)
    finally:
        large_image.discard(planned)
    assert list(out.iterdir()) == []


def test_outputs_names_a_large_inputs_files_and_finds_the_existing_ones(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    assert [path.name for path in outputs.large_paths(out, "big", ome_zarr=False)] == [
        "big_prob.tif", "big_mask.tif", "big_labels.tif", "big_instances.csv"]
    assert [path.name for path in outputs.large_paths(out, "tiny", ome_zarr=True)] == [
        "tiny_prob.ome.zarr", "tiny_mask.ome.zarr", "tiny_labels.ome.zarr", "tiny_instances.csv"]
    (out / "big_mask.tif").write_text("an earlier result")
    (out / "big_overlay.png").write_text("an earlier result, of the image read whole")
    assert outputs.existing_of(out, outputs.Source(tmp_path / "big.tif", large=True)) == [out / "big_mask.tif"]
    assert outputs.existing_of(out, outputs.Source(tmp_path / "big.tif", large=False)) == [
        out / "big_mask.tif", out / "big_overlay.png"]
