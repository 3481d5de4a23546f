"""Stage `predict` through the CLI: inputs of any size, folders and stacks, refusals, one-line errors."""

import cv2
import numpy as np
import pytest
import tifffile

from pipeline.cli import main


def test_predict_mirrors_an_image_smaller_than_the_context(smoke_run, tmp_path):
    image = np.random.default_rng(1).integers(0, 255, size=(13, 20), dtype=np.uint8)  # context is 20 px
    cv2.imwrite(str(tmp_path / "tiny.png"), image)
    out = tmp_path / "out"
    assert main(["--stage", "predict", "--run-dir", str(smoke_run["run_dir"]), "--input", str(tmp_path / "tiny.png"),
                 "--output", str(out)]) == 0
    assert tifffile.imread(out / "tiny_prob.tif").shape == (13, 20)
    assert cv2.imread(str(out / "tiny_overlay.png")).shape == (13, 20, 3)


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
