"""Stage `predict` through the CLI: inputs of any size, folders and stacks, cell instances and
their measurements, outlined overlays, refusals, one-line errors."""

import csv

import cv2
import numpy as np
import pytest
import tifffile

from pipeline.cli import main
from pipeline.config.resolve import preset
from pipeline.data.synthetic import synthetic_em_image, synthetic_em_stack
from pipeline.errors import PipelineError
from pipeline.files.io import read_calibration
from pipeline.files.rundir import RunDir
from pipeline.inference.labelling.instances import COLUMNS, cell_instances, measure
from pipeline.inference.outputs import OUTLINE_COLOURS
from pipeline.stages import predict
from pipeline.stages.predict import input_files


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


def test_predict_mirrors_an_image_smaller_than_the_context(smoke_run, tmp_path):
    image = np.random.default_rng(1).integers(0, 255, size=(13, 20), dtype=np.uint8)  # context is 20 px
    cv2.imwrite(str(tmp_path / "tiny.png"), image)
    out = tmp_path / "out"
    assert main(["--stage", "predict", "--run-dir", str(smoke_run["run_dir"]), "--input", str(tmp_path / "tiny.png"),
                 "--output", str(out)]) == 0
    assert tifffile.imread(out / "tiny_prob.tif").shape == (13, 20)
    assert cv2.imread(str(out / "tiny_overlay.png")).shape == (13, 20, 3)


@pytest.mark.parametrize("method", ["components", "watershed"])
def test_predict_writes_the_cells_as_labels_measurements_and_outlines(smoke_run, tmp_path, method):
    image = synthetic_em_image(120, 7)[0]
    tifffile.imwrite(tmp_path / "em.tif", image)
    out = tmp_path / "out"
    assert main(["--stage", "predict", "--run-dir", str(smoke_run["run_dir"]), "--input", str(tmp_path / "em.tif"),
                 "--output", str(out), "--set", f"predict.instances={method}"]) == 0
    probability = tifffile.imread(out / "em_prob.tif")
    labels = tifffile.imread(out / "em_labels.tif")
    assert labels.dtype == np.uint16 and labels.shape == image.shape
    # The instances of the probability written beside them, with the default min_size (16 px).
    np.testing.assert_array_equal(labels, cell_instances(probability, 0.5, method, 16))
    assert labels.max() >= 2 and not labels[tifffile.imread(out / "em_mask.tif") == 0].any()
    header, *rows = read_csv(out / "em_instances.csv")
    assert tuple(header) == COLUMNS
    np.testing.assert_allclose(np.array(rows, float), measure(labels, probability), atol=5e-4)
    # Outlines only, each in its cell's colour; the rest of the picture stays grey.
    picture = cv2.imread(str(out / "em_overlay.png"))
    coloured = picture[(picture != picture[..., :1]).any(axis=-1)]
    colours = np.unique(coloured, axis=0)
    assert len(colours) >= 2 and set(map(tuple, colours)) <= set(map(tuple, OUTLINE_COLOURS))
    assert len(coloured) < 0.5 * image.size


def test_predict_a_stack_labels_and_measures_it_slice_by_slice(smoke_run, tmp_path):
    stack = synthetic_em_stack(3, 100, 4)[0]
    tifffile.imwrite(tmp_path / "em.tif", stack, photometric="minisblack")
    out = tmp_path / "out"
    assert main(["--stage", "predict", "--run-dir", str(smoke_run["run_dir"]), "--input", str(tmp_path / "em.tif"),
                 "--output", str(out)]) == 0
    labels = tifffile.imread(out / "em_labels.tif")
    assert labels.dtype == np.uint16 and labels.shape == stack.shape
    header, *rows = read_csv(out / "em_instances.csv")
    assert tuple(header) == ("slice", *COLUMNS)
    for index, slice_labels in enumerate(labels):
        assert slice_labels.max() >= 2  # numbered per slice, from 1
        assert [int(row[1]) for row in rows if row[0] == str(index)] == list(range(1, slice_labels.max() + 1))
    assert len(rows) == sum(int(slice_labels.max()) for slice_labels in labels)


def test_predict_a_folder_with_a_stack_and_refuse_to_overwrite(smoke_run, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    stack = np.random.default_rng(2).integers(0, 65535, (3, 40, 50), dtype=np.uint16)
    tifffile.imwrite(folder / "stack.tif", stack, photometric="minisblack")
    tifffile.imwrite(folder / "single.tif", np.random.default_rng(3).uniform(size=(30, 30)).astype(np.float32))
    out = tmp_path / "out"
    args = ["--stage", "predict", "--run-dir", str(smoke_run["run_dir"]), "--input", str(folder), "--output", str(out)]
    assert main(args) == 0
    assert tifffile.imread(out / "stack_prob.tif").shape == (3, 40, 50)
    assert tifffile.imread(out / "single_mask.tif").shape == (30, 30)
    assert tifffile.imread(out / "stack_labels.tif").shape == (3, 40, 50)
    assert tifffile.imread(out / "single_labels.tif").shape == (30, 30)
    assert len(list(out.glob("stack_overlay_*.png"))) == 3
    before = (out / "stack_prob.tif").read_bytes()
    assert main(args) == 2
    assert "single_prob.tif: already exists" in capsys.readouterr().err
    assert (out / "stack_prob.tif").read_bytes() == before
    assert main(args + ["--overwrite"]) == 0


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_tiff_gets_a_one_line_error(smoke_run, tmp_path, capsys, damage):
    path = tmp_path / "broken.tif"
    if damage == "garbage":
        path.write_bytes(b"II*\x00" + b"\x07" * 100)
    else:
        tifffile.imwrite(path, np.zeros((64, 64), np.uint8))
        path.write_bytes(path.read_bytes()[:2000])
    args = ["--stage", "predict", "--run-dir", str(smoke_run["run_dir"]), "--input", str(path),
            "--output", str(tmp_path / "out")]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: {path}: corrupt or unreadable TIFF") and error.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_every_tiff_output_keeps_the_inputs_pixel_size(smoke_run, tmp_path):
    image = tmp_path / "calibrated.tif"
    tifffile.imwrite(image, np.random.default_rng(6).integers(0, 255, (2, 40, 50), np.uint8), imagej=True,
                     resolution=(1 / 0.2, 1 / 0.2), metadata={"unit": "um", "spacing": 0.5, "axes": "ZYX"})
    out = tmp_path / "out"
    assert main(["--stage", "predict", "--run-dir", str(smoke_run["run_dir"]), "--input", str(image),
                 "--output", str(out)]) == 0
    for kind in ("prob", "mask", "labels"):
        calibration = read_calibration(out / f"calibrated_{kind}.tif")
        assert calibration.unit == "um" and calibration.x == pytest.approx(0.2), kind
        assert tifffile.imread(out / f"calibrated_{kind}.tif").shape == (2, 40, 50)


def test_inputs_are_a_file_a_folder_a_glob_pattern_or_a_list_file(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
    for path in ("a/x.tif", "a/y.png", "b/z.tif", "b/notes.md"):
        (tmp_path / path).write_bytes(b"")  # only names count here
    assert input_files(tmp_path / "a" / "x.tif") == [tmp_path / "a/x.tif"]
    assert input_files(tmp_path / "a") == [tmp_path / "a/x.tif", tmp_path / "a/y.png"]
    assert input_files(tmp_path / "**" / "*") == [tmp_path / "a/x.tif", tmp_path / "a/y.png", tmp_path / "b/z.tif"]
    listing = tmp_path / "b" / "inputs.txt"
    listing.write_text(f"# relative to this file\nz.tif\n\n  ../a  \n{tmp_path / 'a/x.tif'}\n")
    with pytest.raises(PipelineError, match="two images named x"):  # the folder a holds x.tif too
        input_files(listing)
    listing.write_text("z.tif\n../a/y.png\n")
    assert input_files(listing) == [tmp_path / "b/z.tif", tmp_path / "b/../a/y.png"]


@pytest.mark.parametrize("input_path, problem", [
    ("none/*.tif", "matches no .tif/.tiff/.png images"),
    ("empty.txt", "lists no inputs"),
    ("missing.txt", "no such file or folder"),
    ("listed.txt", "gone.tif: no such file or folder"),
])
def test_inputs_that_name_no_images_are_refused(tmp_path, input_path, problem):
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    (tmp_path / "listed.txt").write_text("gone.tif\n")
    with pytest.raises(PipelineError, match=problem):
        input_files(tmp_path / input_path)


def test_a_large_inputs_existing_outputs_are_refused_before_anything_is_written(tmp_path):
    config = preset("smoke")
    config.predict.max_whole_pixels = 1000  # 40 x 50 is large
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    out.mkdir()
    tifffile.imwrite(folder / "a_small.tif", np.zeros((20, 20), np.uint8))
    tifffile.imwrite(folder / "big.tif", np.zeros((40, 50), np.uint8), tile=(16, 16))
    (out / "big_labels.tif").write_bytes(b"earlier")
    with pytest.raises(PipelineError, match="big_labels.tif: already exists"):
        predict.run(config, RunDir(tmp_path / "run"), folder, out)  # refused before the model is needed
    assert [path.name for path in out.iterdir()] == ["big_labels.tif"]


def test_a_large_input_that_cannot_be_chunked_refuses_the_command_before_anything_is_written(smoke_run, tmp_path,
                                                                                          capsys):
    """A folder of a good small image and a large one with predict.instances=watershed, which
    chunked labelling cannot follow: one line, no output, the run's configuration untouched."""
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    tifffile.imwrite(folder / "a_small.tif", synthetic_em_image(30, 1)[0])  # first in the folder, not large
    tifffile.imwrite(folder / "big.tif", np.zeros((40, 50), np.uint8), tile=(16, 16))
    saved = {path: path.read_bytes() for path in smoke_run["run_dir"].glob("config*.yaml")}
    args = ["--stage", "predict", "--run-dir", str(smoke_run["run_dir"]), "--input", str(folder), "--output",
            str(out), "--set", "predict.instances=watershed", "--set", "predict.max_whole_pixels=1000"]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: {folder / 'big.tif'}: predict.instances=watershed cannot label") \
        and error.count("\n") == 1
    assert not out.exists()
    assert {path: path.read_bytes() for path in smoke_run["run_dir"].glob("config*.yaml")} == saved
