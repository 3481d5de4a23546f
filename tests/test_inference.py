"""The segmentation function's input layouts, as the Segmenter and the SavedModel trace it."""

import dataclasses

import cv2
import keras
import numpy as np
import pytest
import tensorflow as tf

from pipeline.config.resolve import preset
from pipeline.inference.labelling.graph import connected_components
from pipeline.inference.segmenter import load_model, segmentation_function
from pipeline.training.model import unet

LAYOUTS = "image must be [H, W], [B, H, W], [H, W, 1] or [B, H, W, 1] (or a grey image stored as colour"
RULE = "reads a colour image (3 channels, or 4 with alpha) as grey only when its R, G and B channels are identical"


def traced(input_channels: int = 1):
    """segmentation_function around a small untrained model, traced for any shape as `Segmenter` does."""
    config = preset("smoke")
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, input_channels=input_channels))
    segment = segmentation_function(unet(config.model), config)
    return tf.function(segment, input_signature=[tf.TensorSpec(None, tf.float32)])


@pytest.fixture(scope="module")
def segment():
    return traced()


def image(height: int = 30, width: int = 41, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width)).astype(np.float32)


def test_grey_stored_as_colour_is_one_grey_image(segment):
    grey = image()
    expected = segment(tf.constant(grey))
    alpha = np.full_like(grey, 255)
    for array in (np.stack([grey] * 3, -1), np.stack([grey] * 3 + [alpha], -1)):
        result = segment(tf.constant(array))
        assert result["mask"].shape == grey.shape
        np.testing.assert_array_equal(result["probabilities"].numpy(), expected["probabilities"].numpy())


def test_a_batch_of_grey_stored_as_colour_is_a_batch_of_grey_images(segment):
    batch = np.stack([image(seed=1), image(seed=2)])
    expected = segment(tf.constant(batch))["probabilities"].numpy()
    result = segment(tf.constant(np.stack([batch] * 3, -1)))["probabilities"].numpy()
    assert result.shape == (2, 30, 41, 2)
    np.testing.assert_array_equal(result, expected)


def test_a_batch_of_images_of_other_widths_stays_a_batch(segment):
    assert segment(tf.constant(np.stack([image(20, 5, seed) for seed in (1, 2, 3)])))["mask"].shape == (3, 20, 5)


@pytest.mark.parametrize("channel", [1, 2, 3])
def test_real_colour_is_refused_with_the_rule(segment, channel):
    rgba = np.stack([image()] * 3 + [np.full((30, 41), 255, np.float32)], -1)
    rgba[5, 7, channel] += 1  # a G or B that differs, or an alpha that is not constant
    with pytest.raises(tf.errors.InvalidArgumentError) as caught:
        segment(tf.constant(rgba if channel == 3 else rgba[..., :3]))
    assert RULE in caught.value.message


@pytest.mark.parametrize("shape", [(), (7,), (0, 5), (4, 0, 3), (2, 0, 6, 1), (1, 1, 20, 20, 1)])
def test_other_layouts_and_empty_images_are_refused_with_the_layouts(segment, shape):
    with pytest.raises(tf.errors.InvalidArgumentError) as caught:
        segment(tf.zeros(shape))
    assert LAYOUTS in caught.value.message


def test_a_multichannel_model_takes_its_channels_and_nothing_else():
    segment = traced(input_channels=3)
    colour = np.stack([image(seed=s) for s in range(3)], -1)
    assert segment(tf.constant(colour))["mask"].shape == (30, 41)
    assert segment(tf.constant(colour[None]))["mask"].shape == (1, 30, 41)
    for array in (colour[..., 0], colour[..., :2], np.zeros((0, 41, 3), np.float32)):
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"image must be \[H, W, 3\] or \[B, H, W, 3\]"):
            segment(tf.constant(array))


@pytest.mark.parametrize("seed,fill", [(0, 0.5), (1, 0.62), (2, 0.3), (3, 0.9)])
def test_connected_components_number_cells_as_opencv_does(seed, fill):
    cells = np.random.default_rng(seed).random((61, 47)) < fill
    count, expected = cv2.connectedComponents(cells.astype(np.uint8), connectivity=4)
    labels = tf.function(connected_components)(tf.constant(cells)).numpy()
    np.testing.assert_array_equal(labels, expected)
    assert labels.max() == count - 1


def test_connected_components_follow_a_long_winding_cell():
    # A one-pixel-wide serpentine: its far end is thousands of steps from its first pixel.
    cells = np.zeros((40, 41), bool)
    cells[::2] = True
    cells[1::4, -1] = cells[3::4, 0] = True
    labels = connected_components(tf.constant(cells)).numpy()
    assert set(np.unique(labels)) == {0, 1} and (labels[cells] == 1).all()
    assert connected_components(tf.zeros((5, 7), tf.bool)).numpy().max() == 0


@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1e-3, 1e3, 1e18, 1e20, 1e30])
def test_an_image_of_any_magnitude_gives_the_mask_of_its_unit_version(segment, scale):
    unit = image() / np.float32(255)
    expected = segment(tf.constant(unit))
    result = segment(tf.constant((unit.astype(np.float64) * scale).astype(np.float32)))
    probability = expected["probabilities"].numpy()[..., 1]
    np.testing.assert_allclose(result["probabilities"].numpy(), expected["probabilities"].numpy(), atol=1e-5)
    certain = np.abs(probability - 0.5) > 1e-5
    np.testing.assert_array_equal(result["mask"].numpy()[certain], expected["mask"].numpy()[certain])
    # An untrained network may call every pixel a cell at 0.5: at the median the mask is half cells.
    median = np.median(probability)
    certain = np.abs(probability - median) > 1e-5
    np.testing.assert_array_equal((result["probabilities"].numpy()[..., 1] > median)[certain], (probability > median)[certain])


def test_an_offset_image_gives_the_mask_of_its_unit_version_up_to_its_rounding(segment):
    unit = image() / np.float32(255)
    expected = segment(tf.constant(unit))
    result = segment(tf.constant(unit + np.float32(1000)))  # pixels rounded to 6e-5, 2e-4 of the deviation
    probability = expected["probabilities"].numpy()[..., 1]
    np.testing.assert_allclose(result["probabilities"].numpy(), expected["probabilities"].numpy(), atol=1e-3)
    certain = np.abs(probability - 0.5) > 1e-3
    np.testing.assert_array_equal(result["mask"].numpy()[certain], expected["mask"].numpy()[certain])


def test_load_model_reads_any_model_file_without_a_run_directory(tmp_path):
    """Which file is the stages' business (`RunDir.trained_model`); inference loads the path it is given."""
    keras.utils.set_random_seed(0)
    model = unet(preset("smoke").model)
    model.save(tmp_path / "anywhere.keras")
    loaded = load_model(tmp_path / "anywhere.keras")
    assert not loaded.compiled
    for ours, theirs in zip(model.get_weights(), loaded.get_weights(), strict=True):
        np.testing.assert_array_equal(ours, theirs)
