"""Physical units: where the input declares its pixel size in a length unit, NAME_instances.csv
adds area, centroid and box in that unit, named in the columns; an unreadable unit gives
pixels only with a notice; NAME_labels.tif carries a LUT that Fiji shows, its pixels the labels."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import tifffile

from pipeline.config.resolve import preset
from pipeline.files import io
from pipeline.inference import chunk_grid, large_image, outputs
from pipeline.inference.labelling import instances

PIXEL_COLUMNS = list(instances.COLUMNS)


def read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="") as handle:
        header, *rows = list(csv.reader(handle))
    return header, rows


def cells_probability(height: int = 60, width: int = 80) -> np.ndarray:
    """A probability of cell with four cells of known boxes on a noisy background under the threshold."""
    rng = np.random.default_rng(5)
    probability = rng.uniform(0, 0.4, (height, width)).astype(np.float32)
    for top, left, bottom, right in ((3, 4, 12, 20), (20, 30, 41, 37), (45, 2, 58, 9), (5, 50, 30, 77)):
        probability[top:bottom, left:right] = rng.uniform(0.6, 1.0, (bottom - top, right - left))
    probability[25:31, 10:15] = 0.9  # an irregular one: a notch in its right side
    probability[27, 14] = 0.1
    return probability


def write_whole(tmp_path: Path, probability: np.ndarray, calibration: io.Calibration | None) -> list[Path]:
    """`outputs.write` of a [H, W] probability and an image of the same size, with the smoke preset."""
    config = preset("smoke")
    image = (probability * 255).astype(np.uint8)[None, ..., None]
    return outputs.write(tmp_path / "out", "cells", image, probability[None], config, calibration, overwrite=False)


def calibrated_tiff(path: Path, x: float, y: float, unit: str = "um") -> Path:
    """A TIFF declaring pixels of x by y `unit` in ImageJ's metadata, as Fiji saves them."""
    tifffile.imwrite(path, np.zeros((4, 4), np.uint8), imagej=True, resolution=(1 / x, 1 / y),
                     metadata={"unit": unit, "axes": "YX"})
    return path


@pytest.mark.parametrize("unit,suffix", [("um", "um"), ("micron", "um"), ("\\u00B5m", "um"), ("nm", "nm"),
                                         ("mm", "mm")])
def test_a_declared_pixel_size_adds_area_centroid_and_box_in_its_unit(tmp_path, unit, suffix):
    calibration = io.read_calibration(calibrated_tiff(tmp_path / "in.tif", 0.5, 0.5, unit))
    assert (calibration.x, calibration.y) == (0.5, 0.5)
    written = write_whole(tmp_path, cells_probability(), calibration)
    header, rows = read_csv(written[3])
    physical = [f"area_{suffix}2", f"centroid_y_{suffix}", f"centroid_x_{suffix}", f"min_y_{suffix}",
                f"min_x_{suffix}", f"max_y_{suffix}", f"max_x_{suffix}"]
    assert header == PIXEL_COLUMNS + physical
    table = np.array(rows, float)
    assert len(table) == 5
    pixels, scaled = table[:, :len(PIXEL_COLUMNS)], table[:, len(PIXEL_COLUMNS):]
    np.testing.assert_array_equal(scaled[:, 0], pixels[:, 1] * 0.25)  # area: exact
    np.testing.assert_array_equal(scaled[:, 3:], pixels[:, 4:8] * 0.5)  # box: whole pixels, exact
    # The centroid from the unrounded mean, so within the pixel columns' rounding of it.
    np.testing.assert_allclose(scaled[:, 1:3], pixels[:, 2:4] * 0.5, atol=0.5 * 5e-4 + 1e-8)
    # The pixel columns are those of an uncalibrated input.
    plain = write_whole(tmp_path / "plain", cells_probability(), None)
    assert [row[:len(PIXEL_COLUMNS)] for row in rows] == read_csv(plain[3])[1]


def test_anisotropic_pixels_scale_rows_by_the_height_and_columns_by_the_width(tmp_path):
    calibration = io.read_calibration(calibrated_tiff(tmp_path / "in.tif", x=0.25, y=2.0))
    written = write_whole(tmp_path, cells_probability(), calibration)
    header, rows = read_csv(written[3])
    table = np.array(rows, float)
    column = {name: table[:, i] for i, name in enumerate(header)}
    np.testing.assert_array_equal(column["area_um2"], column["area"] * 0.5)
    for name in ("min", "max"):
        np.testing.assert_array_equal(column[f"{name}_y_um"], column[f"{name}_row"] * 2.0)
        np.testing.assert_array_equal(column[f"{name}_x_um"], column[f"{name}_col"] * 0.25)
    np.testing.assert_allclose(column["centroid_y_um"], column["centroid_y"] * 2.0, atol=2.0 * 5e-4 + 1e-8)
    np.testing.assert_allclose(column["centroid_x_um"], column["centroid_x"] * 0.25, atol=0.25 * 5e-4 + 1e-8)


def test_tiff_resolution_tags_give_micrometre_columns(tmp_path):
    source = tmp_path / "in.tif"
    tifffile.imwrite(source, np.zeros((4, 4), np.uint8), resolution=(20_000.0, 20_000.0), resolutionunit="CENTIMETER")
    header, rows = read_csv(write_whole(tmp_path, cells_probability(), io.read_calibration(source))[3])
    assert header[len(PIXEL_COLUMNS):][0] == "area_um2"
    column = dict(zip(header, np.array(rows, float).T))
    np.testing.assert_allclose(column["area_um2"], column["area"] * 0.25, rtol=1e-12)


def test_an_input_without_a_pixel_size_keeps_the_pixel_columns(tmp_path, capsys):
    header, rows = read_csv(write_whole(tmp_path, cells_probability(), None)[3])
    assert header == PIXEL_COLUMNS and all(len(row) == len(PIXEL_COLUMNS) for row in rows)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("unit,notice", [("inch", "is in 'inch', not a length unit"), ("", "has no unit"),
                                         ("pixel", None)])
def test_a_unit_that_is_no_length_gives_pixels_only_with_a_notice(tmp_path, capsys, unit, notice):
    written = write_whole(tmp_path, cells_probability(), io.Calibration(0.5, 0.5, unit))
    assert read_csv(written[3])[0] == PIXEL_COLUMNS
    error = capsys.readouterr().err
    if notice is None:  # ImageJ's name for an uncalibrated image's unit: no size was declared
        assert error == ""
    else:
        assert error == f"notice: {written[3]}: in pixels only: the input's pixel size {notice} " \
                        "(physical columns take nm, um, mm, cm, m)\n"


def test_a_resolution_without_a_unit_is_no_pixel_size_and_says_so(tmp_path, capsys):
    source = tmp_path / "in.tif"
    tifffile.imwrite(source, np.zeros((4, 4), np.uint8), resolution=(2.0, 2.0), resolutionunit="NONE")
    assert io.read_calibration(source) is None
    error = capsys.readouterr().err
    assert error.startswith(f"notice: {source}: a resolution of 2 x 2 pixels per unit without a unit")
    assert error.count("\n") == 1
    tifffile.imwrite(tmp_path / "plain.tif", np.zeros((4, 4), np.uint8))  # TIFF's default 1 x 1: nothing declared
    assert io.read_calibration(tmp_path / "plain.tif") is None and capsys.readouterr().err == ""


def test_a_pixel_height_in_another_unit_than_the_width_is_no_pixel_size_and_says_so(tmp_path, capsys):
    source = tmp_path / "in.tif"
    tifffile.imwrite(source, np.zeros((4, 4), np.uint8), imagej=True, resolution=(2.0, 4.0),
                     metadata={"unit": "um", "yunit": "nm", "axes": "YX"})
    assert io.read_calibration(source) is None
    assert capsys.readouterr().err == (f"notice: {source}: ImageJ's pixel width is in 'um' but its height in 'nm'; "
                                       "its outputs carry no pixel size and measure in pixels\n")


@pytest.mark.parametrize("calibrated", [False, True])
def test_the_labels_tiff_has_a_lut_and_keeps_the_labels_and_the_pixel_size(tmp_path, calibrated):
    calibration = io.Calibration(0.5, 0.25, "um") if calibrated else None
    probability = cells_probability()
    written = write_whole(tmp_path, probability, calibration)
    with tifffile.TiffFile(written[2]) as tiff:
        metadata = tiff.imagej_metadata
        labels = tiff.asarray()
    lut = np.asarray(metadata["LUTs"])
    assert lut.shape == (3, 256) and lut.dtype == np.uint8
    assert lut[:, 0].tolist() == [0, 0, 0] and lut[:, 1:].max(axis=0).min() > 0  # background black, cells bright
    assert len({tuple(colour) for colour in lut[:, 1:].T}) == 255  # a colour of its own per label up to 255
    assert (metadata["min"], metadata["max"]) == (0, 255)  # so that label k is shown in entry k
    assert labels.dtype == np.uint16
    np.testing.assert_array_equal(labels, instances.cell_instances(probability, 0.5, "components", 16))
    if calibrated:
        assert io.read_calibration(written[2]) == calibration
    # The other images have no LUT.
    with tifffile.TiffFile(written[1]) as tiff:
        assert "LUTs" not in (tiff.imagej_metadata or {})


def test_a_stack_of_labels_keeps_its_slices_with_the_lut(tmp_path):
    probability = np.stack([cells_probability(), cells_probability()[::-1]])
    image = (probability * 255).astype(np.uint8)[..., None]
    written = outputs.write(tmp_path, "stack", image, probability, preset("smoke"), None, overwrite=False)
    with tifffile.TiffFile(written[2]) as tiff:
        assert tiff.series[0].axes == "ZYX" and np.asarray(tiff.imagej_metadata["LUTs"]).shape == (3, 256)
        np.testing.assert_array_equal(tiff.asarray(),
                                      instances.cell_instances(probability, 0.5, "components", 16))


def test_more_than_255_cells_spread_the_lut_over_all_labels():
    labels = np.arange(300, dtype=np.uint16).reshape(15, 20)
    assert outputs.label_display(labels)["max"] == 299


def test_whole_and_chunked_measurements_are_identical_with_a_pixel_size(tmp_path):
    config = preset("smoke")
    config = dataclasses.replace(config, predict=dataclasses.replace(
        config.predict, tile_size=60, max_whole_pixels=1000, chunk_size=30))
    probability = cells_probability()
    source = tmp_path / "big.tif"
    tifffile.imwrite(source, np.zeros(probability.shape, np.uint8), tile=(16, 16), photometric="minisblack",
                     resolution=(40_000.0, 5_000.0), resolutionunit="CENTIMETER")  # 0.25 um wide, 2 um high
    planned = large_image.plan(source, tmp_path / "chunked", "big", config)
    for chunk in chunk_grid.chunks(*probability.shape, config):
        large_image.write_chunk(planned, chunk, probability[chunk.box], config)
    chunked = large_image.finish(planned, config)
    whole = write_whole(tmp_path, probability, io.read_calibration(source))
    header, rows = read_csv(chunked[3])
    assert header[-7:] == ["area_um2", "centroid_y_um", "centroid_x_um", "min_y_um", "min_x_um", "max_y_um",
                           "max_x_um"] and len(rows) == 5
    assert chunked[3].read_bytes() == whole[3].read_bytes()
    np.testing.assert_array_equal(tifffile.imread(chunked[2]), tifffile.imread(whole[2]))
