"""Reading images by the axes their files declare, and writing files that appear whole or not at all."""

import errno
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from pipeline.errors import PipelineError
from pipeline.files import io

AS_ROOT = pytest.mark.skipif(
    os.geteuid() == 0, reason="root ignores file permissions, so a read-only folder cannot be made"
)


def grey(height: int = 24, width: int = 30, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width), dtype=np.uint8)


def colour(height: int = 24, width: int = 30, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def refusal(call, *args) -> str:
    """The one-line message of the PipelineError that `call(*args)` raises."""
    with pytest.raises(PipelineError) as caught:
        call(*args)
    assert "\n" not in str(caught.value)
    return str(caught.value)


def listing(folder: Path) -> list[str]:
    """Every entry under `folder`, hidden temporaries included."""
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


# --- file modes -------------------------------------------------------------------------------

def write_npz(path: Path) -> None:
    with io.atomic_path(path) as temporary:
        io.encode_npz(temporary, {"a": grey()})


WRITERS = {
    "text": lambda path: io.atomic_write_text(path, "text\n"),
    "tiff": lambda path: io.write_tiff(path, grey()),
    "png": lambda path: io.write_png(path, grey()),
    "npz": write_npz,
}


@pytest.mark.parametrize("umask", [0o022, 0o027])
@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_written_files_get_the_mode_open_would_give_them(tmp_path, umask, writer):
    target = tmp_path / f"out.{writer}"
    previous = os.umask(umask)
    try:
        WRITERS[writer](target)
        with open(tmp_path / "plain", "w"):
            pass
    finally:
        os.umask(previous)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask == stat.S_IMODE((tmp_path / "plain").stat().st_mode)


def test_a_replaced_file_keeps_its_mode(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    target.chmod(0o640)
    io.atomic_write_text(target, "new")
    assert target.read_text() == "new" and stat.S_IMODE(target.stat().st_mode) == 0o640


# --- all-or-nothing groups and one-line errors --------------------------------------------------


def test_a_group_appears_only_when_its_block_succeeds(tmp_path):
    targets = [tmp_path / "out" / "a.tif", tmp_path / "out" / "b.png"]
    with pytest.raises(RuntimeError, match="stopped"):
        with io.atomic_paths(targets) as (first, second):
            io.encode_tiff(first, grey())
            raise RuntimeError("stopped")
    assert listing(tmp_path) == []  # no target, no temporary, not even the folder the group made
    with io.atomic_paths(targets) as (first, second):
        io.encode_tiff(first, grey())
        io.encode_png(second, grey())
        assert listing(tmp_path / "out") == sorted(p.name for p in (first, second))
    assert listing(tmp_path / "out") == ["a.tif", "b.png"]
    np.testing.assert_array_equal(tifffile.imread(targets[0]), grey())
    np.testing.assert_array_equal(cv2.imread(str(targets[1]), cv2.IMREAD_UNCHANGED), grey())


def test_a_failed_rename_takes_back_the_targets_the_group_added(tmp_path):
    targets = [tmp_path / "a.txt", tmp_path / "b.txt"]
    with pytest.raises(PipelineError) as caught:
        with io.atomic_paths(targets) as temporaries:
            for temporary in temporaries:
                temporary.write_text("x")
            targets[1].mkdir()  # appears while the group writes: the second rename fails
    assert str(caught.value) == f"{targets[1]}: cannot write (Is a directory)"
    assert listing(tmp_path) == ["b.txt"]


def test_a_full_disk_leaves_nothing_of_the_group(tmp_path):
    # A real write failure: the child may write no file beyond 64 kB (Python ignores
    # SIGXFSZ, so the write fails with EFBIG, as on a full disk).
    script = textwrap.dedent(f"""
        import resource
        from pathlib import Path
        import numpy as np
        from pipeline.errors import PipelineError
        from pipeline.files import io
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
        targets = [Path({str(tmp_path / "out" / "small.tif")!r}), Path({str(tmp_path / "out" / "large.tif")!r})]
        try:
            with io.atomic_paths(targets) as (small, large):
                io.encode_tiff(small, np.zeros((10, 10), np.uint8))
                io.encode_tiff(large, np.zeros((1000, 1000), np.uint8))
        except PipelineError as error:
            print(error)
    """)
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr
    assert child.stdout == f"{tmp_path / 'out' / 'large.tif'}: cannot write (File too large)\n"
    assert listing(tmp_path) == []


def writer_inside(target: Path) -> subprocess.Popen:
    """A process that has written part of `target` inside `atomic_path` and waits there."""
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from pipeline.files import io
        with io.atomic_path(Path({str(target)!r})) as temporary:
            temporary.write_bytes(b"half of a prepared split")
            print("inside", flush=True)
            time.sleep(300)
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "inside\n"
    return process


def test_a_killed_writers_temporary_is_removed_by_the_next_write_into_its_folder(tmp_path):
    killed, alive = writer_inside(tmp_path / "train.npz"), writer_inside(tmp_path / "val.npz")
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        # Another machine's, on a shared disk: its process cannot be asked about.
        elsewhere = f".test.tmp-elsewhere-{killed.pid}-{'0' * 12}.npz"
        (tmp_path / elsewhere).write_bytes(b"")
        assert len([name for name in listing(tmp_path) if name.startswith(".train.")]) == 1  # the killed one's
        io.atomic_write_text(tmp_path / "config.yaml", "next: write\n")
        assert not [name for name in listing(tmp_path) if name.startswith(".train.")]  # removed
        [being_written] = [name for name in listing(tmp_path) if name.startswith(".val.")]
        assert f"-{alive.pid}-" in being_written  # left alone: its writer runs
        assert listing(tmp_path) == sorted([being_written, elsewhere, "config.yaml"])
    finally:
        alive.kill()
        alive.wait()


def test_a_writer_error_that_names_no_file_names_the_group(tmp_path):
    targets = [tmp_path / "a.npz", tmp_path / "b.npz", tmp_path / "c.json"]
    with pytest.raises(PipelineError) as caught:
        with io.atomic_paths(targets):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as np.savez's writes raise it
    assert str(caught.value) == (
        f"{targets[0]} or one of the 2 files written with it: cannot write (No space left on device)"
    )
    assert listing(tmp_path) == []


def test_a_file_in_the_path_is_refused_with_one_line(tmp_path):
    (tmp_path / "taken").write_text("a file")
    for target in (tmp_path / "taken" / "x.txt", tmp_path / "taken" / "sub" / "x.txt"):
        message = refusal(io.atomic_write_text, target, "x")
        assert message == f"{target}: cannot write ({tmp_path / 'taken'} is not a folder)"
    assert listing(tmp_path) == ["taken"] and (tmp_path / "taken").read_text() == "a file"


def test_a_folder_as_target_is_refused_before_anything_is_renamed(tmp_path):
    (tmp_path / "b.txt").mkdir()
    targets = [tmp_path / "a.txt", tmp_path / "b.txt"]
    with pytest.raises(PipelineError) as caught:
        with io.atomic_paths(targets, overwrite=True):
            pass
    assert str(caught.value) == f"{targets[1]}: cannot write (Is a directory)"
    assert listing(tmp_path) == ["b.txt"]


@AS_ROOT
def test_a_read_only_folder_is_refused_with_the_reason(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    assert refusal(io.write_tiff, locked / "x.tif", grey()) == f"{locked / 'x.tif'}: cannot write (Permission denied)"
    assert listing(locked) == []


# --- preflight checks --------------------------------------------------------------------------


def test_a_file_given_as_output_folder_is_refused(tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("")
    assert refusal(io.check_output_folder, taken) == f"{taken}: is a file, not a folder"
    assert refusal(io.check_output_folder, taken / "sub") == f"{taken / 'sub'}: {taken} is not a folder"
    assert refusal(io.check_output_file, taken / "r.json") == f"{taken / 'r.json'}: {taken} is not a folder"


def test_a_folder_given_as_output_file_is_refused(tmp_path):
    assert refusal(io.check_output_file, tmp_path) == f"{tmp_path}: is a folder, not a file"


def test_usable_outputs_pass_and_nothing_is_created(tmp_path):
    io.check_output_folder(tmp_path / "new" / "sub")
    io.check_output_folder(tmp_path)
    io.check_output_file(tmp_path / "new" / "report.json")
    io.check_free_space(tmp_path / "new", 1)
    assert listing(tmp_path) == []


@AS_ROOT
def test_a_read_only_output_folder_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    reason = f"cannot create files in {locked} (Permission denied)"
    for path in (locked, locked / "new" / "sub"):
        assert refusal(io.check_output_folder, path) == f"{path}: {reason}"
    assert refusal(io.check_output_file, locked / "r.json") == f"{locked / 'r.json'}: {reason}"
    assert listing(locked) == []


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_a_folder_that_takes_no_files_is_refused_even_where_os_access_says_yes():
    # /proc refuses new files even to root, for whom os.access(W_OK) is true.
    assert refusal(io.check_output_folder, Path("/proc/out")).startswith("/proc/out: cannot create files in /proc (")


def test_too_little_free_space_is_refused_with_both_sizes(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    message = refusal(io.check_free_space, tmp_path / "new", free * 2 + 10**9)
    size = "[0-9.]+ [kMGT]?B"
    assert re.fullmatch(f"{re.escape(str(tmp_path / 'new'))}: needs {size} but only {size} are free", message)


# --- colour axes from the file ------------------------------------------------------------------


def test_an_rgb_tiff_is_one_colour_image_not_a_stack(tmp_path):
    image = colour()
    tifffile.imwrite(tmp_path / "rgb.tif", image, photometric="rgb")
    np.testing.assert_array_equal(io.read_stack(tmp_path / "rgb.tif", 3), image[None])
    assert refusal(io.read_stack, tmp_path / "rgb.tif", 1) == (
        f"{tmp_path / 'rgb.tif'}: colour image (3 channels) but the model takes 1 channel; "
        "convert it to grey or train with model.input_channels=3"
    )


def test_planar_rgb_and_imagej_channels_become_the_last_axis(tmp_path):
    image = colour()
    tifffile.imwrite(tmp_path / "planar.tif", np.moveaxis(image, -1, 0), photometric="rgb", planarconfig="separate")
    np.testing.assert_array_equal(io.read_stack(tmp_path / "planar.tif", 3), image[None])
    hyperstack = np.stack([np.moveaxis(colour(seed=s), -1, 0) for s in (1, 2)])  # Z, C, Y, X
    tifffile.imwrite(tmp_path / "zcyx.tif", hyperstack, imagej=True, metadata={"axes": "ZCYX"})
    np.testing.assert_array_equal(io.read_stack(tmp_path / "zcyx.tif", 3), np.moveaxis(hyperstack, 1, -1))


def test_grey_stored_as_colour_is_read_as_grey_with_a_notice(tmp_path, capsys):
    image = grey()
    tifffile.imwrite(tmp_path / "g.tif", np.stack([image] * 3, -1), photometric="rgb")
    rgba = np.stack([image] * 3 + [np.full_like(image, 255)], -1)
    cv2.imwrite(str(tmp_path / "g.png"), cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
    for path in (tmp_path / "g.tif", tmp_path / "g.png"):
        np.testing.assert_array_equal(io.read_stack(path, 1), image[None, ..., None])
        notice = f"notice: {path}: colour image with identical R, G and B channels read as grey\n"
        assert capsys.readouterr().err == notice


def test_colour_with_a_varying_alpha_is_refused_for_a_grey_model(tmp_path):
    image = grey()
    rgba = np.stack([image] * 3 + [grey(seed=1)], -1)
    cv2.imwrite(str(tmp_path / "a.png"), rgba)
    assert refusal(io.read_stack, tmp_path / "a.png", 1).startswith(
        f"{tmp_path / 'a.png'}: colour image (4 channels) but the model takes 1 channel;")


def test_png_colour_comes_in_rgb_order(tmp_path):
    image = colour()
    cv2.imwrite(str(tmp_path / "c.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    np.testing.assert_array_equal(io.read_stack(tmp_path / "c.png", 3), image[None])


def test_grey_images_and_stacks_keep_their_slices(tmp_path):
    stack = np.random.default_rng(0).integers(0, 65535, (3, 20, 25), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "stack.tif", stack, photometric="minisblack")
    np.testing.assert_array_equal(io.read_stack(tmp_path / "stack.tif"), stack[..., None])
    cv2.imwrite(str(tmp_path / "g.png"), grey())
    np.testing.assert_array_equal(io.read_stack(tmp_path / "g.png"), grey()[None, ..., None])
    message = refusal(io.read_stack, tmp_path / "g.png", 3)
    assert message == f"{tmp_path / 'g.png'}: grey image (1 channel) but the model takes 3 channels"


def test_two_stack_axes_are_refused_naming_the_axes(tmp_path):
    tifffile.imwrite(tmp_path / "tz.tif", np.zeros((2, 3, 20, 25), np.uint8), imagej=True, metadata={"axes": "TZYX"})
    assert refusal(io.read_stack, tmp_path / "tz.tif").startswith(
        f"{tmp_path / 'tz.tif'}: axes TZYX of shape (2, 3, 20, 25) are not one image or stack")


@pytest.mark.parametrize("axes", ["CYX", "ZYX", "TYX", "QYX"])
def test_files_of_one_value_per_pixel_take_any_leading_axis_as_slices(tmp_path, axes):
    stack = np.random.default_rng(0).uniform(size=(3, 20, 25)).astype(np.float32)
    path = tmp_path / "stack.tif"
    if axes == "QYX":  # plain pages
        tifffile.imwrite(path, stack, photometric="minisblack")
    else:
        tifffile.imwrite(path, stack, imagej=True, metadata={"axes": axes})
    with tifffile.TiffFile(path) as tiff:
        assert tiff.series[0].axes == axes
    np.testing.assert_array_equal(io.read_slices(path, "prediction"), stack)
    if axes == "CYX":  # a model reads ImageJ channels as channels
        np.testing.assert_array_equal(io.read_stack(path, 3), np.moveaxis(stack, 0, -1)[None])


def test_files_of_one_value_per_pixel_refuse_colour_and_two_slice_axes_in_their_terms(tmp_path, capsys):
    image = colour()
    tifffile.imwrite(tmp_path / "rgb.tif", image, photometric="rgb")
    assert refusal(io.read_slices, tmp_path / "rgb.tif", "ground truth") == (
        f"{tmp_path / 'rgb.tif'}: the ground truth file has 3 values per pixel (colour); expected one (a grey image "
        "or stack), or colour with identical R, G and B channels and a constant alpha")
    tifffile.imwrite(tmp_path / "g.tif", np.stack([grey()] * 3, -1), photometric="rgb")
    np.testing.assert_array_equal(io.read_slices(tmp_path / "g.tif", "prediction"), grey()[None])
    assert "read as grey" in capsys.readouterr().err
    tifffile.imwrite(tmp_path / "zc.tif", np.zeros((2, 3, 20, 25), np.uint8), imagej=True, metadata={"axes": "ZCYX"})
    assert refusal(io.read_slices, tmp_path / "zc.tif", "prediction") == (
        f"{tmp_path / 'zc.tif'}: axes ZCYX of shape (2, 3, 20, 25) are not one image or stack: expected Y and X, "
        "at most one slice axis (Z, C, T, ...) and one channel axis (S)")


def test_nan_and_infinite_pixels_are_refused(tmp_path):
    image = np.random.default_rng(0).uniform(size=(20, 25)).astype(np.float32)
    image[1, 2], image[3, 4], image[5, 6] = np.nan, np.inf, -np.inf
    tifffile.imwrite(tmp_path / "nan.tif", image)
    assert refusal(io.read_stack, tmp_path / "nan.tif") == (
        f"{tmp_path / 'nan.tif'}: 3 pixel values are NaN, infinite or beyond float32's range (3.4e38)")
    assert refusal(io.read_slices, tmp_path / "nan.tif", "prediction") == refusal(io.read_stack, tmp_path / "nan.tif")


def test_float64_pixels_beyond_float32_are_refused_not_made_infinite(tmp_path):
    image = np.random.default_rng(0).uniform(size=(20, 25))
    tifffile.imwrite(tmp_path / "in-range.tif", image * np.finfo(np.float32).max)
    assert io.read_stack(tmp_path / "in-range.tif").shape == (1, 20, 25, 1)
    image[1, 2], image[3, 4] = 1e39, -1e300
    tifffile.imwrite(tmp_path / "huge.tif", image)
    assert refusal(io.read_stack, tmp_path / "huge.tif") == (
        f"{tmp_path / 'huge.tif'}: 2 pixel values are NaN, infinite or beyond float32's range (3.4e38)")


# --- input folders -----------------------------------------------------------------------------


@pytest.mark.parametrize("names", [("x.tif", "x.png"), ("x.tif", "x.tiff"), ("x.TIF", "x.tif"),
                                   ("x.ome.zarr", "x.tif"), ("X.zarr", "x.png")])
def test_two_images_with_one_name_are_refused(tmp_path, names):
    for name in names:
        if name.endswith(".png"):
            cv2.imwrite(str(tmp_path / name), grey())
        elif name.endswith(".zarr"):
            (tmp_path / name).mkdir()  # only names count here
        else:
            tifffile.imwrite(tmp_path / name, grey())
    first, second = sorted(names)
    name = io.image_name(tmp_path / second)
    assert refusal(io.image_files, tmp_path) == (
        f"{tmp_path / second}: two images named {name} ({first} and {second}); "
        "their outputs would overwrite each other, so rename one"
    )


def test_a_folder_lists_its_images_and_ome_zarr_images_without_entering_them(tmp_path):
    ome = tmp_path / "b.ome.zarr"
    (ome / "0").mkdir(parents=True)
    tifffile.imwrite(ome / "0" / "inside.tif", grey())  # an OME-Zarr image's contents are not inputs
    (tmp_path / "c.zarr").mkdir()
    (tmp_path / "sub").mkdir()
    tifffile.imwrite(tmp_path / "sub" / "nested.tif", grey())  # nor are sub-folders'
    tifffile.imwrite(tmp_path / "a.tif", grey())
    (tmp_path / "notes.md").write_text("not an image")
    assert io.image_files(tmp_path) == [tmp_path / "a.tif", ome, tmp_path / "c.zarr"]
    assert io.image_files(ome) == [ome]  # named itself, an OME-Zarr image is one input
    assert [io.image_name(path) for path in io.image_files(tmp_path)] == ["a", "b", "c"]
    (tmp_path / "empty").mkdir()
    assert refusal(io.image_files, tmp_path / "empty").endswith("folder contains no .tif/.tiff/.png images or "
                                                              "OME-Zarr images")


# --- pixel size -------------------------------------------------------------------------------


def calibrated_copy(tmp_path: Path, source: Path, array: np.ndarray) -> Path:
    target = tmp_path / f"out_{array.dtype}.tif"
    with io.atomic_path(target) as temporary:
        io.encode_tiff(temporary, array, io.read_calibration(source))
    return target


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32, np.uint32])
def test_an_imagej_pixel_size_travels_to_every_output_type(tmp_path, dtype):
    source = tmp_path / "in.tif"
    tifffile.imwrite(source, np.zeros((3, 20, 30), np.uint16), imagej=True, resolution=(1 / 0.25, 1 / 0.5),
                     metadata={"unit": "um", "spacing": 2.0, "axes": "ZYX"})
    assert io.read_calibration(source) == io.Calibration(0.25, 0.5, "um", 2.0)
    copy = io.read_calibration(calibrated_copy(tmp_path, source, np.zeros((3, 20, 30), dtype)))
    assert (copy.x, copy.y) == pytest.approx((0.25, 0.5)) and copy.unit == "um"
    # ImageJ's format takes 8/16-bit and float32 (with the slice spacing); 32-bit labels get
    # TIFF's own resolution tags, in pixels per centimetre.
    assert copy.z == (None if dtype == np.uint32 else 2.0)


@pytest.mark.parametrize("unit,pixels_per_unit,micrometres", [("CENTIMETER", 10_000.0, 1.0), ("INCH", 50_800.0, 0.5)])
def test_tiff_resolution_tags_are_read_in_micrometres(tmp_path, unit, pixels_per_unit, micrometres):
    tifffile.imwrite(tmp_path / "a.tif", grey(), resolution=(pixels_per_unit, pixels_per_unit), resolutionunit=unit)
    calibration = io.read_calibration(tmp_path / "a.tif")
    assert calibration.unit == "um" and calibration.x == pytest.approx(micrometres)


def test_files_without_a_pixel_size_have_no_calibration(tmp_path):
    tifffile.imwrite(tmp_path / "plain.tif", grey())
    tifffile.imwrite(tmp_path / "screen.tif", grey(), resolution=(72, 72), resolutionunit="INCH")
    cv2.imwrite(str(tmp_path / "a.png"), grey())
    assert [io.read_calibration(tmp_path / name) for name in ("plain.tif", "screen.tif", "a.png")] == [None] * 3


def test_a_file_written_meanwhile_by_another_command_is_never_replaced(tmp_path):
    """The existence check comes before the work; a file another command writes during it
    (two predictions into one folder) must not be replaced by the rename at its end."""
    target, other = tmp_path / "a_mask.tif", tmp_path / "a_prob.tif"
    with pytest.raises(PipelineError, match="a_mask.tif: cannot write"):
        with io.atomic_paths([other, target]) as (first, second):
            first.write_text("ours")
            second.write_text("ours")
            target.write_text("the other command's")
    assert target.read_text() == "the other command's"
    assert not other.exists()  # the group appears whole or not at all
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_mask.tif"]
    with io.atomic_paths([target], overwrite=True) as (temporary,):
        temporary.write_text("asked to replace")
    assert target.read_text() == "asked to replace"
