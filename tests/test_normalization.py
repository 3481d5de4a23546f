"""Normalisation: the same normalised image whatever the image's magnitude, zeros for a constant image."""

import keras
import numpy as np
import pytest
import tensorflow as tf
import tifffile

from pipeline.cli import main
from pipeline.config.resolve import preset
from pipeline.files.rundir import RunDir
from pipeline.normalization import normalize, notice_constant, standardize
from pipeline.training.model import unet

# From far below to far above what per_image_standardization's float32 moments and its
# 1 / sqrt(N) floor on the deviation survive.
SCALES = [1e-30, 1e-20, 1e-3, 1.0, 1e3, 1e18, 1e20, 1e30]


def unit_image(height: int = 37, width: int = 29, seed: int = 0) -> np.ndarray:
    """A float32 image in [0, 1] with structure and noise."""
    rows, cols = np.mgrid[:height, :width]
    smooth = 0.5 + 0.3 * np.sin(rows / 5.0) * np.cos(cols / 7.0)
    return np.clip(smooth + np.random.default_rng(seed).normal(0, 0.1, (height, width)), 0, 1).astype(np.float32)


def exact(image: np.ndarray) -> np.ndarray:
    """The image's standardisation in float64, from its values as they are."""
    values = image.astype(np.float64)
    return (values - values.mean()) / values.std()


@pytest.mark.parametrize("scale", SCALES)
def test_a_scaled_image_normalises_as_its_unit_version(scale):
    unit = unit_image()
    scaled = (unit.astype(np.float64) * scale).astype(np.float32)
    normalised = normalize(scaled[..., None]).numpy()[..., 0]
    assert normalised.dtype == np.float32
    np.testing.assert_allclose(normalised, exact(scaled), atol=1e-6)
    # Scaling rounds each pixel to float32 (a relative 6e-8): nothing more may differ.
    np.testing.assert_allclose(normalised, normalize(unit[..., None]).numpy()[..., 0], atol=1e-6)


def test_ordinary_images_normalise_as_before_up_to_rounding():
    # What training saw until now: per_image_standardization, whose floor an ordinary image is far above.
    images = np.stack([np.round(unit_image(seed=seed) * 255).astype(np.uint8) for seed in range(3)])[..., None]
    np.testing.assert_allclose(normalize(images).numpy(), tf.image.per_image_standardization(images).numpy(), atol=1e-5)


@pytest.mark.parametrize("offset", [1000.0, -1e6])
def test_an_offset_image_normalises_as_its_unit_version(offset):
    unit = unit_image()
    shifted = (unit + np.float32(offset)).astype(np.float32)
    normalised = normalize(shifted[..., None]).numpy()[..., 0]
    np.testing.assert_allclose(normalised, exact(shifted), atol=1e-6)
    # Up to the rounding of the shifted pixels to float32 (half a spacing at the offset).
    rounding = float(np.spacing(np.float32(abs(offset) + 1))) / 2 / unit.std()
    np.testing.assert_allclose(normalised, normalize(unit[..., None]).numpy()[..., 0], atol=2 * rounding)


def test_each_image_of_a_batch_is_normalised_alone_whatever_its_type():
    unit = unit_image()
    batch = np.stack([unit * np.float32(scale) for scale in (1e-30, 1.0, 1e30)])[..., None]
    normalised = normalize(batch).numpy()
    for one in normalised:
        np.testing.assert_allclose(one, normalised[1], atol=1e-6)
    grey = np.round(unit * 65535).astype(np.uint16)
    np.testing.assert_allclose(normalize(grey[..., None]).numpy()[..., 0], exact(grey), atol=1e-6)
    huge = unit.astype(np.float64) * 1e300  # float64 squares of these overflow without the division by the peak
    np.testing.assert_allclose(normalize(huge[..., None]).numpy()[..., 0], exact(unit), atol=1e-6)


@pytest.mark.parametrize("value", [0.0, 0.1, 7.0, -3e30, 1e-30])
def test_a_constant_image_normalises_to_zeros(value):
    constant = np.full((2, 37, 29, 1), value, np.float32)  # 37 x 29 values: 0.1's mean rounds
    assert not normalize(constant).numpy().any()
    assert not standardize(constant, float(np.float32(value)), 0.0).any()
    assert standardize(constant, 0.0, 1.0).dtype == np.float32


def test_standardize_is_normalize_with_the_image_s_own_moments():
    scaled = unit_image() * np.float32(1e20)
    values = scaled.astype(np.float64)
    expected = normalize(scaled[..., None]).numpy()[..., 0]
    np.testing.assert_allclose(standardize(scaled, values.mean(), values.std()), expected, atol=1e-6)


def test_the_notice_names_each_constant_image_of_a_stack(capsys):
    stack = np.stack([unit_image(), np.full((37, 29), 7, np.float32), np.zeros((37, 29), np.float32)])[..., None]
    notice_constant(stack, "in.tif")
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(": constant")[0] for line in lines] == ["notice: in.tif slice 1", "notice: in.tif slice 2"]
    assert "(every pixel 7)" in lines[0] and "(every pixel 0)" in lines[1]
    notice_constant(stack[1:2], "one.tif")
    assert capsys.readouterr().err.startswith("notice: one.tif: constant image (every pixel 7): normalised to zeros")
    notice_constant(stack[:1], "structured.tif")
    assert capsys.readouterr().err == ""


def test_predict_segments_a_constant_image_as_a_blank_one_with_a_notice(tmp_path, capsys):
    config = preset("smoke")
    run_dir = tmp_path / "run"
    keras.utils.set_random_seed(0)
    best = RunDir(run_dir).best_model
    best.parent.mkdir(parents=True)
    unet(config.model).save(best)
    for name, value in (("blank", 0.0), ("seven", 7.0), ("huge", -3e30)):
        tifffile.imwrite(tmp_path / f"{name}.tif", np.full((30, 41), value, np.float32))
    out = tmp_path / "out"
    for name in ("blank", "seven", "huge"):
        assert main(["--stage", "predict", "--preset", "smoke", "--run-dir", str(run_dir),
                     "--input", str(tmp_path / f"{name}.tif"), "--output", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"notice: {tmp_path / 'seven.tif'}: constant image (every pixel 7): normalised to zeros" in err
    assert f"notice: {tmp_path / 'huge.tif'}: constant image (every pixel -3e+30)" in err
    assert "blank.tif: constant image (every pixel 0)" in err
    blank = tifffile.imread(out / "blank_prob.tif")
    assert np.isfinite(blank).all()
    for name in ("seven", "huge"):
        np.testing.assert_array_equal(tifffile.imread(out / f"{name}_prob.tif"), blank)
        np.testing.assert_array_equal(tifffile.imread(out / f"{name}_mask.tif"),
                                      tifffile.imread(out / "blank_mask.tif"))


def test_an_image_with_nan_stays_nan_for_the_checks_after_normalisation():
    """NaN must never be normalised into a plausible image (the zoo package's test tile and
    training data are checked for finite values after it)."""
    image = np.random.default_rng(0).uniform(size=(8, 9, 1)).astype(np.float32)
    image[3, 4] = np.nan
    assert np.isnan(normalize(tf.constant(image)).numpy()).all()
    assert np.isnan(normalize(tf.constant(np.full((8, 9, 1), np.nan, np.float32))).numpy()).all()
